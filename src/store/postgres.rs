//! The `sessions` table: the source of truth for every session, on every replica.
//!
//! Tokens are sealed with the [`Cipher`] before they reach SQL, with the row's id and the column
//! name as associated data, so a ciphertext copied into another row or column does not open.
//! Queries use sqlx's runtime API; each one is exercised by the integration tests against a real
//! PostgreSQL.
//!
//! It also bounds the time of every operation (`BROKER_DATABASE_TIMEOUT`: PostgreSQL's
//! `statement_timeout`, and `PgSessionRepository::within_time_out` for a server that stops
//! answering); the connections themselves are [`connections`]' (a small pool per thread).
//!
//! # Row locks: one order
//! A statement that locks rows of several sessions takes them in one order: `sessions` rows
//! before `session_activity` rows, each by ascending id. A deletion's cascade takes a session's
//! activity row after its session row; a last-seen batch takes activity rows only. So no two
//! operations ever wait for each other in a circle, which PostgreSQL would break by ending one
//! of them after `deadlock_timeout` (a back-channel logout answered with an error and its
//! sessions left, a batch of last-seen times lost until the next flush). The order is stated in
//! the SQL (`ORDER BY id FOR UPDATE`: PostgreSQL sorts before it locks), never left to a plan:
//! the same UPDATE follows the array in one plan and the table in another. The sweep takes no
//! part: it never waits for a lock ([`SWEEP_BATCH`]). Single-row operations (a logout, a refresh
//! lease) cannot close a circle.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Connection, Row};
use uuid::Uuid;

mod connections;
pub use connections::{Connections, Pools};

use super::{
    CachedAccessToken, CachedSession, LeaseAttempt, RefreshCommit, RefreshedTokens, ResealOutcome,
    SessionRecord, SessionRepository, SessionSummary, StoreError,
};
use crate::crypto::{Cipher, Sealed};
use crate::domain::{AccessToken, IdToken, RefreshToken, SessionIdHash, UserClaims};

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How much longer than PostgreSQL's own `statement_timeout` the broker waits for an answer
/// before it gives the connection up: a statement PostgreSQL cancelled comes back as an error
/// on a healthy connection, and that should arrive first.
const SILENCE_GRACE: Duration = Duration::from_secs(1);

/// Applies pending migrations. sqlx holds a PostgreSQL advisory lock while it migrates, so
/// replicas that start at the same moment wait for each other instead of colliding.
///
/// Without a statement time-out: a migration may rewrite every session, and a replica may wait
/// for another's migration as long as that takes. The connection that ran them is closed, not
/// put back with its time-out off.
pub async fn migrate(connections: &Connections) -> Result<(), sqlx::migrate::MigrateError> {
    let mut checkout = connections.checkout().await?;
    let connection = checkout.connection();
    sqlx::raw_sql("SET statement_timeout = 0")
        .execute(&mut *connection)
        .await?;
    MIGRATOR.run(connection).await
}

#[derive(Clone)]
pub struct PgSessionRepository {
    pools: Pools,
    cipher: Cipher,
    /// The most one operation may take ([`PgSessionRepository::within_time_out`]).
    time_out: Duration,
}

fn associated_data(id: Uuid, column: &str) -> Vec<u8> {
    format!("sessions:{id}:{column}").into_bytes()
}

impl PgSessionRepository {
    /// `time_out`: the most one operation may take; the connections should have it as their
    /// `statement_timeout` ([`Connections::new`]).
    pub fn new(pools: impl Into<Pools>, cipher: Cipher, time_out: Duration) -> Self {
        Self {
            pools: pools.into(),
            cipher,
            time_out,
        }
    }

    /// The one row a query finds, or none, within [`PgSessionRepository::within_time_out`].
    async fn fetch_optional_row(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<PgRow>, StoreError> {
        self.within_time_out(async |connection| Ok(query.fetch_optional(connection).await?))
            .await
    }

    /// Runs one operation (its statements, its transaction) on one of the thread's connections,
    /// and gives it up when PostgreSQL has not answered within the time-out (plus
    /// [`SILENCE_GRACE`]): a server that went silent (a network partition, a failover that left
    /// the old primary's address unanswered, a frozen host) costs a request a 503, never a hang.
    ///
    /// A connection whose operation was given up on is closed, not put back: nothing waits on
    /// a silent server holding a place among the connections (sixteen such places, and no
    /// request could get a connection even once a new primary answers).
    async fn within_time_out<T>(
        &self,
        operation: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut checkout = self.pools.get().checkout().await?;
        let limit = self.time_out + SILENCE_GRACE;
        let run = async move {
            let outcome = operation(checkout.connection()).await;
            if matches!(&outcome, Err(error) if error.is_read_only_server()) {
                // A server that refuses writes: a primary demoted to a standby, still reached by
                // the connections made before a fail-over behind a DNS name. Closed, not put
                // back, so that a new connection looks the name up again: before, the read-only
                // connections kept being reused (they answer pings) and every login failed until
                // they reached their 30-minute lifetime (`tests/api/faults.rs`).
                drop(checkout);
            } else {
                checkout.give_back().await;
            }
            outcome
        };
        tokio::time::timeout(limit, run)
            .await
            .unwrap_or(Err(StoreError::PostgresSilent(limit)))
    }

    /// Deletes the sessions that `condition` (over `sessions`, with `binds` as `$1`, `$2`, …)
    /// selects, and returns their `id_hash`.
    ///
    /// A plain DELETE locks the session rows in its plan's order, and its cascade then takes
    /// their `session_activity` rows in that order too; so, in one transaction, the session
    /// rows are locked first, then their activity rows (the module's order: each by id), and
    /// only the sessions locked are deleted (one stored meanwhile is not: its rows were not
    /// taken in order).
    async fn delete_sessions_where(
        &self,
        condition: &str,
        binds: &[Option<&str>],
    ) -> Result<Vec<SessionIdHash>, StoreError> {
        let lock_sessions =
            format!("SELECT id FROM sessions WHERE {condition} ORDER BY id FOR UPDATE");
        let rows = self
            .within_time_out(async |connection| {
                let mut transaction = connection.begin().await?;
                let mut sessions = sqlx::query_scalar(&lock_sessions);
                for bind in binds {
                    sessions = sessions.bind(bind);
                }
                let ids: Vec<Uuid> = sessions.fetch_all(&mut *transaction).await?;
                if ids.is_empty() {
                    transaction.commit().await?;
                    return Ok(Vec::new());
                }
                sqlx::query(
                    "SELECT id FROM session_activity WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .bind(&ids)
                .execute(&mut *transaction)
                .await?;
                let rows = sqlx::query("DELETE FROM sessions WHERE id = ANY($1) RETURNING id_hash")
                    .bind(&ids)
                    .fetch_all(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                Ok(rows)
            })
            .await?;
        rows.iter().map(hash_from_row).collect()
    }

    /// Seals a row's tokens under the current key.
    fn seal_tokens(
        &self,
        id: Uuid,
        id_token: &IdToken,
        refresh_token: Option<&RefreshToken>,
        access_token: Option<&CachedAccessToken>,
    ) -> SealedTokens {
        let seal = |column: &str, plain: &str| {
            self.cipher
                .seal(plain.as_bytes(), &associated_data(id, column))
                .bytes
        };
        SealedTokens {
            key_id: self.cipher.current_key_id().to_string(),
            id_token: seal("id_token", id_token.secret()),
            refresh_token: refresh_token.map(|token| seal("refresh_token", token.secret())),
            access_token: access_token.map(|token| seal("access_token", token.token.secret())),
            access_token_expires_at: access_token.map(|token| token.expires_at),
            access_token_refresh_at: access_token.map(|token| token.refresh_at),
        }
    }

    fn record_from_row(&self, row: &PgRow) -> Result<SessionRecord, StoreError> {
        let id: Uuid = row.try_get("id")?;
        let key_id: String = row.try_get("key_id")?;
        let open = |column: &str, bytes: Vec<u8>| -> Result<String, StoreError> {
            let sealed = Sealed {
                key_id: key_id.clone(),
                bytes,
            };
            let plain = self.cipher.open(&sealed, &associated_data(id, column))?;
            String::from_utf8(plain)
                .map_err(|_| StoreError::Corrupt(format!("{column} is not UTF-8")))
        };
        let id_token = open("id_token", row.try_get("id_token_sealed")?)?;
        let refresh_token = row
            .try_get::<Option<Vec<u8>>, _>("refresh_token_sealed")?
            .map(|bytes| open("refresh_token", bytes))
            .transpose()?;
        let access_token = match (
            row.try_get::<Option<Vec<u8>>, _>("access_token_sealed")?,
            row.try_get::<Option<DateTime<Utc>>, _>("access_token_expires_at")?,
            row.try_get::<Option<DateTime<Utc>>, _>("access_token_refresh_at")?,
        ) {
            (Some(bytes), Some(expires_at), Some(refresh_at)) => Some(CachedAccessToken {
                token: AccessToken::new(open("access_token", bytes)?),
                expires_at,
                refresh_at,
            }),
            _ => None,
        };
        let hash: Vec<u8> = row.try_get("id_hash")?;
        let hash: [u8; 32] = hash
            .try_into()
            .map_err(|_| StoreError::Corrupt("id_hash is not 32 bytes".into()))?;
        let claims: sqlx::types::Json<UserClaims> = row.try_get("user_claims")?;
        Ok(SessionRecord {
            id,
            id_hash: SessionIdHash(hash),
            user: claims.0.normalized(),
            idp_sid: row.try_get("idp_sid")?,
            id_token: IdToken::new(id_token),
            refresh_token: refresh_token.map(RefreshToken::new),
            access_token,
            created_at: row.try_get("created_at")?,
            last_seen_at: row.try_get("last_seen_at")?,
            expires_at: row.try_get("expires_at")?,
        })
    }
}

/// A row's tokens, sealed under the current key (see [`PgSessionRepository::seal_tokens`]).
struct SealedTokens {
    key_id: String,
    id_token: Vec<u8>,
    refresh_token: Option<Vec<u8>>,
    access_token: Option<Vec<u8>>,
    access_token_expires_at: Option<DateTime<Utc>>,
    access_token_refresh_at: Option<DateTime<Utc>>,
}

/// Writes every sealed column of a row (`$1` is the row's id): the refresh commit and re-sealing.
const SET_SEALED_TOKENS: &str = "key_id = $2, id_token_sealed = $3, refresh_token_sealed = $4,
     access_token_sealed = $5, access_token_expires_at = $6, access_token_refresh_at = $7";

impl SealedTokens {
    /// Binds `$2`..`$7` of [`SET_SEALED_TOKENS`].
    fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.key_id)
            .bind(self.id_token)
            .bind(self.refresh_token)
            .bind(self.access_token)
            .bind(self.access_token_expires_at)
            .bind(self.access_token_refresh_at)
    }
}

/// One batch of the expired-session sweep: `$1` now, `$2` the idle cutoff, `$3` the batch size;
/// returns the deleted sessions' `id_hash`.
///
/// It finds the sessions that ended where they can be found without reading every session: the
/// index on `expires_at`, and the narrow `session_activity`, which has one row per session
/// (migrations/…_session_activity_for_every_session.sql). A million sessions' activity rows
/// are some 65 MB against some 2.3 GB of sessions: one pass over them takes tens of
/// milliseconds, where a pass over the sessions took seconds, each sweep, on every replica.
/// Each candidate is checked again on its row: a replica of an earlier version may have moved
/// `sessions.last_seen_at` later.
///
/// The sweep never waits for a row lock, so it never blocks a request or a last-seen write and is
/// never one side of a deadlock: it skips (SKIP LOCKED) a session whose row a request holds, and
/// one whose `session_activity` row a last-seen write holds, which the deletion's cascade would
/// otherwise wait for (while the write, going through its rows in id order, could be waiting
/// for one the cascade had already taken). It locks both rows of a session first and deletes
/// only sessions it holds both of; a skipped session is taken by the next sweep. A session
/// without an activity row (none should be: the trigger makes one with every session) is
/// deleted all the same.
pub const SWEEP_BATCH: &str = "WITH ended AS MATERIALIZED (
    SELECT s.id FROM sessions s
    WHERE s.id IN (SELECT id FROM sessions WHERE expires_at <= $1
                   UNION ALL
                   SELECT id FROM session_activity WHERE last_seen_at <= $2)
      AND (s.expires_at <= $1 OR GREATEST(s.last_seen_at,
               (SELECT a.last_seen_at FROM session_activity a WHERE a.id = s.id)) <= $2)
    LIMIT $3 FOR UPDATE OF s SKIP LOCKED),
held AS MATERIALIZED (
    SELECT a.id FROM session_activity a WHERE a.id IN (SELECT id FROM ended)
    FOR UPDATE SKIP LOCKED)
DELETE FROM sessions WHERE id IN (
    SELECT id FROM held
    UNION ALL
    SELECT e.id FROM ended e
    WHERE NOT EXISTS (SELECT 1 FROM session_activity a WHERE a.id = e.id))
RETURNING id_hash";

/// The live sessions (`$1` now, `$2` the idle cutoff), counted without reading every session
/// (see [`SWEEP_BATCH`]), from each session's one activity row: those used since the cutoff,
/// less the few past their absolute end that no sweep has deleted yet, plus the few whose later
/// time is in `sessions` (a replica of an earlier version moved it).
pub const COUNT_LIVE: &str = "SELECT
      (SELECT count(*) FROM session_activity WHERE last_seen_at > $2)
    - (SELECT count(*) FROM sessions s JOIN session_activity a ON a.id = s.id
       WHERE s.expires_at <= $1 AND a.last_seen_at > $2)
    + (SELECT count(*) FROM session_activity a JOIN sessions s ON s.id = a.id
       WHERE a.last_seen_at <= $2 AND s.last_seen_at > $2 AND s.expires_at > $1)";

/// A session's last-seen time, in a query over `sessions`: the later of the row's own (written at
/// login and by each refresh, and by replicas of versions before `session_activity`) and its
/// `session_activity` row's (written by the touch queue). A scalar subquery, so that it also
/// works in `RETURNING`, where the activity row is still there (a deletion's cascade runs after
/// the statement's rows).
macro_rules! last_seen {
    () => {
        "GREATEST(last_seen_at, (SELECT a.last_seen_at FROM session_activity a WHERE a.id = sessions.id))"
    };
}

/// [`last_seen!`] for a session read to be used (a cache miss; `$2` the idle cutoff): the row's
/// own time alone when it is after the cutoff, which already proves the session within its idle
/// timeout, so that the activity row is looked up only for a session whose own time cannot. A
/// lower bound of the session's last use, then, not always the exact time: the caller records a
/// use now ([`SessionRepository::find_view`]'s contract). It saves the cold read a second index
/// lookup and a second page (`EXPLAIN (ANALYZE, BUFFERS)`, 100,000 sessions: 4 buffers instead
/// of 8). CASE evaluates the subquery only in its branch.
macro_rules! last_seen_to_use {
    () => {
        concat!(
            "CASE WHEN last_seen_at > $2 THEN last_seen_at ELSE ",
            last_seen!(),
            " END"
        )
    };
}

/// The columns [`PgSessionRepository::record_from_row`] reads, in a query over `sessions`, with
/// the last-seen time of [`last_seen!`] (or of the macro named).
macro_rules! record_columns {
    () => {
        record_columns!(last_seen)
    };
    ($last_seen:ident) => {
        concat!(
            "id, key_id, id_token_sealed, refresh_token_sealed, access_token_sealed,
             access_token_expires_at, access_token_refresh_at, id_hash, subject, idp_sid,
             user_claims, created_at, expires_at, ",
            $last_seen!(),
            " AS last_seen_at"
        )
    };
}

/// The token-free view of a session read to be used (`$1` its ID hash, `$2` the idle cutoff).
pub const FIND_VIEW_TO_USE: &str = concat!(
    "SELECT id, key_id, user_claims, created_at, expires_at, ",
    last_seen_to_use!(),
    " AS last_seen_at FROM sessions WHERE id_hash = $1"
);

/// The whole record of a session read to be used (`$1` its ID hash, `$2` the idle cutoff).
pub const FIND_RECORD_TO_USE: &str = concat!(
    "SELECT ",
    record_columns!(last_seen_to_use),
    " FROM sessions WHERE id_hash = $1"
);

/// The advisory-lock key of the expired-session sweep (any constant unique to this application).
const SWEEP_LOCK: i64 = 0x746b_6272_6f6b_6572; // "tkbroker"

fn hash_from_row(row: &PgRow) -> Result<SessionIdHash, StoreError> {
    let hash: Vec<u8> = row.try_get("id_hash")?;
    hash.try_into()
        .map(SessionIdHash)
        .map_err(|_| StoreError::Corrupt("id_hash is not 32 bytes".into()))
}

#[async_trait]
impl SessionRepository for PgSessionRepository {
    #[tracing::instrument(skip_all, fields(session = %session.id))]
    async fn insert(&self, session: &SessionRecord) -> Result<(), StoreError> {
        let sealed = self.seal_tokens(
            session.id,
            &session.id_token,
            session.refresh_token.as_ref(),
            session.access_token.as_ref(),
        );
        // The session's `session_activity` row is made by the database, in this statement
        // (migrations/…_session_activity_for_every_session.sql), as for every insert.
        let query = sqlx::query(
            "INSERT INTO sessions (id, key_id, id_token_sealed, refresh_token_sealed, access_token_sealed,
                                   access_token_expires_at, access_token_refresh_at, id_hash, subject,
                                   idp_sid, user_claims, created_at, last_seen_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(session.id);
        let query = sealed
            .bind(query)
            .bind(session.id_hash.as_bytes())
            .bind(session.user.sub())
            .bind(&session.idp_sid)
            .bind(sqlx::types::Json(&session.user))
            .bind(session.created_at)
            .bind(session.last_seen_at)
            .bind(session.expires_at);
        self.within_time_out(async |connection| {
            query.execute(connection).await?;
            Ok(())
        })
        .await
    }

    async fn find(&self, hash: &SessionIdHash) -> Result<Option<SessionRecord>, StoreError> {
        let query = sqlx::query(concat!(
            "SELECT ",
            record_columns!(),
            " FROM sessions WHERE id_hash = $1"
        ))
        .bind(hash.as_bytes());
        let row = self.fetch_optional_row(query).await?;
        row.map(|row| self.record_from_row(&row)).transpose()
    }

    async fn find_for_use(
        &self,
        hash: &SessionIdHash,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let query = sqlx::query(FIND_RECORD_TO_USE)
            .bind(hash.as_bytes())
            .bind(idle_cutoff);
        let row = self.fetch_optional_row(query).await?;
        row.map(|row| self.record_from_row(&row)).transpose()
    }

    async fn find_view(
        &self,
        hash: &SessionIdHash,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Option<CachedSession>, StoreError> {
        // Only the view's columns: a cold `/session` neither transfers nor opens the tokens.
        let query = sqlx::query(FIND_VIEW_TO_USE)
            .bind(hash.as_bytes())
            .bind(idle_cutoff);
        let Some(row) = self.fetch_optional_row(query).await? else {
            return Ok(None);
        };
        let key_id: String = row.try_get("key_id")?;
        if !self.cipher.has_key(&key_id) {
            return Err(crate::crypto::OpenError::UnknownKey(key_id).into());
        }
        let claims: sqlx::types::Json<UserClaims> = row.try_get("user_claims")?;
        Ok(Some(CachedSession {
            id: row.try_get("id")?,
            user: claims.0.normalized(),
            created_at: row.try_get("created_at")?,
            last_seen_at: row.try_get("last_seen_at")?,
            expires_at: row.try_get("expires_at")?,
        }))
    }

    async fn touch_many(&self, touches: &[(Uuid, DateTime<Utc>)]) -> Result<Vec<Uuid>, StoreError> {
        // The times go to `session_activity` (migrations/…_session_activity.sql: a narrow row,
        // so little WAL), by a plain UPDATE: one index lookup and one new row version each, in the
        // row's page (HOT). The rows are locked first, by id (`locked`; the module's lock
        // order). The UPDATE's own order is its plan's: for a small table, a custom plan follows
        // the array and a generic one (a prepared statement's, after five runs) the table, and
        // two replicas' flushes over the same sessions, one in each order, deadlocked in about
        // one test run in three. GREATEST: out-of-order times never move one back. The
        // session's own row is neither written nor locked (the key does not change, so no
        // foreign-key check runs).
        //
        // Asynchronous commit: the batch does not wait for its WAL to reach the disk (the WAL
        // writer flushes it within 3 × wal_writer_delay). Last-seen times are the one write the
        // broker can lose in a PostgreSQL crash without harm: a lost one makes the session end
        // up to one touch interval early, as a replica's crash already could (flows/touch.rs).
        // Every other write keeps the server's synchronous_commit. One statement, so one round
        // trip: `set_config(…, true)` holds for the statement's own transaction, whose commit
        // reads it (the same as BEGIN; SET LOCAL …; UPDATE …; COMMIT, in four).
        let (ids, times): (Vec<Uuid>, Vec<DateTime<Utc>>) = touches.iter().copied().unzip();
        let written = sqlx::query_scalar(
            "WITH asynchronous AS MATERIALIZED (
                 SELECT set_config('synchronous_commit', 'off', true)),
             locked AS MATERIALIZED (
                 SELECT id FROM session_activity WHERE id = ANY($1::uuid[])
                 ORDER BY id FOR UPDATE)
             UPDATE session_activity a
             SET last_seen_at = GREATEST(a.last_seen_at, t.last_seen_at)
             FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, last_seen_at)
             WHERE a.id = t.id AND a.id IN (SELECT id FROM locked)
               AND EXISTS (SELECT FROM asynchronous)
             RETURNING a.id",
        )
        .bind(&ids)
        .bind(&times);
        let written: std::collections::HashSet<Uuid> = self
            .within_time_out(async |connection| Ok(written.fetch_all(connection).await?))
            .await?
            .into_iter()
            .collect();
        // Every session has its activity row from the moment it is stored, and loses it with
        // the session (the trigger and the cascade): an id with none is a session that is gone.
        Ok(ids.into_iter().filter(|id| !written.contains(id)).collect())
    }

    #[tracing::instrument(skip_all)]
    async fn delete(&self, hash: &SessionIdHash) -> Result<Option<SessionRecord>, StoreError> {
        let query = sqlx::query(concat!(
            "DELETE FROM sessions WHERE id_hash = $1 RETURNING ",
            record_columns!()
        ))
        .bind(hash.as_bytes());
        let row = self.fetch_optional_row(query).await?;
        match row.map(|row| self.record_from_row(&row)).transpose() {
            Ok(record) => Ok(record),
            // The row is gone either way; tokens we cannot open cannot be revoked either.
            Err(StoreError::Sealed(error)) => {
                tracing::warn!(%error, "deleted a session whose tokens cannot be opened");
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    async fn try_lease_refresh(
        &self,
        hash: &SessionIdHash,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let lease = Uuid::new_v4();
        let row = sqlx::query(concat!(
            "UPDATE sessions SET refresh_lease = $2, refresh_lease_until = now() + $3 * interval '1 millisecond'
             WHERE id_hash = $1 AND (refresh_lease_until IS NULL OR refresh_lease_until <= now())
             RETURNING ",
            record_columns!()
        ),
        )
        .bind(hash.as_bytes())
        .bind(lease)
        .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let (row, exists) = self
            .within_time_out(async |connection| {
                if let Some(row) = row.fetch_optional(&mut *connection).await? {
                    return Ok((Some(row), true));
                }
                let exists: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE id_hash = $1)")
                        .bind(hash.as_bytes())
                        .fetch_one(connection)
                        .await?;
                Ok((None, exists))
            })
            .await?;
        if let Some(row) = row {
            return Ok(LeaseAttempt::Taken {
                lease,
                record: Box::new(self.record_from_row(&row)?),
            });
        }
        Ok(if exists {
            LeaseAttempt::Held
        } else {
            LeaseAttempt::Gone
        })
    }

    async fn release_refresh_lease(&self, id: Uuid, lease: Uuid) -> Result<(), StoreError> {
        let query = sqlx::query(
            "UPDATE sessions SET refresh_lease = NULL, refresh_lease_until = NULL
             WHERE id = $1 AND refresh_lease = $2",
        )
        .bind(id)
        .bind(lease);
        self.within_time_out(async |connection| {
            query.execute(connection).await?;
            Ok(())
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(session = %id))]
    async fn commit_refresh(
        &self,
        id: Uuid,
        lease: Uuid,
        tokens: &RefreshedTokens<'_>,
    ) -> Result<RefreshCommit, StoreError> {
        let sealed = self.seal_tokens(
            id,
            tokens.id_token,
            tokens.refresh_token,
            Some(tokens.access_token),
        );
        let statement = format!(
            "UPDATE sessions SET {SET_SEALED_TOKENS}, refresh_lease = NULL, refresh_lease_until = NULL,
                                 last_seen_at = GREATEST(last_seen_at, $9)
             WHERE id = $1 AND refresh_lease = $8"
        );
        let update = sealed
            .bind(sqlx::query(&statement).bind(id))
            .bind(lease)
            .bind(tokens.used_at);
        self.within_time_out(async |connection| {
            if update.execute(&mut *connection).await?.rows_affected() == 1 {
                return Ok(RefreshCommit::Committed);
            }
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1)")
                    .bind(id)
                    .fetch_one(connection)
                    .await?;
            Ok(if exists {
                RefreshCommit::LeaseLost
            } else {
                RefreshCommit::Gone
            })
        })
        .await
    }

    async fn delete_by_idp_session(
        &self,
        sid: &str,
        sub: Option<&str>,
    ) -> Result<Vec<SessionIdHash>, StoreError> {
        self.delete_sessions_where(
            "idp_sid = $1 AND ($2::text IS NULL OR subject = $2)",
            &[Some(sid), sub],
        )
        .await
    }

    async fn delete_by_subject(&self, sub: &str) -> Result<Vec<SessionIdHash>, StoreError> {
        self.delete_sessions_where("subject = $1", &[Some(sub)])
            .await
    }

    async fn list_by_subject(&self, sub: &str) -> Result<Vec<SessionSummary>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT id, subject, idp_sid, created_at, ",
            last_seen!(),
            " AS last_seen_at, expires_at FROM sessions WHERE subject = $1 ORDER BY created_at"
        ))
        .bind(sub);
        let rows = self
            .within_time_out(async |connection| Ok(rows.fetch_all(connection).await?))
            .await?;
        rows.iter()
            .map(|row| {
                Ok(SessionSummary {
                    id: row.try_get("id")?,
                    subject: row.try_get("subject")?,
                    idp_sid: row.try_get("idp_sid")?,
                    created_at: row.try_get("created_at")?,
                    last_seen_at: row.try_get("last_seen_at")?,
                    expires_at: row.try_get("expires_at")?,
                })
            })
            .collect()
    }

    async fn delete_expired(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<Option<Vec<SessionIdHash>>, StoreError> {
        // One sweeper at a time across replicas: a transaction-scoped advisory lock, never waited
        // for. Nor does the batch wait for a row (SWEEP_BATCH).
        let rows = self
            .within_time_out(async |connection| {
                let mut transaction = connection.begin().await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                    .bind(SWEEP_LOCK)
                    .fetch_one(&mut *transaction)
                    .await?;
                if !locked {
                    return Ok(None);
                }
                // Not a prepared statement: planned with this sweep's instants, so that the
                // plan follows how many rows have actually ended.
                let rows = sqlx::query(SWEEP_BATCH)
                    .persistent(false)
                    .bind(now)
                    .bind(idle_cutoff)
                    .bind(batch)
                    .fetch_all(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                Ok(Some(rows))
            })
            .await?;
        let Some(rows) = rows else { return Ok(None) };
        rows.iter()
            .map(hash_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    async fn count_live(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let count = sqlx::query_scalar(COUNT_LIVE)
            .persistent(false)
            .bind(now)
            .bind(idle_cutoff);
        let count: i64 = self
            .within_time_out(async |connection| Ok(count.fetch_one(connection).await?))
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn reseal_batch(&self, after: Uuid, batch: i64) -> Result<ResealOutcome, StoreError> {
        self.within_time_out(async |connection| {
            let mut transaction = connection.begin().await?;
            // The next sessions in id order, whatever their key: a range of the primary key's
            // index, so that a pass reads each row about once whatever the table's size. Asking
            // for rows under another key instead, `WHERE key_id <> $1 LIMIT n`, made every batch
            // a sequential scan from the table's first page past the rows resealed before it: the
            // pages read grew with the square of the sessions' number (`rotate-keys` took 27–28 s
            // for 200,000 sessions, 9 s now; `shared_buffers` 4 GB), and only tables larger than
            // a quarter of `shared_buffers`, whose scans PostgreSQL synchronizes, escaped it.
            let ids: Vec<Uuid> =
                sqlx::query_scalar("SELECT id FROM sessions WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(after)
                    .bind(batch)
                    .fetch_all(&mut *transaction)
                    .await?;
            let next = if ids.len() < usize::try_from(batch).unwrap_or(usize::MAX) {
                None
            } else {
                ids.last().copied()
            };
            // Those under another key, locked by id (the module's lock order). No SKIP LOCKED: a
            // row a request holds is waited for (milliseconds) and checked again, so no row is
            // passed over; one resealed or deleted meanwhile (a refresh seals under the current
            // key) is left alone.
            let rows = sqlx::query(concat!(
                "SELECT ",
                record_columns!(),
                " FROM sessions WHERE id = ANY($2) AND key_id <> $1 ORDER BY id FOR UPDATE"
            ))
            .bind(self.cipher.current_key_id())
            .bind(&ids)
            .fetch_all(&mut *transaction)
            .await?;
            let mut outcome = ResealOutcome {
                next,
                ..ResealOutcome::default()
            };
            // In id order, so deletions' cascades take activity rows by id too.
            for row in &rows {
                let record = match self.record_from_row(row) {
                    Ok(record) => record,
                    // Under a key that is gone: it can never be opened again; that session ends.
                    Err(StoreError::Sealed(error)) => {
                        let id: Uuid = row.try_get("id")?;
                        tracing::warn!(session = %id, %error, "deleting a session no configured key opens");
                        sqlx::query("DELETE FROM sessions WHERE id = $1")
                            .bind(id)
                            .execute(&mut *transaction)
                            .await?;
                        outcome.ended.push(hash_from_row(row)?);
                        continue;
                    }
                    Err(other) => return Err(other),
                };
                let sealed = self.seal_tokens(
                    record.id,
                    &record.id_token,
                    record.refresh_token.as_ref(),
                    record.access_token.as_ref(),
                );
                let statement = format!("UPDATE sessions SET {SET_SEALED_TOKENS} WHERE id = $1");
                sealed
                    .bind(sqlx::query(&statement).bind(record.id))
                    .execute(&mut *transaction)
                    .await?;
                outcome.resealed += 1;
            }
            transaction.commit().await?;
            Ok(outcome)
        })
        .await
    }

    async fn any_sealed_under_other_keys(&self) -> Result<bool, StoreError> {
        let exists =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE key_id <> $1)")
                .bind(self.cipher.current_key_id());
        self.within_time_out(async |connection| Ok(exists.fetch_one(connection).await?))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.within_time_out(async |connection| {
            sqlx::query("SELECT 1").execute(connection).await?;
            Ok(())
        })
        .await
    }
}
