//! In-memory implementations of the store traits, for `token-broker dev` and unit tests.
//!
//! Same semantics as Redis and PostgreSQL (single-use pending logins, tombstones, TTLs on the
//! injected clock), none of the durability: everything is gone when the process ends, and a
//! second replica would not see it. `serve` never uses them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    CacheLookup, CachedAccessToken, CachedSession, LeaseAttempt, LoginStore, PendingLogin,
    RefreshCommit, RefreshedTokens, Replacing, ResealOutcome, SessionCache, SessionRecord,
    SessionRepository, SessionSummary, StoreError,
};
use crate::clock::Clock;
use crate::domain::{SessionIdHash, State};

enum CacheEntry {
    Live(CachedSession),
    Ended,
}

#[derive(Default)]
struct Maps {
    pending: HashMap<String, (PendingLogin, DateTime<Utc>)>,
    cache: HashMap<SessionIdHash, (CacheEntry, DateTime<Utc>)>,
    access_tokens: HashMap<SessionIdHash, (CachedAccessToken, DateTime<Utc>)>,
    /// Refresh leases by session id: (lease, until).
    leases: HashMap<Uuid, (Uuid, DateTime<Utc>)>,
    seen: HashMap<String, DateTime<Utc>>,
    sessions: HashMap<SessionIdHash, SessionRecord>,
}

/// All three stores in one process-local map set.
#[derive(Clone)]
pub struct MemoryStore {
    maps: Arc<Mutex<Maps>>,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            maps: Arc::default(),
            clock,
        }
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remove_where(&self, matches: impl Fn(&SessionRecord) -> bool) -> Vec<SessionIdHash> {
        let mut maps = self.maps();
        let hashes: Vec<SessionIdHash> = maps
            .sessions
            .values()
            .filter(|r| matches(r))
            .map(|r| r.id_hash)
            .collect();
        for hash in &hashes {
            if let Some(record) = maps.sessions.remove(hash) {
                maps.leases.remove(&record.id);
            }
        }
        hashes
    }

    fn deadline(&self, ttl: Duration) -> DateTime<Utc> {
        self.clock.now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
    }
}

#[async_trait]
impl LoginStore for MemoryStore {
    async fn put_pending(
        &self,
        state: &State,
        login: &PendingLogin,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let deadline = self.deadline(ttl);
        self.maps()
            .pending
            .insert(state.storage_key(), (login.clone(), deadline));
        Ok(())
    }

    async fn take_pending(&self, state: &State) -> Result<Option<PendingLogin>, StoreError> {
        let now = self.clock.now();
        let taken = self.maps().pending.remove(&state.storage_key());
        Ok(taken
            .filter(|(_, deadline)| *deadline > now)
            .map(|(login, _)| login))
    }
}

#[async_trait]
impl SessionCache for MemoryStore {
    async fn get(&self, hash: &SessionIdHash) -> Result<CacheLookup, StoreError> {
        let now = self.clock.now();
        Ok(match self.maps().cache.get(hash) {
            Some((_, deadline)) if *deadline <= now => CacheLookup::Unknown,
            Some((CacheEntry::Live(session), _)) => CacheLookup::Live(session.clone()),
            Some((CacheEntry::Ended, _)) => CacheLookup::Ended,
            None => CacheLookup::Unknown,
        })
    }

    async fn put(
        &self,
        hash: &SessionIdHash,
        session: &CachedSession,
        ttl: Duration,
        replacing: Replacing,
    ) -> Result<(), StoreError> {
        let deadline = self.deadline(ttl);
        let now = self.clock.now();
        let mut maps = self.maps();
        let refused = match maps.cache.get(hash) {
            Some((entry, until)) if *until > now => {
                replacing == Replacing::Nothing || matches!(entry, CacheEntry::Ended)
            }
            _ => false,
        };
        if !refused {
            maps.cache
                .insert(*hash, (CacheEntry::Live(session.clone()), deadline));
        }
        Ok(())
    }

    async fn mark_ended_for(&self, hash: &SessionIdHash, ttl: Duration) -> Result<(), StoreError> {
        let deadline = self.deadline(ttl);
        let mut maps = self.maps();
        maps.cache.insert(*hash, (CacheEntry::Ended, deadline));
        maps.access_tokens.remove(hash);
        Ok(())
    }

    async fn put_access_token(
        &self,
        hash: &SessionIdHash,
        token: &CachedAccessToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let deadline = self.deadline(ttl);
        self.maps()
            .access_tokens
            .insert(*hash, (token.clone(), deadline));
        Ok(())
    }

    async fn get_access_token(
        &self,
        hash: &SessionIdHash,
    ) -> Result<Option<CachedAccessToken>, StoreError> {
        let now = self.clock.now();
        Ok(self
            .maps()
            .access_tokens
            .get(hash)
            .filter(|(_, deadline)| *deadline > now)
            .map(|(token, _)| token.clone()))
    }

    async fn remember_once(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let deadline = self.deadline(ttl);
        let mut maps = self.maps();
        if maps.seen.get(id).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        maps.seen.insert(id.to_string(), deadline);
        Ok(true)
    }

    async fn forget(&self, id: &str) -> Result<(), StoreError> {
        self.maps().seen.remove(id);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl SessionRepository for MemoryStore {
    async fn insert(&self, session: &SessionRecord) -> Result<(), StoreError> {
        self.maps()
            .sessions
            .insert(session.id_hash, session.clone());
        Ok(())
    }

    async fn find(&self, hash: &SessionIdHash) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.maps().sessions.get(hash).cloned())
    }

    async fn find_view(
        &self,
        hash: &SessionIdHash,
        _idle_cutoff: DateTime<Utc>,
    ) -> Result<Option<CachedSession>, StoreError> {
        Ok(self.maps().sessions.get(hash).map(SessionRecord::view))
    }

    async fn touch_many(&self, touches: &[(Uuid, DateTime<Utc>)]) -> Result<Vec<Uuid>, StoreError> {
        let mut maps = self.maps();
        let mut gone = Vec::new();
        for &(id, last_seen_at) in touches {
            match maps.sessions.values_mut().find(|record| record.id == id) {
                Some(record) => record.last_seen_at = record.last_seen_at.max(last_seen_at),
                None => gone.push(id),
            }
        }
        Ok(gone)
    }

    async fn delete(&self, hash: &SessionIdHash) -> Result<Option<SessionRecord>, StoreError> {
        let mut maps = self.maps();
        let record = maps.sessions.remove(hash);
        if let Some(record) = &record {
            maps.leases.remove(&record.id);
        }
        Ok(record)
    }

    async fn try_lease_refresh(
        &self,
        hash: &SessionIdHash,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let now = self.clock.now();
        let until = self.deadline(ttl);
        let mut maps = self.maps();
        let Some(record) = maps.sessions.get(hash).cloned() else {
            return Ok(LeaseAttempt::Gone);
        };
        if maps
            .leases
            .get(&record.id)
            .is_some_and(|(_, until)| *until > now)
        {
            return Ok(LeaseAttempt::Held);
        }
        let lease = Uuid::new_v4();
        maps.leases.insert(record.id, (lease, until));
        Ok(LeaseAttempt::Taken {
            lease,
            record: Box::new(record),
        })
    }

    async fn release_refresh_lease(&self, id: Uuid, lease: Uuid) -> Result<(), StoreError> {
        let mut maps = self.maps();
        if maps.leases.get(&id).is_some_and(|(held, _)| *held == lease) {
            maps.leases.remove(&id);
        }
        Ok(())
    }

    async fn commit_refresh(
        &self,
        id: Uuid,
        lease: Uuid,
        tokens: &RefreshedTokens<'_>,
    ) -> Result<RefreshCommit, StoreError> {
        let mut maps = self.maps();
        let Maps {
            sessions, leases, ..
        } = &mut *maps;
        let Some(record) = sessions.values_mut().find(|record| record.id == id) else {
            return Ok(RefreshCommit::Gone);
        };
        if leases.get(&id).is_none_or(|(held, _)| *held != lease) {
            return Ok(RefreshCommit::LeaseLost);
        }
        leases.remove(&id);
        record.refresh_token = tokens.refresh_token.cloned();
        record.id_token = tokens.id_token.clone();
        record.access_token = Some(tokens.access_token.clone());
        record.last_seen_at = record.last_seen_at.max(tokens.used_at);
        Ok(RefreshCommit::Committed)
    }

    async fn delete_by_idp_session(
        &self,
        sid: &str,
        sub: Option<&str>,
    ) -> Result<Vec<SessionIdHash>, StoreError> {
        Ok(self.remove_where(|record| {
            record.idp_sid.as_deref() == Some(sid) && sub.is_none_or(|sub| record.user.sub() == sub)
        }))
    }

    async fn delete_by_subject(&self, sub: &str) -> Result<Vec<SessionIdHash>, StoreError> {
        Ok(self.remove_where(|record| record.user.sub() == sub))
    }

    async fn list_by_subject(&self, sub: &str) -> Result<Vec<SessionSummary>, StoreError> {
        let mut sessions: Vec<SessionSummary> = self
            .maps()
            .sessions
            .values()
            .filter(|record| record.user.sub() == sub)
            .map(|record| SessionSummary {
                id: record.id,
                subject: record.user.sub().to_string(),
                idp_sid: record.idp_sid.clone(),
                created_at: record.created_at,
                last_seen_at: record.last_seen_at,
                expires_at: record.expires_at,
            })
            .collect();
        sessions.sort_by_key(|s| s.created_at);
        Ok(sessions)
    }

    async fn delete_expired(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<Option<Vec<SessionIdHash>>, StoreError> {
        let mut maps = self.maps();
        let expired: Vec<SessionIdHash> = maps
            .sessions
            .values()
            .filter(|r| r.expires_at <= now || r.last_seen_at <= idle_cutoff)
            .take(usize::try_from(batch).unwrap_or(0))
            .map(|r| r.id_hash)
            .collect();
        for hash in &expired {
            if let Some(record) = maps.sessions.remove(hash) {
                maps.leases.remove(&record.id);
            }
        }
        Ok(Some(expired))
    }

    async fn count_live(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let maps = self.maps();
        let live = maps
            .sessions
            .values()
            .filter(|r| r.expires_at > now && r.last_seen_at > idle_cutoff)
            .count();
        Ok(live as u64)
    }

    async fn reseal_batch(&self, _after: Uuid, _batch: i64) -> Result<ResealOutcome, StoreError> {
        // Nothing is sealed in memory.
        Ok(ResealOutcome::default())
    }

    async fn any_sealed_under_other_keys(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::{AllowedOrigins, Nonce, PkceVerifier, ReturnTo, SessionId, UserClaims};

    fn pending() -> PendingLogin {
        let origins = AllowedOrigins::parse("https://app.example.com").unwrap();
        PendingLogin {
            code_verifier: PkceVerifier::new("v"),
            nonce: Nonce::new("n"),
            return_to: ReturnTo::parse("/", &origins).unwrap(),
            binding_hash: "h".into(),
            created_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn pending_logins_are_single_use_and_expire() {
        let clock = ManualClock::new(Utc::now());
        let store = MemoryStore::new(Arc::new(clock.clone()));
        let (state, other) = (State::generate(), State::generate());
        store
            .put_pending(&state, &pending(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(store.take_pending(&state).await.unwrap().is_some());
        assert!(store.take_pending(&state).await.unwrap().is_none());

        store
            .put_pending(&other, &pending(), Duration::from_secs(60))
            .await
            .unwrap();
        clock.advance(chrono::Duration::seconds(61));
        assert!(store.take_pending(&other).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_tombstone_is_never_overwritten_by_a_late_put() {
        let store = MemoryStore::new(Arc::new(ManualClock::new(Utc::now())));
        let hash = SessionId::generate().hash();
        let view = CachedSession {
            id: Uuid::new_v4(),
            user: UserClaims::select("alice".into(), &serde_json::Map::new()),
            created_at: Utc::now(),
            last_seen_at: Utc::now(),
            expires_at: Utc::now(),
        };
        store
            .put(
                &hash,
                &view,
                Duration::from_secs(60),
                Replacing::AnyViewOrEntry,
            )
            .await
            .unwrap();
        assert!(matches!(
            store.get(&hash).await.unwrap(),
            CacheLookup::Live(_)
        ));
        store.mark_ended(&hash).await.unwrap();
        store
            .put(
                &hash,
                &view,
                Duration::from_secs(60),
                Replacing::AnyViewOrEntry,
            )
            .await
            .unwrap();
        assert_eq!(store.get(&hash).await.unwrap(), CacheLookup::Ended);
    }

    #[tokio::test]
    async fn a_view_put_after_a_miss_fills_the_gap_only() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let store = MemoryStore::new(clock.clone());
        let view = |sub: &str| CachedSession {
            id: Uuid::new_v4(),
            user: UserClaims::select(sub.into(), &serde_json::Map::new()),
            created_at: Utc::now(),
            last_seen_at: Utc::now(),
            expires_at: Utc::now(),
        };
        let ttl = Duration::from_secs(60);
        let sub = async |hash| match store.get(hash).await.unwrap() {
            CacheLookup::Live(session) => Some(session.user.sub().to_string()),
            _ => None,
        };
        let (empty, ended, cached) = (
            SessionId::generate().hash(),
            SessionId::generate().hash(),
            SessionId::generate().hash(),
        );
        store
            .put(&empty, &view("alice"), ttl, Replacing::Nothing)
            .await
            .unwrap();
        assert_eq!(sub(&empty).await.as_deref(), Some("alice"));
        store.mark_ended(&ended).await.unwrap();
        store
            .put(&ended, &view("alice"), ttl, Replacing::Nothing)
            .await
            .unwrap();
        assert_eq!(store.get(&ended).await.unwrap(), CacheLookup::Ended);
        store
            .put(&cached, &view("bob"), ttl, Replacing::AnyViewOrEntry)
            .await
            .unwrap();
        store
            .put(&cached, &view("mallory"), ttl, Replacing::Nothing)
            .await
            .unwrap();
        assert_eq!(sub(&cached).await.as_deref(), Some("bob"));
        // Once an entry has expired, there is a gap again.
        clock.advance(chrono::Duration::seconds(61));
        store
            .put(&cached, &view("carol"), ttl, Replacing::Nothing)
            .await
            .unwrap();
        assert_eq!(sub(&cached).await.as_deref(), Some("carol"));
    }
}
