//! One connection type for the three Redis topologies, so the store's commands and scripts run
//! unchanged on each: a single server, a Redis Cluster, or a Sentinel-managed master; and one
//! such connection per thread ([`Connections`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
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
        let source = match topology {
            RedisTopology::Single(info) => Source::Server(redis::Client::open(info)?),
            RedisTopology::Cluster(nodes) => Source::Cluster(
                ClusterClientBuilder::new(nodes)
                    .connection_timeout(CONNECTION_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(2)
                    .build()?,
            ),
            RedisTopology::Sentinel {
                sentinels,
                master_name,
                master,
            } => Source::sentinel(sentinels, master_name, master)?,
        };
        Self::open(source).await
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

/// A connection to Redis, whichever the topology (one server, a cluster, a Sentinel-managed
/// master), that is replaced by a new one when it stops answering (in a cluster: when a
/// node it sends to does) or its server was demoted to a replica, or, behind Sentinel, when its
/// master may have moved.
///
/// The `redis` crate's `ConnectionManager` reconnects by itself only when the connection is
/// closed or refused. A server that went silent instead (a fail-over that left the old
/// master's address unanswered, a network partition, a frozen host) times every command out
/// and is never replaced: until TCP gives up on the connection, some 15 minutes later, every
/// login fails and every cache read first waits out the response time-out. Here the first
/// command that times out replaces it (and behind Sentinel, one that finds the master
/// unreachable or demoted: Sentinel is asked again, where reconnecting would find the old
/// address).
///
/// A cluster connection is no different: when a master goes silent and the cluster promotes
/// its replica, the crate's cluster connection may go on sending that master's slots to the
/// silent node (it learns of a new owner from a `MOVED` answer, which a silent node never
/// gives). In three of six runs of `tests/api/redis_cluster.rs` every command for that third
/// of the slots still timed out 16 s after the promotion (the test's bound; over a minute in
/// one longer run): one login in three failed. A new cluster connection reads the slots from
/// the nodes that answer; with it, logins worked again within 4.3 s of the promotion in each
/// of thirteen runs. (Those 4.2 s are two logins refused after a 2-s time-out each; why the
/// second one is not served by the new connection is not established. Two remedies were tried
/// and changed nothing, so neither is built: a new connection made without the silent seed node
/// (4 runs of 6 at 3.4–4.2 s, against 2 of 6 at 4.2 s without), and every thread's connection
/// replaced as soon as one was (4 of 6 at 4.2 s).)
///
/// Each handle keeps the connection it uses, so a command takes no lock: it compares its
/// generation with the shared one (an atomic read) and takes the current connection only after
/// a replacement.
#[derive(Clone)]
pub struct Connection {
    generation: u64,
    connection: Replaced,
    shared: Arc<Replaceable>,
}

/// What a [`Connection`] holds and replaces.
#[derive(Clone)]
enum Replaced {
    /// One server (on its own, or the master Sentinel names).
    Server(ConnectionManager),
    /// Routes each command by its key's hash slot and follows `MOVED`/`ASK` redirections.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Replaced {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

struct Replaceable {
    source: tokio::sync::Mutex<Source>,
    /// Which errors call for a new connection.
    replace_after: fn(&RedisError) -> bool,
    /// Bumped on every replacement, so that many requests failing at once replace the
    /// connection only once, and handles see that theirs was replaced.
    generation: AtomicU64,
    /// The current connection, with the generation it belongs to.
    current: RwLock<(u64, Replaced)>,
}

/// Where a new connection comes from.
enum Source {
    Server(redis::Client),
    /// The master that Sentinel names at the time.
    Sentinel(SentinelClient),
    /// The cluster, its slots as its answering nodes tell them.
    Cluster(ClusterClient),
}

impl Source {
    fn sentinel(
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
        Ok(Self::Sentinel(SentinelClient::build(
            sentinels,
            master_name,
            Some(node),
            SentinelServerType::Master,
        )?))
    }

    async fn connect(&mut self) -> RedisResult<Replaced> {
        let client = match self {
            Self::Server(client) => client.clone(),
            Self::Sentinel(sentinel) => sentinel.async_get_client().await?,
            Self::Cluster(cluster) => {
                return Ok(Replaced::Cluster(cluster.get_async_connection().await?));
            }
        };
        let manager = ConnectionManager::new_with_config(client, manager_config()).await?;
        Ok(Replaced::Server(manager))
    }

    fn replace_after(&self) -> fn(&RedisError) -> bool {
        match self {
            Self::Server(_) => silent_or_demoted,
            // A cluster connection follows a node that closes or refuses by itself (it reconnects
            // and reads the slots again), and a demoted one answers with a redirection; a silent
            // one it does not follow.
            Self::Cluster(_) => RedisError::is_timeout,
            Self::Sentinel(_) => master_may_have_moved,
        }
    }
}

impl Connection {
    async fn open(mut source: Source) -> RedisResult<Self> {
        // Boxed: Sentinel's and the connection manager's futures are deep enough that, inlined
        // into the start-up future, their layout exceeds the compiler's recursion limit in
        // release builds.
        let connection = Box::pin(source.connect()).await?;
        Ok(Self {
            generation: 0,
            connection: connection.clone(),
            shared: Arc::new(Replaceable {
                replace_after: source.replace_after(),
                source: tokio::sync::Mutex::new(source),
                generation: AtomicU64::new(0),
                current: RwLock::new((0, connection)),
            }),
        })
    }

    /// Takes the current connection if this handle's was replaced.
    fn catch_up(&mut self) {
        if self.shared.generation.load(Ordering::Acquire) == self.generation {
            return;
        }
        let current = match self.shared.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        (self.generation, self.connection) = current;
    }

    /// Makes a new connection, unless another request already did since `seen` or is making one
    /// now: one attempt at a time, and no request waits for another's (with Redis hung, new
    /// connections time out too, and requests queued behind each other's attempts would wait
    /// two seconds more for each one ahead). When none can be made, the current one stays (and
    /// reconnects by itself once the server refuses or closes it).
    async fn replace(&self, seen: u64) {
        let Ok(mut source) = self.shared.source.try_lock() else {
            return;
        };
        if self.shared.generation.load(Ordering::Acquire) != seen {
            return;
        }
        let behind_sentinel = matches!(*source, Source::Sentinel(_));
        match source.connect().await {
            Ok(connection) => {
                let mut current = match self.shared.current.write() {
                    Ok(current) => current,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *current = (seen + 1, connection);
                self.shared.generation.store(seen + 1, Ordering::Release);
                match *source {
                    Source::Sentinel(_) => {
                        tracing::info!("reconnected to the Redis master that Sentinel names")
                    }
                    Source::Cluster(_) => tracing::info!(
                        "reconnected to the Redis cluster after a node stopped answering"
                    ),
                    Source::Server(_) => {
                        tracing::info!("replaced a Redis connection that stopped answering")
                    }
                }
            }
            Err(error) if behind_sentinel => {
                tracing::warn!(%error, "Sentinel did not name a reachable Redis master")
            }
            Err(error) => tracing::warn!(
                %error,
                "could not replace a Redis connection that stopped answering"
            ),
        }
    }

    /// A command's result, after replacing the connection when its error calls for it.
    ///
    /// The error may come as an `Err` (the connection's: a time-out, a closed connection) or as
    /// an answer: the server's error replies (`READONLY`, …) are `Ok(Value::ServerError)` here,
    /// turned into errors only by the caller's conversion. Checking the `Err`s alone, a master
    /// demoted to a replica was never noticed by its `READONLY`s: with one server not at all
    /// (`tests/api/faults.rs`), behind Sentinel only because a Sentinel fail-over also closes
    /// the demoted master's client connections.
    async fn settle<T: Answer>(&self, result: RedisResult<T>) -> RedisResult<T> {
        let replace_after = self.shared.replace_after;
        let replace = match &result {
            Err(error) => replace_after(error),
            Ok(answer) => answer.has_error(replace_after),
        };
        if replace {
            // This request fails (it may have been applied); the next one uses the new connection.
            // Boxed: making a connection is a large future, and every command's future would
            // otherwise be as large (allocated and copied per command).
            Box::pin(self.replace(self.generation)).await;
        }
        result
    }
}

/// What a command or a pipeline answers, as its server error replies go.
trait Answer {
    /// Whether it holds an error reply for which `is` holds.
    fn has_error(&self, is: fn(&RedisError) -> bool) -> bool;
}

impl Answer for Value {
    fn has_error(&self, is: fn(&RedisError) -> bool) -> bool {
        // Cloned on error replies only (the crate does not export their type).
        matches!(self, Value::ServerError(_))
            && self
                .clone()
                .extract_error()
                .err()
                .is_some_and(|error| is(&error))
    }
}

impl Answer for Vec<Value> {
    fn has_error(&self, is: fn(&RedisError) -> bool) -> bool {
        self.iter().any(|answer| answer.has_error(is))
    }
}

/// The errors of a server that stopped answering, or that was demoted to a replica while its
/// address now leads elsewhere: a managed Redis's primary endpoint (a DNS name) after a
/// fail-over, whose old master refuses every write with `READONLY` on the connections made
/// before. A new connection looks the name up again. Before, nothing replaced such a connection:
/// every login failed until the broker was restarted (`tests/api/faults.rs`).
fn silent_or_demoted(error: &RedisError) -> bool {
    error.is_timeout() || error.kind() == ErrorKind::ReadOnly
}

/// The error a stale master gives: unreachable, or demoted to a read-only replica.
fn master_may_have_moved(error: &RedisError) -> bool {
    error.kind() == ErrorKind::ReadOnly
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.catch_up();
            let result = self.connection.req_packed_command(cmd).await;
            self.settle(result).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.catch_up();
            let result = self
                .connection
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.settle(result).await
        })
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}
