//! Builds the application from a [`Config`]: stores, IdP client, HTTP server. Tests and `main`
//! start exactly the same thing; tests bind port 0 and ask [`Application::port`].

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, App, HttpServer};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::crypto::Cipher;
use crate::flows::relay::Relay;
use crate::flows::sweep::{spawn_background_sweep, SweepTask};
use crate::flows::touch::{spawn_background_flush, TouchFlushTask};
use crate::flows::Broker;
use crate::metrics::Metrics;
use crate::oidc::Provider;
use crate::routes::health::Readiness;
use crate::routes::{self, middleware};
use crate::store::memory::MemoryStore;
use crate::store::postgres::{self, PgSessionRepository};
use crate::store::redis::RedisStore;
use crate::store::{LoginStore, SessionCache, SessionRepository};
use crate::telemetry;

/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
/// At shutdown, while no new connection is let in and before the listener closes: time for
/// those the kernel has queued to be accepted and to deliver their request.
const QUEUED_SETTLE: Duration = Duration::from_millis(50);
/// After the listener closed, before the workers stop: time for the last connections accepted
/// to deliver their request.
const ACCEPTED_SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("DATABASE_URL: {0}")]
    Database(#[source] crate::store::StoreError),
    #[error("migrations failed: {0}")]
    Migrations(#[from] sqlx::migrate::MigrateError),
    #[error("REDIS_URL: {0}")]
    Redis(#[source] crate::store::StoreError),
    #[error("BROKER_LISTEN_ADDR: {0}")]
    Listen(#[source] std::io::Error),
    #[error("HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Routes mounted besides the broker's own (dev mode's IdP and demo page).
pub type ExtraRoutes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// The stores a broker runs on.
pub struct Stores {
    pub logins: Arc<dyn LoginStore>,
    pub cache: Arc<dyn SessionCache>,
    pub sessions: Arc<dyn SessionRepository>,
}

impl Stores {
    /// Redis and PostgreSQL, migrating first unless `BROKER_RUN_MIGRATIONS=false`.
    pub async fn connect(config: &Config) -> Result<Self, StartupError> {
        let cipher = Cipher::new(&config.encryption_keys);
        let pools =
            postgres::Pools::per_thread(config.database_url.secret(), config.database_timeout)
                .map_err(StartupError::Database)?;
        if config.run_migrations {
            postgres::migrate(pools.get()).await?;
        }
        let redis = RedisStore::connect(
            config.redis_url.secret(),
            &config.redis_key_prefix,
            cipher.clone(),
        )
        .await
        .map_err(StartupError::Redis)?;
        let redis = Arc::new(redis);
        Ok(Self {
            logins: redis.clone(),
            cache: redis,
            sessions: Arc::new(PgSessionRepository::new(
                pools,
                cipher,
                config.database_timeout,
            )),
        })
    }

    /// Process-local stores for `token-broker dev` and tests.
    pub fn in_memory(clock: Arc<dyn Clock>) -> Self {
        let memory = Arc::new(MemoryStore::new(clock));
        Self {
            logins: memory.clone(),
            cache: memory.clone(),
            sessions: memory,
        }
    }
}

pub struct Application {
    port: u16,
    server: Server,
    signals: ShutdownSignals,
    broker: web::Data<Broker>,
    readiness: web::Data<Readiness>,
    /// The listening socket (a second handle on the server's), to refuse connections with
    /// before the workers stop.
    listener: TcpListener,
    /// The expired-session sweep; dropped (and so stopped) with the application.
    sweep: Option<SweepTask>,
    /// Writes the queued last-seen times every 10 ms; stopped with the application.
    touch_flush: TouchFlushTask,
}

impl Application {
    /// Binds `BROKER_LISTEN_ADDR` and builds the application on Redis and PostgreSQL.
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(config.listen_addr).map_err(StartupError::Listen)?;
        Self::build_on(listener, config, Arc::new(SystemClock)).await
    }

    /// Builds on an already bound listener with the given clock (tests bind port 0 first, so
    /// the public URL can name the port before the application exists).
    pub async fn build_on(
        listener: TcpListener,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        let stores = Stores::connect(&config).await?;
        Self::assemble(listener, config, clock, stores, None)
    }

    /// Builds from given stores, with extra routes mounted before the broker's own (dev mode
    /// mounts its IdP and demo page this way).
    pub fn assemble(
        listener: TcpListener,
        config: Config,
        clock: Arc<dyn Clock>,
        stores: Stores,
        extra_routes: Option<ExtraRoutes>,
    ) -> Result<Self, StartupError> {
        if !config.is_https() {
            tracing::warn!(
                public_url = %config.public_url,
                "BROKER_PUBLIC_URL is plain http: cookies are not Secure. Use this for local development only."
            );
        }
        let metrics = Arc::new(Metrics::new());
        let provider = Arc::new(Provider::new(&config)?.with_metrics(metrics.clone()));

        // Warm the discovery cache without holding up start-up; /readyz reports a failure.
        let warm = provider.clone();
        tokio::spawn(async move {
            if let Err(error) = warm.metadata().await {
                tracing::warn!(%error, "IdP discovery is not reachable yet");
            }
        });

        let port = listener.local_addr().map_err(StartupError::Listen)?.port();
        let shutdown_listener = listener.try_clone().map_err(StartupError::Listen)?;
        let broker = web::Data::new(Broker {
            config: Arc::new(config),
            provider,
            logins: stores.logins,
            cache: stores.cache,
            sessions: stores.sessions,
            clock,
            metrics,
            touches: Default::default(),
        });
        let readiness = web::Data::new(Readiness::default());
        let relay = web::Data::new(Relay::new(&broker.config)?);
        let server = {
            let (broker, readiness) = (broker.clone(), readiness.clone());
            HttpServer::new(move || {
                let mut app = App::new()
                    .app_data(broker.clone())
                    .app_data(readiness.clone())
                    .app_data(relay.clone())
                    .wrap(middleware::EveryRequest {
                        readiness: readiness.clone(),
                    });
                if let Some(extra) = &extra_routes {
                    let extra = extra.clone();
                    app = app.configure(move |config| extra(config));
                }
                app.configure(routes::configure)
            })
            .disable_signals()
            .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
            .listen(listener)
            .map_err(StartupError::Listen)?
            .run()
        };
        let signals = ShutdownSignals::register().map_err(StartupError::Listen)?;
        let sweep = spawn_background_sweep(broker.clone().into_inner());
        let touch_flush = spawn_background_flush(broker.clone().into_inner());
        tracing::info!(port, "token-broker listening");
        Ok(Self {
            port,
            server,
            signals,
            broker,
            readiness,
            listener: shutdown_listener,
            sweep,
            touch_flush,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The flows and stores this application runs on (tests inspect them).
    pub fn broker(&self) -> web::Data<Broker> {
        self.broker.clone()
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM or SIGINT: then `/readyz` turns 503 at once and every answer closes
    /// its connection (`Connection: close`, see [`middleware::EveryRequest`]); after
    /// `BROKER_SHUTDOWN_DELAY` (still serving, so a load balancer that routes by readiness can
    /// stop first) new connections are refused, those accepted or queued a moment before get to
    /// deliver their request ([`refuse_new_connections`]), then idle connections close, requests in flight
    /// finish (bounded by the grace period, 25 s), the last-seen times still queued are written,
    /// and the future resolves. The background sweep stops with the server.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let readiness = self.readiness.clone();
        let signals = self.signals;
        let sweep = self.sweep;
        let listener = self.listener;
        let delay = self.broker.config.shutdown_delay;
        tokio::spawn(async move {
            signals.recv().await;
            readiness.start_draining();
            if !delay.is_zero() {
                tracing::info!(
                    delay_s = delay.as_secs_f64(),
                    "shutdown signal received: /readyz is 503; serving on until the delay ends"
                );
                tokio::time::sleep(delay).await;
            }
            tracing::info!("shutdown signal received: draining");
            refuse_new_connections(&handle, listener).await;
            handle.stop(true).await;
        });
        let result = self.server.await;
        drop(sweep);
        drop(self.touch_flush);
        if let Err(error) = self.broker.flush_touches().await {
            tracing::warn!(%error, "could not write the last-seen times at shutdown");
        }
        result
    }
}

/// Stops taking connections before the workers stop, so that no connection is closed under a
/// request on its way in. A worker's stop closes every connection that has no request in
/// progress, and closing the listener resets every connection the kernel had queued for it; a
/// load balancer sees either closed after it sent the request, and retries that only for an
/// idempotent method (nginx never retries a `POST` that went out). A refused connection, in
/// contrast, is retried on another replica whatever the method. So, on Linux:
/// 1. the listening socket drops connection requests (a socket filter on pure SYNs): the kernel
///    queues no new connection, the client's retransmission a second later is refused (or, when
///    the replica is back on that port by then, served);
/// 2. for [`QUEUED_SETTLE`] the server accepts and serves what the kernel had queued;
/// 3. the listener closes (a read shutdown of a listening socket: the kernel refuses new
///    connections while the server's own handle stays open) and actix's accept thread pauses;
///    its one error for the closed socket is expected and not logged
///    ([`telemetry::listener_closed`]);
/// 4. for [`ACCEPTED_SETTLE`] the last connections accepted deliver their request; then the
///    workers stop.
///
/// Measured with the rolling restart test (nine restarts a run, a fifth of the load relayed
/// `POST`s), runs with a failed `POST`: before any of this, four of five (1 to 3 each); with
/// `Connection: close` alone, one of six; with the accept thread paused before the shutdown,
/// three of six (the kernel went on queueing connections that nobody accepted); with the
/// shutdown first, two of ten (those queued at that instant); with the filter first, none of
/// twelve. Where the filter or the shutdown is not supported, the workers stop as before.
async fn refuse_new_connections(handle: &ServerHandle, listener: TcpListener) {
    let socket = socket2::SockRef::from(&listener);
    match drop_connection_requests(&socket) {
        Ok(()) => tokio::time::sleep(QUEUED_SETTLE).await,
        Err(error) => tracing::debug!(%error, "cannot filter connection requests"),
    }
    telemetry::listener_closed();
    match socket.shutdown(std::net::Shutdown::Read) {
        Ok(()) => {
            handle.pause().await;
            tokio::time::sleep(ACCEPTED_SETTLE).await
        }
        Err(error) => {
            tracing::debug!(%error, "the listening socket cannot be shut down; stopping as is");
        }
    }
}

/// A classic BPF socket filter on the listening socket that drops segments with SYN set and
/// ACK clear (new connection requests) and lets all else through, so handshakes under way
/// complete. A TCP socket's filter sees the packet from the TCP header on; its flags are byte 13.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn drop_connection_requests(socket: &socket2::SockRef<'_>) -> std::io::Result<()> {
    use socket2::SockFilter;
    const LOAD_BYTE_AT: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JUMP_IF_ANY_SET: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    const TCP_FLAGS: u32 = 13;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    socket.attach_filter(&[
        SockFilter::new(LOAD_BYTE_AT, 0, 0, TCP_FLAGS),
        // ACK set: let through (to 4); else on.
        SockFilter::new(JUMP_IF_ANY_SET, 2, 0, ACK),
        // SYN set: drop (to 3); else let through (to 4).
        SockFilter::new(JUMP_IF_ANY_SET, 0, 1, SYN),
        SockFilter::new(RETURN, 0, 0, 0),
        SockFilter::new(RETURN, 0, 0, u32::MAX),
    ])
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn drop_connection_requests(_: &socket2::SockRef<'_>) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// SIGTERM and SIGINT, with the handlers installed on creation: a signal that arrives before
/// anyone waits for it (say, right after "listening" was logged) is kept, never fatal.
struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn register() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::Duration;

    use super::drop_connection_requests;

    #[test]
    fn the_filter_turns_new_connections_away_and_keeps_the_queued_ones() {
        // Arrange: a connection the kernel has queued (not yet accepted), then the filter.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let mut queued = TcpStream::connect(address).unwrap();
        let socket = socket2::SockRef::from(&listener);

        // Act
        drop_connection_requests(&socket).unwrap();

        // Assert: a new connection gets no answer (its SYN is dropped; the client would retry
        // after a second) ...
        let error = TcpStream::connect_timeout(&address, Duration::from_millis(300)).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        // ... the queued one is accepted and carries data both ways ...
        let (mut accepted, _) = listener.accept().unwrap();
        queued.write_all(b"ping").unwrap();
        let mut received = [0u8; 4];
        accepted.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"ping");
        accepted.write_all(b"pong").unwrap();
        queued.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"pong");
        // ... and once the listener is shut down, a new connection is refused at once.
        socket.shutdown(Shutdown::Read).unwrap();
        let error = TcpStream::connect_timeout(&address, Duration::from_millis(300)).unwrap_err();
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{error}"
        );
    }
}
