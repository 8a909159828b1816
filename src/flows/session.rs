//! `/session`: the hot path of every page load, and the session's idle and absolute expiry.
//!
//! The common case is one Redis `GET` and nothing else. The idle timeout slides without a write
//! on every call: `last_seen_at` is moved only when it is older than [`touch_interval`] (so a
//! session may end up to that much earlier than its exact idle limit): in the cached view at
//! once, in PostgreSQL by the replica's touch queue within 10 ms ([`super::touch`]).
//! A cache miss (first use after a Redis flush, or an evicted key) reads PostgreSQL and re-caches
//! the view after the answer (not before it). That read may get a lower bound of the last-seen
//! time instead of the exact one, when the bound alone proves the session within its idle
//! timeout (PostgreSQL then skips a lookup). The re-cached view has the use's time; PostgreSQL
//! gets it only when its own time lags by [`miss_touch_interval`] (a tenth of the idle
//! timeout) or more. Otherwise the next use past the touch interval, served from the view,
//! writes it. So a Redis flush, after which every returning session is a miss, costs
//! PostgreSQL one read per session rather than a read and a write (the batched writes had been
//! 59.6 µs of PostgreSQL's 95.6 µs per cold request in `scripts/bench`). What that costs: a
//! session whose last use was such a miss may end up to that lag early (the expiry sweep, and
//! a later miss, read PostgreSQL's time), never late.

use chrono::{DateTime, Utc};

use super::{chrono_duration, Broker};
use crate::domain::{SessionId, SessionIdHash, UserClaims};
use crate::store::{
    CacheLookup, CachedAccessToken, CachedSession, Replacing, SessionRecord, StoreError,
};

/// What `/session` reports.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub user: UserClaims,
    /// When the session ends if unused: the earlier of idle and absolute expiry.
    pub expires_at: DateTime<Utc>,
}

/// How stale `last_seen_at` may get before it is written again: a tenth of the idle timeout,
/// at most a minute.
pub fn touch_interval(idle_timeout: std::time::Duration) -> std::time::Duration {
    (idle_timeout / 10).min(std::time::Duration::from_secs(60))
}

/// How stale PostgreSQL's own last-seen time may be for a cache miss to leave it unwritten: a
/// tenth of the idle timeout (at least [`touch_interval`], which it equals for idle timeouts up
/// to 10 minutes). A miss re-caches the view with the use's time either way; the next use past
/// the touch interval, served from that view, writes it to PostgreSQL as every such use does.
pub fn miss_touch_interval(idle_timeout: std::time::Duration) -> std::time::Duration {
    idle_timeout / 10
}

impl Broker {
    /// The moment a session ends if it is not used again.
    pub(crate) fn session_end(&self, session: &CachedSession) -> DateTime<Utc> {
        let idle_end = session.last_seen_at + chrono_duration(self.config.session_idle_timeout);
        idle_end.min(session.expires_at)
    }

    /// How long the cache may keep the view: until the session would end.
    pub(crate) fn cache_ttl(
        &self,
        session: &CachedSession,
        now: DateTime<Utc>,
    ) -> std::time::Duration {
        (self.session_end(session) - now)
            .to_std()
            .unwrap_or(std::time::Duration::from_millis(1))
    }

    /// Deletes a session everywhere: the PostgreSQL row and, in Redis, a tombstone in place of
    /// the cached view (so no replica re-caches it) and the cached access token.
    pub async fn end_session(
        &self,
        hash: &SessionIdHash,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let record = self.sessions.delete(hash).await?;
        self.cache.mark_ended(hash).await?;
        Ok(record)
    }

    /// The live session behind a cookie, sliding its idle timeout; `None` when there is none.
    pub async fn current_session(&self, id: &SessionId) -> Result<Option<SessionView>, StoreError> {
        Ok(self
            .live_session(&id.hash(), false)
            .await?
            .map(|(view, _)| view))
    }

    /// [`Broker::current_session`] by ID hash. With `with_token`, the session's latest access
    /// token is read in the same Redis round trip (or with the row, when PostgreSQL was read)
    /// and returned as `Some(latest)`; `None` when it was not asked for. No span of its own
    /// (nor in `current_session`): this is every page load's path, and the request's span
    /// already names the route.
    pub(crate) async fn live_session(
        &self,
        hash: &SessionIdHash,
        with_token: bool,
    ) -> Result<Option<(SessionView, Option<Option<CachedAccessToken>>)>, StoreError> {
        let now = self.clock.now();
        let lookup = if with_token {
            self.cache
                .get_with_access_token(hash)
                .await
                .map(|(lookup, token)| (lookup, Some(token)))
        } else {
            self.cache.get(hash).await.map(|lookup| (lookup, None))
        };
        let redis_answered = lookup.is_ok();
        // Redis answered that it holds nothing for the session: the view read from PostgreSQL
        // may only fill that gap.
        let held_nothing = matches!(lookup, Ok((CacheLookup::Unknown, _)));
        let (cached, mut token) = match lookup {
            Ok((CacheLookup::Live(session), token)) => (Some(session), token),
            Ok((CacheLookup::Ended, _)) => return Ok(None),
            Ok((CacheLookup::Unknown | CacheLookup::Unreadable, token)) => (None, token),
            Err(error) => {
                // Losing Redis must not log everyone out: PostgreSQL answers instead.
                self.metrics.store_error(&error);
                tracing::warn!(%error, "session cache unavailable; reading PostgreSQL");
                (None, None)
            }
        };
        // The cold branches are boxed, allocated only when taken: inlined, their futures
        // (PostgreSQL's queries, the deletions) were most of this one's size, and actix boxes
        // every handler's future, so each cached request allocated and copied room for them.
        let (mut session, from_cache) = match cached {
            Some(session) => (session, true),
            None => {
                // Redis has no token (flushed, evicted) or is down: the row's copy serves.
                let wants_row_token = with_token && !matches!(token, Some(Some(_)));
                let read = self.session_from_postgresql(
                    hash,
                    with_token,
                    wants_row_token && redis_answered,
                    now,
                );
                let Some((session, row_token)) = Box::pin(read).await? else {
                    return Ok(None);
                };
                if wants_row_token {
                    token = Some(row_token);
                }
                (session, false)
            }
        };

        if now >= self.session_end(&session) {
            tracing::info!(session = %session.id, "session expired");
            Box::pin(self.end_session(hash)).await?;
            return Ok(None);
        }

        let idle_timeout = self.config.session_idle_timeout;
        let age = (now - session.last_seen_at).to_std().unwrap_or_default();
        let stale = age >= touch_interval(idle_timeout);
        if stale {
            // The cached view gets the time below; PostgreSQL within 10 ms (`touch`), unless
            // the time was just read from PostgreSQL and lags by less than the miss interval:
            // after a Redis flush, the sessions that come back cost PostgreSQL a read each, not
            // a read and a write (see the module's documentation).
            session.last_seen_at = now;
            if from_cache || age >= miss_touch_interval(idle_timeout) {
                self.touches.record(session.id, hash, now);
            }
        }
        if stale || !from_cache {
            self.cache_view_after_response(hash, &session, now, held_nothing);
        }
        let view = SessionView {
            expires_at: self.session_end(&session),
            user: session.user,
        };
        Ok(Some((view, token)))
    }

    /// Writes the session's view to Redis in a task of its own, so that the answer does not wait
    /// for it: a cache miss costs the request the `GET` and the PostgreSQL read, not a third
    /// round trip. The cache only saves work, so nothing depends on the write having happened:
    /// a request that comes first reads PostgreSQL again. The write cannot bring an ended
    /// session back either: it is refused where a tombstone is (`SessionCache::put`), and a
    /// tombstone outlives any such task by far. A task waits at most Redis's response
    /// time-out, as the request would have. `held_nothing`: Redis answered that it held nothing
    /// for the session, so the write only fills that gap ([`Replacing::Nothing`]: cheaper).
    fn cache_view_after_response(
        &self,
        hash: &SessionIdHash,
        session: &CachedSession,
        now: DateTime<Utc>,
        held_nothing: bool,
    ) {
        let ttl = self.cache_ttl(session, now);
        let (cache, metrics, hash, session) = (
            self.cache.clone(),
            self.metrics.clone(),
            *hash,
            session.clone(),
        );
        tokio::spawn(async move {
            let replacing = if held_nothing {
                Replacing::Nothing
            } else {
                Replacing::AnyViewOrEntry
            };
            if let Err(error) = cache.put(&hash, &session, ttl, replacing).await {
                metrics.store_error(&error);
                tracing::warn!(%error, "could not cache the session");
            }
        });
    }

    /// A session Redis did not answer with, from PostgreSQL: the view and, with `with_token`,
    /// the row's access token (cached in Redis too with `cache_row_token`).
    /// A session whose tokens cannot be opened is ended. Awaited boxed by
    /// [`Broker::live_session`]: inlined, its future made `current_session`'s 992 bytes instead
    /// of 528, carried by every cached request.
    async fn session_from_postgresql(
        &self,
        hash: &SessionIdHash,
        with_token: bool,
        cache_row_token: bool,
        now: DateTime<Utc>,
    ) -> Result<Option<(CachedSession, Option<CachedAccessToken>)>, StoreError> {
        match self.read_session_row(hash, with_token, now).await {
            Ok(Some((session, row_token))) => {
                if let (true, Some(entry)) = (cache_row_token, &row_token) {
                    self.cache_access_token(hash, entry).await;
                }
                Ok(Some((session, row_token)))
            }
            Ok(None) => Ok(None),
            Err(StoreError::Sealed(error)) => {
                // Sealed under a key no longer configured: the session cannot be used.
                tracing::warn!(%error, "ending a session whose tokens cannot be opened");
                self.end_session(hash).await?;
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// A cache miss: the session's row. `/session` reads only the view's columns (no token is
    /// transferred or opened); with `with_token` the whole row, and its access token with it.
    /// Its `last_seen_at` may be a lower bound that proves the session within its idle timeout
    /// at `now` ([`crate::store::SessionRepository::find_view`]): a bound older than the touch
    /// interval is stale, so the caller records a use, as with the exact time.
    async fn read_session_row(
        &self,
        hash: &SessionIdHash,
        with_token: bool,
        now: DateTime<Utc>,
    ) -> Result<Option<(CachedSession, Option<CachedAccessToken>)>, StoreError> {
        let idle_cutoff = now - chrono_duration(self.config.session_idle_timeout);
        if !with_token {
            return Ok(self
                .sessions
                .find_view(hash, idle_cutoff)
                .await?
                .map(|view| (view, None)));
        }
        Ok(self
            .sessions
            .find_for_use(hash, idle_cutoff)
            .await?
            .map(|record| (record.view(), record.access_token)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// actix allocates and moves every handler's future, so the hot paths' futures must not
    /// carry the cold branches' (PostgreSQL's read, the refresh and its IdP call) inline: those
    /// are awaited boxed. Inlined, `access_token`'s was 3,136 bytes and `current_session`'s
    /// 992; boxed, 688 and 528 (the same in the test and the release build, 2026-12-07).
    #[test]
    fn the_hot_paths_futures_do_not_carry_the_cold_paths() {
        let broker = super::super::in_memory_broker(
            crate::clock::ManualClock::new(chrono::Utc::now()),
            |_| {},
        );
        let id = SessionId::generate();
        let session = std::mem::size_of_val(&broker.current_session(&id));
        let token = std::mem::size_of_val(&broker.access_token(&id));
        assert!(session <= 640, "current_session's future: {session} bytes");
        assert!(token <= 1024, "access_token's future: {token} bytes");
    }

    #[test]
    fn a_miss_leaves_postgresql_a_tenth_of_idle_behind_never_less_than_a_touch_interval() {
        for minutes in [1, 5, 10, 11, 60, 12 * 60, 7 * 24 * 60] {
            let idle = Duration::from_secs(minutes * 60);
            assert!(
                miss_touch_interval(idle) >= touch_interval(idle),
                "{minutes} min"
            );
        }
        assert_eq!(
            miss_touch_interval(Duration::from_secs(12 * 3600)),
            Duration::from_secs(72 * 60)
        );
        assert_eq!(
            miss_touch_interval(Duration::from_secs(600)),
            touch_interval(Duration::from_secs(600))
        );
    }

    #[test]
    fn touch_interval_is_a_tenth_of_idle_at_most_a_minute() {
        assert_eq!(
            touch_interval(Duration::from_secs(12 * 3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            touch_interval(Duration::from_secs(300)),
            Duration::from_secs(30)
        );
    }
}
