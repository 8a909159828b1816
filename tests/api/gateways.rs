//! Forward-auth through real, unmodified gateways: nginx (`auth_request`) and Caddy (`forward_auth`)
//! run as child processes with the committed examples `deploy/gateways/nginx.conf` and
//! `deploy/gateways/Caddyfile` (only their addresses replaced), between a test client and a small
//! upstream that echoes what reached it. Without a session nothing reaches the upstream; with one,
//! the upstream gets the broker's access token; after logout, nothing again.
//!
//! The binaries come from `TOKEN_BROKER_NGINX` / `TOKEN_BROKER_CADDY` (set by scripts/test, which
//! installs them when it can), else from PATH (and /usr/sbin). A missing gateway fails the test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::helpers::*;

/// What the upstream saw, one entry per request that reached it.
type Seen = Arc<Mutex<Vec<serde_json::Value>>>;

fn repo_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces `from` in a committed example, which must contain it exactly once: the example and
/// this test cannot drift apart silently.
fn substitute(text: &str, file: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{file} should contain `{from}` exactly once"
    );
    text.replace(from, to)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The gateway's binary: `$env_var`, else `name` on PATH or in /usr/sbin (Debian's nginx).
fn gateway_binary(env_var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (set {env_var} or put it on PATH): run the suite with scripts/test, \
                 which installs it, or install it yourself (Debian: apt-get install {name})"
            )
        })
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "token-broker-{label}-{}-{nanos}",
            std::process::id()
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

/// A gateway child process, killed (even when the test panics) before its directory is removed.
struct Gateway {
    name: &'static str,
    child: Child,
    url: String,
    stderr: PathBuf,
    // Declared last: dropped after `drop` below has killed the child.
    _dir: TempDir,
}

impl Gateway {
    fn spawn(name: &'static str, mut command: Command, dir: TempDir, port: u16) -> Self {
        let stderr = dir.0.join("stderr.log");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&stderr)
                    .unwrap(),
            ));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let mut gateway = Gateway {
            name,
            child,
            url: format!("http://127.0.0.1:{port}"),
            stderr,
            _dir: dir,
        };
        gateway.wait_until_listening(port);
        gateway
    }

    fn wait_until_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on port {port} after 10 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Everything the gateway wrote so far, for assertion messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("--- {} output ---\n{text}--- end ---", self.name)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream API that answers every request with what it received, as JSON.
async fn spawn_upstream() -> (String, Seen) {
    async fn echo(request: HttpRequest, body: web::Bytes, seen: web::Data<Seen>) -> HttpResponse {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("<not text>").to_string())
        };
        let echoed = serde_json::json!({
            "method": request.method().as_str(),
            "path": request.uri().to_string(),
            "authorization": header("authorization"),
            "x_auth_subject": header("x-auth-subject"),
            "body": String::from_utf8_lossy(&body),
        });
        seen.lock().unwrap().push(echoed.clone());
        HttpResponse::Ok().json(echoed)
    }

    let seen: Seen = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let data = web::Data::new(seen.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .default_service(web::to(echo))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (address, seen)
}

/// nginx with `deploy/gateways/nginx.conf` inside a minimal main configuration of the test's own:
/// pid, temp files and logs in `dir`, errors on stderr, in the foreground, as a single process.
fn start_nginx(broker: &str, upstream: &str, port: u16) -> Gateway {
    let file = "deploy/gateways/nginx.conf";
    let mut server = repo_file(file);
    server = substitute(
        &server,
        file,
        "server token-broker:8080;",
        &format!("server {};", &broker["http://".len()..]),
    );
    server = substitute(
        &server,
        file,
        "server api:8000;",
        &format!("server {upstream};"),
    );
    server = substitute(
        &server,
        file,
        "listen 80;",
        &format!("listen 127.0.0.1:{port};"),
    );
    server = substitute(
        &server,
        file,
        "https://auth.example.com/login",
        &format!("{broker}/login"),
    );

    let dir = TempDir::new("nginx");
    let config = format!(
        "pid nginx.pid;\n\
         error_log stderr notice;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         access_log off;\n\
         client_body_temp_path client_body_temp;\n\
         proxy_temp_path proxy_temp;\n\
         fastcgi_temp_path fastcgi_temp;\n\
         uwsgi_temp_path uwsgi_temp;\n\
         scgi_temp_path scgi_temp;\n\
         {server}\n\
         }}\n"
    );
    let config_path = dir.0.join("nginx.conf");
    std::fs::write(&config_path, config).unwrap();
    let mut command = Command::new(gateway_binary("TOKEN_BROKER_NGINX", "nginx"));
    command
        .arg("-e")
        .arg("stderr")
        .arg("-p")
        .arg(&dir.0)
        .arg("-c")
        .arg(&config_path)
        // One process: killing it leaves no orphaned worker behind.
        .args(["-g", "daemon off; master_process off;"]);
    Gateway::spawn("nginx", command, dir, port)
}

/// Caddy with `deploy/gateways/Caddyfile`, after global options that keep it to `dir`: no admin
/// endpoint, no automatic HTTPS, storage and HOME/XDG directories in `dir`.
fn start_caddy(broker: &str, upstream: &str, port: u16) -> Gateway {
    let file = "deploy/gateways/Caddyfile";
    let dir = TempDir::new("caddy");
    let mut site = repo_file(file);
    site = substitute(
        &site,
        file,
        "app.example.com {",
        &format!("http://127.0.0.1:{port} {{\n\tbind 127.0.0.1"),
    );
    site = substitute(
        &site,
        file,
        "forward_auth token-broker:8080",
        &format!("forward_auth {}", &broker["http://".len()..]),
    );
    site = substitute(
        &site,
        file,
        "reverse_proxy api:8000",
        &format!("reverse_proxy {upstream}"),
    );
    let config = format!(
        "{{\n\tadmin off\n\tauto_https off\n\tstorage file_system {{\n\t\troot {}\n\t}}\n}}\n\n{site}",
        dir.0.join("storage").display()
    );
    let config_path = dir.0.join("Caddyfile");
    std::fs::write(&config_path, config).unwrap();
    let mut command = Command::new(gateway_binary("TOKEN_BROKER_CADDY", "caddy"));
    command
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&config_path)
        .env("HOME", &dir.0)
        .env("XDG_CONFIG_HOME", dir.0.join("config"))
        .env("XDG_DATA_HOME", dir.0.join("data"))
        .env("XDG_CACHE_HOME", dir.0.join("cache"));
    Gateway::spawn("caddy", command, dir, port)
}

/// The broker, with the gateway's origin allowed as a `return_to` target.
async fn spawn_app_behind(gateway_port: u16) -> TestApp {
    spawn_app_with(|setup| {
        setup.settings.allowed_origins = Some(format!(
            "{FRONTEND},https://app.example.com,http://127.0.0.1:{gateway_port}"
        ))
    })
    .await
}

/// The access token the broker's `/auth` hands out for this cookie.
async fn token_from_broker(app: &TestApp, cookie: &str) -> String {
    let response = app
        .http
        .get(format!("{}/auth", app.address))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

async fn get(app: &TestApp, url: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = app
        .http
        .get(url)
        // A client cannot smuggle its own identity past the gateway.
        .header("authorization", "Bearer forged")
        .header("x-auth-subject", "mallory");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.expect("request through the gateway")
}

/// A logged-in request reaches the upstream with the broker's token, by GET and by POST (the
/// gateway checks with its own GET either way), and a forged identity from the client does not.
async fn assert_session_reaches_upstream(
    app: &TestApp,
    gateway: &Gateway,
    seen: &Seen,
    cookie: &str,
) {
    let token = token_from_broker(app, cookie).await;
    let response = get(
        app,
        &format!("{}/orders/7?x=1&y=2", gateway.url),
        Some(cookie),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", gateway.log());
    let echoed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echoed["path"], "/orders/7?x=1&y=2");
    assert_eq!(
        echoed["authorization"],
        format!("Bearer {token}"),
        "{}",
        gateway.log()
    );
    assert_eq!(echoed["x_auth_subject"], "alice");

    let response = app
        .http
        .post(format!("{}/orders", gateway.url))
        .header("cookie", cookie)
        .body("an order")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", gateway.log());
    let echoed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["body"], "an order");
    assert_eq!(echoed["authorization"], format!("Bearer {token}"));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// nginx's 401 handling: a redirect to the broker's /login that brings the browser back, which
/// the broker accepts (a 302 on to the IdP, not a 400).
async fn assert_nginx_sends_to_login(app: &TestApp, gateway: &Gateway, cookie: Option<&str>) {
    let response = get(app, &format!("{}/orders/7", gateway.url), cookie).await;
    assert_eq!(response.status(), 302, "{}", gateway.log());
    let login = location(&response);
    assert_eq!(
        login,
        format!("{}/login?return_to={}/orders/7", app.address, gateway.url)
    );
    let response = app
        .get(&login[app.address.len()..], &Browser::default())
        .await;
    assert_eq!(response.status(), 302, "the broker accepts the return_to");
    assert!(location(&response).starts_with(&app.idp.issuer()));
}

#[tokio::test]
async fn nginx_auth_request_passes_the_access_token_of_a_live_session_only() {
    let port = free_port();
    let app = spawn_app_behind(port).await;
    let (upstream, seen) = spawn_upstream().await;
    let gateway = start_nginx(&app.address, &upstream, port);

    assert_nginx_sends_to_login(&app, &gateway, None).await;
    assert!(seen.lock().unwrap().is_empty(), "{}", gateway.log());

    let mut browser = app.logged_in_browser("alice").await;
    let cookie = browser.cookie_header();
    assert_session_reaches_upstream(&app, &gateway, &seen, &cookie).await;

    let response = app.post_logout(&mut browser, Some(FRONTEND), true).await;
    assert_eq!(response.status(), 200);
    assert_nginx_sends_to_login(&app, &gateway, Some(&cookie)).await;
    assert_eq!(seen.lock().unwrap().len(), 2, "{}", gateway.log());
}

#[tokio::test]
async fn caddy_forward_auth_passes_the_access_token_of_a_live_session_only() {
    let port = free_port();
    let app = spawn_app_behind(port).await;
    let (upstream, seen) = spawn_upstream().await;
    let gateway = start_caddy(&app.address, &upstream, port);

    // Caddy hands the broker's refusal to the client as it is: 401 problem+json.
    let response = get(&app, &format!("{}/orders/7", gateway.url), None).await;
    assert_eq!(response.status(), 401, "{}", gateway.log());
    assert!(response.headers().get("authorization").is_none());
    assert_problem(response, 401).await;
    assert!(seen.lock().unwrap().is_empty(), "{}", gateway.log());

    let mut browser = app.logged_in_browser("alice").await;
    let cookie = browser.cookie_header();
    assert_session_reaches_upstream(&app, &gateway, &seen, &cookie).await;

    let response = app.post_logout(&mut browser, Some(FRONTEND), true).await;
    assert_eq!(response.status(), 200);
    let response = get(&app, &format!("{}/orders/7", gateway.url), Some(&cookie)).await;
    assert_eq!(response.status(), 401, "{}", gateway.log());
    assert_problem(response, 401).await;
    assert_eq!(seen.lock().unwrap().len(), 2, "{}", gateway.log());
}

/// Envoy (not run here) appends the request's path to `path_prefix` and keeps the request's
/// method: the check requests that `deploy/gateways/envoy.yaml` makes are still forward-auth.
#[tokio::test]
async fn envoy_example_check_requests_reach_forward_auth() {
    let envoy: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("deploy/gateways/envoy.yaml")).unwrap();
    let filters = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"];
    let prefix = filters[0]["typed_config"]["http_service"]["path_prefix"]
        .as_str()
        .expect("envoy.yaml: the first HTTP filter's http_service.path_prefix");
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let check = format!("{}{prefix}/orders/7?x=1&y=2", app.address);
    let token = token_from_broker(&app, &browser.cookie_header()).await;

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = app
            .http
            .request(method.clone(), &check)
            .header("cookie", browser.cookie_header())
            .header("content-length", "0")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method} {check}");
        assert_eq!(
            response.headers()["authorization"].to_str().unwrap(),
            format!("Bearer {token}"),
            "{method}"
        );
        assert_eq!(response.headers()["x-auth-subject"], "alice");

        let response = app
            .http
            .request(method.clone(), &check)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{method} without a session");
    }
}
