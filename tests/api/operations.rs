//! Operations: the expired-session sweep (alone and from two replicas at once), the incident
//! response commands `sessions list|revoke`, and key rotation with `rotate-keys`, run through the
//! real binary against the test's PostgreSQL and Redis.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use token_broker::clock::ManualClock;
use token_broker::crypto::EncryptionKey;
use token_broker::domain::SessionId;
use token_broker::store::CacheLookup;

use crate::helpers::*;

fn minutes(n: i64) -> chrono::Duration {
    chrono::Duration::minutes(n)
}

fn hash_of(browser: &Browser) -> token_broker::domain::SessionIdHash {
    SessionId::parse(browser.session().expect("a session cookie"))
        .expect("a well-formed session cookie")
        .hash()
}

/// The broker's environment for the binary: `app.settings` as the variables `serve` reads.
fn binary_env(app: &TestApp, encryption_keys: Option<&str>) -> Vec<(&'static str, String)> {
    let s = &app.settings;
    let keys = encryption_keys
        .map(str::to_string)
        .or(s.encryption_keys.clone());
    [
        ("BROKER_PUBLIC_URL", s.public_url.clone()),
        ("BROKER_OIDC_ISSUER", s.oidc_issuer.clone()),
        ("BROKER_CLIENT_ID", s.client_id.clone()),
        ("BROKER_CLIENT_SECRET", s.client_secret.clone()),
        ("BROKER_ALLOWED_ORIGINS", s.allowed_origins.clone()),
        ("BROKER_ENCRYPTION_KEYS", keys),
        ("DATABASE_URL", s.database_url.clone()),
        ("REDIS_URL", s.redis_url.clone()),
        ("BROKER_REDIS_KEY_PREFIX", s.redis_key_prefix.clone()),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect()
}

/// Runs the binary to completion with only `PATH` and `env` in its environment.
async fn run(args: &[&str], env: &[(&'static str, String)]) -> Output {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the command finishes")
        .expect("run token-broker")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn key_ids(app: &TestApp) -> Vec<String> {
    let pool = app.database.pool().await;
    let ids = sqlx::query_scalar("SELECT DISTINCT key_id FROM sessions ORDER BY key_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    ids
}

#[tokio::test]
async fn the_sweep_deletes_idle_and_absolute_expired_sessions_and_keeps_live_ones() {
    // Arrange: idle timeout 3 min, lifetime 4 min; the ID tokens of the test IdP live 5 min, so
    // logins a little "later" on the broker's clock still verify.
    let clock = ManualClock::new(Utc::now());
    let app = spawn_app_with(|s| {
        s.settings.session_idle_timeout = Some("3m".into());
        s.settings.session_max_lifetime = Some("4m".into());
        s.clock = Arc::new(clock.clone());
        s.customize_config = Box::new(|c| {
            c.sweep_interval = Duration::ZERO;
            c.sweep_batch = 2;
        });
    })
    .await;
    let absolute = [
        app.logged_in_browser("alice").await,
        app.logged_in_browser("anna").await,
    ];
    clock.advance(minutes(2));
    for browser in &absolute {
        assert_eq!(app.get_session(browser).await.status(), 200, "used at 2:00");
    }
    let idle = [
        app.logged_in_browser("bob").await,
        app.logged_in_browser("bert").await,
    ];
    let live = [
        app.logged_in_browser("carol").await,
        app.logged_in_browser("chris").await,
    ];
    // 3:30: bob and bert stay unused from here on.
    clock.advance(chrono::Duration::seconds(90));
    for browser in absolute.iter().chain(&live) {
        assert_eq!(app.get_session(browser).await.status(), 200, "used at 3:30");
    }
    // 5:10 — alice/anna: past their 4-minute lifetime, used 1:40 ago; bob/bert: idle 3:10;
    // carol/chris: idle 1:40, 3:10 old.
    clock.advance(chrono::Duration::seconds(100));

    // Act
    let report = app.broker.sweep_expired_sessions().await.unwrap();

    // Assert
    assert_eq!(report.deleted, 4, "{report:?}");
    assert!(!report.skipped);
    assert_eq!(report.cache_failures, 0);
    assert_eq!(app.session_rows().await, 2);
    for browser in absolute.iter().chain(&idle) {
        assert_eq!(
            app.broker.cache.get(&hash_of(browser)).await.unwrap(),
            CacheLookup::Ended,
            "the Redis view of a swept session is a tombstone"
        );
        assert_problem(app.get_session(browser).await, 401).await;
    }
    for browser in &live {
        assert_eq!(app.get_session(browser).await.status(), 200);
    }
    assert_eq!(
        app.broker.sweep_expired_sessions().await.unwrap().deleted,
        0
    );
}

#[tokio::test]
async fn two_replicas_sweeping_at_once_delete_each_expired_row_exactly_once() {
    // Arrange: two live logins, two logins made to look expired, and 1,100 expired rows
    // (idle and absolute) — more than two batches of 500.
    let app =
        spawn_app_with(|s| s.customize_config = Box::new(|c| c.sweep_interval = Duration::ZERO))
            .await;
    let live = [
        app.logged_in_browser("alice").await,
        app.logged_in_browser("bob").await,
    ];
    let expired = [
        app.logged_in_browser("carol").await,
        app.logged_in_browser("dave").await,
    ];
    let pool = app.database.pool().await;
    for browser in &expired {
        // Both last-seen times: the row's own (login) and the touch queue's.
        sqlx::query(
            "WITH idle AS (
                 UPDATE sessions SET last_seen_at = now() - interval '13 hours' WHERE id_hash = $1
                 RETURNING id)
             UPDATE session_activity SET last_seen_at = now() - interval '13 hours'
             WHERE id IN (SELECT id FROM idle)",
        )
        .bind(hash_of(browser).as_bytes())
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO sessions (id, id_hash, subject, user_claims, key_id, id_token_sealed,
                               created_at, last_seen_at, expires_at)
         SELECT gen_random_uuid(), decode(md5(i::text) || md5((-i)::text), 'hex'), 'bulk-' || i,
                '{\"sub\": \"bulk\"}', 'none', '\\x00',
                now() - interval '8 days',
                CASE WHEN i % 2 = 0 THEN now() - interval '13 hours' ELSE now() END,
                CASE WHEN i % 2 = 0 THEN now() + interval '1 day' ELSE now() - interval '1 minute' END
         FROM generate_series(1, 1100) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let (first, second) = (spawn_replica(&app).await, spawn_replica(&app).await);

    // Act: both replicas (and the first broker) sweep at the same moment, twice each.
    let sweeps = join_all(
        [
            &first.broker,
            &second.broker,
            &app.broker,
            &first.broker,
            &second.broker,
        ]
        .map(|broker| broker.sweep_expired_sessions()),
    )
    .await;

    // Assert
    let reports: Vec<_> = sweeps
        .into_iter()
        .map(|sweep| sweep.expect("a concurrent sweep does not fail"))
        .collect();
    let deleted: u64 = reports.iter().map(|r| r.deleted).sum();
    assert_eq!(deleted, 1102, "{reports:?}");
    assert_eq!(app.session_rows().await, 2);
    for browser in &live {
        assert_eq!(first.get("/session", browser).await.status(), 200);
    }
    for browser in &expired {
        assert_eq!(
            second.broker.cache.get(&hash_of(browser)).await.unwrap(),
            CacheLookup::Ended
        );
        assert_problem(second.get("/session", browser).await, 401).await;
    }
}

#[tokio::test]
async fn sessions_list_shows_a_subjects_sessions_and_no_secret() {
    // Arrange
    let app = spawn_app().await;
    let browsers = [
        app.logged_in_browser("alice").await,
        app.logged_in_browser("alice").await,
    ];
    let bob = app.logged_in_browser("bob").await;
    let mut secrets = Vec::new();
    for browser in browsers.iter().chain([&bob]) {
        let record = app
            .broker
            .sessions
            .find(&hash_of(browser))
            .await
            .unwrap()
            .unwrap();
        secrets.push(browser.session().unwrap().clone());
        secrets.push(hash_of(browser).to_hex());
        secrets.push(record.id_token.secret().to_string());
        secrets.push(record.refresh_token.unwrap().secret().to_string());
        let auth = forward_auth(&app.http, &app.address, browser).await;
        secrets.push(auth.headers()["authorization"].to_str().unwrap()[7..].to_string());
    }
    secrets.push(app.encryption_key.secret_base64());
    let env = binary_env(&app, None);

    // Act
    let table = run(&["sessions", "list", "--sub", "alice"], &env).await;
    let json = run(&["sessions", "list", "--sub", "alice", "--json"], &env).await;

    // Assert
    assert_eq!(table.status.code(), Some(0), "{}", stderr(&table));
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let pool = app.database.pool().await;
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM sessions WHERE subject = 'alice' ORDER BY created_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let table_text = stdout(&table);
    assert_eq!(
        table_text.lines().count(),
        3,
        "a header and two rows:\n{table_text}"
    );
    assert!(table_text.lines().next().unwrap().contains("LAST SEEN"));
    let lines: Vec<serde_json::Value> = stdout(&json)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), 2);
    for (id, line) in ids.iter().zip(&lines) {
        assert!(table_text.contains(&id.to_string()));
        assert_eq!(line["id"], id.to_string());
        assert_eq!(line["subject"], "alice");
        for field in ["created_at", "last_seen_at", "expires_at"] {
            assert!(line[field].is_string(), "{field} in {line}");
        }
    }
    let everything = [&table, &json]
        .map(|o| format!("{}{}", stdout(o), stderr(o)))
        .concat();
    assert!(!everything.contains("bob"));
    for secret in &secrets {
        assert!(
            !everything.contains(secret.as_str()),
            "a secret was printed"
        );
    }
}

#[tokio::test]
async fn sessions_revoke_ends_every_session_of_the_subject_and_no_other() {
    // Arrange
    let app = spawn_app().await;
    let alice = [
        app.logged_in_browser("alice").await,
        app.logged_in_browser("alice").await,
    ];
    let bob = app.logged_in_browser("bob").await;
    for browser in alice.iter().chain([&bob]) {
        // Warm the Redis views and access tokens: revoke must not leave them answering.
        cache_view_and_token(&app, browser).await;
    }
    let replica = spawn_replica(&app).await;
    let env = binary_env(&app, None);

    // Act
    let output = run(&["sessions", "revoke", "--sub", "alice"], &env).await;

    // Assert
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("ended 2 session(s)"),
        "{}",
        stdout(&output)
    );
    for browser in &alice {
        assert_problem(app.get_session(browser).await, 401).await;
        assert_problem(replica.get("/session", browser).await, 401).await;
        assert_eq!(
            forward_auth(&app.http, &app.address, browser)
                .await
                .status(),
            401
        );
        assert_eq!(
            forward_auth(&replica.http, &replica.address, browser)
                .await
                .status(),
            401
        );
    }
    assert_eq!(app.get_session(&bob).await.status(), 200);
    assert_eq!(
        forward_auth(&replica.http, &replica.address, &bob)
            .await
            .status(),
        200
    );
    assert_eq!(app.session_rows().await, 1);
    let listed = run(&["sessions", "list", "--sub", "alice"], &env).await;
    assert_eq!(listed.status.code(), Some(0));
    assert!(
        stdout(&listed).contains("no sessions"),
        "{}",
        stdout(&listed)
    );
}

#[tokio::test]
async fn operator_commands_report_a_store_failure_in_one_line_without_the_password() {
    // Arrange: a database that does not exist, reached with a password that must not be printed.
    let app = spawn_app().await;
    let mut url = url::Url::parse(&app.database.url).unwrap();
    url.set_path("tb_test_does_not_exist");
    url.set_password(Some("hunter2-db-password")).unwrap();
    let mut env = binary_env(&app, None);
    env.retain(|(name, _)| *name != "DATABASE_URL");
    env.push(("DATABASE_URL", url.to_string()));

    // Act
    let output = run(&["sessions", "list", "--sub", "alice"], &env).await;

    // Assert
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.starts_with("token-broker: "), "{message}");
    assert!(!message.contains("hunter2-db-password"), "{message}");
    assert!(stdout(&output).is_empty());
}

#[tokio::test]
async fn rotate_keys_reseals_every_session_so_the_old_key_can_be_removed() {
    // Arrange: sessions sealed under key A (tokens in PostgreSQL, views and access tokens in
    // Redis), then key B rolled out in front of A.
    let app = spawn_app().await;
    let key_a = app.encryption_key.clone();
    let key_b = EncryptionKey::generate();
    let both = format!("{},{}", key_b.secret_base64(), key_a.secret_base64());
    let alice = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    assert_eq!(
        forward_auth(&app.http, &app.address, &alice).await.status(),
        200
    );
    assert_eq!(key_ids(&app).await, vec![key_a.id().to_string()]);
    let rolled_out = {
        let both = both.clone();
        spawn_replica_with(&app, move |s| s.encryption_keys = Some(both)).await
    };
    assert_eq!(rolled_out.get("/session", &alice).await.status(), 200);

    // Act
    let output = run(&["rotate-keys"], &binary_env(&app, Some(&both))).await;

    // Assert: every row under B; a replica that knows only B serves both sessions.
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output).trim(),
        format!("resealed 2 sessions under key {}", key_b.id())
    );
    assert_eq!(key_ids(&app).await, vec![key_b.id().to_string()]);
    let again = run(&["rotate-keys"], &binary_env(&app, Some(&both))).await;
    assert!(
        stdout(&again).starts_with("resealed 0 sessions"),
        "{}",
        stdout(&again)
    );

    let only_b = {
        let key_b = key_b.secret_base64();
        spawn_replica_with(&app, move |s| s.encryption_keys = Some(key_b)).await
    };
    let refreshes = app.idp.stats().refresh_grants;
    for (browser, subject) in [(&alice, "alice"), (&bob, "bob")] {
        // The Redis view is sealed under A: a miss, answered from PostgreSQL.
        assert_eq!(only_b.get("/session", browser).await.status(), 200);
        // So is the cached access token: the row's copy, resealed under B, serves.
        let auth = forward_auth(&only_b.http, &only_b.address, browser).await;
        assert_eq!(auth.status(), 200);
        assert_eq!(auth.headers()["x-auth-subject"], subject);
    }
    assert_eq!(app.idp.stats().refresh_grants, refreshes);
    // The resealed refresh token works, and the refreshed tokens are stored under B.
    expire_cached_token(&app, &alice).await;
    assert_eq!(
        forward_auth(&only_b.http, &only_b.address, &alice)
            .await
            .status(),
        200
    );
    assert_eq!(app.idp.stats().refresh_grants, refreshes + 1);
    assert_eq!(key_ids(&app).await, vec![key_b.id().to_string()]);
}

#[tokio::test]
async fn rotate_keys_reads_each_session_a_few_times_however_many_there_are() {
    // Arrange: 10,000 sessions sealed under key A, in a database of their own with no broker
    // running (nothing else reads the table). PostgreSQL synchronizes sequential scans of tables
    // larger than a quarter of `shared_buffers`, so that a scan starts where the last one
    // stopped; smaller tables are scanned from their first page every time. Off for this
    // database, so that what is measured is the same whatever the server's `shared_buffers`.
    const SESSIONS: i64 = 10_000;
    let database = TestDatabase::create().await;
    let redis = TestRedis::new();
    let (key_a, key_b) = (EncryptionKey::generate(), EncryptionKey::generate());
    let env = |keys: String| {
        vec![
            ("BROKER_PUBLIC_URL", "http://127.0.0.1:9".to_string()),
            ("BROKER_OIDC_ISSUER", "http://127.0.0.1:9".to_string()),
            ("BROKER_CLIENT_ID", CLIENT_ID.to_string()),
            ("BROKER_ALLOWED_ORIGINS", "http://127.0.0.1:9".to_string()),
            ("BROKER_ENCRYPTION_KEYS", keys),
            ("DATABASE_URL", database.url.clone()),
            ("REDIS_URL", redis.url.clone()),
            ("BROKER_REDIS_KEY_PREFIX", redis.prefix.clone()),
        ]
    };
    let mut observer = <sqlx::PgConnection as sqlx::Connection>::connect(&database.url)
        .await
        .unwrap();
    let no_synchronized_scans = format!(
        r#"ALTER DATABASE "{}" SET synchronize_seqscans = off"#,
        database.name
    );
    sqlx::query(&no_synchronized_scans)
        .execute(&mut observer)
        .await
        .unwrap();
    let migrated = run(&["migrate"], &env(key_a.secret_base64())).await;
    assert_eq!(migrated.status.code(), Some(0), "{}", stderr(&migrated));
    insert_sessions_sealed_under(&database, &key_a, SESSIONS).await;
    let before = sessions_table_counts(&mut observer).await;

    // Act
    let keys = format!("{},{}", key_b.secret_base64(), key_a.secret_base64());
    let output = run(&["rotate-keys"], &env(keys)).await;

    // Assert: about seven page reads a session: its id in the pass, its row locked, read and
    // written anew, the final check that none is left (measured: 7.3). Batches that each looked
    // for rows under the old key with a sequential scan from the table's start read 13.6 a
    // session here, and more the more sessions there are (each batch passes over the rows
    // resealed before it).
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output).trim(),
        format!("resealed {SESSIONS} sessions under key {}", key_b.id())
    );
    let after = sessions_table_counts(&mut observer).await;
    assert_eq!(after.rows_updated - before.rows_updated, SESSIONS);
    let pages = after.pages_read - before.pages_read;
    assert!(
        pages <= 10 * SESSIONS,
        "rotate-keys read {pages} pages of the table for {SESSIONS} sessions ({:.1} a session)",
        pages as f64 / SESSIONS as f64
    );
}

/// Stores `count` sessions sealed under `key`, as logins store them, and closes the connections.
async fn insert_sessions_sealed_under(database: &TestDatabase, key: &EncryptionKey, count: i64) {
    use futures_util::StreamExt;
    use token_broker::store::postgres::{Connections, PgSessionRepository};
    use token_broker::store::SessionRepository;

    let time_out = Duration::from_secs(30);
    let options = database
        .url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap();
    let repository = PgSessionRepository::new(
        Connections::new(options, 8, time_out),
        token_broker::crypto::Cipher::new(std::slice::from_ref(key)),
        time_out,
    );
    let now = Utc::now();
    futures_util::stream::iter(0..count)
        .for_each_concurrent(8, |n| {
            let repository = &repository;
            async move {
                let record = token_broker::store::SessionRecord {
                    id: uuid::Uuid::new_v4(),
                    id_hash: SessionId::generate().hash(),
                    user: token_broker::domain::UserClaims::select(
                        format!("user-{n}"),
                        &Default::default(),
                    ),
                    idp_sid: None,
                    id_token: token_broker::domain::IdToken::new("i".repeat(900)),
                    refresh_token: Some(token_broker::domain::RefreshToken::new("r".repeat(64))),
                    access_token: None,
                    created_at: now,
                    last_seen_at: now,
                    expires_at: now + chrono::Duration::hours(12),
                };
                repository.insert(&record).await.unwrap();
            }
        })
        .await;
}

/// What PostgreSQL counted for the `sessions` table.
struct SessionsTableCounts {
    /// Pages of the table read (from `shared_buffers` or not) by any statement.
    pages_read: i64,
    rows_updated: i64,
}

/// The table's counters once every other connection to the database has closed (autovacuum's
/// too): a backend reports its counts as it exits, before it leaves `pg_stat_activity`.
async fn sessions_table_counts(observer: &mut sqlx::PgConnection) -> SessionsTableCounts {
    let others = "SELECT count(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let open: i64 = sqlx::query_scalar(others)
            .fetch_one(&mut *observer)
            .await
            .unwrap();
        if open == 0 {
            let (pages_read, rows_updated) = sqlx::query_as(
                "SELECT coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0), n_tup_upd \
                 FROM pg_statio_user_tables \
                 JOIN pg_stat_user_tables USING (relid, schemaname, relname) \
                 WHERE relname = 'sessions'",
            )
            .fetch_one(&mut *observer)
            .await
            .unwrap();
            return SessionsTableCounts {
                pages_read,
                rows_updated,
            };
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} other connection(s) to the test database still open after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rotate_keys_with_a_bad_key_list_names_the_variable_without_echoing_a_key() {
    // Arrange
    let app = spawn_app().await;
    let good = app.encryption_key.secret_base64();
    let short = "c2hvcnQtc2VjcmV0LWtleS12YWx1ZQ==";
    let garbage = "not-base64-secret!value";

    for keys in [format!("{good},{short}"), format!("{garbage},{good}")] {
        // Act
        let output = run(&["rotate-keys"], &binary_env(&app, Some(&keys))).await;

        // Assert
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains("BROKER_ENCRYPTION_KEYS"), "{message}");
        for key in [&good, short, garbage] {
            assert!(!message.contains(key), "a key was echoed: {message}");
        }
        assert!(stdout(&output).is_empty());
    }
}

#[tokio::test]
async fn rotate_keys_ends_sessions_sealed_under_a_key_no_longer_configured() {
    // Arrange: a session under key A, cached live in Redis; then A is dropped from the key list
    // before it was rotated away (an operator mistake).
    let app = spawn_app().await;
    let alice = app.logged_in_browser("alice").await;
    assert_eq!(app.get("/session", &alice).await.status(), 200);
    let only_b = EncryptionKey::generate().secret_base64();

    // Act
    let output = run(&["rotate-keys"], &binary_env(&app, Some(&only_b))).await;

    // Assert: the row is gone, and so is the live view every replica would answer from.
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(printed.starts_with("resealed 0 sessions"), "{printed}");
    assert!(
        printed.contains("ended 1 session(s) sealed under keys no longer configured"),
        "{printed}"
    );
    assert!(key_ids(&app).await.is_empty());
    assert_problem(app.get("/session", &alice).await, 401).await;
}
