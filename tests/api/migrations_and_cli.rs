//! The binary's commands: concurrent `migrate` and `serve` on one fresh database, configuration
//! errors that name each variable without echoing a secret, `openapi`, and `--help`.

use std::process::Output;

use crate::helpers::*;

const REQUIRED: [&str; 7] = [
    "BROKER_PUBLIC_URL",
    "BROKER_OIDC_ISSUER",
    "BROKER_CLIENT_ID",
    "BROKER_ALLOWED_ORIGINS",
    "BROKER_ENCRYPTION_KEYS",
    "DATABASE_URL",
    "REDIS_URL",
];

/// Runs the binary to completion with only `PATH` and `env` in its environment, so the suite's
/// own `DATABASE_URL` and `REDIS_URL` cannot leak in.
fn command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .kill_on_drop(true);
    command
}

async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let output = command(args, env).output();
    tokio::time::timeout(std::time::Duration::from_secs(60), output)
        .await
        .expect("finishes")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn migration_files() -> Vec<i64> {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut versions: Vec<i64> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".sql"))
        .map(|name| {
            name.split('_')
                .next()
                .unwrap()
                .parse()
                .expect("<version>_<name>.sql")
        })
        .collect();
    versions.sort_unstable();
    versions
}

/// The migrated state of a database: `sessions` tables, applied versions, all successful.
async fn migrated_state(database: &TestDatabase) -> (i64, Vec<i64>, bool) {
    let pool = database.pool().await;
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'sessions'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    let all_succeeded: bool = sqlx::query_scalar("SELECT bool_and(success) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    (tables, versions, all_succeeded)
}

#[tokio::test]
async fn three_migrate_processes_started_together_all_succeed_and_migrate_once() {
    // Arrange
    let database = TestDatabase::create().await;
    let env = [("DATABASE_URL", database.url.as_str())];

    // Act: all three are started before any is awaited.
    let children: Vec<_> = (0..3)
        .map(|_| command(&["migrate"], &env).output())
        .collect();
    let outputs = futures_util::future::join_all(children).await;

    // Assert
    for output in outputs {
        let output = output.unwrap();
        assert!(
            output.status.success(),
            "{:?}: {}{}",
            output.status,
            text(&output.stdout),
            text(&output.stderr)
        );
    }
    let (tables, versions, all_succeeded) = migrated_state(&database).await;
    assert_eq!(tables, 1);
    assert_eq!(versions, migration_files());
    assert!(all_succeeded);
}

#[tokio::test]
async fn upgrading_a_database_with_sessions_keeps_each_ones_last_seen_time() {
    // Arrange: a database migrated by the version before `session_activity` (its migrations,
    // copied), holding sessions that version wrote: last-seen times only in `sessions`.
    let database = TestDatabase::create().await;
    let pool = migrate_as_earlier_version(&database, "20261206000002", 3).await;
    // Sessions as that version writes them: an INSERT that names only `sessions`.
    let insert_as_earlier_version = |from: i32, to: i32| {
        sqlx::query(
            "INSERT INTO sessions (id, id_hash, subject, user_claims, key_id, id_token_sealed,
                                   created_at, last_seen_at, expires_at)
             SELECT gen_random_uuid(), sha256(n::text::bytea), 'user-' || n, '{\"sub\": \"x\"}', 'k1',
                    '\\x00', now() - interval '1 hour', now() - n * interval '1 minute', now() + interval '1 day'
             FROM generate_series($1::int, $2::int) AS n",
        )
        .bind(from)
        .bind(to)
        .execute(&pool)
    };
    insert_as_earlier_version(1, 20).await.unwrap();

    // Act: this version's migrations; then that version, still running on other replicas during
    // the rolling upgrade, stores more sessions its way.
    let migrated = run(&["migrate"], &[("DATABASE_URL", database.url.as_str())]).await;
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    insert_as_earlier_version(21, 30).await.unwrap();

    // Assert: every session has its activity row, with its own time, whoever stored it; and
    // deleting a session deletes that row with it.
    let unmatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sessions s FULL JOIN session_activity a ON a.id = s.id
         WHERE a.last_seen_at IS DISTINCT FROM s.last_seen_at",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let activity_rows = || async {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM session_activity")
            .fetch_one(&pool)
            .await
            .unwrap();
        count
    };
    assert_eq!((activity_rows().await, unmatched), (30, 0));
    sqlx::query("DELETE FROM sessions WHERE subject = 'user-1'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(activity_rows().await, 29);
    pool.close().await;
}

/// Migrates `database` as the version before migration `first_new` did: with copies of the
/// migrations before it (`count` of them).
async fn migrate_as_earlier_version(
    database: &TestDatabase,
    first_new: &str,
    count: usize,
) -> sqlx::PgPool {
    let earlier = std::env::temp_dir().join(format!("tb-migrations-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&earlier).unwrap();
    let mut copied = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.as_str() < first_new {
            std::fs::copy(&path, earlier.join(&name)).unwrap();
            copied += 1;
        }
    }
    assert_eq!(copied, count, "the migrations before {first_new}");
    let pool = database.pool().await;
    let migrator = sqlx::migrate::Migrator::new(earlier.as_path())
        .await
        .unwrap();
    migrator.run(&pool).await.unwrap();
    std::fs::remove_dir_all(&earlier).unwrap();
    pool
}

#[tokio::test]
async fn sessions_stored_without_an_activity_row_get_one_when_migrating() {
    // Arrange: a database migrated by the version that added `session_activity` (whose logins
    // insert both rows in one statement), holding sessions that it stored, and sessions that
    // a replica of the version before it stored meanwhile (no activity row).
    let database = TestDatabase::create().await;
    let pool = migrate_as_earlier_version(&database, "20261206000003", 4).await;
    for statement in [
        "WITH session AS (
             INSERT INTO sessions (id, id_hash, subject, user_claims, key_id, id_token_sealed,
                                   created_at, last_seen_at, expires_at)
             SELECT gen_random_uuid(), sha256(n::text::bytea), 'user-' || n, '{}', 'k1', '\\x00',
                    now() - interval '1 hour', now() - n * interval '1 minute', now() + interval '1 day'
             FROM generate_series(1, 5) AS n
             RETURNING id, last_seen_at)
         INSERT INTO session_activity (id, last_seen_at) SELECT id, last_seen_at FROM session",
        "INSERT INTO sessions (id, id_hash, subject, user_claims, key_id, id_token_sealed,
                               created_at, last_seen_at, expires_at)
         SELECT gen_random_uuid(), sha256(n::text::bytea), 'user-' || n, '{}', 'k1', '\\x00',
                now() - interval '1 hour', now() - n * interval '1 minute', now() + interval '1 day'
         FROM generate_series(6, 15) AS n",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }

    // Act: this version's migrations; then the version before, still running on other
    // replicas, stores one more session its way.
    let migrated = run(&["migrate"], &[("DATABASE_URL", database.url.as_str())]).await;
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    sqlx::query(
        "WITH session AS (
             INSERT INTO sessions (id, id_hash, subject, user_claims, key_id, id_token_sealed,
                                   created_at, last_seen_at, expires_at)
             VALUES (gen_random_uuid(), sha256('16'), 'user-16', '{}', 'k1', '\\x00',
                     now(), now(), now() + interval '1 day')
             RETURNING id, last_seen_at)
         INSERT INTO session_activity (id, last_seen_at) SELECT id, last_seen_at FROM session",
    )
    .execute(&pool)
    .await
    .unwrap();

    // Assert: each of the 16 has exactly one activity row, with its own time.
    let (activity_rows, unmatched): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM session_activity),
                (SELECT count(*) FROM sessions s FULL JOIN session_activity a ON a.id = s.id
                 WHERE a.last_seen_at IS DISTINCT FROM s.last_seen_at)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((activity_rows, unmatched), (16, 0));
    pool.close().await;
}

#[tokio::test]
async fn three_serve_processes_starting_together_on_a_fresh_database_all_come_up() {
    // Arrange: an issuer nobody answers at; start-up does not need the IdP.
    let database = TestDatabase::create().await;
    let redis = TestRedis::new();
    let key = token_broker::crypto::EncryptionKey::generate().secret_base64();
    let env = [
        ("BROKER_LISTEN_ADDR", "127.0.0.1:0"),
        ("BROKER_PUBLIC_URL", "http://127.0.0.1:1"),
        ("BROKER_OIDC_ISSUER", "http://127.0.0.1:1"),
        ("BROKER_CLIENT_ID", CLIENT_ID),
        ("BROKER_ALLOWED_ORIGINS", FRONTEND),
        ("BROKER_ENCRYPTION_KEYS", key.as_str()),
        ("DATABASE_URL", database.url.as_str()),
        ("REDIS_URL", redis.url.as_str()),
        ("BROKER_REDIS_KEY_PREFIX", redis.prefix.as_str()),
    ];

    // Act
    let mut processes: Vec<BrokerProcess> = (0..3)
        .map(|_| BrokerProcess::spawn(&["serve"], &env))
        .collect();
    for process in &mut processes {
        // Logged after the migrations ran; a failed start-up ends the process instead.
        process.wait_for_line("token-broker listening").await;
    }

    // Assert
    for process in processes {
        let (status, output) = process.terminate().await;
        assert!(status.success(), "{status}: {output}");
    }
    let (tables, versions, all_succeeded) = migrated_state(&database).await;
    assert_eq!(tables, 1);
    assert_eq!(versions, migration_files());
    assert!(all_succeeded);
}

#[tokio::test]
async fn serve_without_configuration_names_each_missing_variable_on_its_own_line() {
    for args in [&["serve"][..], &[]] {
        // Act
        let output = run(args, &[]).await;

        // Assert
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        for variable in REQUIRED {
            let lines = stderr
                .lines()
                .filter(|line| line.contains(&format!("{variable}: ")))
                .count();
            assert_eq!(lines, 1, "{variable} in:\n{stderr}");
        }
        assert_eq!(
            stderr.lines().count(),
            REQUIRED.len(),
            "one line per problem:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn invalid_settings_are_named_without_echoing_any_secret() {
    // Arrange: everything valid but one setting; secrets given that must never be printed.
    let client_secret = "client-secret-canary-7d1c";
    let almost_a_key = "c2VjcmV0LWtleS10aGF0LWlzLW9uZS1ieXRlLXNobw=="; // 31 bytes
    let cases = [
        ("BROKER_ENCRYPTION_KEYS", "short", "BROKER_ENCRYPTION_KEYS"),
        (
            "BROKER_ENCRYPTION_KEYS",
            almost_a_key,
            "BROKER_ENCRYPTION_KEYS",
        ),
        (
            "DATABASE_URL",
            "mysql://user:db-password-canary@db/x",
            "DATABASE_URL",
        ),
        (
            "REDIS_URL",
            "memcached://:redis-password-canary@cache",
            "REDIS_URL",
        ),
    ];
    let valid_key = token_broker::crypto::EncryptionKey::generate().secret_base64();

    for (variable, value, named) in cases {
        let mut env = vec![
            ("BROKER_PUBLIC_URL", "http://127.0.0.1:1"),
            ("BROKER_OIDC_ISSUER", "http://127.0.0.1:1"),
            ("BROKER_CLIENT_ID", CLIENT_ID),
            ("BROKER_CLIENT_SECRET", client_secret),
            ("BROKER_ALLOWED_ORIGINS", FRONTEND),
            ("BROKER_ENCRYPTION_KEYS", valid_key.as_str()),
            (
                "DATABASE_URL",
                "postgres://user:db-password-canary@127.0.0.1:1/x",
            ),
            ("REDIS_URL", "redis://:redis-password-canary@127.0.0.1:1"),
        ];
        env.retain(|(name, _)| *name != variable);
        env.push((variable, value));

        // Act
        let output = run(&["serve"], &env).await;

        // Assert
        let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert_eq!(
            output.status.code(),
            Some(2),
            "{variable}={value}: {printed}"
        );
        assert_eq!(printed.lines().count(), 1, "{printed}");
        assert!(printed.contains(&format!("{named}: ")), "{printed}");
        for secret in [
            client_secret,
            "db-password-canary",
            "redis-password-canary",
            valid_key.as_str(),
            value,
        ] {
            assert!(
                !printed.contains(secret),
                "{variable}={value}: printed {secret:?}: {printed}"
            );
        }
    }
}

#[tokio::test]
async fn migrate_against_an_unreachable_database_fails_without_echoing_its_password() {
    // Act
    let output = run(
        &["migrate"],
        &[(
            "DATABASE_URL",
            "postgres://user:db-password-canary@127.0.0.1:1/x",
        )],
    )
    .await;

    // Assert
    let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(!output.status.success(), "{printed}");
    assert!(!printed.is_empty());
    assert!(!printed.contains("db-password-canary"), "{printed}");
}

#[tokio::test]
async fn openapi_prints_the_committed_document_exactly() {
    // Arrange
    let committed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json"),
    )
    .unwrap();

    // Act
    let output = run(&["openapi"], &[]).await;

    // Assert
    assert!(output.status.success());
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout) == committed,
        "`token-broker openapi` differs from openapi/openapi.json"
    );
}

#[tokio::test]
async fn help_lists_every_flag_and_command_and_no_secret_from_the_environment() {
    // Arrange: clap shows `[env: NAME=value]` for a set variable unless told not to.
    let env = [
        ("BROKER_CLIENT_SECRET", "client-secret-canary-7d1c"),
        ("BROKER_ENCRYPTION_KEYS", "encryption-key-canary"),
        ("DATABASE_URL", "postgres://user:db-password-canary@db/x"),
        ("REDIS_URL", "redis://:redis-password-canary@cache"),
    ];

    // Act
    let output = run(&["--help"], &env).await;

    // Assert
    let help = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for flag in [
        "--listen-addr",
        "--public-url",
        "--oidc-issuer",
        "--client-id",
        "--client-secret",
        "--scopes",
        "--allowed-origins",
        "--default-return-to",
        "--post-logout-redirect-url",
        "--encryption-keys",
        "--database-url",
        "--redis-url",
        "--session-idle-timeout",
        "--session-max-lifetime",
        "--login-ttl",
        "--cookie-samesite",
        "--api-routes",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    for command in ["serve", "migrate", "openapi", "dev"] {
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(command)),
            "{command} missing:\n{help}"
        );
    }
    for (_, secret) in env {
        assert!(!help.contains(secret), "--help shows {secret}");
    }
}
