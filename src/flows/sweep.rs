//! The expired-session sweep: deleting PostgreSQL rows of sessions past their idle or absolute
//! end, ending their Redis views, and the background task that runs it on every replica.
//!
//! SPEC "Data": expired sessions are deleted by a background sweep that is safe with many
//! replicas. Every replica runs the task; the store's advisory lock lets one sweep at a time and
//! the others skip their turn (a sweep is never waited for). Each batch is its own short
//! transaction that skips sessions whose rows a request or a last-seen write holds: a sweep never
//! waits for a row, so it never blocks a request and never deadlocks with one.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::{chrono_duration, Broker};
use crate::store::StoreError;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Rows deleted from PostgreSQL.
    pub deleted: u64,
    /// Deleted sessions whose Redis view could not be replaced by a tombstone (the view lapses
    /// on its own: its TTL is the session's end, which has passed).
    pub cache_failures: u64,
    /// Another replica was sweeping: this one stopped and left the rest to it.
    pub skipped: bool,
}

impl Broker {
    /// Deletes every session that ended (idle or absolute) before now, in batches of
    /// `sweep_batch`, each in a short transaction of its own, and ends their Redis views. Fails
    /// without deleting anything when the queued last-seen times cannot be written.
    #[tracing::instrument(skip_all)]
    pub async fn sweep_expired_sessions(&self) -> Result<SweepReport, StoreError> {
        // This replica's queued last-seen times first: it never deletes a session it just served
        // (another replica's are at most a flush interval behind).
        self.flush_touches().await?;
        // The same instants as `current_session`: a session ends when now >= last_seen + idle
        // or now >= expires_at, so no row is deleted that `/session` would still accept.
        let now = self.clock.now();
        let idle_cutoff = now - chrono_duration(self.config.session_idle_timeout);
        let batch = self.config.sweep_batch.max(1);
        let mut report = SweepReport::default();
        loop {
            let Some(hashes) = self
                .sessions
                .delete_expired(now, idle_cutoff, batch)
                .await?
            else {
                report.skipped = true;
                break;
            };
            report.deleted += hashes.len() as u64;
            for hash in &hashes {
                if let Err(error) = self.cache.mark_ended(hash).await {
                    report.cache_failures += 1;
                    tracing::debug!(%error, "could not end a swept session's cached view");
                }
            }
            // A short batch means nothing is left (or only rows a request holds right now,
            // which the next sweep takes).
            if (hashes.len() as i64) < batch {
                break;
            }
        }
        Ok(report)
    }
}

impl Broker {
    /// Recounts the `live_sessions` gauge when its count is older than
    /// [`crate::metrics::LIVE_SESSIONS_MAX_AGE`] (one `count(*)` per replica per 30 s at most,
    /// however often `/metrics` is scraped); a failure keeps the last value.
    pub async fn recount_live_sessions(&self) {
        if !self.metrics.claim_live_sessions_recount() {
            return;
        }
        let now = self.clock.now();
        let idle_cutoff = now - chrono_duration(self.config.session_idle_timeout);
        match self.sessions.count_live(now, idle_cutoff).await {
            Ok(count) => self.metrics.set_live_sessions(count),
            Err(error) => {
                self.metrics.store_error(&error);
                tracing::warn!(%error, "could not count the live sessions");
            }
        }
    }
}

/// How long to wait before the next sweep: the interval, ±25 % at random, so that replicas
/// started together drift apart instead of contending for the lock every time.
fn next_delay(interval: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.75..1.25);
    interval.mul_f64(factor)
}

/// The background task: a sweep every `sweep_interval` (with jitter), forever. `None` when the
/// interval is zero (sweeping turned off). Dropping the returned guard stops the task.
pub fn spawn_background_sweep(broker: Arc<Broker>) -> Option<SweepTask> {
    let interval = broker.config.sweep_interval;
    if interval.is_zero() {
        return None;
    }
    let handle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(next_delay(interval)).await;
            match broker.sweep_expired_sessions().await {
                Ok(report) => {
                    if report.deleted > 0 {
                        tracing::info!(
                            deleted = report.deleted,
                            cache_failures = report.cache_failures,
                            "expired sessions swept"
                        );
                    }
                    if report.skipped {
                        tracing::debug!("another replica is sweeping expired sessions");
                    }
                }
                Err(error) => {
                    broker.metrics.store_error(&error);
                    tracing::warn!(%error, "expired-session sweep failed");
                }
            }
        }
    });
    Some(super::BackgroundTask(handle))
}

/// Owns the background sweep; the task is aborted when this is dropped (the server stopped).
/// An abort mid-batch rolls that batch's transaction back: nothing is half-deleted.
pub type SweepTask = super::BackgroundTask;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::{IdToken, SessionId, UserClaims};
    use crate::store::{CacheLookup, Replacing, SessionRecord};
    use chrono::Utc;

    fn broker(clock: ManualClock, batch: i64) -> Broker {
        super::super::in_memory_broker(clock, |config| config.sweep_batch = batch)
    }

    /// A session created `age` ago and last used `idle` ago, cached as live.
    async fn session(broker: &Broker, age: chrono::Duration, idle: chrono::Duration) -> SessionId {
        let id = SessionId::generate();
        let now = broker.clock.now();
        let record = SessionRecord {
            id: uuid::Uuid::new_v4(),
            id_hash: id.hash(),
            user: UserClaims::select("alice".into(), &Default::default()),
            idp_sid: None,
            id_token: IdToken::new("id-token"),
            refresh_token: None,
            access_token: None,
            created_at: now - age,
            last_seen_at: now - idle,
            expires_at: now - age + chrono::Duration::days(1),
        };
        broker.sessions.insert(&record).await.unwrap();
        broker
            .cache
            .put(
                &id.hash(),
                &record.view(),
                Duration::from_secs(3600),
                Replacing::AnyViewOrEntry,
            )
            .await
            .unwrap();
        id
    }

    #[tokio::test]
    async fn the_sweep_deletes_idle_and_absolute_expired_sessions_in_batches() {
        let broker = broker(ManualClock::new(Utc::now()), 2);
        let hours = chrono::Duration::hours;
        let live = session(&broker, hours(2), chrono::Duration::minutes(59)).await;
        let mut expired = Vec::new();
        for _ in 0..3 {
            expired.push(session(&broker, hours(2), hours(1)).await);
            expired.push(session(&broker, hours(24), hours(0)).await);
        }

        let report = broker.sweep_expired_sessions().await.unwrap();

        assert_eq!(report.deleted, 6);
        assert!(!report.skipped);
        assert_eq!(report.cache_failures, 0);
        assert!(broker.sessions.find(&live.hash()).await.unwrap().is_some());
        for id in &expired {
            assert!(broker.sessions.find(&id.hash()).await.unwrap().is_none());
            assert_eq!(
                broker.cache.get(&id.hash()).await.unwrap(),
                CacheLookup::Ended
            );
        }
        assert_eq!(broker.sweep_expired_sessions().await.unwrap().deleted, 0);
    }

    #[tokio::test]
    async fn a_zero_interval_turns_the_background_sweep_off() {
        let mut broker = broker(ManualClock::new(Utc::now()), 500);
        let mut config = (*broker.config).clone();
        config.sweep_interval = Duration::ZERO;
        broker.config = Arc::new(config);
        assert!(spawn_background_sweep(Arc::new(broker)).is_none());
    }

    #[test]
    fn the_delay_stays_within_a_quarter_of_the_interval() {
        let interval = Duration::from_secs(60);
        for _ in 0..1000 {
            let delay = next_delay(interval);
            assert!(delay >= Duration::from_secs(45) && delay < Duration::from_secs(75));
        }
    }
}
