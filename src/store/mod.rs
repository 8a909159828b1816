//! Where state lives: the store traits and their Redis and PostgreSQL implementations.
//!
//! - [`LoginStore`] (Redis): pending logins, written by `/login`, consumed once by `/callback`.
//! - [`SessionCache`] (Redis): the token-free view of a session that `/session` reads on every
//!   page load, plus tombstones of ended sessions so that no replica resurrects them.
//! - [`SessionRepository`] (PostgreSQL): the source of truth, with tokens sealed at rest, and
//!   the refresh lease that makes one refresh grant per session at a time across replicas.
//!
//! Flows depend on the traits only, so the same flow code runs on other implementations.

pub mod memory;
pub mod postgres;
pub mod redis;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    AccessToken, IdToken, Nonce, PkceVerifier, RefreshToken, ReturnTo, SessionIdHash, State,
    UserClaims,
};

/// A store that could not do its job. Carries the cause for the log; never shown to a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    /// PostgreSQL did not answer an operation within the database time-out (and a grace):
    /// the connection was closed.
    #[error("PostgreSQL did not answer within {0:?}")]
    PostgresSilent(std::time::Duration),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// Tokens sealed under a key that is no longer configured, or tampered with: the session
    /// cannot be used and must end (cleanly, as a 401).
    #[error("sealed tokens cannot be opened: {0}")]
    Sealed(#[from] crate::crypto::OpenError),
}

impl StoreError {
    /// PostgreSQL refused a write because the server is read-only (SQLSTATE 25006): a hot
    /// standby, or a server set `default_transaction_read_only`.
    pub fn is_read_only_server(&self) -> bool {
        matches!(self, Self::Postgres(sqlx::Error::Database(error)) if error.code().as_deref() == Some("25006"))
    }
}

/// A login waiting for its callback, stored under its `state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingLogin {
    pub code_verifier: PkceVerifier,
    pub nonce: Nonce,
    pub return_to: ReturnTo,
    /// SHA-256 of the login-binding cookie, hex.
    pub binding_hash: String,
    pub created_at: DateTime<Utc>,
}

/// A session as PostgreSQL keeps it.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub id: Uuid,
    pub id_hash: SessionIdHash,
    pub user: UserClaims,
    pub idp_sid: Option<String>,
    pub id_token: IdToken,
    pub refresh_token: Option<RefreshToken>,
    /// The latest access token, so that `/auth` keeps working without Redis (which caches it).
    pub access_token: Option<CachedAccessToken>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl SessionRecord {
    pub fn view(&self) -> CachedSession {
        CachedSession {
            id: self.id,
            user: self.user.clone(),
            created_at: self.created_at,
            last_seen_at: self.last_seen_at,
            expires_at: self.expires_at,
        }
    }
}

/// The token-free part of a session that the hot path needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedSession {
    pub id: Uuid,
    pub user: UserClaims,
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub created_at: DateTime<Utc>,
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub last_seen_at: DateTime<Utc>,
    /// The absolute end (`created_at + BROKER_SESSION_MAX_LIFETIME`).
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub expires_at: DateTime<Utc>,
}

/// What the cache knows about a session ID hash.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheLookup {
    Live(CachedSession),
    /// The session was ended; do not look further.
    Ended,
    /// The cache does not know (never cached, evicted, or Redis was flushed): ask PostgreSQL.
    Unknown,
    /// The cache holds an entry that does not open (sealed under a key no longer configured) or
    /// parse (a form this version does not know): ask PostgreSQL, and replace the entry
    /// ([`Replacing::AnyViewOrEntry`]; [`Replacing::Nothing`] would leave it there).
    Unreadable,
}

#[async_trait]
pub trait LoginStore: Send + Sync + 'static {
    async fn put_pending(
        &self,
        state: &State,
        login: &PendingLogin,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError>;
    /// Returns the pending login and deletes it in one atomic step: a second call finds nothing.
    async fn take_pending(&self, state: &State) -> Result<Option<PendingLogin>, StoreError>;
}

/// How long a tombstone ([`SessionCache::mark_ended`]) stays: far longer than any request that
/// might re-cache the session it replaced.
pub const TOMBSTONE_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a view written by [`SessionCache::put`] may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacing {
    /// Anything but a tombstone: a cached view (a last-seen time moved), an entry that does not
    /// open ([`CacheLookup::Unreadable`]). In Redis a script (`GET`, compare, `SET`).
    AnyViewOrEntry,
    /// Nothing: for a session the cache held nothing for ([`CacheLookup::Unknown`], a new
    /// login). A tombstone or a view written since stays. In Redis one `SET NX`, for much less
    /// of its time than the script (the cold `/session` path).
    Nothing,
}

#[async_trait]
pub trait SessionCache: Send + Sync + 'static {
    async fn get(&self, hash: &SessionIdHash) -> Result<CacheLookup, StoreError>;
    /// Caches the view, over what `replacing` allows: never over a tombstone (an ended session
    /// is never brought back).
    async fn put(
        &self,
        hash: &SessionIdHash,
        session: &CachedSession,
        ttl: std::time::Duration,
        replacing: Replacing,
    ) -> Result<(), StoreError>;
    /// Replaces the view with a tombstone that outlives any in-flight re-caching
    /// ([`TOMBSTONE_TTL`]), and drops the session's cached access token.
    async fn mark_ended(&self, hash: &SessionIdHash) -> Result<(), StoreError> {
        self.mark_ended_for(hash, TOMBSTONE_TTL).await
    }
    /// [`SessionCache::mark_ended`], the tombstone kept for `ttl`.
    async fn mark_ended_for(
        &self,
        hash: &SessionIdHash,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError>;
    /// Caches a session's access token (sealed at rest) for `ttl`.
    async fn put_access_token(
        &self,
        hash: &SessionIdHash,
        token: &CachedAccessToken,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError>;
    /// The cached access token, if any (one that does not open counts as none).
    async fn get_access_token(
        &self,
        hash: &SessionIdHash,
    ) -> Result<Option<CachedAccessToken>, StoreError>;
    /// [`SessionCache::get`] and [`SessionCache::get_access_token`] at once: `/auth` needs both,
    /// and one Redis round trip (one `MGET`; the keys share a hash tag) costs half of two.
    async fn get_with_access_token(
        &self,
        hash: &SessionIdHash,
    ) -> Result<(CacheLookup, Option<CachedAccessToken>), StoreError> {
        let lookup = self.get(hash).await?;
        Ok((lookup, self.get_access_token(hash).await?))
    }
    /// Records `id` (e.g. a logout token's `jti`) for `ttl`; false when it was already recorded.
    async fn remember_once(&self, id: &str, ttl: std::time::Duration) -> Result<bool, StoreError>;
    /// Forgets what `remember_once` recorded, so that a request that failed after recording its
    /// `id` can be retried.
    async fn forget(&self, id: &str) -> Result<(), StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
}

#[async_trait]
pub trait SessionRepository: Send + Sync + 'static {
    async fn insert(&self, session: &SessionRecord) -> Result<(), StoreError>;
    async fn find(&self, hash: &SessionIdHash) -> Result<Option<SessionRecord>, StoreError>;
    /// The session read to be used after a cache miss (`/auth`, the relay): as
    /// [`SessionRepository::find`], with [`SessionRepository::find_view`]'s last-seen time.
    async fn find_for_use(
        &self,
        hash: &SessionIdHash,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let _ = idle_cutoff; // the exact time is always within the contract
        self.find(hash).await
    }
    /// The token-free view of a session read to be used (what `/session` needs after a cache
    /// miss): no token column is read or opened. A row sealed under a key no longer configured is
    /// [`StoreError::Sealed`], as with [`SessionRepository::find`].
    ///
    /// Its `last_seen_at` is the session's last use, or a lower bound of it that is after
    /// `idle_cutoff` (now less the idle timeout): either way the session is within its idle
    /// timeout exactly when the time is after the cutoff. A caller that gets a bound records a
    /// use now (a bound older than the touch interval is stale), and a bound within the touch
    /// interval is less than one interval behind, the precision the interval allows anyway; so
    /// it never needs the exact time, which may cost the store a second lookup (PostgreSQL's
    /// `session_activity`).
    async fn find_view(
        &self,
        hash: &SessionIdHash,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<Option<CachedSession>, StoreError>;
    /// Records use (the sliding idle timeout) of many sessions at once, never moving a
    /// `last_seen_at` backwards; returns the ids whose row is gone.
    async fn touch_many(&self, touches: &[(Uuid, DateTime<Utc>)]) -> Result<Vec<Uuid>, StoreError>;
    /// Deletes the session; returns the deleted record (its tokens are needed for revocation).
    async fn delete(&self, hash: &SessionIdHash) -> Result<Option<SessionRecord>, StoreError>;
    /// Takes the session's refresh lease for `ttl` unless someone holds it, and returns the
    /// record as it is now (the tokens to refresh with are re-read under the lease). The TTL,
    /// on the database's clock, bounds a lease whose holder died.
    async fn try_lease_refresh(
        &self,
        hash: &SessionIdHash,
        ttl: std::time::Duration,
    ) -> Result<LeaseAttempt, StoreError>;
    /// Gives the lease back if it is still `lease` (one that expired and was retaken is not ours).
    async fn release_refresh_lease(&self, id: Uuid, lease: Uuid) -> Result<(), StoreError>;
    /// Stores the tokens of a refresh, resealed under the current key, and releases the lease,
    /// in one statement, only while `lease` is still held: a holder that outlived its lease never
    /// overwrites what the next holder stored.
    async fn commit_refresh(
        &self,
        id: Uuid,
        lease: Uuid,
        tokens: &RefreshedTokens<'_>,
    ) -> Result<RefreshCommit, StoreError>;
    /// Deletes the sessions of an IdP session (`sid`), restricted to `sub` when given.
    async fn delete_by_idp_session(
        &self,
        sid: &str,
        sub: Option<&str>,
    ) -> Result<Vec<SessionIdHash>, StoreError>;
    /// Deletes every session of a subject.
    async fn delete_by_subject(&self, sub: &str) -> Result<Vec<SessionIdHash>, StoreError>;
    async fn list_by_subject(&self, sub: &str) -> Result<Vec<SessionSummary>, StoreError>;
    /// Deletes up to `batch` sessions that ended before `now` (absolute) or were last seen before
    /// `idle_cutoff`. `None` when another replica is sweeping right now.
    async fn delete_expired(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<Option<Vec<SessionIdHash>>, StoreError>;
    /// Looks at the next `batch` sessions in id order after `after` (a pass over the table
    /// starts at [`Uuid::nil`]: session ids are random (v4) UUIDs, never nil), re-seals those not
    /// sealed under the current key and deletes those that no configured key opens. Waits for
    /// rows that requests hold. [`ResealOutcome::next`] is where the next batch starts; `None`
    /// at the end of the table.
    async fn reseal_batch(&self, after: Uuid, batch: i64) -> Result<ResealOutcome, StoreError>;
    /// Whether any session is sealed under another key than the current one (a pass of
    /// [`Self::reseal_batch`] may have missed rows stored behind it by a replica that still
    /// sealed under the old key).
    async fn any_sealed_under_other_keys(&self) -> Result<bool, StoreError>;
    /// How many sessions are live: neither past `now` (absolute) nor last seen before
    /// `idle_cutoff` (the `live_sessions` gauge; called at most every 30 s per replica).
    async fn count_live(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
}

/// How [`SessionRepository::try_lease_refresh`] went.
#[derive(Debug)]
pub enum LeaseAttempt {
    /// Ours until released or `ttl` passes, with the record read under it.
    Taken {
        lease: Uuid,
        record: Box<SessionRecord>,
    },
    /// Another request (on any replica) is refreshing this session.
    Held,
    /// No such session.
    Gone,
}

/// What a refresh stores: every token is resealed under the current key.
#[derive(Debug)]
pub struct RefreshedTokens<'a> {
    pub refresh_token: Option<&'a RefreshToken>,
    pub id_token: &'a IdToken,
    pub access_token: &'a CachedAccessToken,
    /// When the request that needed the new token used the session. The session's own
    /// last-seen time moves to it (never back) in the same write: a refresh rewrites the row
    /// anyway, and a session that refreshes within each idle timeout then keeps a row time
    /// that proves it live on its own ([`SessionRepository::find_view`]: one lookup).
    pub used_at: DateTime<Utc>,
}

/// How [`SessionRepository::commit_refresh`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshCommit {
    Committed,
    /// The session was deleted meanwhile (logout, back-channel logout, sweep).
    Gone,
    /// The lease expired and someone else took it: nothing was stored.
    LeaseLost,
}

/// What one [`SessionRepository::reseal_batch`] did.
#[derive(Debug, Default)]
pub struct ResealOutcome {
    pub resealed: u64,
    /// Sessions deleted because no configured key opens them (their cache views must end too).
    pub ended: Vec<SessionIdHash>,
    /// The last session id the batch looked at, after which the next batch starts; `None` when
    /// the batch reached the end of the table.
    pub next: Option<Uuid>,
}

/// An access token and when it expires, as the cache keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedAccessToken {
    pub token: AccessToken,
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub expires_at: DateTime<Utc>,
    /// From this moment the token is refreshed before use (30 s before expiry, or half its
    /// lifetime for tokens that live less than a minute).
    #[serde(deserialize_with = "crate::rfc3339::deserialize")]
    pub refresh_at: DateTime<Utc>,
}

/// A session as the operator's `sessions list` shows it: no token, no cookie.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    pub id: Uuid,
    pub subject: String,
    pub idp_sid: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}
