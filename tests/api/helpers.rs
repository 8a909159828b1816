//! `spawn_app()`: the real broker on a random port, with its own PostgreSQL database, its own
//! Redis key prefix, and the Rust test IdP; plus a small cookie-keeping browser and one helper
//! per step of the login flow.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use token_broker::clock::{Clock, SystemClock};
use token_broker::config::{Config, Settings};
use token_broker::crypto::{Cipher, EncryptionKey};
use token_broker::dev_idp::{DevIdp, DevIdpOptions, KeyMaterial};
use token_broker::startup::Application;
use url::Url;

pub const FRONTEND: &str = "http://localhost:3000";
/// The Kubernetes manifests' readiness probe (`deploy/kubernetes/base/deployment.yaml`; the
/// `deploy_files` tests hold the two together): draining only, none of the shared dependencies.
pub const KUBERNETES_READINESS_PROBE: &str = "/readyz?exclude=redis,postgres,idp";
pub const CLIENT_ID: &str = "token-broker-test";
pub const CLIENT_SECRET: &str = "test-client-secret-4f1e9a";

/// RSA key generation is slow: one key set per test process.
fn shared_keys() -> KeyMaterial {
    static KEYS: OnceLock<KeyMaterial> = OnceLock::new();
    KEYS.get_or_init(KeyMaterial::generate).clone()
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with scripts/test, which provides PostgreSQL and Redis")
    })
}

/// A database of its own, dropped when the test ends.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = required_env("DATABASE_URL");
        let name = format!("tb_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx_connect(&admin_url).await;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let mut url = Url::parse(&admin_url).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            name,
            url: url.to_string(),
            admin_url,
        }
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

async fn sqlx_connect(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url)
        .await
        .expect("connect to PostgreSQL")
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; a thread with its own runtime may block.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = sqlx_connect(&admin_url).await;
                sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A Redis key prefix of its own; its keys are deleted when the test ends.
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
}

impl TestRedis {
    pub fn new() -> Self {
        Self {
            url: required_env("REDIS_URL"),
            prefix: format!("tbtest:{}:", uuid::Uuid::new_v4().simple()),
        }
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("REDIS_URL is valid")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis")
    }

    /// Every key under this test's prefix.
    pub async fn keys(&self) -> Vec<String> {
        let mut connection = self.connection().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }

    /// Every key under this test's prefix with its value, as bytes (the session cache's values
    /// are binary).
    pub async fn values(&self) -> Vec<(String, Vec<u8>)> {
        let mut connection = self.connection().await;
        let mut values = Vec::new();
        for key in self.keys().await {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
            values.push((key, value.unwrap_or_default()));
        }
        values
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let (url, pattern) = (self.url.clone(), format!("{}*", self.prefix));
        let _ = std::thread::spawn(move || {
            let client = redis::Client::open(url).ok()?;
            let mut connection = client.get_connection().ok()?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query(&mut connection)
                .ok()?;
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL").arg(keys).query(&mut connection).ok()?;
            }
            Some(())
        })
        .join();
    }
}

/// Deletes every key of the test's Redis prefix: the cache as a Redis flush leaves it (a shared
/// Redis is never flushed).
pub async fn delete_redis_keys(app: &TestApp) {
    let keys = app.redis.keys().await;
    if !keys.is_empty() {
        let mut connection = app.redis.connection().await;
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}

/// A TCP proxy in front of a test's server (Redis, PostgreSQL) that can stop answering the way
/// an unreachable server does, without closing anything:
/// - with `hang_new` set, new connections are accepted and then left without an answer (a hung
///   server);
/// - [`StallingProxy::silence_existing`] stops the connections made so far from forwarding
///   anything, either way, and keeps them open (a peer gone silent: a network partition, a
///   failover that left the old primary's address unanswered); connections made afterwards
///   forward as before;
/// - [`StallingProxy::send_new_to`] sends the connections made afterwards to another server, as a
///   DNS name does when a managed service fails over (connections made before keep theirs).
pub struct StallingProxy {
    /// `url` with the proxy's host and port.
    pub url: String,
    pub hang_new: Arc<AtomicBool>,
    upstream: Arc<std::sync::Mutex<String>>,
    /// Connections numbered below this are silent.
    silent_below: tokio::sync::watch::Sender<u64>,
    next_number: Arc<AtomicU64>,
}

impl StallingProxy {
    /// A proxy to the server of `url` (its host and port; the rest is kept).
    pub async fn start(url: &str) -> Self {
        let target = Url::parse(url).expect("a URL");
        let upstream = Arc::new(std::sync::Mutex::new(host_and_port(&target)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut url = target.clone();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port()))
            .unwrap();
        let hang_new = Arc::new(AtomicBool::new(false));
        let (silent_below, _) = tokio::sync::watch::channel(0);
        let next_number = Arc::new(AtomicU64::new(0));
        let (hang, silence, numbers, current) = (
            Arc::clone(&hang_new),
            silent_below.clone(),
            Arc::clone(&next_number),
            Arc::clone(&upstream),
        );
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                if hang.load(Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                let number = numbers.fetch_add(1, Ordering::SeqCst);
                let mut silenced = silence.subscribe();
                let upstream = current.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let silent = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        _ = silenced.wait_for(|below| number < *below) => true,
                    };
                    if silent {
                        // Both ends stay open and unanswered until the test ends.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Self {
            url: url.to_string(),
            hang_new,
            upstream,
            silent_below,
            next_number,
        }
    }

    /// Connections made from now on go to the server of `url`.
    pub fn send_new_to(&self, url: &str) {
        *self.upstream.lock().unwrap() = host_and_port(&Url::parse(url).expect("a URL"));
    }

    /// Every connection made so far goes silent for good.
    pub fn silence_existing(&self) {
        self.silent_below
            .send_replace(self.next_number.load(Ordering::SeqCst));
    }
}

fn host_and_port(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().expect("the URL has a host"),
        url.port_or_known_default().expect("the URL has a port")
    )
}

/// What a test may change before the app starts.
pub struct TestSetup {
    pub idp_options: DevIdpOptions,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub customize_config: Box<dyn FnOnce(&mut Config)>,
}

pub struct TestApp {
    pub address: String,
    /// The settings the broker was started with (replicas start from them).
    pub settings: Settings,
    pub idp: DevIdp,
    pub database: TestDatabase,
    pub redis: TestRedis,
    pub encryption_key: EncryptionKey,
    pub http: reqwest::Client,
    pub broker: actix_web::web::Data<token_broker::flows::Broker>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut TestSetup)) -> TestApp {
    let idp_listener = TcpListener::bind("127.0.0.1:0").expect("bind IdP port");
    let idp_url = format!(
        "http://127.0.0.1:{}",
        idp_listener.local_addr().unwrap().port()
    );
    let broker_listener = TcpListener::bind("127.0.0.1:0").expect("bind broker port");
    let port = broker_listener.local_addr().unwrap().port();
    let address = format!("http://127.0.0.1:{port}");

    let database = TestDatabase::create().await;
    let redis = TestRedis::new();
    let encryption_key = EncryptionKey::generate();

    let mut setup = TestSetup {
        idp_options: DevIdpOptions {
            client_id: CLIENT_ID.into(),
            client_secret: Some(CLIENT_SECRET.into()),
            token_endpoint_auth_methods: vec![
                "client_secret_basic".into(),
                "client_secret_post".into(),
            ],
            redirect_uris: vec![format!("{address}/callback")],
            post_logout_redirect_uris: vec![format!("{FRONTEND}/")],
            keys: Some(shared_keys()),
            ..DevIdpOptions::default()
        },
        settings: Settings {
            public_url: Some(address.clone()),
            oidc_issuer: Some(idp_url.clone()),
            client_id: Some(CLIENT_ID.into()),
            client_secret: Some(CLIENT_SECRET.into()),
            allowed_origins: Some(format!("{FRONTEND},https://app.example.com")),
            encryption_keys: Some(encryption_key.secret_base64()),
            database_url: Some(database.url.clone()),
            redis_url: Some(redis.url.clone()),
            redis_key_prefix: Some(redis.prefix.clone()),
            idp_timeout: Some("2s".into()),
            ..Settings::default()
        },
        clock: Arc::new(SystemClock),
        customize_config: Box::new(|_| {}),
    };
    customize(&mut setup);

    let idp = DevIdp::new(Url::parse(&idp_url).unwrap(), setup.idp_options);
    tokio::spawn(idp.serve(idp_listener).expect("start the test IdP"));

    let settings = setup.settings.clone();
    let mut config = Config::from_settings(&setup.settings).expect("valid test configuration");
    config.jwks_refetch_interval = Duration::ZERO;
    // Tests sweep explicitly (operations.rs): no background sweep racing their injected clocks.
    config.sweep_interval = Duration::ZERO;
    (setup.customize_config)(&mut config);
    let application = Application::build_on(broker_listener, config, setup.clock)
        .await
        .expect("start the broker");
    let broker = application.broker();
    tokio::spawn(application.run_until_stopped());

    let http = test_client();
    TestApp {
        address,
        settings,
        idp,
        database,
        redis,
        encryption_key,
        http,
        broker,
    }
}

/// A browser's cookie jar for the broker's host: enough to follow the flow by hand.
#[derive(Default, Clone, Debug)]
pub struct Browser {
    pub cookies: HashMap<String, String>,
}

impl Browser {
    pub fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Applies the response's `Set-Cookie` headers (a zero Max-Age deletes).
    pub fn absorb(&mut self, response: &reqwest::Response) {
        for header in response.headers().get_all("set-cookie") {
            let text = header.to_str().unwrap();
            let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.to_ascii_lowercase().contains("max-age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
    }

    pub fn session(&self) -> Option<&String> {
        self.cookies.get("session")
    }
}

/// The parameters of an authorization request the broker sent the browser to.
#[derive(Debug, Clone)]
pub struct AuthorizationRequest {
    pub url: Url,
    pub params: HashMap<String, String>,
}

pub fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("location")
        .unwrap_or_else(|| panic!("no Location on a {} response", response.status()))
        .to_str()
        .unwrap()
        .to_string()
}

pub fn query_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl TestApp {
    pub fn cipher(&self) -> Cipher {
        Cipher::new(std::slice::from_ref(&self.encryption_key))
    }

    pub async fn get(&self, path: &str, browser: &Browser) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.address))
            .header("cookie", browser.cookie_header())
            .send()
            .await
            .expect("request to the broker")
    }

    /// `GET /login`, absorbing the binding cookie.
    pub async fn get_login(
        &self,
        browser: &mut Browser,
        return_to: Option<&str>,
    ) -> reqwest::Response {
        let path = match return_to {
            Some(to) => format!("/login?return_to={}", urlencode(to)),
            None => "/login".into(),
        };
        let response = self.get(&path, browser).await;
        browser.absorb(&response);
        response
    }

    /// `/login` that must succeed: the authorization request it redirects to.
    pub async fn start_login(
        &self,
        browser: &mut Browser,
        return_to: Option<&str>,
    ) -> AuthorizationRequest {
        let response = self.get_login(browser, return_to).await;
        assert_eq!(
            response.status(),
            302,
            "/login answered {}",
            response.status()
        );
        let url = Url::parse(&location(&response)).unwrap();
        let params = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        AuthorizationRequest { url, params }
    }

    /// The user signs in at the IdP as `username`; returns the callback URL the IdP redirects to.
    pub async fn approve(&self, request: &AuthorizationRequest, username: &str) -> String {
        self.submit_idp_form(request, &[("username", username)])
            .await
    }

    /// The user presses Cancel at the IdP.
    pub async fn deny(&self, request: &AuthorizationRequest) -> String {
        self.submit_idp_form(request, &[("cancel", "1")]).await
    }

    async fn submit_idp_form(
        &self,
        request: &AuthorizationRequest,
        extra: &[(&str, &str)],
    ) -> String {
        let mut form: Vec<(String, String)> = request.params.clone().into_iter().collect();
        form.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let response = self
            .http
            .post(format!("{}/authorize", self.idp.issuer()))
            .form(&form)
            .send()
            .await
            .expect("IdP authorize");
        assert_eq!(
            response.status(),
            302,
            "IdP authorize answered {}",
            response.status()
        );
        location(&response)
    }

    /// Follows the IdP's redirect back to the broker's `/callback`.
    pub async fn callback(&self, browser: &mut Browser, callback_url: &str) -> reqwest::Response {
        let response = self
            .http
            .get(callback_url)
            .header("cookie", browser.cookie_header())
            .send()
            .await
            .expect("callback");
        browser.absorb(&response);
        response
    }

    /// A whole login as `username`; returns the callback's response (302 to return_to on success).
    pub async fn login_as(&self, browser: &mut Browser, username: &str) -> reqwest::Response {
        let request = self.start_login(browser, None).await;
        let callback = self.approve(&request, username).await;
        self.callback(browser, &callback).await
    }

    /// A browser with a completed login as `username`.
    pub async fn logged_in_browser(&self, username: &str) -> Browser {
        let mut browser = Browser::default();
        let response = self.login_as(&mut browser, username).await;
        assert_eq!(response.status(), 302);
        assert!(
            query_param(&location(&response), "login_error").is_none(),
            "login failed: {}",
            location(&response)
        );
        assert!(browser.session().is_some(), "no session cookie after login");
        browser
    }

    pub async fn get_session(&self, browser: &Browser) -> reqwest::Response {
        self.get("/session", browser).await
    }

    pub async fn post_logout(
        &self,
        browser: &mut Browser,
        origin: Option<&str>,
        json: bool,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/logout", self.address))
            .header("cookie", browser.cookie_header());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if json {
            request = request.header("accept", "application/json");
        }
        let response = request.send().await.expect("logout");
        browser.absorb(&response);
        response
    }

    pub async fn session_rows(&self) -> i64 {
        let pool = self.database.pool().await;
        let count: (i64,) = sqlx::query_as("SELECT count(*) FROM sessions")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        count.0
    }
}

pub fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Asserts an RFC 9457 problem response with this status, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status(), status, "expected {status}");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let body: serde_json::Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status);
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:token-broker:problem:"),
        "{body}"
    );
    assert!(body["title"].is_string());
    body
}

/// A login the broker refused: a 302 to `FRONTEND` + `return_path` with `login_error=<code>`
/// appended, and no session cookie set by this response.
pub fn assert_login_error_redirect(response: &reqwest::Response, return_path: &str, code: &str) {
    assert_eq!(
        response.status(),
        302,
        "a failed login redirects to the frontend"
    );
    let separator = if return_path.contains('?') { '&' } else { '?' };
    assert_eq!(
        location(response),
        format!("{FRONTEND}{return_path}{separator}login_error={code}")
    );
    let sets_session = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|cookie| {
            let cookie = cookie.to_str().unwrap_or_default();
            cookie.starts_with("session=") || cookie.starts_with("__Host-session=")
        });
    assert!(!sets_session, "a refused login sets no session cookie");
}

/// [`assert_login_error_redirect`], and nothing was created: no session row, `/session` is 401.
pub async fn assert_login_refused(
    app: &TestApp,
    browser: &Browser,
    response: &reqwest::Response,
    return_path: &str,
    code: &str,
) {
    assert_login_error_redirect(response, return_path, code);
    assert_eq!(
        app.session_rows().await,
        0,
        "a refused login stores no session"
    );
    assert_problem(app.get_session(browser).await, 401).await;
}

/// The real `token-broker` binary as a child process: only `PATH` and the given variables in its
/// environment (the suite's own `DATABASE_URL` must not leak in), stdout and stderr captured.
pub struct BrokerProcess {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    output: Arc<std::sync::Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl BrokerProcess {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start token-broker");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        let stdout: Box<dyn tokio::io::AsyncRead + Unpin + Send> =
            Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn tokio::io::AsyncRead + Unpin + Send> =
            Box::new(child.stderr.take().unwrap());
        let readers = [stdout, stderr]
            .into_iter()
            .map(|pipe| {
                let (sender, output) = (sender.clone(), output.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncBufReadExt;
                    let mut pipe = tokio::io::BufReader::new(pipe).lines();
                    while let Ok(Some(line)) = pipe.next_line().await {
                        output.lock().unwrap().push_str(&format!("{line}\n"));
                        let _ = sender.send(line);
                    }
                })
            })
            .collect();
        Self {
            child,
            lines,
            output,
            readers,
        }
    }

    /// Waits (at most 30 s) for an output line containing `needle`, and returns it.
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "no line with {needle:?}; output so far:\n{}",
                self.output.lock().unwrap()
            ),
        }
    }

    /// SIGTERM, then the exit status and everything the process printed.
    pub async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the broker stops within 30 s of SIGTERM")
            .unwrap();
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.await;
        }
        let output = self.output.lock().unwrap().clone();
        (status, output)
    }
}

/// Another broker replica: same database, Redis prefix, keys and IdP as `app`, its own port.
pub struct Replica {
    pub address: String,
    pub broker: actix_web::web::Data<token_broker::flows::Broker>,
    pub http: reqwest::Client,
}

impl Replica {
    pub async fn get(&self, path: &str, browser: &Browser) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.address))
            .header("cookie", browser.cookie_header())
            .send()
            .await
            .expect("request to the replica")
    }
}

pub async fn spawn_replica(app: &TestApp) -> Replica {
    spawn_replica_with(app, |_| {}).await
}

/// A replica with changed settings (other encryption keys, say). Its public URL stays the
/// first broker's: the IdP has only that redirect URI registered, and any replica can serve it.
pub async fn spawn_replica_with(app: &TestApp, customize: impl FnOnce(&mut Settings)) -> Replica {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind replica port");
    let address = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let mut settings = app.settings.clone();
    customize(&mut settings);
    let mut config = Config::from_settings(&settings).expect("valid replica configuration");
    config.jwks_refetch_interval = Duration::ZERO;
    // Tests sweep explicitly (operations.rs): no background sweep racing their injected clocks.
    config.sweep_interval = Duration::ZERO;
    let application = Application::build_on(listener, config, Arc::new(SystemClock))
        .await
        .expect("start the replica");
    let broker = application.broker();
    tokio::spawn(application.run_until_stopped());
    let http = test_client();
    Replica {
        address,
        broker,
        http,
    }
}

/// `GET {base}/auth` as a gateway forwards it: the browser's cookies, nothing else.
pub async fn forward_auth(
    http: &reqwest::Client,
    base: &str,
    browser: &Browser,
) -> reqwest::Response {
    http.get(format!("{base}/auth"))
        .header("cookie", browser.cookie_header())
        .send()
        .await
        .expect("GET /auth")
}

/// Runs a cold read's statement (`store::postgres::FIND_VIEW_TO_USE` or `FIND_RECORD_TO_USE`)
/// for the session under `EXPLAIN (ANALYZE, FORMAT JSON)` with `idle_cutoff`, asserts that it
/// found the session, and returns the actual loops of each scan of `session_activity` in its
/// plan (0: never executed).
pub async fn cold_read_activity_lookups(
    app: &TestApp,
    query: &str,
    hash: &token_broker::domain::SessionIdHash,
    idle_cutoff: chrono::DateTime<chrono::Utc>,
) -> Vec<u64> {
    fn scans(node: &serde_json::Value, relation: &str, loops: &mut Vec<u64>) {
        if node["Relation Name"] == relation {
            loops.push(node["Actual Loops"].as_u64().unwrap());
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            scans(child, relation, loops);
        }
    }
    let pool = app.database.pool().await;
    let plan: serde_json::Value =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {query}"))
            .bind(hash.as_bytes())
            .bind(idle_cutoff)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    let root = &plan[0]["Plan"];
    assert_eq!(root["Actual Rows"], 1, "the session is found: {plan:#}");
    let mut loops = Vec::new();
    scans(root, "session_activity", &mut loops);
    loops
}

/// The SHA-256 of the browser's session cookie: the key of its Redis entries and PostgreSQL row.
pub fn session_hash(browser: &Browser) -> token_broker::domain::SessionIdHash {
    token_broker::domain::SessionId::parse(browser.session().expect("a session cookie"))
        .expect("a well-formed session cookie")
        .hash()
}

pub fn session_hash_hex(browser: &Browser) -> String {
    session_hash(browser).to_hex()
}

/// The IdP session id (`sid`) the broker stored for a browser's session.
pub async fn idp_sid(app: &TestApp, browser: &Browser) -> String {
    let record = app
        .broker
        .sessions
        .find(&session_hash(browser))
        .await
        .unwrap();
    record
        .expect("session row")
        .idp_sid
        .expect("the dev IdP puts sid in its ID tokens")
}

/// `/session` and `/auth` answer 200 for the browser, which leaves its view and access token
/// cached in Redis.
pub async fn cache_view_and_token(app: &TestApp, browser: &Browser) {
    assert_eq!(app.get_session(browser).await.status(), 200);
    assert_eq!(
        forward_auth(&app.http, &app.address, browser)
            .await
            .status(),
        200
    );
}

/// The token of a forward-auth answer's `Authorization: Bearer` header.
pub fn bearer(response: &reqwest::Response) -> String {
    let value = response.headers()["authorization"].to_str().unwrap();
    value
        .strip_prefix("Bearer ")
        .expect("a Bearer token")
        .to_string()
}

/// Makes the session's access token due for refresh, as its expiry would: deletes the Redis
/// cache entry and the copy in the session's PostgreSQL row.
pub async fn expire_cached_token(app: &TestApp, browser: &Browser) {
    let mut redis = app.redis.connection().await;
    let key = format!("{}at:{{{}}}", app.redis.prefix, session_hash_hex(browser));
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "{key} was cached");
    expire_stored_token(app, browser).await;
}

/// Drops the copy of the session's access token in its PostgreSQL row (where `/auth` reads it
/// when Redis has none), so that the next use refreshes.
pub async fn expire_stored_token(app: &TestApp, browser: &Browser) {
    let hash = session_hash(browser);
    // The database the broker was started with (some tests give it a private server).
    let url = app
        .settings
        .database_url
        .as_deref()
        .expect("a DATABASE_URL");
    let pool = sqlx::PgPool::connect(url)
        .await
        .expect("connect to the broker's database");
    let updated = sqlx::query(
        "UPDATE sessions SET access_token_sealed = NULL, access_token_expires_at = NULL,
                             access_token_refresh_at = NULL
         WHERE id_hash = $1 AND access_token_sealed IS NOT NULL",
    )
    .bind(hash.as_bytes())
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    pool.close().await;
    assert_eq!(updated, 1, "the session's row held its access token");
}

/// Opens a sealed access-token cache entry (`{prefix}at:{hash}`) and returns the token in it.
/// Read as the broker's `store::redis::values` documents the layout, independently of its code:
/// `0x02`, the sealed binary form; inside, two times of 12 bytes each, then the token.
pub fn open_cached_access_token(
    cipher: &token_broker::crypto::Cipher,
    key: &str,
    value: &[u8],
) -> String {
    let (form, sealed) = value.split_first().expect("a value");
    assert_eq!(*form, 0x02, "the binary form");
    let opened = cipher
        .open_binary(sealed, key.as_bytes())
        .expect("the cache entry opens under the configured key");
    String::from_utf8(opened[24..].to_vec()).expect("the token is text")
}

/// An HTTP client as the tests use it: no redirects followed, a 20 s time-out, and idle
/// connections dropped before the broker's 5 s keep-alive closes them (reusing a connection the
/// server is closing at that moment fails with `IncompleteMessage`).
pub fn test_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}
