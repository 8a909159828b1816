//! Recording that sessions were used (the sliding idle timeout), off the request path.
//!
//! A request that finds a session's `last_seen_at` older than
//! [`touch_interval`](super::session::touch_interval) moves it in the cached view at once and
//! queues the new time here (a cache miss, whose time is PostgreSQL's own, only when it is older
//! than [`miss_touch_interval`](super::session::miss_touch_interval)); every [`FLUSH_INTERVAL`]
//! the queue is written to PostgreSQL in one statement for every session touched meanwhile. A
//! request never waits for a PostgreSQL write (or its WAL flush) to answer: after a Redis flush,
//! when every session is read from PostgreSQL once and those whose stored time lags are due for
//! a touch, that is at most a hundred batched writes a second instead of one per request
//! (docs/benchmarks.md, cold path). The interval is short so
//! that each batch is small, and the batch commits asynchronously (it does not wait for its WAL
//! flush). Requests served while a batch ran made up most of the cold path's slowest percent: at
//! about 1,150 cold requests a second, 200 ms batches (9 ms each) ran 5 % of the time and
//! overlapped 56 % of the requests above the p99 (the broker's access log against these batches'
//! debug lines);
//! 50 ms batches of 2–3 ms brought the cold p99 from 3.6 ms to 2.3 and 1.9 ms (`scripts/bench
//! --cold-only`, one run before, two after; one batch a second had been worse still), and 10 ms
//! batches, each one statement, from 1.52 to 0.94 ms at 2,000 cold requests a second and from
//! 2.41 to 1.47 ms at 4,000 (`scripts/bench-cold-ab`, medians of four pairs of runs; lower in
//! every pair). A flush is one round trip, so an empty queue costs nothing and a small one little.
//!
//! The times are written to `session_activity`, a table of narrow rows (id and time), not to the
//! session's own row. When they were in the ~1.6 KB session rows, each write was usually the
//! first change to its page since the last checkpoint, which puts the whole page in the WAL:
//! about 8 KB of WAL per touch after a Redis flush, which started a checkpoint within seconds
//! (and made every page pay again), and about 45 µs of PostgreSQL's time per row. About 125
//! narrow rows share a page, so after a checkpoint each page pays once: a cold run's 59,717
//! touches wrote 57 MiB of WAL (7,987 whole pages; docs/benchmarks.md), and a batch took about
//! 22 µs a row (its debug line, `scripts/bench --cold-only`).
//!
//! What that costs: PostgreSQL's `last_seen_at` may lag by one interval more (the expiry sweep
//! and a cache miss read it; idle timeouts are minutes to hours), and a replica that dies loses
//! at most its last interval's times, as a failed write did before; so does a PostgreSQL crash
//! within the WAL writer's delay of an asynchronous commit (about 0.6 s): those sessions end up
//! to one touch interval early. A row found gone at the
//! flush (deleted by another replica behind a cache that missed its tombstone) gets one now. A
//! flush that fails keeps its times for the next one; the queue is bounded, and a time that does
//! not fit is dropped (the cached view has it; PostgreSQL gets the next one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Broker;
use crate::domain::SessionIdHash;
use crate::store::StoreError;

/// How often a replica writes its queued times.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Sessions one queue holds at most (about 100 bytes each): far more than one interval's
/// distinct sessions, so only a long PostgreSQL outage under heavy traffic reaches it.
const MAX_QUEUED: usize = 100_000;
/// Rows one statement updates at most.
const FLUSH_BATCH: usize = 500;

/// The times waiting for their write, one per session (the latest).
#[derive(Debug, Default)]
pub struct TouchQueue {
    queued: Mutex<HashMap<Uuid, QueuedTouch>>,
}

#[derive(Debug, Clone, Copy)]
struct QueuedTouch {
    hash: SessionIdHash,
    last_seen_at: DateTime<Utc>,
}

/// A session used at a time, as [`crate::store::SessionRepository::touch_many`] writes it.
pub type Touch = (Uuid, DateTime<Utc>);

impl TouchQueue {
    fn queued(&self) -> MutexGuard<'_, HashMap<Uuid, QueuedTouch>> {
        // A panic while holding the lock leaves a plain map behind: still consistent.
        self.queued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `last_seen_at` for the session `id` (keeping the later of two times).
    pub fn record(&self, id: Uuid, hash: &SessionIdHash, last_seen_at: DateTime<Utc>) {
        let mut queued = self.queued();
        let full = queued.len() >= MAX_QUEUED;
        match queued.get_mut(&id) {
            Some(entry) => entry.last_seen_at = entry.last_seen_at.max(last_seen_at),
            None if full => tracing::debug!("touch queue full; dropping a last-seen time"),
            None => {
                queued.insert(
                    id,
                    QueuedTouch {
                        hash: *hash,
                        last_seen_at,
                    },
                );
            }
        }
    }

    /// How many sessions wait for their write.
    pub fn len(&self) -> usize {
        self.queued().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self) -> HashMap<Uuid, QueuedTouch> {
        std::mem::take(&mut *self.queued())
    }

    /// Puts back what a failed flush took, unless newer times came meanwhile.
    fn restore(&self, touches: impl IntoIterator<Item = (Uuid, QueuedTouch)>) {
        for (id, touch) in touches {
            self.record(id, &touch.hash, touch.last_seen_at);
        }
    }
}

impl Broker {
    /// Writes the queued last-seen times to PostgreSQL and ends the cached views of sessions
    /// whose row is gone. Returns how many rows were written. On a failure, the times not yet
    /// written stay queued.
    pub async fn flush_touches(&self) -> Result<usize, StoreError> {
        let started = std::time::Instant::now();
        // Each batch locks its rows in id order (`touch_many`), so two replicas' flushes over the
        // same rows lock them alike; the batches themselves are separate transactions.
        let touches: Vec<(Uuid, QueuedTouch)> = self.touches.take().into_iter().collect();
        let mut written = 0;
        let mut rest = touches.as_slice();
        while !rest.is_empty() {
            let (batch, after) = rest.split_at(rest.len().min(FLUSH_BATCH));
            let rows: Vec<Touch> = batch
                .iter()
                .map(|(id, touch)| (*id, touch.last_seen_at))
                .collect();
            let gone = match self.sessions.touch_many(&rows).await {
                Ok(gone) => gone,
                Err(error) => {
                    self.touches.restore(rest.iter().copied());
                    return Err(error);
                }
            };
            written += batch.len() - gone.len();
            for (id, touch) in batch.iter().filter(|(id, _)| gone.contains(id)) {
                tracing::info!(session = %id, "session deleted behind its cached view; ending the view");
                if let Err(error) = self.cache.mark_ended(&touch.hash).await {
                    self.metrics.store_error(&error);
                    tracing::warn!(%error, "could not end the cached view of a deleted session");
                }
            }
            rest = after;
        }
        if !touches.is_empty() {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            tracing::debug!(written, micros, "wrote last-seen times");
        }
        Ok(written)
    }
}

/// Starts the task that flushes the touch queue every [`FLUSH_INTERVAL`] (an empty queue costs
/// no query).
pub fn spawn_background_flush(broker: Arc<Broker>) -> TouchFlushTask {
    let handle = tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(FLUSH_INTERVAL).await;
            match broker.flush_touches().await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("last-seen times are written again");
                }
                Ok(_) => {}
                Err(error) => {
                    broker.metrics.store_error(&error);
                    // Once per outage, not five times a second.
                    if !failing {
                        tracing::warn!(%error, queued = broker.touches.len(), "could not write last-seen times; keeping them queued");
                    }
                    failing = true;
                }
            }
        }
    });
    super::BackgroundTask(handle)
}

/// Owns the flush task; aborted when dropped (the server stopped, before a last flush).
pub type TouchFlushTask = super::BackgroundTask;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_the_latest_time_per_session_and_stays_bounded() {
        let queue = TouchQueue::default();
        let hash = SessionIdHash([7; 32]);
        let (id, now) = (Uuid::new_v4(), Utc::now());
        queue.record(id, &hash, now);
        queue.record(id, &hash, now - chrono::Duration::seconds(5));
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.take()[&id].last_seen_at, now);

        for _ in 0..MAX_QUEUED + 10 {
            queue.record(Uuid::new_v4(), &hash, now);
        }
        assert_eq!(queue.len(), MAX_QUEUED);
    }
}
