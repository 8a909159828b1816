//! What is stored, and how sessions begin and end: only hashes and sealed tokens at rest, a new
//! session ID at every login (no fixation), Redis loss survived, unknown keys and timeouts ending
//! sessions cleanly.

use std::sync::Arc;

use chrono::{Duration, Utc};
use sha2::{Digest, Sha256};
use token_broker::clock::ManualClock;
use token_broker::crypto::{EncryptionKey, Sealed};
use token_broker::domain::SessionId;
use token_broker::store::{CacheLookup, Replacing};

use crate::helpers::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(value: &str) -> String {
    hex(&Sha256::digest(value.as_bytes()))
}

/// Every row of `sessions`, every column as text.
async fn session_rows_as_text(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT row_to_json(s)::text FROM sessions s")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn assert_absent(haystack: &str, secrets: &[(&str, &str)], place: &str) {
    for (name, secret) in secrets {
        assert!(
            !secret.is_empty(),
            "{name} is empty: the check would prove nothing"
        );
        assert!(
            !haystack.contains(secret),
            "{place} contains the {name} in plaintext"
        );
        // A bytea column shows as hex in row_to_json: plaintext bytes would appear that way.
        assert!(
            !haystack.contains(&hex(secret.as_bytes())),
            "{place} contains the {name} as hex bytes"
        );
    }
}

#[tokio::test]
async fn postgresql_holds_only_the_cookie_hash_and_tokens_sealed_under_the_configured_key() {
    // Arrange
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let cookie = browser.session().unwrap().clone();
    let record = app
        .broker
        .sessions
        .find(&SessionId::parse(&cookie).unwrap().hash())
        .await
        .unwrap()
        .unwrap();
    let id_token = record.id_token.secret().to_string();
    let refresh_token = record.refresh_token.as_ref().unwrap().secret().to_string();
    let access_token = record
        .access_token
        .as_ref()
        .unwrap()
        .token
        .secret()
        .to_string();
    let pool = app.database.pool().await;

    // Act
    let rows = session_rows_as_text(&pool).await;
    let (id, id_hash, key_id, id_token_sealed, refresh_sealed, access_sealed): (
        uuid::Uuid,
        Vec<u8>,
        String,
        Vec<u8>,
        Vec<u8>,
        Vec<u8>,
    ) = sqlx::query_as(
        "SELECT id, id_hash, key_id, id_token_sealed, refresh_token_sealed, access_token_sealed
         FROM sessions",
    )
    .fetch_one(&pool)
    .await
    .unwrap();

    // Assert
    assert_eq!(rows.len(), 1);
    assert_eq!(
        hex(&id_hash),
        sha256_hex(&cookie),
        "id_hash is SHA-256 of the cookie value"
    );
    assert_eq!(key_id, app.encryption_key.id());
    let secrets = [
        ("session cookie", cookie.as_str()),
        ("ID token", &id_token),
        ("refresh token", &refresh_token),
        ("access token", &access_token),
    ];
    assert_absent(&rows[0], &secrets, "the sessions row");
    // The sealed columns open with the configured key, bound to their row and column.
    let open = |bytes: Vec<u8>, column: &str| {
        let sealed = Sealed {
            key_id: key_id.clone(),
            bytes,
        };
        String::from_utf8(
            app.cipher()
                .open(&sealed, format!("sessions:{id}:{column}").as_bytes())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(open(id_token_sealed.clone(), "id_token"), id_token);
    assert_eq!(open(refresh_sealed, "refresh_token"), refresh_token);
    assert_eq!(open(access_sealed, "access_token"), access_token);
    let elsewhere = Sealed {
        key_id: key_id.clone(),
        bytes: id_token_sealed,
    };
    assert!(app
        .cipher()
        .open(
            &elsewhere,
            format!("sessions:{}:id_token", uuid::Uuid::new_v4()).as_bytes()
        )
        .is_err());
    pool.close().await;
}

#[tokio::test]
async fn redis_holds_no_cookie_state_nonce_or_token_in_plaintext() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, Some("/x")).await;
    let state = request.params["state"].clone();
    let nonce = request.params["nonce"].clone();
    let binding = browser.cookies["login-binding"].clone();

    // Act: the pending login, then the session's cache entries.
    let pending = app.redis.values().await;
    let callback = app.approve(&request, "alice").await;
    let code = query_param(&callback, "code").unwrap();
    app.callback(&mut browser, &callback).await;
    let cookie = browser.session().unwrap().clone();
    let after_login = app.redis.values().await;

    // Assert: the pending login is keyed by the state's hash and sealed.
    assert_eq!(pending.len(), 1);
    let (pending_key, pending_value) = &pending[0];
    assert_eq!(
        pending_key,
        &format!("{}login:{}", app.redis.prefix, sha256_hex(&state))
    );
    let opened = app
        .cipher()
        .open_string(pending_value, pending_key.as_bytes())
        .expect("sealed pending login");
    assert!(
        String::from_utf8(opened).unwrap().contains(&nonce),
        "the sealed value is the pending login"
    );

    // The access token is only in the sealed cache entry, which opens to a JWT.
    let cookie_hash = sha256_hex(&cookie);
    let at_key = format!("{}at:{{{cookie_hash}}}", app.redis.prefix);
    let (_, sealed_access_token) = after_login
        .iter()
        .find(|(k, _)| *k == at_key)
        .expect("access token cached");
    let access_token = open_cached_access_token(&app.cipher(), &at_key, sealed_access_token);
    let segments: Vec<&str> = access_token.split('.').collect();
    assert_eq!(segments.len(), 3, "a JWS compact serialization");
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            segments[0],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(header["alg"].is_string(), "{header}");
    assert!(after_login
        .iter()
        .any(|(k, _)| *k == format!("{}session:{{{cookie_hash}}}", app.redis.prefix)));

    let secrets = [
        ("session cookie", cookie.as_str()),
        ("binding cookie", binding.as_str()),
        ("state", state.as_str()),
        ("nonce", nonce.as_str()),
        ("authorization code", code.as_str()),
        ("access token", access_token.as_str()),
    ];
    for (key, value) in pending.iter().chain(&after_login) {
        assert_absent(
            &format!("{key} {}", String::from_utf8_lossy(value)),
            &secrets,
            &format!("Redis key {key}"),
        );
    }
}

#[tokio::test]
async fn a_planted_random_session_cookie_is_replaced_at_login_and_stays_worthless() {
    // Arrange: the attacker sets a well-formed session cookie in the victim's browser.
    let app = spawn_app().await;
    let planted = SessionId::generate().secret().to_string();
    let mut victim = Browser::default();
    victim.cookies.insert("session".into(), planted.clone());

    // Act
    let response = app.login_as(&mut victim, "alice").await;

    // Assert
    assert_eq!(response.status(), 302);
    let issued = victim.session().unwrap().clone();
    assert_ne!(issued, planted, "a new session ID at every login");
    assert_eq!(app.get_session(&victim).await.status(), 200);
    let mut attacker = Browser::default();
    attacker.cookies.insert("session".into(), planted);
    assert_problem(app.get_session(&attacker).await, 401).await;
    assert_eq!(app.session_rows().await, 1);
}

#[tokio::test]
async fn an_attackers_real_session_planted_in_a_victims_browser_is_ended_by_the_victims_login() {
    // Arrange: mallory logs in, then plants her own live session cookie in alice's browser.
    let app = spawn_app().await;
    let mallory = app.logged_in_browser("mallory").await;
    let mallory_cookie = mallory.session().unwrap().clone();
    let mut victim = Browser::default();
    victim
        .cookies
        .insert("session".into(), mallory_cookie.clone());
    assert_eq!(
        app.get_session(&victim).await.status(),
        200,
        "the planted session is live"
    );

    // Act: alice logs in from her browser.
    let response = app.login_as(&mut victim, "alice").await;

    // Assert: a new cookie for alice; mallory's planted session has been ended.
    assert_eq!(response.status(), 302);
    assert!(query_param(&location(&response), "login_error").is_none());
    let alice_cookie = victim.session().unwrap().clone();
    assert_ne!(alice_cookie, mallory_cookie);
    let body: serde_json::Value = app.get_session(&victim).await.json().await.unwrap();
    assert_eq!(body["user"]["sub"], "alice");
    assert_problem(app.get_session(&mallory).await, 401).await;
    assert_eq!(app.session_rows().await, 1, "only alice's session is left");
}

#[tokio::test]
async fn losing_the_redis_keys_keeps_live_sessions_and_expires_pending_logins_cleanly() {
    // Arrange: a live session, an ended one, and a login waiting for its callback.
    let app = spawn_app().await;
    let alive = app.logged_in_browser("alice").await;
    let mut ended = app.logged_in_browser("bob").await;
    let ended_cookie = ended.session().unwrap().clone();
    assert_eq!(
        app.post_logout(&mut ended, Some(FRONTEND), true)
            .await
            .status(),
        200
    );
    ended.cookies.insert("session".into(), ended_cookie);
    let mut pending = Browser::default();
    let request = app.start_login(&mut pending, Some("/pending")).await;
    let callback = app.approve(&request, "carol").await;

    // Act: every key of this test vanishes (a shared Redis is never flushed).
    delete_redis_keys(&app).await;
    assert!(app.redis.keys().await.is_empty());
    let session = app.get_session(&alive).await;
    let ended_session = app.get_session(&ended).await;
    let finished = app.callback(&mut pending, &callback).await;

    // Assert: the live session answers from PostgreSQL and is cached again.
    assert_eq!(session.status(), 200);
    let hash = sha256_hex(alive.session().unwrap());
    assert!(
        app.redis
            .keys()
            .await
            .contains(&format!("{}session:{{{hash}}}", app.redis.prefix)),
        "re-cached"
    );
    // The ended session does not come back with its tombstone gone.
    assert_problem(ended_session, 401).await;
    // The pending login is lost: a clean, retryable login_expired, and no session.
    assert_eq!(finished.status(), 302);
    assert_eq!(
        location(&finished),
        "http://localhost:3000/?login_error=login_expired"
    );
    assert!(pending.session().is_none());
    assert_eq!(app.session_rows().await, 1);
    assert_eq!(
        app.idp.stats().code_grants,
        2,
        "the expired login never reached the token endpoint"
    );
    let retry = app.start_login(&mut pending, Some("/pending")).await;
    let callback = app.approve(&retry, "carol").await;
    assert_eq!(
        location(&app.callback(&mut pending, &callback).await),
        "http://localhost:3000/pending"
    );
}

/// A second broker on the first one's database and Redis prefix, configured with another key only.
async fn spawn_replica_without_the_key(app: &TestApp) -> TestApp {
    let (database_url, prefix) = (app.database.url.clone(), app.redis.prefix.clone());
    spawn_app_with(move |s| {
        s.settings.database_url = Some(database_url);
        s.settings.redis_key_prefix = Some(prefix);
        s.settings.encryption_keys = Some(EncryptionKey::generate().secret_base64());
    })
    .await
}

#[tokio::test]
async fn a_session_sealed_under_a_key_no_longer_configured_ends_with_a_401() {
    // Arrange
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let replica = spawn_replica_without_the_key(&app).await;

    // Act
    let response = replica.get_session(&browser).await;

    // Assert: the Redis view the first broker cached must not vouch for a session whose tokens
    // no configured key can open (it could never be used for a token, yet /session would slide it).
    assert_eq!(
        response.status(),
        401,
        "the replica answered from the cached view without checking the session's key"
    );
    assert_problem(response, 401).await;
    assert_eq!(app.session_rows().await, 0, "the unusable row is deleted");
    assert_problem(app.get_session(&browser).await, 401).await;
}

#[tokio::test]
async fn a_session_sealed_under_a_key_no_longer_configured_ends_when_read_from_postgresql() {
    // Arrange: the cache does not know the session, so the replica must open the row.
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    delete_redis_keys(&app).await;
    let replica = spawn_replica_without_the_key(&app).await;

    // Act
    let response = replica.get_session(&browser).await;

    // Assert
    assert_problem(response, 401).await;
    assert_eq!(app.session_rows().await, 0, "the unusable row is deleted");
}

fn manual_clock() -> ManualClock {
    ManualClock::new(Utc::now())
}

/// A broker on `clock` with a 10-minute idle timeout (so a touch is due after a minute).
async fn spawn_app_idle_10_minutes(clock: &ManualClock) -> TestApp {
    let clock = clock.clone();
    spawn_app_with(move |s| {
        s.settings.session_idle_timeout = Some("10m".into());
        s.clock = Arc::new(clock);
    })
    .await
}

#[tokio::test]
async fn a_session_idle_longer_than_the_idle_timeout_ends() {
    // Arrange
    let clock = manual_clock();
    let app = spawn_app_idle_10_minutes(&clock).await;
    let browser = app.logged_in_browser("alice").await;
    assert_eq!(app.get_session(&browser).await.status(), 200);

    // Act
    clock.advance(Duration::minutes(11));
    let response = app.get_session(&browser).await;

    // Assert
    assert_problem(response, 401).await;
    assert_eq!(app.session_rows().await, 0, "the expired row is deleted");
}

#[tokio::test]
async fn activity_within_the_idle_window_slides_it() {
    // Arrange
    let clock = manual_clock();
    let app = spawn_app_idle_10_minutes(&clock).await;
    let browser = app.logged_in_browser("alice").await;

    // Act: 12 minutes after login, but never 10 without use.
    clock.advance(Duration::minutes(6));
    let first = app.get_session(&browser).await;
    clock.advance(Duration::minutes(6));
    let second = app.get_session(&browser).await;

    // Assert
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    let body: serde_json::Value = second.json().await.unwrap();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    let now = token_broker::clock::Clock::now(&clock);
    assert!(
        expires_at > now + Duration::minutes(9),
        "the idle end moved: {expires_at}"
    );
    // Then 11 minutes of silence end it.
    clock.advance(Duration::minutes(11));
    assert_problem(app.get_session(&browser).await, 401).await;
}

#[tokio::test]
async fn a_session_ends_at_its_absolute_lifetime_however_active() {
    // Arrange
    let clock = manual_clock();
    let app = spawn_app_with(|s| {
        s.settings.session_idle_timeout = Some("10m".into());
        s.settings.session_max_lifetime = Some("1h".into());
        s.clock = Arc::new(clock.clone());
    })
    .await;
    let browser = app.logged_in_browser("alice").await;

    // Act: used every 5 minutes for 55 minutes.
    for minute in (5..60).step_by(5) {
        clock.advance(Duration::minutes(5));
        assert_eq!(
            app.get_session(&browser).await.status(),
            200,
            "at {minute} min"
        );
    }
    clock.advance(Duration::minutes(5));
    let response = app.get_session(&browser).await;

    // Assert
    assert_problem(response, 401).await;
    assert_eq!(app.session_rows().await, 0);
}

// ---------------------------------------------------------------------------------------------
// Last-seen times: written by the replica's touch queue, not by the request (src/flows/touch.rs)

async fn stored_last_seen(app: &TestApp, browser: &Browser) -> Option<chrono::DateTime<Utc>> {
    let pool = app.database.pool().await;
    let seen = sqlx::query_scalar(
        "SELECT a.last_seen_at FROM sessions s JOIN session_activity a ON a.id = s.id
         WHERE s.id_hash = $1",
    )
    .bind(session_hash(browser).as_bytes())
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    seen
}

/// Advances the clock by `minutes` (past the touch interval, a minute), uses the session (200),
/// and waits for PostgreSQL to have that use's time ([`wait_for_stored_last_seen`]); returns it.
async fn use_and_wait_for_its_write(
    app: &TestApp,
    browser: &Browser,
    clock: &ManualClock,
    minutes: i64,
) -> chrono::DateTime<Utc> {
    let before = stored_last_seen(app, browser).await.unwrap();
    clock.advance(Duration::minutes(minutes));
    let used_at = token_broker::clock::Clock::now(clock);
    assert_eq!(app.get_session(browser).await.status(), 200);
    wait_for_stored_last_seen(app, browser, before, used_at).await;
    used_at
}

/// Waits for PostgreSQL to have a last-seen time later than `before` for the browser's session
/// (the touch queue's flush, every 10 ms; 5 s of margin) and asserts that it is `expected`.
async fn wait_for_stored_last_seen(
    app: &TestApp,
    browser: &Browser,
    before: chrono::DateTime<Utc>,
    expected: chrono::DateTime<Utc>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let seen = stored_last_seen(app, browser).await.unwrap();
        if seen > before {
            assert_eq!(seen.timestamp_micros(), expected.timestamp_micros());
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "last_seen_at stayed {seen}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_used_session_has_its_last_seen_time_written_to_postgresql_within_a_flush() {
    // Arrange: a session last written at login.
    let clock = manual_clock();
    let app = spawn_app_idle_10_minutes(&clock).await;
    let browser = app.logged_in_browser("alice").await;

    // Act and assert: used past the touch interval, PostgreSQL has the new time within the
    // flush interval.
    use_and_wait_for_its_write(&app, &browser, &clock, 2).await;
    // And the broker's own queue is empty again.
    assert!(app.broker.touches.is_empty());
}

#[tokio::test]
async fn a_cache_miss_finds_the_use_that_keeps_a_session_alive_after_its_login_time_is_past_the_idle_timeout(
) {
    // Arrange: logged in at T, used at T+6 min (idle timeout 10 min); that use is in
    // PostgreSQL. At T+12 the session's own row (its login time) no longer proves it live: only
    // its activity row does, which a cold read looks up only then.
    let clock = manual_clock();
    let app = spawn_app_idle_10_minutes(&clock).await;
    let browser = app.logged_in_browser("alice").await;
    let used_at = use_and_wait_for_its_write(&app, &browser, &clock, 6).await;
    clock.advance(Duration::minutes(6));

    // Act: a cache miss (Redis lost its keys).
    delete_redis_keys(&app).await;
    let response = app.get_session(&browser).await;

    // Assert: live, and the idle end slid from this use.
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    let now = token_broker::clock::Clock::now(&clock);
    let idle_end = now + Duration::minutes(10);
    assert!(
        (expires_at.with_timezone(&Utc) - idle_end).num_seconds() == 0,
        "expires at {expires_at}, not {idle_end}"
    );
    wait_for_stored_last_seen(&app, &browser, used_at, now).await;
    // And 11 minutes of silence end it, from PostgreSQL too.
    clock.advance(Duration::minutes(11));
    delete_redis_keys(&app).await;
    assert_problem(app.get_session(&browser).await, 401).await;
    assert_eq!(app.session_rows().await, 0);
}

/// A broker on `clock` with the default idle timeout, 12 hours: a touch is due after a minute,
/// and a cache miss writes PostgreSQL's time only when it is 72 minutes old or more.
async fn spawn_app_idle_12_hours(clock: &ManualClock) -> TestApp {
    let clock = clock.clone();
    spawn_app_with(move |s| s.clock = Arc::new(clock)).await
}

/// Waits (5 s at most) until Redis holds a view of the session again (written after the answer
/// to a miss), and returns it.
async fn wait_for_cached_view(
    app: &TestApp,
    hash: &token_broker::domain::SessionIdHash,
) -> token_broker::store::CachedSession {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let CacheLookup::Live(view) = app.broker.cache.get(hash).await.unwrap() {
            return view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the view was not cached again within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_cache_miss_leaves_a_recent_stored_time_for_the_next_use_to_write_and_writes_an_old_one_at_once(
) {
    // Arrange: logged in at T (PostgreSQL's time); at T+5 min Redis has lost its keys.
    let clock = manual_clock();
    let app = spawn_app_idle_12_hours(&clock).await;
    let browser = app.logged_in_browser("alice").await;
    let login_time = stored_last_seen(&app, &browser).await.unwrap();
    clock.advance(Duration::minutes(5));
    delete_redis_keys(&app).await;

    // Act: the miss.
    assert_eq!(app.get_session(&browser).await.status(), 200);

    // Assert: the view is cached again with this use's time, and PostgreSQL keeps the login
    // time (5 minutes behind, under the 72-minute miss interval) after the queue's flush,
    // which would have written a queued time.
    let now = token_broker::clock::Clock::now(&clock);
    let view = wait_for_cached_view(&app, &session_hash(&browser)).await;
    assert_eq!(view.last_seen_at, now);
    app.broker.flush_touches().await.unwrap();
    assert_eq!(stored_last_seen(&app, &browser).await, Some(login_time));

    // And the next use past the touch interval, served from that view, writes its time.
    let used_at = use_and_wait_for_its_write(&app, &browser, &clock, 2).await;

    // And a miss that finds PostgreSQL's time 72 minutes old writes the use at once.
    clock.advance(Duration::minutes(72));
    delete_redis_keys(&app).await;
    assert_eq!(app.get_session(&browser).await.status(), 200);
    let now = token_broker::clock::Clock::now(&clock);
    wait_for_stored_last_seen(&app, &browser, used_at, now).await;
}

#[tokio::test]
async fn a_session_whose_last_use_was_a_miss_never_outlives_its_stored_time_by_the_idle_timeout() {
    // Arrange: logged in at T; used at T+30 min through a miss, which left PostgreSQL at T.
    let clock = manual_clock();
    let app = spawn_app_idle_12_hours(&clock).await;
    let browser = app.logged_in_browser("alice").await;
    clock.advance(Duration::minutes(30));
    delete_redis_keys(&app).await;
    assert_eq!(app.get_session(&browser).await.status(), 200);
    wait_for_cached_view(&app, &session_hash(&browser)).await;
    // A last-seen write the miss queued (it must queue none) would land here, not by chance.
    app.broker.flush_touches().await.unwrap();

    // Act: 12 hours after the login, with no use since the miss, Redis loses its keys again.
    clock.advance(Duration::hours(12) - Duration::minutes(30));
    delete_redis_keys(&app).await;

    // Assert: the session ended by PostgreSQL's time (30 minutes, under a tenth of the idle
    // timeout, before its exact idle end): early, never late.
    assert_problem(app.get_session(&browser).await, 401).await;
    assert_eq!(app.session_rows().await, 0);
}

#[tokio::test]
async fn a_cache_miss_looks_up_the_activity_row_only_when_the_sessions_own_time_cannot_prove_it_live(
) {
    // Arrange: a session whose own row says it was used at login.
    let app = spawn_app().await;
    let record = insert_full_sized_session(&app, 1).await;

    for query in [
        token_broker::store::postgres::FIND_VIEW_TO_USE,
        token_broker::store::postgres::FIND_RECORD_TO_USE,
    ] {
        for (cutoff, lookups) in [
            (record.last_seen_at - Duration::minutes(1), 0),
            (record.last_seen_at + Duration::minutes(1), 1),
        ] {
            // Act: the cold read's own statement, executed.
            let activity_lookups =
                cold_read_activity_lookups(&app, query, &record.id_hash, cutoff).await;

            // Assert: `session_activity` is read only when the idle cutoff is after the row's
            // own time.
            assert_eq!(activity_lookups, [lookups], "cutoff {cutoff}, {query}");
        }
    }
}

#[tokio::test]
async fn a_session_deleted_behind_its_cached_view_ends_when_its_touch_finds_the_row_gone() {
    // Arrange: the row is deleted without a tombstone (a logout while Redis was unreachable
    // deletes the row, then fails to end the view): only Redis still vouches for the session.
    let clock = manual_clock();
    let app = spawn_app_idle_10_minutes(&clock).await;
    let browser = app.logged_in_browser("alice").await;
    let pool = app.database.pool().await;
    sqlx::query("DELETE FROM sessions")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    // Act: the next use past the touch interval is served from the view and queues a touch.
    clock.advance(Duration::minutes(2));
    assert_eq!(app.get_session(&browser).await.status(), 200);

    // Assert: the flush (every 10 ms) finds no row and ends the view with a tombstone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while app.get_session(&browser).await.status() != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the view outlived its row"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(app.session_rows().await, 0, "no row came back");
    let dump = app.redis.values().await;
    assert!(
        dump.iter()
            .any(|(key, value)| key.contains("session:") && value == b"ended"),
        "{dump:?}"
    );
}

#[tokio::test]
async fn replicas_flushing_the_same_sessions_at_once_neither_deadlock_nor_move_times_back() {
    // Arrange: 200 sessions, two repositories on the same database (two replicas).
    let app = spawn_app().await;
    let first = app.broker.sessions.clone();
    let replica = spawn_replica(&app).await;
    let second = replica.broker.sessions.clone();
    let mut ids = Vec::new();
    for n in 0..200 {
        let id = SessionId::generate();
        let now = Utc::now();
        let record = token_broker::store::SessionRecord {
            id: uuid::Uuid::new_v4(),
            id_hash: id.hash(),
            user: token_broker::domain::UserClaims::select(
                format!("user-{n}"),
                &Default::default(),
            ),
            idp_sid: None,
            id_token: token_broker::domain::IdToken::new("id-token"),
            refresh_token: None,
            access_token: None,
            created_at: now,
            last_seen_at: now,
            expires_at: now + Duration::hours(1),
        };
        first.insert(&record).await.unwrap();
        ids.push(record.id);
    }
    let later = Utc::now() + Duration::minutes(5);

    // Act: each replica writes all of them, in opposite orders, ten times over, at once; one
    // of them with an older time.
    let mut writers = Vec::new();
    for round in 0..10 {
        let forward: Vec<_> = ids.iter().map(|id| (*id, later)).collect();
        let backward: Vec<_> = ids
            .iter()
            .rev()
            .map(|id| (*id, later - Duration::minutes(1)))
            .collect();
        let forward_writer = if round % 2 == 0 { &first } else { &second }.clone();
        let backward_writer = second.clone();
        writers.push(tokio::spawn(async move {
            forward_writer.touch_many(&forward).await
        }));
        writers.push(tokio::spawn(async move {
            backward_writer.touch_many(&backward).await
        }));
    }

    // Assert: no error (a deadlock is one), no row missing, every time the latest.
    for writer in writers {
        let gone = writer.await.unwrap().expect("touch_many failed");
        assert!(gone.is_empty(), "{gone:?}");
    }
    let pool = app.database.pool().await;
    let times: Vec<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT DISTINCT last_seen_at FROM session_activity")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(times.len(), 1, "{times:?}");
    assert_eq!(times[0].timestamp_micros(), later.timestamp_micros());
}

/// A transaction holding a session's `session_activity` row, as a last-seen write (touch_many)
/// does while its batch runs.
async fn hold_activity_row(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: uuid::Uuid,
) -> Result<(), sqlx::Error> {
    let update =
        sqlx::query("UPDATE session_activity SET last_seen_at = last_seen_at WHERE id = $1")
            .bind(id)
            .execute(&mut **transaction);
    match tokio::time::timeout(std::time::Duration::from_secs(5), update).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!("the last-seen write waited 5 s for its row"),
    }
}

#[tokio::test]
async fn the_sweep_skips_a_session_whose_last_seen_write_is_in_flight_instead_of_waiting_for_it() {
    // Arrange: two sessions unused for 13 hours (idle timeout 12 h); a last-seen write holds
    // the first one's activity row, as a batch does while it runs.
    let app = spawn_app().await;
    let held = insert_full_sized_session(&app, 0).await;
    let free = insert_full_sized_session(&app, 1).await;
    let pool = app.database.pool().await;
    for table in ["sessions", "session_activity"] {
        sqlx::query(&format!(
            "UPDATE {table} SET last_seen_at = now() - interval '13 hours'"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let mut writer = pool.begin().await.unwrap();
    hold_activity_row(&mut writer, held.id).await.unwrap();
    let now = Utc::now();
    let idle_cutoff = now - Duration::hours(12);
    let sweep = || app.broker.sessions.delete_expired(now, idle_cutoff, 100);

    // Act: a sweep while the write is in flight; another after it committed.
    let during = tokio::time::timeout(std::time::Duration::from_secs(5), sweep())
        .await
        .expect("the sweep waited 5 s for a row a last-seen write holds");
    writer.commit().await.unwrap();
    let after = sweep().await.unwrap();

    // Assert: the first took the free session and left the held one (no error, no wait); the
    // next took that one.
    assert_eq!(during.unwrap(), Some(vec![free.id_hash]));
    assert_eq!(after, Some(vec![held.id_hash]));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM session_activity")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    pool.close().await;
}

/// Two sessions stored through the repository, the one with the higher id first (so first in the
/// table, where a plain scan meets it first), of users `user-{users[0]}` (the lower id) and
/// `user-{users[1]}`. Returns them lower id first.
async fn two_sessions_higher_id_stored_first(
    app: &TestApp,
    users: [usize; 2],
) -> [token_broker::store::SessionRecord; 2] {
    let mut ids = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()];
    ids.sort();
    let higher = insert_full_sized_session_with_id(app, users[1], ids[1]).await;
    let lower = insert_full_sized_session_with_id(app, users[0], ids[0]).await;
    [lower, higher]
}

/// Takes the row `id` of `table` in `transaction` without waiting for it: an error when another
/// transaction holds it.
async fn take_row_without_waiting(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    id: uuid::Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE NOWAIT"
    ))
    .bind(id)
    .execute(&mut **transaction)
    .await
    .map(|_| ())
}

/// What a spawned operation returned; it must finish within 5 s.
async fn finished<T>(task: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 5 s"))
        .unwrap()
}

#[tokio::test]
async fn a_last_seen_write_takes_its_rows_in_id_order_whatever_its_plan() {
    // Arrange: two sessions, the one with the higher id stored first (first in the table); a
    // replica whose connections plan every statement generically, as a prepared statement is
    // after five runs (for this table, a hash join that follows the table); another write
    // holds the lower id's row.
    let app = spawn_app().await;
    let [lower, higher] = two_sessions_higher_id_stored_first(&app, [1, 0])
        .await
        .map(|session| session.id);
    let pool = app.database.pool().await;
    sqlx::query(&format!(
        r#"ALTER DATABASE "{}" SET plan_cache_mode = force_generic_plan"#,
        app.database.name
    ))
    .execute(&pool)
    .await
    .unwrap();
    let replica = spawn_replica(&app).await;
    let mut other_writer = pool.begin().await.unwrap();
    hold_activity_row(&mut other_writer, lower).await.unwrap();

    // Act: the replica writes both; while it waits, the other write asks for the higher id's
    // row without waiting for it; then it commits.
    let sessions = replica.broker.sessions.clone();
    let later = Utc::now() + Duration::minutes(5);
    let write = tokio::spawn(async move {
        sessions
            .touch_many(&[(higher, later), (lower, later)])
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let higher_row = take_row_without_waiting(&mut other_writer, "session_activity", higher).await;
    other_writer.commit().await.unwrap();
    let gone = finished(write, "the write")
        .await
        .expect("the write failed");

    // Assert: the write was waiting at the lower id and had not taken the higher one (in any
    // other order, two writes over the same sessions can deadlock); then it wrote both.
    higher_row.expect("the higher id's row was taken before the lower one's");
    assert!(gone.is_empty(), "{gone:?}");
    let times: Vec<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT last_seen_at FROM session_activity")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        times
            .iter()
            .map(|t| t.timestamp_micros())
            .collect::<Vec<_>>(),
        [later.timestamp_micros(); 2]
    );
    pool.close().await;
}

#[tokio::test]
async fn a_logout_of_several_sessions_takes_their_rows_in_id_order() {
    // Arrange: one user's two sessions, the one with the higher id stored first; another
    // transaction holds the lower id's session row (as `rotate-keys` does while it reseals).
    let app = spawn_app().await;
    let [lower, higher] = two_sessions_higher_id_stored_first(&app, [3, 3])
        .await
        .map(|session| session.id);
    let pool = app.database.pool().await;
    let mut holder = pool.begin().await.unwrap();
    take_row_without_waiting(&mut holder, "sessions", lower)
        .await
        .unwrap();

    // Act: the logout of every session of the user; while it waits, the holder asks for the
    // higher id's row without waiting for it; then it commits.
    let broker = app.broker.clone();
    let logout = tokio::spawn(async move { broker.sessions.delete_by_subject("user-3").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let higher_row = take_row_without_waiting(&mut holder, "sessions", higher).await;
    holder.commit().await.unwrap();
    let ended = finished(logout, "the logout")
        .await
        .expect("the logout failed");

    // Assert: the logout was waiting at the lower id and had not taken the higher one; then it
    // ended both.
    higher_row.expect("the higher id's session row was taken before the lower one's");
    assert_eq!(ended.len(), 2);
    pool.close().await;
}

#[tokio::test]
async fn a_back_channel_logout_and_a_last_seen_write_over_the_same_sessions_never_deadlock() {
    // Arrange: one user's two sessions, the one with the higher id stored first (so that a
    // plain DELETE's cascade reaches its activity row first); a last-seen write that has taken
    // the lower one's row and will take the higher one's next (touch_many goes in id order).
    let app = spawn_app().await;
    let [lower, higher] = two_sessions_higher_id_stored_first(&app, [7, 7]).await;
    let pool = app.database.pool().await;
    let mut writer = pool.begin().await.unwrap();
    hold_activity_row(&mut writer, lower.id).await.unwrap();

    // Act: the logout of every session of the user (a back-channel logout with `sub` only),
    // then, while it runs, the write's second row; the write commits.
    let broker = app.broker.clone();
    let logout = tokio::spawn(async move { broker.sessions.delete_by_subject("user-7").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second_row = hold_activity_row(&mut writer, higher.id).await;
    let committed = writer.commit().await;
    let ended = finished(logout, "the logout").await;

    // Assert: neither was ended by PostgreSQL's deadlock detector; both sessions are gone.
    second_row.expect("the last-seen write failed");
    committed.expect("the last-seen write failed to commit");
    let mut ended = ended.expect("the logout failed");
    ended.sort_by_key(|hash| hash.0);
    let mut expected = vec![lower.id_hash, higher.id_hash];
    expected.sort_by_key(|hash| hash.0);
    assert_eq!(ended, expected);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM session_activity")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    pool.close().await;
}

/// A session record with tokens the size of real ones (an ID token of ~900 characters), stored
/// through the repository as a login stores it.
async fn insert_full_sized_session(app: &TestApp, n: usize) -> token_broker::store::SessionRecord {
    insert_full_sized_session_with_id(app, n, uuid::Uuid::new_v4()).await
}

async fn insert_full_sized_session_with_id(
    app: &TestApp,
    n: usize,
    id: uuid::Uuid,
) -> token_broker::store::SessionRecord {
    let now = Utc::now();
    let token = |len: usize| "t".repeat(len);
    let record = token_broker::store::SessionRecord {
        id,
        id_hash: SessionId::generate().hash(),
        user: token_broker::domain::UserClaims::select(format!("user-{n}"), &Default::default()),
        idp_sid: Some(token(36)),
        id_token: token_broker::domain::IdToken::new(token(900)),
        refresh_token: Some(token_broker::domain::RefreshToken::new(token(64))),
        access_token: Some(token_broker::store::CachedAccessToken {
            token: token_broker::domain::AccessToken::new(token(64)),
            expires_at: now + Duration::hours(1),
            refresh_at: now + Duration::minutes(59),
        }),
        created_at: now,
        last_seen_at: now,
        expires_at: now + Duration::hours(12),
    };
    app.broker.sessions.insert(&record).await.unwrap();
    record
}

#[tokio::test]
async fn a_last_seen_write_leaves_the_session_row_alone_and_changes_a_narrow_row_in_its_page() {
    // Arrange: 400 sessions the size of real ones; where each row and each version is.
    let app = spawn_app().await;
    let mut records = Vec::new();
    for n in 0..400 {
        records.push(insert_full_sized_session(&app, n).await);
    }
    let pool = app.database.pool().await;
    let session_versions = || {
        sqlx::query_scalar::<_, String>(
            "SELECT id || ' ' || ctid || ' ' || xmin || ' ' || xmax FROM sessions ORDER BY id",
        )
        .fetch_all(&pool)
    };
    let activity_pages = || {
        sqlx::query_as::<_, (uuid::Uuid, String)>(
            "SELECT id, (ctid::text::point)[0]::text FROM session_activity ORDER BY id",
        )
        .fetch_all(&pool)
    };
    let sessions_before = session_versions().await.unwrap();
    let pages_before = activity_pages().await.unwrap();

    // Act: the touch queue's write for every eighth session (about 15 to a page).
    let later = Utc::now() + Duration::minutes(2);
    let touched: Vec<_> = records.iter().step_by(8).map(|r| (r.id, later)).collect();
    let gone = app.broker.sessions.touch_many(&touched).await.unwrap();

    // Assert: no session row was written or even locked (its page is not dirtied: after a
    // checkpoint, that would be a full-page image of ~8 KB in the WAL per touch); each time is
    // in its narrow row, which stayed in its page (over a hundred fit in one).
    assert!(gone.is_empty(), "{gone:?}");
    assert_eq!(session_versions().await.unwrap(), sessions_before);
    assert_eq!(activity_pages().await.unwrap(), pages_before);
    // (Rows on the fullest page: each pooled connection that inserts fills a page of its own.)
    let (written, rows_per_page): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM session_activity WHERE last_seen_at = $1),
                (SELECT count(*) FROM session_activity
                 GROUP BY (ctid::text::point)[0] ORDER BY count(*) DESC LIMIT 1)",
    )
    .bind(later)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(written, 50);
    assert!(
        rows_per_page >= 100,
        "{rows_per_page} rows on the fullest page"
    );
    let exact = later + Duration::minutes(1); // a cutoff after every time: the exact times
    for record in records.iter().step_by(8) {
        let view = app
            .broker
            .sessions
            .find_view(&record.id_hash, exact)
            .await
            .unwrap();
        assert_eq!(
            view.unwrap().last_seen_at.timestamp_micros(),
            later.timestamp_micros()
        );
    }
    pool.close().await;
}

/// A session's last-seen time as the repository's reads see it (the view, the record and the
/// record read to be used agree, given an idle cutoff after every time, which asks them for the
/// exact time).
async fn seen_by_reads(app: &TestApp, hash: &token_broker::domain::SessionIdHash) -> i64 {
    let sessions = &app.broker.sessions;
    let exact = Utc::now() + Duration::days(1);
    let view = sessions.find_view(hash, exact).await.unwrap().unwrap();
    let record = sessions.find(hash).await.unwrap().unwrap();
    let to_use = sessions.find_for_use(hash, exact).await.unwrap().unwrap();
    assert_eq!(view.last_seen_at, record.last_seen_at);
    assert_eq!(to_use.last_seen_at, record.last_seen_at);
    view.last_seen_at.timestamp_micros()
}

/// The columns an earlier version's INSERT names: `sessions` only, never `session_activity`.
const EARLIER_VERSIONS_INSERT: &str =
    "INSERT INTO sessions (id, key_id, id_token_sealed, refresh_token_sealed, access_token_sealed,
                           access_token_expires_at, access_token_refresh_at, id_hash, subject, idp_sid,
                           user_claims, created_at, last_seen_at, expires_at)
     SELECT id, key_id, id_token_sealed, refresh_token_sealed, access_token_sealed,
            access_token_expires_at, access_token_refresh_at, id_hash, subject, idp_sid,
            user_claims, created_at, last_seen_at, expires_at FROM earlier";

#[tokio::test]
async fn a_session_an_earlier_version_stores_and_touches_keeps_its_latest_last_seen_time() {
    // Arrange: a session stored as a replica of a version before `session_activity` stores it
    // during a rolling upgrade: an INSERT that names only `sessions`.
    let app = spawn_app().await;
    let record = insert_full_sized_session(&app, 1).await;
    let pool = app.database.pool().await;
    let mut transaction = pool.begin().await.unwrap();
    for statement in [
        "CREATE TEMPORARY TABLE earlier ON COMMIT DROP AS SELECT * FROM sessions",
        "DELETE FROM sessions",
        EARLIER_VERSIONS_INSERT,
    ] {
        sqlx::query(statement)
            .execute(&mut *transaction)
            .await
            .unwrap();
    }
    transaction.commit().await.unwrap();
    let activity: Vec<(uuid::Uuid, chrono::DateTime<Utc>)> =
        sqlx::query_as("SELECT id, last_seen_at FROM session_activity")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        activity
            .iter()
            .map(|(id, seen)| (*id, seen.timestamp_micros()))
            .collect::<Vec<_>>(),
        [(record.id, record.last_seen_at.timestamp_micros())],
        "the database made its activity row"
    );

    // Act: this version touches it; then the earlier version, later still.
    let later = Utc::now() + Duration::minutes(2);
    let gone = app
        .broker
        .sessions
        .touch_many(&[(record.id, later)])
        .await
        .unwrap();
    assert!(gone.is_empty(), "{gone:?}");
    let after_touch = seen_by_reads(&app, &record.id_hash).await;
    let latest = later + Duration::minutes(2);
    sqlx::query("UPDATE sessions SET last_seen_at = $1")
        .bind(latest)
        .execute(&pool)
        .await
        .unwrap();

    // Assert: each read has the later of the two times; so do the sweep and the live count,
    // which keep the session while only the earlier version's time is within the idle timeout.
    assert_eq!(after_touch, later.timestamp_micros());
    assert_eq!(
        seen_by_reads(&app, &record.id_hash).await,
        latest.timestamp_micros()
    );
    let listed = app.broker.sessions.list_by_subject("user-1").await.unwrap();
    assert_eq!(
        listed[0].last_seen_at.timestamp_micros(),
        latest.timestamp_micros()
    );
    let sessions = &app.broker.sessions;
    let (now, cutoff_between) = (Utc::now(), later + Duration::minutes(1));
    assert_eq!(sessions.count_live(now, cutoff_between).await.unwrap(), 1);
    assert_eq!(
        sessions
            .delete_expired(now, cutoff_between, 100)
            .await
            .unwrap(),
        Some(vec![])
    );
    let past_both = latest + Duration::seconds(1);
    assert_eq!(sessions.count_live(now, past_both).await.unwrap(), 0);
    assert_eq!(
        sessions.delete_expired(now, past_both, 100).await.unwrap(),
        Some(vec![record.id_hash])
    );
    pool.close().await;
}

#[tokio::test]
async fn the_sweep_and_the_live_count_find_ended_sessions_without_reading_every_session() {
    // Arrange: 3,000 sessions the size of real ones, logged in 13 hours ago; 10 past their
    // absolute end, 10 unused for 13 hours, the rest used a minute ago; statistics current, as
    // autovacuum keeps them.
    let app = spawn_app().await;
    insert_full_sized_session(&app, 0).await;
    let pool = app.database.pool().await;
    let mut connection = pool.acquire().await.unwrap();
    for statement in [
        "CREATE TEMPORARY TABLE earlier AS
         SELECT gen_random_uuid() AS id, key_id, id_token_sealed, refresh_token_sealed, access_token_sealed,
                access_token_expires_at, access_token_refresh_at, sha256(n::text::bytea) AS id_hash,
                subject || n AS subject, idp_sid, user_claims, now() - interval '13 hours' AS created_at,
                now() - interval '13 hours' AS last_seen_at, now() + interval '6 days' AS expires_at
         FROM sessions, generate_series(1, 3000) AS n",
        "DELETE FROM sessions",
        EARLIER_VERSIONS_INSERT,
        "UPDATE session_activity SET last_seen_at = now() - interval '1 minute'",
        "UPDATE sessions SET expires_at = now() - interval '1 minute'
         WHERE id IN (SELECT id FROM sessions ORDER BY id LIMIT 10)",
        "UPDATE session_activity SET last_seen_at = now() - interval '13 hours'
         WHERE id IN (SELECT id FROM session_activity ORDER BY id DESC LIMIT 10)",
        "VACUUM ANALYZE sessions, session_activity",
    ] {
        // One connection: the temporary table is its own.
        sqlx::query(statement)
            .execute(&mut *connection)
            .await
            .unwrap();
    }
    drop(connection);
    let now = Utc::now();
    let idle_cutoff = now - Duration::hours(12);

    // Act: each query as the repository runs it, planned for these instants; then the
    // repository's own calls.
    let mut plans = Vec::new();
    for (query, binds_batch) in [
        (token_broker::store::postgres::SWEEP_BATCH, true),
        (token_broker::store::postgres::COUNT_LIVE, false),
    ] {
        let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {query}");
        let mut explain = sqlx::query_scalar::<_, serde_json::Value>(&explain)
            .persistent(false)
            .bind(now)
            .bind(idle_cutoff);
        if binds_batch {
            explain = explain.bind(1000_i64);
        }
        let mut transaction = pool.begin().await.unwrap();
        plans.push(explain.fetch_one(&mut *transaction).await.unwrap());
        transaction.rollback().await.unwrap();
    }
    let live = app
        .broker
        .sessions
        .count_live(now, idle_cutoff)
        .await
        .unwrap();
    let swept = app
        .broker
        .sessions
        .delete_expired(now, idle_cutoff, 1000)
        .await
        .unwrap()
        .unwrap();

    // Assert: neither reads the sessions table through (an index finds each row it reads), and
    // both have the right answer.
    for plan in &plans {
        let mut scans = Vec::new();
        collect_sequential_scans(plan, &mut scans);
        assert!(
            !scans.contains(&"sessions".to_string()),
            "a sequential scan of sessions: {plan:#}"
        );
    }
    assert_eq!((live, swept.len()), (2980, 20));
    assert_eq!(
        app.broker
            .sessions
            .count_live(now, idle_cutoff)
            .await
            .unwrap(),
        2980
    );
    pool.close().await;
}

/// The tables that a JSON plan (`EXPLAIN (FORMAT JSON)`) reads by sequential scan.
fn collect_sequential_scans(plan: &serde_json::Value, tables: &mut Vec<String>) {
    match plan {
        serde_json::Value::Object(node) => {
            if node.get("Node Type").and_then(|t| t.as_str()) == Some("Seq Scan") {
                if let Some(table) = node.get("Relation Name").and_then(|t| t.as_str()) {
                    tables.push(table.to_string());
                }
            }
            node.values()
                .for_each(|child| collect_sequential_scans(child, tables));
        }
        serde_json::Value::Array(children) => children
            .iter()
            .for_each(|child| collect_sequential_scans(child, tables)),
        _ => {}
    }
}

#[tokio::test]
async fn a_missed_view_is_cached_again_after_the_answer_and_never_over_a_logout() {
    // Arrange: two live sessions whose cached views are gone (a Redis flush).
    let app = spawn_app().await;
    let kept = app.logged_in_browser("alice").await;
    let mut ended = app.logged_in_browser("bob").await;
    delete_redis_keys(&app).await;
    let hash_of = |browser: &Browser| {
        SessionId::parse(browser.session().expect("a session cookie"))
            .expect("a well-formed session cookie")
            .hash()
    };
    let (kept_hash, ended_hash) = (hash_of(&kept), hash_of(&ended));
    let cache = &app.broker.cache;

    // Act: each is read from PostgreSQL; one logs out at once, while the write of its view
    // back to Redis may still be on its way.
    assert_eq!(app.get_session(&kept).await.status(), 200);
    assert_eq!(app.get_session(&ended).await.status(), 200);
    let logout = app.post_logout(&mut ended, Some(FRONTEND), true).await;
    assert_eq!(logout.status(), 200);

    // Assert: the view is back in Redis soon after the answer; the ended session's key is its
    // tombstone, and stays one after every write in flight has had time to land.
    wait_for_cached_view(&app, &kept_hash).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(cache.get(&ended_hash).await.unwrap(), CacheLookup::Ended);
    assert_problem(app.get_session(&ended).await, 401).await;
}

#[tokio::test]
async fn a_view_written_after_a_miss_fills_the_gap_only() {
    // What the cold path writes back after a miss (`Replacing::Nothing`) must neither bring an ended
    // session back (a tombstone written since the miss) nor replace a view another request
    // cached meanwhile. Against the broker's real Redis store.
    let app = spawn_app().await;
    let cache = &app.broker.cache;
    let view = |sub: &str| token_broker::store::CachedSession {
        id: uuid::Uuid::new_v4(),
        user: token_broker::domain::UserClaims::select(sub.into(), &serde_json::Map::new()),
        created_at: Utc::now(),
        last_seen_at: Utc::now(),
        expires_at: Utc::now() + Duration::hours(1),
    };
    let ttl = std::time::Duration::from_secs(60);
    let cached_sub = async |hash| match cache.get(hash).await.unwrap() {
        CacheLookup::Live(session) => Some(session.user.sub().to_string()),
        _ => None,
    };

    // Nothing held: filled.
    let empty = SessionId::generate().hash();
    cache
        .put(&empty, &view("alice"), ttl, Replacing::Nothing)
        .await
        .unwrap();
    assert_eq!(cached_sub(&empty).await.as_deref(), Some("alice"));

    // A tombstone: kept.
    let ended = SessionId::generate().hash();
    cache.mark_ended(&ended).await.unwrap();
    cache
        .put(&ended, &view("alice"), ttl, Replacing::Nothing)
        .await
        .unwrap();
    assert_eq!(cache.get(&ended).await.unwrap(), CacheLookup::Ended);

    // A view cached meanwhile: kept.
    let cached = SessionId::generate().hash();
    cache
        .put(&cached, &view("bob"), ttl, Replacing::AnyViewOrEntry)
        .await
        .unwrap();
    cache
        .put(&cached, &view("mallory"), ttl, Replacing::Nothing)
        .await
        .unwrap();
    assert_eq!(cached_sub(&cached).await.as_deref(), Some("bob"));
}

#[tokio::test]
async fn an_unreadable_cached_view_is_replaced_after_the_answer() {
    // An entry that does not open (sealed under a key no longer configured, or of a form this
    // version does not know) is a miss that PostgreSQL answers. The view read there must replace
    // it, not fill only an empty key and so leave every later request a miss until it expires.
    let app = spawn_app().await;
    let user = app.logged_in_browser("alice").await;
    let hash = SessionId::parse(user.session().expect("a session cookie"))
        .expect("a well-formed session cookie")
        .hash();
    let key = format!("{}session:{{{}}}", app.redis.prefix, hash.to_hex());
    let mut connection = app.redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&b"\x00sealed elsewhere"[..])
        .query_async(&mut connection)
        .await
        .unwrap();
    let cache = &app.broker.cache;
    assert_eq!(cache.get(&hash).await.unwrap(), CacheLookup::Unreadable);

    assert_eq!(app.get_session(&user).await.status(), 200);

    let mut waited = 0;
    while !matches!(cache.get(&hash).await.unwrap(), CacheLookup::Live(_)) {
        assert!(
            waited < 100,
            "the unreadable entry was not replaced within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
}
