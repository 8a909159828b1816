//! One connection type for the three Redis topologies, so the store's commands and scripts run
//! unchanged on each: a single server, a Redis Cluster, or a Sentinel-managed master; and one
//! such connection per thread ([`Connections`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, TlsMode, Value,
};

use thread_local::ThreadLocal;

use super::topology::RedisTopology;

/// Bounded time-outs everywhere, so a hung Redis turns into an error instead of a hung request.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection per thread that uses Redis, each made in the background on first use.
///
/// An actix worker is a single-threaded runtime. A multiplexed connection is driven by a task on
/// the runtime that made it, so one shared connection (made at start-up, on the main thread)
/// made every command of every worker a round trip between threads: the worker queues the
/// command and wakes the main thread, which writes it, reads the reply and wakes the worker —
/// two context switches per command, a fifth of the hot path's CPU (`scripts/bench`). With a
/// connection per worker the command, its reply and the request stay on one thread. The cost is
/// one connection per worker thread (the number of cores by default) per replica, plus the one
/// made at start-up.
///
/// No request waits for its thread's connection to be made: until it is, the thread uses the
/// start-up connection, and a failed attempt is tried again by a later request, in the background
/// again. So a Redis that hangs while a worker makes its connection costs that worker nothing but
/// the shared connection's own behaviour (one reconnect attempt at a time, [`manager_config`]).
pub struct Connections {
    topology: RedisTopology,
    /// Made at start-up (proving Redis answers); serves every thread until it has its own.
    shared: Connection,
    per_thread: ThreadLocal<Arc<OwnConnection>>,
}

#[derive(Default)]
struct OwnConnection {
    made: OnceLock<Connection>,
    /// An attempt to make it is under way.
    connecting: AtomicBool,
}

/// An attempt under way: when it ends, however it ends (made, failed, or dropped with its
/// runtime), the next request may start another.
struct Attempt(Arc<OwnConnection>);

impl Drop for Attempt {
    fn drop(&mut self) {
        self.0.connecting.store(false, Ordering::Release);
    }
}

impl Connections {
    /// Connects, failing fast when Redis does not answer (start-up).
    pub async fn connect(topology: RedisTopology) -> RedisResult<Arc<Self>> {
        let shared = Connection::connect(topology.clone()).await?;
        let connections = Self {
            topology,
            shared: shared.clone(),
            per_thread: ThreadLocal::new(),
        };
        // The thread that connected (the main thread: background work) drives the shared one.
        let _ = connections.per_thread.get_or_default().made.set(shared);
        Ok(Arc::new(connections))
    }

    /// This thread's connection; the start-up one while this thread's is being made (which the
    /// first call starts, on this thread's runtime).
    pub fn get(self: &Arc<Self>) -> Connection {
        let own = self.per_thread.get_or_default();
        if let Some(connection) = own.made.get() {
            return connection.clone();
        }
        // Outside a runtime (never on the request path) there is nothing to drive one.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.shared.clone();
        };
        if !own.connecting.swap(true, Ordering::AcqRel) {
            let attempt = Attempt(Arc::clone(own));
            let topology = self.topology.clone();
            runtime.spawn(async move {
                match Connection::connect_answering(topology).await {
                    Ok(connection) => {
                        let _ = attempt.0.made.set(connection);
                    }
                    // Debug: during an outage the requests themselves log the failure.
                    Err(error) => tracing::debug!(
                        %error,
                        "could not open this thread's Redis connection; the shared one serves meanwhile"
                    ),
                }
            });
        }
        self.shared.clone()
    }

    /// Whether the calling thread has its own connection yet (tests).
    pub fn has_own(&self) -> bool {
        self.per_thread
            .get()
            .is_some_and(|own| own.made.get().is_some())
    }
}

#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    /// Routes each command by its key's hash slot and follows `MOVED`/`ASK` redirections.
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

impl Connection {
    /// Connects and sees a `PING` answered: a server that accepts connections but never
    /// answers (hung) must not become a thread's connection.
    async fn connect_answering(topology: RedisTopology) -> RedisResult<Self> {
        let mut connection = Self::connect(topology).await?;
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(connection)
    }

    /// Connects, failing fast when Redis does not answer.
    pub async fn connect(topology: RedisTopology) -> RedisResult<Self> {
        match topology {
            RedisTopology::Single(info) => {
                let client = redis::Client::open(info)?;
                let manager = ConnectionManager::new_with_config(client, manager_config()).await?;
                Ok(Self::Single(manager))
            }
            RedisTopology::Cluster(nodes) => {
                let cluster = ClusterClientBuilder::new(nodes)
                    .connection_timeout(CONNECTION_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(2)
                    .build()?
                    .get_async_connection()
                    .await?;
                Ok(Self::Cluster(cluster))
            }
            RedisTopology::Sentinel {
                sentinels,
                master_name,
                master,
            } => Ok(Self::Sentinel(
                SentinelConnection::connect(sentinels, master_name, master).await?,
            )),
        }
    }
}

/// One connection attempt per reconnect, no retry loop: a request waiting on a reconnect waits
/// for that attempt only (refused at once, or `CONNECTION_TIMEOUT`), and the next request that
/// finds the connection broken starts another. With retries, every request during a Redis outage
/// waited for the whole back-off (about 2.4 s for 2 retries, once per Redis command: `/auth`
/// took 7 s to answer its 503), see `tests/api/faults.rs`.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECTION_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
        .set_number_of_retries(0)
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
            Self::Sentinel(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
            Self::Sentinel(connection) => connection.get_db(),
        }
    }
}

/// A connection to the master that Sentinel names, asking Sentinel again when the master stops
/// answering or turns out to be a replica (after a fail-over). The `redis` crate's
/// `ConnectionManager` alone would keep reconnecting to the old address.
#[derive(Clone)]
pub struct SentinelConnection {
    shared: Arc<SentinelShared>,
}

struct SentinelShared {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The current master connection and a generation number, bumped on every re-resolution so
    /// that many requests failing at once ask Sentinel only once.
    current: RwLock<(u64, ConnectionManager)>,
}

impl SentinelConnection {
    async fn connect(
        sentinels: Vec<redis::ConnectionInfo>,
        master_name: String,
        master: redis::ConnectionInfo,
    ) -> RedisResult<Self> {
        let node = SentinelNodeConnectionInfo {
            tls_mode: match master.addr {
                ConnectionAddr::TcpTls { insecure, .. } if insecure => Some(TlsMode::Insecure),
                ConnectionAddr::TcpTls { .. } => Some(TlsMode::Secure),
                _ => None,
            },
            redis_connection_info: Some(master.redis),
        };
        let mut sentinel = SentinelClient::build(
            sentinels,
            master_name,
            Some(node),
            SentinelServerType::Master,
        )?;
        let manager = master_connection(&mut sentinel).await?;
        Ok(Self {
            shared: Arc::new(SentinelShared {
                sentinel: tokio::sync::Mutex::new(sentinel),
                current: RwLock::new((0, manager)),
            }),
        })
    }

    fn current(&self) -> (u64, ConnectionManager) {
        match self.shared.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Asks Sentinel for the master again, unless another request already did since `seen`.
    async fn reresolve(&self, seen: u64) {
        let mut sentinel = self.shared.sentinel.lock().await;
        if self.current().0 != seen {
            return;
        }
        match master_connection(&mut sentinel).await {
            Ok(manager) => {
                let mut current = match self.shared.current.write() {
                    Ok(current) => current,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *current = (seen + 1, manager);
                tracing::info!("reconnected to the Redis master that Sentinel names");
            }
            Err(error) => tracing::warn!(%error, "Sentinel did not name a reachable Redis master"),
        }
    }
}

async fn master_connection(sentinel: &mut SentinelClient) -> RedisResult<ConnectionManager> {
    let client = sentinel.async_get_client().await?;
    ConnectionManager::new_with_config(client, manager_config()).await
}

/// The error a stale master gives: unreachable, or demoted to a read-only replica.
fn master_may_have_moved(error: &RedisError) -> bool {
    error.kind() == ErrorKind::ReadOnly
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut connection) = self.current();
            let result = connection.req_packed_command(cmd).await;
            if matches!(&result, Err(error) if master_may_have_moved(error)) {
                // This request fails (it may have been applied); the next one goes to the new master.
                self.reresolve(generation).await;
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut connection) = self.current();
            let result = connection
                .req_packed_commands(pipeline, offset, count)
                .await;
            if matches!(&result, Err(error) if master_may_have_moved(error)) {
                self.reresolve(generation).await;
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}
