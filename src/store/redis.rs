//! Every Redis key the broker uses: names, value types and TTLs in one place.
//!
//! | key | value | TTL |
//! |---|---|---|
//! | `{prefix}login:<sha256(state)>` | pending login, sealed JSON | `BROKER_LOGIN_TTL` |
//! | `{prefix}session:{<hash>}` | [`CachedSession`], sealed binary (`values`); or `ended` | until idle/absolute expiry; `ended`: 1 h (after a logout that could not delete the row: the idle timeout and a minute) |
//! | `{prefix}at:{<hash>}` | access token and its expiry, sealed binary (`values`; `/auth`) | the token's expiry |
//! | `{prefix}seen:<sha256(id)>` | `1`: a logout token's `jti` already used | until the token could expire |
//!
//! `<hash>` is the hex SHA-256 of the session ID, inside `{…}` (a Redis Cluster hash tag): a
//! session's view (or tombstone) and token cache share one slot, so the `MULTI` that ends
//! a session (view and token cache at once) and the `MGET` that `/auth` reads both with work on
//! a cluster, while different sessions spread
//! over the masters. Every other command and script touches one key; there is no `KEYS`/`SCAN`.
//! The prefix may not contain braces (config), so it never becomes the tag. Nothing here is
//! needed for a live session to survive a Redis flush: the session cache is rebuilt from
//! PostgreSQL on a miss.
//!
//! `REDIS_URL` may name one server, a cluster or a Sentinel-managed master (`topology`);
//! `connection::Connection` hides which; `connection::Connections` keeps one per thread (each
//! actix worker drives its own). `PING` (readiness) goes to every cluster master.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use super::{
    CacheLookup, CachedAccessToken, CachedSession, LoginStore, PendingLogin, Replacing,
    SessionCache, StoreError,
};
use crate::crypto::Cipher;
use crate::domain::{SessionIdHash, State};

mod connection;
pub mod topology;
mod values;

use connection::Connections;
use topology::RedisTopology;

const ENDED: &str = "ended";

/// Sets the session view unless a tombstone is there (atomic on the server).
const PUT_UNLESS_ENDED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Whether Redis refused a command for lack of memory (`OOM`; inside `MULTI`, the crate reports
/// the queued command's `OOM`): it still answers reads and deletions.
fn refused_for_memory(error: &redis::RedisError) -> bool {
    error.code() == Some("OOM")
}

#[derive(Clone)]
pub struct RedisStore {
    connections: Arc<Connections>,
    prefix: String,
    cipher: Cipher,
    put_unless_ended: Script,
}

impl RedisStore {
    /// Connects (failing fast when Redis does not answer) with bounded command time-outs, so a
    /// hung Redis turns into an error instead of a hung request.
    pub async fn connect(url: &str, prefix: &str, cipher: Cipher) -> Result<Self, StoreError> {
        let topology = RedisTopology::parse(url).map_err(|message| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "URL", message))
        })?;
        let connections = Connections::connect(topology).await?;
        Ok(Self {
            connections,
            prefix: prefix.to_string(),
            cipher,
            put_unless_ended: Script::new(PUT_UNLESS_ENDED),
        })
    }

    /// Whether the calling thread has its own Redis connection yet, rather than the start-up
    /// one (tests: `connection::Connections`).
    pub fn thread_has_own_connection(&self) -> bool {
        self.connections.has_own()
    }

    fn login_key(&self, state: &State) -> String {
        format!("{}login:{}", self.prefix, state.storage_key())
    }

    fn session_key(&self, hash: &SessionIdHash) -> String {
        self.hash_key("session:", hash)
    }

    fn access_token_key(&self, hash: &SessionIdHash) -> String {
        self.hash_key("at:", hash)
    }

    /// `{prefix}{kind}{<hash>}`, built without `format!`: two of these name every request's keys.
    fn hash_key(&self, kind: &str, hash: &SessionIdHash) -> String {
        let mut key = String::with_capacity(self.prefix.len() + kind.len() + 66);
        key.push_str(&self.prefix);
        key.push_str(kind);
        key.push('{');
        hash.push_hex(&mut key);
        key.push('}');
        key
    }

    fn seen_key(&self, id: &str) -> String {
        format!(
            "{}seen:{}",
            self.prefix,
            crate::crypto::sha256_base64url(id)
        )
    }
}

impl RedisStore {
    /// A session cache value as read from `key` (`None`: no such key).
    fn open_session(&self, key: &str, value: Option<&[u8]>) -> CacheLookup {
        let sealed = match value {
            None => return CacheLookup::Unknown,
            Some(value) if value == ENDED.as_bytes() => return CacheLookup::Ended,
            Some(sealed) => sealed,
        };
        // An entry that does not open (sealed under a key no longer configured) or does not parse
        // (a form this version does not know) is a miss, not an outage: PostgreSQL decides.
        match values::open_session(&self.cipher, key, sealed) {
            Ok(session) => CacheLookup::Live(session),
            Err(error) => {
                tracing::warn!(%error, "unreadable session cache entry; reading PostgreSQL");
                CacheLookup::Unreadable
            }
        }
    }

    /// A cached access token as read from `key`. Under a retired key, or unreadable: as if not
    /// cached; a refresh replaces it.
    fn open_access_token(&self, key: &str, sealed: &[u8]) -> Option<CachedAccessToken> {
        values::open_access_token(&self.cipher, key, sealed)
            .map_err(|error| tracing::warn!(%error, "unreadable cached access token"))
            .ok()
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl LoginStore for RedisStore {
    #[tracing::instrument(skip_all)]
    async fn put_pending(
        &self,
        state: &State,
        login: &PendingLogin,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.login_key(state);
        let json = serde_json::to_vec(login).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sealed = self.cipher.seal_to_string(&json, key.as_bytes());
        let mut connection = self.connections.get();
        let _: () = connection.pset_ex(&key, sealed, millis(ttl)).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn take_pending(&self, state: &State) -> Result<Option<PendingLogin>, StoreError> {
        let key = self.login_key(state);
        let mut connection = self.connections.get();
        // GETDEL: of two concurrent callbacks with the same state, exactly one gets the value.
        let sealed: Option<String> = connection.get_del(&key).await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let json = match self.cipher.open_string(&sealed, key.as_bytes()) {
            Ok(json) => json,
            // Sealed under a key no longer configured: as good as expired; a retry works.
            Err(error) => {
                tracing::warn!(%error, "pending login cannot be opened");
                return Ok(None);
            }
        };
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("pending login: {e}")))
    }
}

#[async_trait]
impl SessionCache for RedisStore {
    async fn get(&self, hash: &SessionIdHash) -> Result<CacheLookup, StoreError> {
        let key = self.session_key(hash);
        let mut connection = self.connections.get();
        // Bytes, not `String`: the sealed value is binary (`values`).
        let value: Option<Vec<u8>> = connection.get(&key).await?;
        Ok(self.open_session(&key, value.as_deref()))
    }

    async fn get_with_access_token(
        &self,
        hash: &SessionIdHash,
    ) -> Result<(CacheLookup, Option<CachedAccessToken>), StoreError> {
        let (session_key, token_key) = (self.session_key(hash), self.access_token_key(hash));
        let mut connection = self.connections.get();
        // One MGET: both keys carry the session's hash tag, so it is one slot on a cluster too,
        // and the pair is read atomically (`mark_ended` changes both in one MULTI).
        let mut mget = redis::Cmd::with_capacity(3, 4 + session_key.len() + token_key.len());
        let (session, token): (Option<Vec<u8>>, Option<Vec<u8>>) = mget
            .arg("MGET")
            .arg(&session_key)
            .arg(&token_key)
            .query_async(&mut connection)
            .await?;
        Ok((
            self.open_session(&session_key, session.as_deref()),
            token.and_then(|sealed| self.open_access_token(&token_key, &sealed)),
        ))
    }

    async fn put(
        &self,
        hash: &SessionIdHash,
        session: &CachedSession,
        ttl: Duration,
        replacing: Replacing,
    ) -> Result<(), StoreError> {
        let key = self.session_key(hash);
        let sealed = values::seal_session(&self.cipher, &key, session);
        let mut connection = self.connections.get();
        match replacing {
            Replacing::AnyViewOrEntry => {
                let _: i64 = self
                    .put_unless_ended
                    .key(&key)
                    .arg(sealed)
                    .arg(millis(ttl))
                    .arg(ENDED)
                    .invoke_async(&mut connection)
                    .await?;
            }
            Replacing::Nothing => {
                let _: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(sealed)
                    .arg("PX")
                    .arg(millis(ttl))
                    .arg("NX")
                    .query_async(&mut connection)
                    .await?;
            }
        }
        Ok(())
    }

    async fn mark_ended_for(&self, hash: &SessionIdHash, ttl: Duration) -> Result<(), StoreError> {
        let (view, token) = (self.session_key(hash), self.access_token_key(hash));
        let mut connection = self.connections.get();
        let tombstone: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .pset_ex(&view, ENDED, millis(ttl))
            .ignore()
            .del(&token)
            .ignore()
            .query_async(&mut connection)
            .await;
        let Err(error) = tombstone else {
            return Ok(());
        };
        if !refused_for_memory(&error) {
            return Err(error.into());
        }
        // Redis is full (`maxmemory` with the `noeviction` policy, its default): it refuses the
        // tombstone, as it refuses every command that may add data, but deletes. Without this,
        // the view of a session already deleted from PostgreSQL stayed live: `/session` and
        // `/auth` answered 200 after a logout for as long as Redis was full, up to the idle
        // timeout. Deleted, the next request reads PostgreSQL and finds no session. What the
        // tombstone adds, refusing a view re-cached by a request that read the row before it
        // was deleted, is moot while Redis refuses that write too; one that lands after Redis
        // has room again lives until its next last-seen write finds the row gone (the touch
        // queue then ends it: within the touch interval).
        let _: i64 = connection.del(&[&view, &token]).await?;
        tracing::warn!(%error, "Redis is out of memory: deleted a cached session instead of marking it ended");
        Ok(())
    }

    async fn put_access_token(
        &self,
        hash: &SessionIdHash,
        token: &CachedAccessToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.access_token_key(hash);
        let sealed = values::seal_access_token(&self.cipher, &key, token);
        let mut connection = self.connections.get();
        let _: () = connection.pset_ex(&key, sealed, millis(ttl)).await?;
        Ok(())
    }

    async fn get_access_token(
        &self,
        hash: &SessionIdHash,
    ) -> Result<Option<CachedAccessToken>, StoreError> {
        let key = self.access_token_key(hash);
        let mut connection = self.connections.get();
        let sealed: Option<Vec<u8>> = connection.get(&key).await?;
        Ok(sealed.and_then(|sealed| self.open_access_token(&key, &sealed)))
    }

    async fn remember_once(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.seen_key(id);
        let mut connection = self.connections.get();
        let stored: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut connection)
            .await;
        match stored {
            Ok(stored) => Ok(stored.is_some()),
            // Full, Redis still answers reads: an id recorded before is still known.
            Err(error) if refused_for_memory(&error) => {
                let seen: bool = connection.exists(&key).await?;
                if seen {
                    Ok(false)
                } else {
                    Err(error.into())
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn forget(&self, id: &str) -> Result<(), StoreError> {
        let key = self.seen_key(id);
        let mut connection = self.connections.get();
        let _: i64 = connection.del(key).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connections.get();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(())
    }
}
