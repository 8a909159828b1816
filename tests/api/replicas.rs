//! Three broker *processes* (the real binary; one database, Redis prefix, key set and IdP) behind
//! a real nginx load balancer: round robin, keep-alive to the upstreams, and
//! `proxy_next_upstream error timeout http_502` for the idempotent requests a browser and a
//! gateway send. A login whose steps land on different replicas works, and a rolling restart
//! (SIGTERM with `BROKER_SHUTDOWN_DELAY`, exit 0, start again on the same port) under constant load
//! fails no request at all: not even a relayed `POST`, which nginx never retries once sent.
//!
//! The helpers here (free ports, temporary directories, the broker binary on a chosen port) are
//! shared with `faults`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::relay::spawn_upstream;

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory of its own under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "token-broker-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment of the real binary as one more replica of `app` (same database, Redis prefix,
/// keys, IdP and public URL), listening on `port`, with `extra` added or overriding.
pub(crate) fn broker_env(
    app: &TestApp,
    port: u16,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let s = &app.settings;
    let mut env: Vec<(String, String)> = [
        ("BROKER_LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("BROKER_PUBLIC_URL", s.public_url.clone().unwrap()),
        ("BROKER_OIDC_ISSUER", s.oidc_issuer.clone().unwrap()),
        ("BROKER_CLIENT_ID", s.client_id.clone().unwrap()),
        ("BROKER_CLIENT_SECRET", s.client_secret.clone().unwrap()),
        ("BROKER_ALLOWED_ORIGINS", s.allowed_origins.clone().unwrap()),
        ("BROKER_ENCRYPTION_KEYS", s.encryption_keys.clone().unwrap()),
        ("DATABASE_URL", s.database_url.clone().unwrap()),
        ("REDIS_URL", s.redis_url.clone().unwrap()),
        (
            "BROKER_REDIS_KEY_PREFIX",
            s.redis_key_prefix.clone().unwrap(),
        ),
        ("BROKER_IDP_TIMEOUT", "2s".to_string()),
        ("BROKER_LOG_FORMAT", "json".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }
    env
}

/// Starts the binary with `env` and waits until it listens (after its migrations ran).
pub(crate) async fn start_broker(env: &[(String, String)]) -> BrokerProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut process = BrokerProcess::spawn(&["serve"], &env);
    process.wait_for_line("token-broker listening").await;
    process
}

/// Polls `{base}/readyz` until it answers 200 (at most 15 s).
pub(crate) async fn wait_until_ready(base: &str) {
    let http = test_client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await {
            if response.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{base} not ready after 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET url` with the browser's cookies, absorbing what it sets.
async fn browse(http: &reqwest::Client, url: &str, browser: &mut Browser) -> reqwest::Response {
    let response = http
        .get(url)
        .header("cookie", browser.cookie_header())
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    browser.absorb(&response);
    response
}

/// One login with each step sent to its own base URL: `/login` to `login`, the IdP's redirect
/// back to `callback` (instead of the registered public URL), `/session` to `session`.
async fn login_across(app: &TestApp, login: &str, callback: &str, session: &str, user: &str) {
    let http = test_client();
    let mut browser = Browser::default();
    let response = browse(&http, &format!("{login}/login"), &mut browser).await;
    assert_eq!(response.status(), 302, "/login on {login}");
    let url = url::Url::parse(&location(&response)).unwrap();
    let params = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let back = app
        .approve(&AuthorizationRequest { url, params }, user)
        .await;
    let back = back.replacen(&app.address, callback, 1);
    assert!(back.starts_with(callback), "{back}");
    let response = browse(&http, &back, &mut browser).await;
    assert_eq!(response.status(), 302, "/callback on {callback}");
    assert!(
        query_param(&location(&response), "login_error").is_none(),
        "{}",
        location(&response)
    );
    assert!(browser.session().is_some());
    let response = browse(&http, &format!("{session}/session"), &mut browser).await;
    assert_eq!(response.status(), 200, "/session on {session}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["user"]["sub"], user);
    let response = browse(&http, &format!("{login}/auth"), &mut browser).await;
    assert_eq!(response.status(), 200, "/auth on {login}");
}

/// nginx as the replicas' load balancer, killed on drop (before its directory goes).
pub(crate) struct Nginx {
    child: Child,
    pub url: String,
    log: PathBuf,
    _dir: TempDir,
}

impl Nginx {
    fn start(upstreams: &[u16]) -> Self {
        let port = free_port();
        let servers: String = upstreams
            .iter()
            // max_fails/fail_timeout: a replica that refused a connection is skipped for 1 s.
            .map(|p| format!("    server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;\n"))
            .collect();
        let config = format!(
            "pid nginx.pid;\n\
             error_log stderr warn;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n\
             access_log off;\n\
             client_body_temp_path client_body_temp;\n\
             proxy_temp_path proxy_temp;\n\
             fastcgi_temp_path fastcgi_temp;\n\
             uwsgi_temp_path uwsgi_temp;\n\
             scgi_temp_path scgi_temp;\n\
             upstream brokers {{\n\
             {servers}\
                 keepalive 32;\n\
                 # Below the broker's 5 s keep-alive: nginx drops an idle connection first.\n\
                 keepalive_timeout 4s;\n\
             }}\n\
             server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location / {{\n\
                     proxy_pass http://brokers;\n\
                     proxy_http_version 1.1;\n\
                     proxy_set_header Connection \"\";\n\
                     proxy_set_header Host $http_host;\n\
                     proxy_connect_timeout 1s;\n\
                     proxy_read_timeout 30s;\n\
                     # Never a POST that was sent (non_idempotent is off): the broker must not\n\
                     # close a connection under one (src/startup.rs).\n\
                     proxy_next_upstream error timeout http_502;\n\
                     proxy_next_upstream_timeout 10s;\n\
                 }}\n\
             }}\n\
             }}\n"
        );
        let dir = TempDir::new("nginx-lb");
        let config_path = dir.0.join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.0.join("stderr.log");
        let binary = std::env::var_os("TOKEN_BROKER_NGINX")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
        let child = Command::new(&binary)
            .arg("-e")
            .arg("stderr")
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&config_path)
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx ({}): {e}", binary.display()));
        let mut nginx = Nginx {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                panic!("nginx exited ({status}):\n{}", nginx.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening:\n{}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        nginx
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    ports: Vec<u16>,
    envs: Vec<Vec<(String, String)>>,
    processes: Vec<Option<BrokerProcess>>,
}

impl Cluster {
    async fn start(app: &TestApp, count: usize, extra: &[(&str, &str)]) -> Self {
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let envs: Vec<_> = ports.iter().map(|p| broker_env(app, *p, extra)).collect();
        let mut processes = Vec::new();
        for env in &envs {
            processes.push(Some(start_broker(env).await));
        }
        for port in &ports {
            wait_until_ready(&format!("http://127.0.0.1:{port}")).await;
        }
        Cluster {
            ports,
            envs,
            processes,
        }
    }

    fn base(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[index])
    }
}

#[tokio::test]
async fn a_login_whose_steps_land_on_different_replicas_works_directly_and_through_nginx() {
    let app = spawn_app().await;
    let cluster = Cluster::start(&app, 3, &[]).await;
    let nginx = Nginx::start(&cluster.ports);

    // Every assignment of the three steps to three different replicas.
    for (login, callback, session) in [(0, 1, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)] {
        login_across(
            &app,
            &cluster.base(login),
            &cluster.base(callback),
            &cluster.base(session),
            &format!("user{login}{callback}{session}"),
        )
        .await;
    }
    // Through the load balancer (round robin spreads the steps over the replicas).
    for n in 0..3 {
        login_across(&app, &nginx.url, &nginx.url, &nginx.url, &format!("lb{n}")).await;
    }
    assert_eq!(app.session_rows().await, 7);
}

/// What a load request ended with.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    /// The relayed `POST`s answered 200, by their unique path.
    posted: Vec<String>,
    failures: Vec<String>,
}

/// One load loop's request, again and again.
#[derive(Clone, Copy, Debug)]
enum Load {
    Session,
    Auth,
    /// A `POST` through the token relay to the `orders` route, each to a path of its own: a
    /// request nginx never retries once it was sent.
    RelayPost,
}

/// The loops of `loads` against `base` until `stop`, each with its own kept-alive client.
fn hammer(
    base: &str,
    browser: &Browser,
    loads: &[Load],
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Tally>>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let handles = loads
        .iter()
        .enumerate()
        .map(|(n, load)| {
            let (base, cookie, load) = (base.to_string(), browser.cookie_header(), *load);
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                // The client keeps its connections to nginx alive (as a browser would).
                let http = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sent += 1;
                    let (path, request) = match load {
                        Load::Session => {
                            ("/session".to_string(), http.get(format!("{base}/session")))
                        }
                        Load::Auth => ("/auth".to_string(), http.get(format!("{base}/auth"))),
                        Load::RelayPost => {
                            let path = format!("/api/orders/place/{n}-{sent}");
                            let request = http
                                .post(format!("{base}{path}"))
                                .header("x-csrf", "1")
                                .body(format!("order {n}-{sent}"));
                            (path, request)
                        }
                    };
                    let result = request.header("cookie", &cookie).send().await;
                    let failure = match result {
                        Ok(response) => {
                            let status = response.status();
                            match response.bytes().await {
                                Ok(_) if status == 200 => None,
                                Ok(body) => Some(format!(
                                    "{path}: {status} {}",
                                    String::from_utf8_lossy(&body)
                                )),
                                Err(e) => Some(format!("{path}: body cut: {e:?}")),
                            }
                        }
                        Err(e) => Some(format!("{path}: {e:?}")),
                    };
                    let mut tally = tally.lock().unwrap();
                    match failure {
                        None if matches!(load, Load::RelayPost) => {
                            tally.ok += 1;
                            tally.posted.push(path);
                        }
                        None => tally.ok += 1,
                        Some(failure) => tally.failures.push(failure),
                    }
                }
            })
        })
        .collect();
    (tally, handles)
}

/// `http_requests_total` for `/session` and `/auth` on one replica.
async fn served(base: &str) -> f64 {
    let text = test_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .filter(|l| l.contains("route=\"/session\"") || l.contains("route=\"/auth\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `TB_TEST_LONG` (scripts/test --long): more rounds of the rolling restart.
fn rounds() -> usize {
    if std::env::var("TB_TEST_LONG").is_ok_and(|v| v == "1") {
        3
    } else {
        1
    }
}

#[tokio::test]
async fn a_rolling_restart_under_constant_load_through_nginx_fails_no_request() {
    let app = spawn_app().await;
    // The relay's test upstream: it keeps the path of every request.
    let orders = spawn_upstream().await;
    let routes = format!("orders={}/base", orders.url);
    let mut cluster = Cluster::start(
        &app,
        3,
        &[
            ("BROKER_SHUTDOWN_DELAY", "1s"),
            ("BROKER_API_ROUTES", &routes),
        ],
    )
    .await;
    let nginx = Nginx::start(&cluster.ports);
    let browser = app.logged_in_browser("alice").await;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loads = [
        Load::Session,
        Load::Auth,
        Load::RelayPost,
        Load::Session,
        Load::Auth,
        Load::RelayPost,
    ];
    let (tally, handles) = hammer(&nginx.url, &browser, &loads, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    for _ in 0..rounds() {
        for index in 0..cluster.ports.len() {
            let process = cluster.processes[index].take().unwrap();
            let (status, output) = process.terminate().await;
            assert!(status.success(), "replica {index}: {status}\n{output}");
            let restarted = start_broker(&cluster.envs[index]).await;
            cluster.processes[index] = Some(restarted);
            let base = cluster.base(index);
            wait_until_ready(&base).await;
            // nginx has taken the restarted replica back before the next one goes down.
            let deadline = Instant::now() + Duration::from_secs(10);
            while served(&base).await < 20.0 {
                assert!(Instant::now() < deadline, "nginx does not use {base} again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.await.unwrap();
    }

    let tally = tally.lock().unwrap();
    let log = nginx.log();
    let retried = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    println!(
        "rolling restart: {} rounds over 3 replicas in {:?}: {} requests answered 200 ({} of them \
         relayed POSTs), {} failed; nginx passed on to the next replica after {} refused \
         connections, {} connection time-outs (a request for a connection the replica no longer \
         let in) and {} connections closed under a request",
        rounds(),
        started.elapsed(),
        tally.ok,
        tally.posted.len(),
        tally.failures.len(),
        retried("Connection refused"),
        retried("timed out"),
        retried("prematurely closed") + retried("reset by peer"),
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed: {:#?}\nnginx:\n{}",
        tally.failures.len(),
        tally.ok + tally.failures.len(),
        &tally.failures[..tally.failures.len().min(20)],
        nginx.log()
    );
    assert!(tally.ok > 200, "{}", tally.ok);
    // Every POST answered reached the upstream, and exactly once.
    let mut received = orders.paths();
    received.sort();
    let mut posted: Vec<String> = tally
        .posted
        .iter()
        .map(|p| p.replacen("/api/orders", "/base", 1))
        .collect();
    posted.sort();
    assert!(posted.len() > 50, "{}", posted.len());
    assert_eq!(received, posted);
}
