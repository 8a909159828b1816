//! The broker's PostgreSQL connections: a small pool per thread ([`Pools`]) that takes a
//! connection back without a round trip.
//!
//! sqlx's own pool pings every connection as it comes back (in a task spawned for it): a second
//! round trip after every statement, with its wake-ups on both sides. It has to, because a
//! connection may come back from a query future dropped halfway through, or with a dropped
//! transaction's `ROLLBACK` only queued, in any state. Here a connection goes back only from an
//! operation that ran to its end ([`Checkout::give_back`]), after `flush` has sent whatever was
//! queued and read the answers still owed; when nothing is owed, as after every statement that
//! completed, that costs nothing. A checkout dropped without being given back (an operation
//! given up on, a request cancelled, a failed flush) closes its connection.
//!
//! The rest is what sqlx's pool did for the broker: a bound on the connections (a semaphore, and
//! a bound on the wait for one), `statement_timeout` set on each new connection, a ping for a
//! connection idle for a second or more (the one a PostgreSQL restart or a dropped idle TCP
//! connection may have killed since its last use: a failed ping closes it and the next one is
//! tried, so the caller never sees it), and an end to connections idle for long or open for
//! long. Idle connections are taken in turn, the longest idle first (as sqlx's pool does): under
//! a steady load every connection stays in use and none needs the ping, where taking the most
//! recently used first would leave the deeper ones idle for seconds, to be pinged in the bursts
//! that reach them (a round trip more in the slowest requests).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use thread_local::ThreadLocal;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::store::StoreError;

/// At most this many connections per replica (a little more with many cores: see [`Pools`]).
pub const MAX_CONNECTIONS: u32 = 16;

/// A connection idle for this long is pinged before it is handed out.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// The longest wait for a connection (capped at the database time-out): when none can be had,
/// because PostgreSQL refuses connections or all of them are busy.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection found idle this long when one is needed is closed (sqlx's default; there is no
/// background reaper: a thread with no work at all keeps what it has open).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// A connection open for this long is closed when it comes back (sqlx's default): a server's
/// per-connection caches do not grow without end, and after a fail-over behind a DNS name every
/// connection finds the new primary in time (one that a write finds read-only is closed at once:
/// `PgSessionRepository::within_time_out`).
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// One set of connections: a thread's, or one shared by every thread (tools and tests).
pub struct Connections {
    connect: PgConnectOptions,
    /// `statement_timeout`, set on every connection as it is made.
    statement_timeout: String,
    acquire_timeout: Duration,
    permits: Semaphore,
    /// Longest idle first.
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    connection: Open,
    since: Instant,
}

struct Open {
    connection: PgConnection,
    opened: Instant,
}

impl Connections {
    /// At most `max_connections` connections to `connect`, made when first needed (start-up does
    /// not fail while PostgreSQL is still coming up; `/readyz` reports it instead).
    ///
    /// Every connection gets `statement_timeout` = `time_out` when it is made, so PostgreSQL
    /// itself cancels a statement that waits (on a lock an operator holds, say) or works longer;
    /// without it, each request given up on would leave a backend waiting behind, and enough of
    /// them would use up the server's connections. (Set after connecting, not by a startup
    /// `options` parameter, which poolers such as PgBouncer refuse.)
    ///
    /// Nor is sqlx's `extra_float_digits` startup parameter sent: PgBouncer closes a connection
    /// that names a parameter it does not know (unless its operator lists it in
    /// `ignore_startup_parameters`), and the broker stores no floating-point values.
    pub fn new(connect: PgConnectOptions, max_connections: u32, time_out: Duration) -> Self {
        Self {
            connect: connect.extra_float_digits(None),
            statement_timeout: format!("{}ms", time_out.as_millis()),
            acquire_timeout: ACQUIRE_TIMEOUT.min(time_out),
            permits: Semaphore::new(usize::try_from(max_connections).unwrap_or(usize::MAX)),
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// A connection for one operation: an idle one (pinged first when it has idled for a
    /// second), or a new one. Waits at most the acquire time-out (`PoolTimedOut`).
    pub async fn checkout(&self) -> Result<Checkout<'_>, sqlx::Error> {
        let checkout = async {
            let permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| sqlx::Error::PoolClosed)?;
            while let Some(idle) = self.take_idle() {
                let mut open = idle.connection;
                if idle.since.elapsed() < PING_WHEN_IDLE_FOR || open.connection.ping().await.is_ok()
                {
                    return Ok(self.checkout_of(open, permit));
                }
            }
            let open = self.open().await?;
            Ok(self.checkout_of(open, permit))
        };
        tokio::time::timeout(self.acquire_timeout, checkout)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    fn checkout_of<'a>(&'a self, open: Open, permit: SemaphorePermit<'a>) -> Checkout<'a> {
        Checkout {
            open,
            home: self,
            _permit: permit,
        }
    }

    /// The connection idle longest; those idle longer than [`IDLE_TIMEOUT`] are closed on the
    /// way.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some(entry) = idle.pop_front() {
            if entry.since.elapsed() < IDLE_TIMEOUT {
                return Some(entry);
            }
        }
        None
    }

    async fn open(&self) -> Result<Open, sqlx::Error> {
        let mut connection = self.connect.connect().await?;
        sqlx::query("SELECT set_config('statement_timeout', $1, false)")
            .bind(&self.statement_timeout)
            .execute(&mut connection)
            .await?;
        Ok(Open {
            connection,
            opened: Instant::now(),
        })
    }

    fn put_back(&self, connection: Open) {
        if connection.opened.elapsed() >= MAX_LIFETIME {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push_back(Idle {
                connection,
                since: Instant::now(),
            });
    }
}

/// A connection checked out for one operation. Dropped without [`Checkout::give_back`], it
/// closes the connection (and gives its place up).
pub struct Checkout<'a> {
    open: Open,
    home: &'a Connections,
    _permit: SemaphorePermit<'a>,
}

impl Checkout<'_> {
    /// The connection, for the operation.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.open.connection
    }

    /// Once the operation has run to its end: sends what it left queued (a dropped
    /// transaction's `ROLLBACK`) and reads the answers still owed — nothing, and no round trip,
    /// after statements that completed — then puts the connection back for the next operation.
    /// A connection that fails this is closed. Call it within the operation's time bound: a
    /// server that stops answering makes it wait. (`Connection::flush` is hidden from sqlx 0.8's
    /// documentation, so not bound by its semver promise: the `database_connections` tests hold
    /// both halves of what it does here, and `Cargo.lock` the version.)
    pub async fn give_back(mut self) {
        if self.open.connection.flush().await.is_ok() {
            self.home.put_back(self.open);
        }
    }
}

/// The broker's PostgreSQL connections: a set per thread that uses them, or one set for all
/// (tools and tests).
///
/// An actix worker is a single-threaded runtime, and a connection's socket belongs to the
/// runtime that opened it: that runtime's thread is woken for its readiness and wakes the task
/// waiting on it. One set shared by the workers meant (1) that a query on a connection another
/// worker had opened woke that worker's thread first (two context switches more per round trip:
/// the cold `/session` path), and (2) that during a graceful shutdown, once an idle worker's
/// runtime had stopped, a request still draining on another worker failed (503) on a connection
/// the stopped runtime had opened ("A Tokio 1.x context was found, but it is being shutdown").
/// With a set per thread, a thread's queries use connections it opened.
///
/// The per-replica bound of [`MAX_CONNECTIONS`] is split between the threads (the workers, one
/// per core, and the main thread, which runs the background work), at least two each: with
/// more than seven cores a replica may hold two per thread.
#[derive(Clone)]
pub enum Pools {
    Shared(Arc<Connections>),
    PerThread(Arc<PerThreadPools>),
}

pub struct PerThreadPools {
    connect: PgConnectOptions,
    max_connections: u32,
    time_out: Duration,
    pools: ThreadLocal<Connections>,
}

impl Pools {
    /// A set per thread, made on each thread's first use. `time_out`: as for [`Connections::new`].
    pub fn per_thread(url: &str, time_out: Duration) -> Result<Self, StoreError> {
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        Ok(Self::PerThread(Arc::new(PerThreadPools {
            connect: url.parse()?,
            max_connections: connections_per_thread(cores + 1),
            time_out,
            pools: ThreadLocal::new(),
        })))
    }

    /// One set of [`MAX_CONNECTIONS`] for every thread. `time_out`: as for [`Connections::new`].
    pub fn shared(url: &str, time_out: Duration) -> Result<Self, StoreError> {
        Ok(Connections::new(url.parse()?, MAX_CONNECTIONS, time_out).into())
    }

    /// The calling thread's connections.
    pub fn get(&self) -> &Connections {
        match self {
            Self::Shared(connections) => connections,
            Self::PerThread(per_thread) => per_thread.pools.get_or(|| {
                Connections::new(
                    per_thread.connect.clone(),
                    per_thread.max_connections,
                    per_thread.time_out,
                )
            }),
        }
    }
}

impl From<Connections> for Pools {
    fn from(connections: Connections) -> Self {
        Self::Shared(Arc::new(connections))
    }
}

/// [`MAX_CONNECTIONS`] split between `threads`, at least two each.
fn connections_per_thread(threads: usize) -> u32 {
    (MAX_CONNECTIONS / u32::try_from(threads.max(1)).unwrap_or(u32::MAX)).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_connections_are_split_between_its_threads_two_at_least() {
        // A worker per core, and the main thread.
        let per_thread = |cores: usize| connections_per_thread(cores + 1);
        assert_eq!(per_thread(1), 8);
        assert_eq!(per_thread(2), 5);
        assert_eq!(per_thread(3), 4);
        assert_eq!(per_thread(7), 2);
        assert_eq!(per_thread(64), 2);
        for cores in 1..=7 {
            assert!(per_thread(cores) * u32::try_from(cores + 1).unwrap() <= MAX_CONNECTIONS);
        }
    }
}
