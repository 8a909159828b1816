//! `GET /auth`: access tokens for gateways, refreshed near expiry, exactly one refresh grant per
//! session across replicas, and the session's fate when the IdP refuses or is down.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use token_broker::domain::SessionId;

use crate::helpers::*;

async fn stored_refresh_token(app: &TestApp, browser: &Browser) -> String {
    let hash = SessionId::parse(browser.session().unwrap()).unwrap().hash();
    let record = app
        .broker
        .sessions
        .find(&hash)
        .await
        .unwrap()
        .expect("session row");
    record
        .refresh_token
        .expect("refresh token")
        .secret()
        .to_string()
}

fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_live_session_gets_the_cached_access_token_and_its_subject() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;

    let response = forward_auth(&app.http, &app.address, &browser).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-auth-subject"], "alice");
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(response.headers().get("set-cookie").is_none());
    let token = bearer(&response);
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["iss"], app.idp.issuer());
    assert!(response.text().await.unwrap().is_empty());
    assert_eq!(
        app.idp.stats().refresh_grants,
        0,
        "the token from the login is used, not refreshed"
    );
}

#[tokio::test]
async fn without_a_live_session_forward_auth_is_401() {
    let app = spawn_app().await;
    let mut garbage = Browser::default();
    garbage.cookies.insert("session".into(), "x".repeat(43));
    let mut browser = app.logged_in_browser("alice").await;
    app.post_logout(&mut browser, Some(FRONTEND), true).await;
    let mut logged_out = Browser::default();
    logged_out
        .cookies
        .insert("session".into(), session_of_logged_out(&app).await);

    for anonymous in [Browser::default(), garbage, logged_out] {
        let response = forward_auth(&app.http, &app.address, &anonymous).await;
        assert!(response.headers().get("authorization").is_none());
        assert_problem(response, 401).await;
    }
}

/// The cookie of a session that logged out.
async fn session_of_logged_out(app: &TestApp) -> String {
    let mut browser = app.logged_in_browser("carol").await;
    let cookie = browser.session().cloned().unwrap();
    app.post_logout(&mut browser, Some(FRONTEND), true).await;
    cookie
}

#[tokio::test]
async fn a_token_due_for_refresh_is_refreshed_and_the_rotated_refresh_token_stored_first() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let first = bearer(&forward_auth(&app.http, &app.address, &browser).await);
    let old_refresh_token = stored_refresh_token(&app, &browser).await;

    expire_cached_token(&app, &browser).await;
    let response = forward_auth(&app.http, &app.address, &browser).await;

    assert_eq!(response.status(), 200);
    let refreshed = bearer(&response);
    assert_ne!(refreshed, first);
    assert_eq!(app.idp.stats().refresh_grants, 1);
    let new_refresh_token = stored_refresh_token(&app, &browser).await;
    assert_ne!(
        new_refresh_token, old_refresh_token,
        "the rotated refresh token is stored"
    );
    assert!(app.idp.is_refresh_token_active(&new_refresh_token));
    assert!(!app.idp.is_refresh_token_active(&old_refresh_token));
    // The new token is cached: the next request does not refresh again.
    assert_eq!(
        bearer(&forward_auth(&app.http, &app.address, &browser).await),
        refreshed
    );
    assert_eq!(app.idp.stats().refresh_grants, 1);
}

#[tokio::test]
async fn a_token_within_30_seconds_of_expiry_is_refreshed_on_the_injected_clock() {
    let clock = token_broker::clock::ManualClock::new(chrono::Utc::now());
    let app = spawn_app_with(|s| s.clock = std::sync::Arc::new(clock.clone())).await;
    let browser = app.logged_in_browser("alice").await;
    let first = bearer(&forward_auth(&app.http, &app.address, &browser).await);

    // The test IdP's tokens live 300 s: at 269 s the token is still used, at 271 s it is refreshed.
    clock.advance(chrono::Duration::seconds(269));
    assert_eq!(
        bearer(&forward_auth(&app.http, &app.address, &browser).await),
        first
    );
    assert_eq!(app.idp.stats().refresh_grants, 0);
    clock.advance(chrono::Duration::seconds(2));
    assert_ne!(
        bearer(&forward_auth(&app.http, &app.address, &browser).await),
        first
    );
    assert_eq!(app.idp.stats().refresh_grants, 1);
}

#[tokio::test]
async fn a_refresh_moves_the_session_rows_own_last_seen_time_to_the_use_that_needed_it() {
    // Arrange: idle timeout 10 minutes; the test IdP's tokens live 300 s.
    let clock = token_broker::clock::ManualClock::new(chrono::Utc::now());
    let app = spawn_app_with(|s| {
        s.settings.session_idle_timeout = Some("10m".into());
        s.clock = std::sync::Arc::new(clock.clone());
    })
    .await;
    let browser = app.logged_in_browser("alice").await;
    let row_time = async || -> chrono::DateTime<chrono::Utc> {
        let pool = app.database.pool().await;
        let seen = sqlx::query_scalar("SELECT last_seen_at FROM sessions WHERE id_hash = $1")
            .bind(session_hash(&browser).as_bytes())
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        seen
    };
    let at_login = row_time().await;

    // Act: used when the token is due for refresh.
    clock.advance(chrono::Duration::seconds(271));
    let used_at = token_broker::clock::Clock::now(&clock);
    assert_eq!(
        forward_auth(&app.http, &app.address, &browser)
            .await
            .status(),
        200
    );

    // Assert: the refresh wrote the use's time into the row it rewrote.
    assert_eq!(app.idp.stats().refresh_grants, 1);
    assert_eq!(
        row_time().await.timestamp_micros(),
        used_at.timestamp_micros(),
        "logged in at {at_login}"
    );
    // So when the login is past the idle timeout and the refresh is not, a cache miss finds the
    // session live from its row alone.
    clock.advance(chrono::Duration::minutes(8));
    let idle_cutoff = token_broker::clock::Clock::now(&clock) - chrono::Duration::minutes(10);
    assert!(at_login <= idle_cutoff && used_at > idle_cutoff);
    for query in [
        token_broker::store::postgres::FIND_VIEW_TO_USE,
        token_broker::store::postgres::FIND_RECORD_TO_USE,
    ] {
        let hash = session_hash(&browser);
        let lookups = cold_read_activity_lookups(&app, query, &hash, idle_cutoff).await;
        assert_eq!(lookups, [0], "{query}");
    }
    delete_redis_keys(&app).await;
    assert_eq!(app.get_session(&browser).await.status(), 200);
}

#[tokio::test]
async fn two_hundred_concurrent_requests_on_three_replicas_cause_exactly_one_refresh_grant() {
    let app = spawn_app().await;
    let replicas = [spawn_replica(&app).await, spawn_replica(&app).await];
    let addresses = [
        app.address.clone(),
        replicas[0].address.clone(),
        replicas[1].address.clone(),
    ];
    let browser = app.logged_in_browser("alice").await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(200)
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut previous = bearer(&forward_auth(&http, &app.address, &browser).await);
    let started = Instant::now();

    for round in 0..20 {
        expire_cached_token(&app, &browser).await;
        let grants_before = app.idp.stats().refresh_grants;

        let requests = (0..200).map(|i| forward_auth(&http, &addresses[i % 3], &browser));
        let responses = join_all(requests).await;

        let mut tokens = std::collections::HashSet::new();
        for response in &responses {
            assert_eq!(response.status(), 200, "round {round}");
            tokens.insert(bearer(response));
        }
        assert_eq!(
            tokens.len(),
            1,
            "round {round}: every request gets the same new token"
        );
        let token = tokens.into_iter().next().unwrap();
        assert_ne!(token, previous, "round {round}: the token was refreshed");
        previous = token;
        let stats = app.idp.stats();
        assert_eq!(
            stats.refresh_grants,
            grants_before + 1,
            "round {round}: exactly one refresh grant"
        );
        assert_eq!(
            stats.refresh_grants_rejected, 0,
            "round {round}: no refresh token was used twice"
        );
    }

    let elapsed = started.elapsed();
    eprintln!(
        "single-flight: 20 rounds x 200 requests over 3 replicas, 20 refresh grants, {elapsed:?}"
    );
    assert_eq!(
        app.get_session(&browser).await.status(),
        200,
        "the session survives"
    );
    assert_eq!(replicas[1].get("/session", &browser).await.status(), 200);
}

#[tokio::test]
async fn an_idp_refusing_the_refresh_token_ends_the_session_everywhere() {
    let app = spawn_app().await;
    let replica = spawn_replica(&app).await;
    let browser = app.logged_in_browser("alice").await;
    assert_eq!(replica.get("/session", &browser).await.status(), 200);

    app.idp.controls().set_refresh_error(Some("invalid_grant"));
    expire_cached_token(&app, &browser).await;
    assert_problem(forward_auth(&app.http, &app.address, &browser).await, 401).await;

    assert_problem(app.get_session(&browser).await, 401).await;
    assert_problem(replica.get("/session", &browser).await, 401).await;
    assert_problem(replica.get("/auth", &browser).await, 401).await;
    assert_eq!(app.session_rows().await, 0);
}

#[tokio::test]
async fn an_idp_that_fails_or_hangs_keeps_the_session_and_answers_503() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    expire_cached_token(&app, &browser).await;

    app.idp.controls().set_token_status(Some(500));
    let response = forward_auth(&app.http, &app.address, &browser).await;
    assert!(response.headers().contains_key("retry-after"));
    let body = assert_problem(response, 503).await;
    assert_eq!(body["type"], "urn:token-broker:problem:idp-unavailable");

    app.idp.controls().set_token_status(None);
    app.idp
        .controls()
        .set_token_delay(Some(Duration::from_secs(5)));
    let started = Instant::now();
    assert_problem(forward_auth(&app.http, &app.address, &browser).await, 503).await;
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "the 2 s IdP time-out applies"
    );

    assert_eq!(
        app.get_session(&browser).await.status(),
        200,
        "the session is kept"
    );
    app.idp.controls().set_token_delay(None);
    let response = forward_auth(&app.http, &app.address, &browser).await;
    assert_eq!(response.status(), 200, "the next request tries again");
}

#[tokio::test]
async fn a_session_without_a_refresh_token_gets_401_from_forward_auth_once_its_token_expired() {
    let app = spawn_app_with(|s| s.settings.scopes = Some("openid profile email".into())).await;
    let browser = app.logged_in_browser("alice").await;
    assert_eq!(
        forward_auth(&app.http, &app.address, &browser)
            .await
            .status(),
        200
    );

    expire_cached_token(&app, &browser).await;
    assert_problem(forward_auth(&app.http, &app.address, &browser).await, 401).await;
    assert_eq!(app.idp.stats().refresh_grants, 0);
    assert_eq!(
        app.get_session(&browser).await.status(),
        200,
        "the session itself lives on"
    );
}

#[tokio::test]
async fn after_redis_loses_everything_the_session_and_its_token_come_back_from_postgresql() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let before = bearer(&forward_auth(&app.http, &app.address, &browser).await);
    let mut redis = app.redis.connection().await;
    let keys = app.redis.keys().await;
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .unwrap();

    let response = forward_auth(&app.http, &app.address, &browser).await;

    assert_eq!(response.status(), 200);
    assert_eq!(
        bearer(&response),
        before,
        "the token came back from PostgreSQL"
    );
    assert_eq!(app.idp.stats().refresh_grants, 0, "without a refresh");
    assert_eq!(app.get_session(&browser).await.status(), 200);
}

#[tokio::test]
async fn a_lease_left_by_a_dead_refresher_expires_and_the_next_request_refreshes() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    expire_cached_token(&app, &browser).await;
    // A replica took the refresh lease and died: the lease outlives it only until its bound.
    let pool = app.database.pool().await;
    let hash = session_hash(&browser).as_bytes().to_vec();
    let leased = sqlx::query(
        "UPDATE sessions SET refresh_lease = gen_random_uuid(),
                             refresh_lease_until = now() + interval '1500 milliseconds'
         WHERE id_hash = $1",
    )
    .bind(&hash)
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(leased, 1);

    let started = Instant::now();
    let response = forward_auth(&app.http, &app.address, &browser).await;

    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "it waited for the lease"
    );
    assert_eq!(app.idp.stats().refresh_grants, 1);
    let lease: (Option<uuid::Uuid>,) =
        sqlx::query_as("SELECT refresh_lease FROM sessions WHERE id_hash = $1")
            .bind(&hash)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(lease.0, None, "the new holder released its lease");
    pool.close().await;
}

#[tokio::test]
async fn a_refresher_that_outlived_its_lease_stores_nothing_over_the_next_holders_tokens() {
    use token_broker::store::{LeaseAttempt, RefreshCommit, RefreshedTokens};
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let hash = SessionId::parse(browser.session().unwrap()).unwrap().hash();
    let sessions = &app.broker.sessions;

    // A takes the lease (500 ms); B takes it again after it expired.
    let LeaseAttempt::Taken { lease: a, record } = sessions
        .try_lease_refresh(&hash, Duration::from_millis(500))
        .await
        .unwrap()
    else {
        panic!("the lease was free");
    };
    assert!(matches!(
        sessions
            .try_lease_refresh(&hash, Duration::from_secs(5))
            .await
            .unwrap(),
        LeaseAttempt::Held
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let LeaseAttempt::Taken { lease: b, .. } = sessions
        .try_lease_refresh(&hash, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("an expired lease can be taken");
    };

    // A's late commit is refused and stores nothing; B's commit works and frees the lease.
    let late = token_broker::domain::RefreshToken::new("late-refresh-token");
    let access = record.access_token.clone().unwrap();
    let tokens = RefreshedTokens {
        refresh_token: Some(&late),
        id_token: &record.id_token,
        access_token: &access,
        used_at: record.last_seen_at,
    };
    assert_eq!(
        sessions
            .commit_refresh(record.id, a, &tokens)
            .await
            .unwrap(),
        RefreshCommit::LeaseLost
    );
    let stored = sessions.find(&hash).await.unwrap().unwrap();
    assert_eq!(
        stored.refresh_token, record.refresh_token,
        "A stored nothing"
    );
    assert_eq!(
        sessions
            .commit_refresh(record.id, b, &tokens)
            .await
            .unwrap(),
        RefreshCommit::Committed
    );
    assert_eq!(
        sessions.find(&hash).await.unwrap().unwrap().refresh_token,
        Some(late.clone())
    );
    assert!(matches!(
        sessions
            .try_lease_refresh(&hash, Duration::from_secs(5))
            .await
            .unwrap(),
        LeaseAttempt::Taken { .. }
    ));
    // A deleted session: no lease, and a commit says so.
    app.broker.end_session(&hash).await.unwrap();
    assert!(matches!(
        sessions
            .try_lease_refresh(&hash, Duration::from_secs(5))
            .await
            .unwrap(),
        LeaseAttempt::Gone
    ));
    assert_eq!(
        sessions
            .commit_refresh(record.id, b, &tokens)
            .await
            .unwrap(),
        RefreshCommit::Gone
    );
}
