//! Operator commands: `sessions list`, `sessions revoke` (incident response) and `rotate-keys`
//! (re-encryption after a new key was added). They run on the configuration and stores of
//! `serve`; this module does the work and renders the output, [`crate::cli`] prints it and picks
//! the exit code. Nothing here prints a token, a cookie or a session-ID hash.

use chrono::SecondsFormat;

use crate::config::Config;
use crate::domain::SessionIdHash;
use crate::startup::{StartupError, Stores};
use crate::store::{SessionCache, SessionRepository, SessionSummary, StoreError};

/// Rows re-sealed per transaction by `rotate-keys`: short transactions, so requests that touch
/// a row being re-sealed wait only briefly.
pub const RESEAL_BATCH: i64 = 200;

/// An operator command that could not finish. The message is one line that names no secret.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect: {0}")]
    Connect(#[from] StartupError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The rows are gone (the sessions cannot be refreshed or re-read), but some Redis views still
    /// say live: until they lapse, `/session` and `/auth` may keep answering for them.
    #[error(
        "ended {deleted} session(s) in PostgreSQL, but {failed} cached view(s) could not be \
         ended in Redis (they lapse within the idle timeout): {error}"
    )]
    CacheNotEnded {
        deleted: usize,
        failed: usize,
        error: StoreError,
    },
}

/// The stores of `serve`, without migrating: an operator command never changes the schema
/// (`token-broker migrate` does).
pub async fn connect(config: &Config) -> Result<Stores, AdminError> {
    let mut config = config.clone();
    config.run_migrations = false;
    Ok(Stores::connect(&config).await?)
}

/// The sessions of a subject, oldest first.
pub async fn list_sessions(
    sessions: &dyn SessionRepository,
    sub: &str,
) -> Result<Vec<SessionSummary>, AdminError> {
    Ok(sessions.list_by_subject(sub).await?)
}

/// Ends every session of a subject: deletes the rows, then replaces each Redis view with a
/// tombstone so no replica answers from its cache. Returns how many sessions ended.
/// The IdP's refresh tokens are not revoked (the rows are gone, so the broker never uses them).
pub async fn revoke_sessions(
    sessions: &dyn SessionRepository,
    cache: &dyn SessionCache,
    sub: &str,
) -> Result<usize, AdminError> {
    let hashes = sessions.delete_by_subject(sub).await?;
    end_cached_views(cache, &hashes).await?;
    Ok(hashes.len())
}

/// Replaces the Redis view of each (already deleted) session with a tombstone.
async fn end_cached_views(
    cache: &dyn SessionCache,
    hashes: &[SessionIdHash],
) -> Result<(), AdminError> {
    let mut failed = 0;
    let mut first_error = None;
    for hash in hashes {
        if let Err(error) = cache.mark_ended(hash).await {
            failed += 1;
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        None => Ok(()),
        Some(error) => Err(AdminError::CacheNotEnded {
            deleted: hashes.len(),
            failed,
            error,
        }),
    }
}

/// What `rotate-keys` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Sessions now sealed under the first key.
    pub resealed: u64,
    /// Sessions sealed under a key that is no longer configured: they could never be opened
    /// again, so they were ended.
    pub ended: usize,
}

/// Re-seals every stored token under the current (first) key: passes over the sessions in id
/// order, a batch at a time, until none is left under another key. (One pass does it, unless a
/// replica still sealing under the old key stored sessions behind it.) Rows that no configured
/// key opens are deleted by the store; their cached views are ended here.
pub async fn rotate_keys(
    sessions: &dyn SessionRepository,
    cache: &dyn SessionCache,
) -> Result<RotationReport, AdminError> {
    let mut report = RotationReport::default();
    loop {
        let mut after = Some(uuid::Uuid::nil());
        while let Some(start) = after {
            let outcome = sessions.reseal_batch(start, RESEAL_BATCH).await?;
            end_cached_views(cache, &outcome.ended).await?;
            report.resealed += outcome.resealed;
            report.ended += outcome.ended.len();
            after = outcome.next;
        }
        if !sessions.any_sealed_under_other_keys().await? {
            return Ok(report);
        }
    }
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A fixed-width table, one session per line, with a header; text from the IdP (subject, sid)
/// is escaped so it cannot drive the operator's terminal.
pub fn render_table(sessions: &[SessionSummary]) -> String {
    let rows: Vec<[String; 6]> = sessions
        .iter()
        .map(|s| {
            [
                s.id.to_string(),
                s.subject.escape_debug().to_string(),
                timestamp(s.created_at),
                timestamp(s.last_seen_at),
                timestamp(s.expires_at),
                s.idp_sid
                    .as_deref()
                    .map_or_else(|| "-".to_string(), |sid| sid.escape_debug().to_string()),
            ]
        })
        .collect();
    let header = [
        "SESSION",
        "SUBJECT",
        "CREATED",
        "LAST SEEN",
        "EXPIRES",
        "IDP SID",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let line = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ");
            format!("{}\n", line.trim_end())
        })
        .collect()
}

/// One JSON object per line (`id`, `subject`, `idp_sid`, `created_at`, `last_seen_at`,
/// `expires_at`), for scripts.
pub fn render_json_lines(sessions: &[SessionSummary]) -> Result<String, serde_json::Error> {
    sessions
        .iter()
        .map(|s| serde_json::to_string(s).map(|line| line + "\n"))
        .collect()
}

/// `message` on one line, with every configured secret (connection URLs and their passwords,
/// the client secret, the keys) replaced: store errors are printed to the operator's terminal.
pub fn one_line_without_secrets(message: &str, config: &Config) -> String {
    let mut secrets: Vec<String> = vec![
        config.database_url.secret().to_string(),
        config.redis_url.secret().to_string(),
    ];
    for url in [config.database_url.secret(), config.redis_url.secret()] {
        if let Some(password) = url::Url::parse(url)
            .ok()
            .and_then(|u| u.password().map(str::to_string))
        {
            secrets.push(password);
        }
    }
    if let Some(secret) = &config.client_secret {
        secrets.push(secret.secret().to_string());
    }
    secrets.extend(config.encryption_keys.iter().map(|k| k.secret_base64()));
    let mut line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        line = line.replace(secret.as_str(), "[redacted]");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};

    use crate::clock::{Clock, SystemClock};
    use crate::config::Settings;
    use crate::crypto::EncryptionKey;
    use crate::domain::{IdToken, RefreshToken, SessionId, UserClaims};
    use crate::store::{CacheLookup, SessionRecord};

    fn summary(subject: &str, sid: Option<&str>) -> SessionSummary {
        let at = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        SessionSummary {
            id: uuid::Uuid::nil(),
            subject: subject.into(),
            idp_sid: sid.map(str::to_string),
            created_at: at,
            last_seen_at: at,
            expires_at: at,
        }
    }

    #[test]
    fn the_table_has_a_header_aligned_columns_and_escaped_text() {
        let table = render_table(&[summary("alice", Some("sid-1")), summary("bob\x1b[2J", None)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("SESSION"));
        assert!(lines[1].contains("2025-01-02T03:04:05Z"));
        assert!(lines[1].ends_with("sid-1"));
        assert!(lines[2].contains("bob\\u{1b}[2J") && lines[2].ends_with('-'));
        let column = lines[0].find("CREATED").unwrap();
        assert_eq!(lines[1].find("2025"), Some(column));
    }

    #[test]
    fn json_lines_are_one_object_per_session() {
        let text = render_json_lines(&[summary("alice", None), summary("bob", None)]).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed[1]["subject"], "bob");
        assert_eq!(parsed[0]["created_at"], "2025-01-02T03:04:05Z");
    }

    #[test]
    fn error_lines_name_no_secret() {
        let key = EncryptionKey::generate();
        let settings = Settings {
            public_url: Some("https://app.example.com".into()),
            oidc_issuer: Some("https://idp.example.com".into()),
            client_id: Some("broker".into()),
            client_secret: Some("client-s3cret".into()),
            allowed_origins: Some("https://app.example.com".into()),
            encryption_keys: Some(key.secret_base64()),
            database_url: Some("postgres://u:dbpass@db/broker".into()),
            redis_url: Some("redis://:redispass@redis:6379".into()),
            ..Settings::default()
        };
        let config = Config::from_settings(&settings).unwrap();
        let message = format!(
            "failed at postgres://u:dbpass@db/broker\nwith dbpass, redispass, client-s3cret, {}",
            key.secret_base64()
        );
        let line = one_line_without_secrets(&message, &config);
        assert!(!line.contains('\n'));
        for secret in ["dbpass", "redispass", "client-s3cret", &key.secret_base64()] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
    }

    #[tokio::test]
    async fn revoke_ends_every_session_of_the_subject_only() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let stores = Stores::in_memory(clock.clone());
        let mut ids = Vec::new();
        for sub in ["alice", "alice", "bob"] {
            let id = SessionId::generate();
            let now = clock.now();
            let record = SessionRecord {
                id: uuid::Uuid::new_v4(),
                id_hash: id.hash(),
                user: UserClaims::select(sub.into(), &Default::default()),
                idp_sid: None,
                id_token: IdToken::new("id"),
                refresh_token: Some(RefreshToken::new("rt")),
                access_token: None,
                created_at: now,
                last_seen_at: now,
                expires_at: now + chrono::Duration::hours(1),
            };
            stores.sessions.insert(&record).await.unwrap();
            stores
                .cache
                .put(
                    &id.hash(),
                    &record.view(),
                    std::time::Duration::from_secs(60),
                    crate::store::Replacing::AnyViewOrEntry,
                )
                .await
                .unwrap();
            ids.push(id);
        }

        let listed = list_sessions(stores.sessions.as_ref(), "alice")
            .await
            .unwrap();
        let ended = revoke_sessions(stores.sessions.as_ref(), stores.cache.as_ref(), "alice")
            .await
            .unwrap();

        assert_eq!(listed.len(), 2);
        assert_eq!(ended, 2);
        for id in &ids[..2] {
            assert_eq!(
                stores.cache.get(&id.hash()).await.unwrap(),
                CacheLookup::Ended
            );
        }
        assert!(matches!(
            stores.cache.get(&ids[2].hash()).await.unwrap(),
            CacheLookup::Live(_)
        ));
        assert_eq!(
            list_sessions(stores.sessions.as_ref(), "bob")
                .await
                .unwrap()
                .len(),
            1
        );
    }
}
