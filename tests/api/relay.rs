//! `/api/{name}/{path…}`: the token relay against a real upstream started by the test — the
//! bearer and the headers that cross, streaming both ways with flat memory, time-outs, escapes,
//! CSRF, CORS, and the one refresh-and-retry on `invalid_token`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::body::SizedStream;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// What the upstream saw and how it should behave.
#[derive(Default)]
pub(crate) struct UpstreamState {
    hits: AtomicU64,
    /// The path of every request, in order.
    paths: Mutex<Vec<String>>,
    /// The bearer tokens of every request, in order.
    bearers: Mutex<Vec<String>>,
    /// Tokens answered with 401 `invalid_token`.
    rejected: Mutex<HashSet<String>>,
    reject_all: AtomicBool,
}

pub(crate) struct Upstream {
    pub(crate) url: String,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub(crate) fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn bearers(&self) -> Vec<String> {
        self.state.bearers.lock().unwrap().clone()
    }

    fn reject(&self, token: &str) {
        self.state
            .rejected
            .lock()
            .unwrap()
            .insert(token.to_string());
    }

    fn reject_all(&self) {
        self.state.reject_all.store(true, Ordering::SeqCst);
    }
}

/// 64 KiB of one byte value: large bodies are this chunk, again and again, made as they go.
static CHUNK: [u8; 65_536] = [7; 65_536];
const BIG: u64 = 200 * 1024 * 1024;
/// Bodies up to this size are hashed too (debug-build SHA-256 is slow for 200 MB).
const HASH_LIMIT: u64 = 8 * 1024 * 1024;

/// Echoes the request as JSON: method, raw path, query, headers, body length, byte sum and
/// (for small bodies) SHA-256. A rejected bearer gets `401 invalid_token` instead.
async fn echo(
    request: HttpRequest,
    mut body: web::Payload,
    state: web::Data<UpstreamState>,
) -> HttpResponse {
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.paths.lock().unwrap().push(request.path().to_string());
    let bearer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    state.bearers.lock().unwrap().push(bearer.clone());
    if state.reject_all.load(Ordering::SeqCst) || state.rejected.lock().unwrap().contains(&bearer) {
        return HttpResponse::Unauthorized()
            .insert_header((
                "www-authenticate",
                r#"Bearer realm="api", error="invalid_token", error_description="revoked""#,
            ))
            .finish();
    }
    let (mut length, mut sum, mut hasher) = (0u64, 0u64, Sha256::new());
    // A relay that gave up mid-upload ends the stream with an error: answer what arrived.
    while let Some(Ok(chunk)) = body.next().await {
        length += chunk.len() as u64;
        sum = sum.wrapping_add(byte_sum(&chunk));
        if length <= HASH_LIMIT {
            hasher.update(&chunk);
        }
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in request.headers() {
        let entry = headers
            .entry(name.as_str().to_string())
            .or_insert_with(|| json!([]));
        entry
            .as_array_mut()
            .unwrap()
            .push(json!(value.to_str().unwrap_or("<bytes>")));
    }
    HttpResponse::Ok()
        .insert_header(("set-cookie", "session=from-upstream; Path=/"))
        .insert_header(("access-control-allow-origin", "*"))
        .insert_header(("x-upstream", "yes"))
        .json(json!({
            "method": request.method().as_str(),
            "path": request.uri().path(),
            "query": request.uri().query(),
            "headers": headers,
            "length": length,
            "sum": sum,
            "sha256": (length <= HASH_LIMIT).then(|| hex(&hasher.finalize())),
        }))
}

fn byte_sum(bytes: &[u8]) -> u64 {
    bytes.iter().map(|b| u64::from(*b)).sum()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `bytes` of [`CHUNK`], with a Content-Length, generated while it is sent.
async fn big(path: web::Path<u64>) -> HttpResponse {
    let total = path.into_inner();
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        (sent < total).then(|| {
            let n = (total - sent).min(CHUNK.len() as u64);
            let chunk = web::Bytes::from_static(&CHUNK[..n as usize]);
            (Ok::<_, std::io::Error>(chunk), sent + n)
        })
    });
    HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(SizedStream::new(total, stream))
}

async fn sleep(path: web::Path<u64>) -> HttpResponse {
    tokio::time::sleep(Duration::from_millis(path.into_inner())).await;
    HttpResponse::Ok().body("late")
}

/// The test upstream (also the replicas test's): `/base/big/{bytes}`, `/base/sleep/{ms}`, and an
/// echo of anything else.
pub(crate) async fn spawn_upstream() -> Upstream {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let state = web::Data::new(UpstreamState::default());
    let shared = state.clone().into_inner();
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .route("/base/big/{bytes}", web::get().to(big))
            .route("/base/big/{bytes}", web::head().to(big))
            .route("/base/sleep/{ms}", web::get().to(sleep))
            .default_service(web::to(echo))
    })
    .workers(2)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    Upstream { url, state: shared }
}

/// A port nobody listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The broker with `up` (the test upstream, base path `/base`) and `down` (a closed port) as
/// relay routes, and a 1 s response time-out; plus a logged-in browser.
async fn spawn_relay() -> (TestApp, Upstream, Browser) {
    let upstream = spawn_upstream().await;
    let routes = format!(
        "up={}/base,down=http://127.0.0.1:{}/x",
        upstream.url,
        closed_port()
    );
    let app = spawn_app_with(|setup| {
        setup.settings.api_routes = Some(routes);
        setup.settings.api_timeout = Some("1s".into());
    })
    .await;
    let browser = app.logged_in_browser("alice").await;
    (app, upstream, browser)
}

fn relay_request(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    browser: &Browser,
) -> reqwest::RequestBuilder {
    app.http
        .request(method, format!("{}{path}", app.address))
        .header("cookie", browser.cookie_header())
        .header("x-csrf", "1")
}

async fn auth_token(app: &TestApp, browser: &Browser) -> String {
    let response = app.get("/auth", browser).await;
    assert_eq!(response.status(), 200);
    response.headers()["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

fn header_values(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_get_arrives_with_the_bearer_and_without_the_browsers_credentials() {
    // Arrange
    let (app, upstream, browser) = spawn_relay().await;

    // Act
    let response = relay_request(
        &app,
        reqwest::Method::GET,
        "/api/up/orders/42?b=2&a=%20x&a=1",
        &browser,
    )
    .header("origin", FRONTEND)
    .header("x-forwarded-for", "203.0.113.9")
    .header("connection", "keep-alive, x-hop")
    .header("x-hop", "secret")
    .header("keep-alive", "timeout=5")
    .header("te", "trailers")
    .header("trailer", "x-checksum")
    .header("proxy-authorization", "Basic c2VjcmV0")
    .header("x-custom", "kept")
    .send()
    .await
    .unwrap();

    // Assert
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert!(
        response.headers().get("set-cookie").is_none(),
        "the upstream's cookies stay behind"
    );
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        FRONTEND,
        "CORS is the broker's, not the upstream's"
    );
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/base/orders/42");
    assert_eq!(echo["query"], "b=2&a=%20x&a=1");
    let token = auth_token(&app, &browser).await;
    assert_eq!(
        header_values(&echo, "authorization"),
        [format!("Bearer {token}")],
        "the token /auth gives"
    );
    for absent in [
        "cookie",
        "x-csrf",
        "origin",
        "x-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
    ] {
        assert!(
            echo["headers"].get(absent).is_none(),
            "{absent} reached the upstream: {echo}"
        );
    }
    for connection in header_values(&echo, "connection") {
        assert!(!connection.to_ascii_lowercase().contains("x-hop"));
    }
    assert_eq!(header_values(&echo, "x-custom"), ["kept"]);
    assert_eq!(
        header_values(&echo, "x-forwarded-for"),
        ["203.0.113.9, 127.0.0.1"]
    );
    assert_eq!(header_values(&echo, "x-forwarded-proto"), ["http"]);
    let broker_host = app.address.trim_start_matches("http://");
    assert_eq!(header_values(&echo, "x-forwarded-host"), [broker_host]);
    assert_eq!(app.idp.stats().refresh_grants, 0);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn a_post_body_arrives_intact_and_other_methods_are_relayed() {
    // Arrange
    let (app, upstream, browser) = spawn_relay().await;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 256) as u8).collect();

    // Act
    let response = relay_request(&app, reqwest::Method::POST, "/api/up/upload", &browser)
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["length"], body.len() as u64);
    assert_eq!(echo["sha256"], hex(&Sha256::digest(&body)));
    // The length is kept, and never sent alongside chunked framing (request smuggling).
    assert_eq!(header_values(&echo, "content-length"), ["1000000"]);
    assert!(echo["headers"].get("transfer-encoding").is_none());
    assert_eq!(
        header_values(&echo, "content-type"),
        ["application/octet-stream"]
    );
    for method in ["PUT", "PATCH", "DELETE", "OPTIONS"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = relay_request(&app, method.clone(), "/api/up/thing", &browser)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let echo: Value = response.json().await.unwrap();
        assert_eq!(echo["method"], method.as_str());
    }
    let head = relay_request(&app, reqwest::Method::HEAD, "/api/up/big/1000", &browser)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "1000");
    assert!(head.bytes().await.unwrap().is_empty());
    assert_eq!(upstream.hits(), 5, "HEAD went to the download route");
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Samples this process's RSS every 10 ms until dropped; `peak()` is the highest seen.
struct RssSampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_kib()));
        let task = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    peak.fetch_max(rss_kib(), Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Self { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst).max(rss_kib())
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The broker, the upstream and the client all run in this process: RSS growth bounds what the
/// broker buffered. 200 MB held anywhere would show as ≥ 200 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_megabytes_stream_both_ways_in_flat_memory() {
    // Arrange
    let (app, upstream, browser) = spawn_relay().await;
    let http = reqwest::Client::new();
    // Warm up connections and allocator pools with a small transfer each way.
    let warm = http
        .get(format!("{}/api/up/big/1000000", app.address))
        .header("cookie", browser.cookie_header())
        .header("x-csrf", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(warm.bytes().await.unwrap().len(), 1_000_000);
    const LIMIT_KIB: u64 = 64 * 1024;

    // Act: download.
    let before = rss_kib();
    let sampler = RssSampler::start();
    let started = Instant::now();
    let response = http
        .get(format!("{}/api/up/big/{BIG}", app.address))
        .header("cookie", browser.cookie_header())
        .header("x-csrf", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(BIG));
    let (mut length, mut sum) = (0u64, 0u64);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        length += chunk.len() as u64;
        sum = sum.wrapping_add(byte_sum(&chunk));
    }
    let download_peak = sampler.peak();
    drop(sampler);
    let download_time = started.elapsed();

    // Assert
    assert_eq!((length, sum), (BIG, 7 * BIG));
    println!(
        "download: {BIG} bytes in {download_time:?}; RSS before {before} KiB, peak {download_peak} KiB, growth {} KiB",
        download_peak.saturating_sub(before)
    );
    assert!(
        download_peak.saturating_sub(before) < LIMIT_KIB,
        "RSS grew by {} KiB during a 200 MB download",
        download_peak - before
    );

    // Act: upload (chunked, no Content-Length). It takes longer than BROKER_API_TIMEOUT (1 s):
    // the wait for the response counts from the body's last chunk.
    let before = rss_kib();
    let sampler = RssSampler::start();
    let started = Instant::now();
    let chunks = BIG / CHUNK.len() as u64;
    let upload = futures_util::stream::iter(0..chunks)
        .map(|_| Ok::<_, std::io::Error>(web::Bytes::from_static(&CHUNK)));
    let response = http
        .put(format!("{}/api/up/upload", app.address))
        .header("cookie", browser.cookie_header())
        .header("x-csrf", "1")
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    let upload_peak = sampler.peak();
    drop(sampler);
    let upload_time = started.elapsed();

    // Assert
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["length"], BIG);
    assert_eq!(echo["sum"], 7 * BIG);
    println!(
        "upload: {BIG} bytes in {upload_time:?}; RSS before {before} KiB, peak {upload_peak} KiB, growth {} KiB",
        upload_peak.saturating_sub(before)
    );
    assert!(
        upload_peak.saturating_sub(before) < LIMIT_KIB,
        "RSS grew by {} KiB during a 200 MB upload",
        upload_peak - before
    );
    assert_eq!(upstream.hits(), 1, "only the upload was echoed");
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_and_an_unreachable_one_a_502() {
    // Arrange
    let (app, _upstream, browser) = spawn_relay().await;

    // Act
    let started = Instant::now();
    let slow = relay_request(&app, reqwest::Method::GET, "/api/up/sleep/3000", &browser)
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    let down = relay_request(&app, reqwest::Method::GET, "/api/down/anything", &browser)
        .send()
        .await
        .unwrap();

    // Assert
    let problem = assert_problem(slow, 504).await;
    assert_eq!(problem["type"], "urn:token-broker:problem:upstream-timeout");
    assert!(
        waited < Duration::from_millis(2500),
        "BROKER_API_TIMEOUT=1s, waited {waited:?}"
    );
    // An upload that stalls is an upstream that does not answer, too.
    let stalled =
        futures_util::stream::iter([Ok::<_, std::io::Error>(web::Bytes::from_static(&CHUNK))])
            .chain(futures_util::stream::pending());
    let started = Instant::now();
    let stalled = relay_request(&app, reqwest::Method::POST, "/api/up/upload", &browser)
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await;
    let waited_stalled = started.elapsed();
    let problem = assert_problem(down, 502).await;
    assert_eq!(
        problem["type"],
        "urn:token-broker:problem:upstream-unavailable"
    );
    // The broker answers 504 while the body is still open; the client may see that answer or a
    // closed connection, but not after waiting for the upstream's 20 s.
    if let Ok(response) = stalled {
        assert_problem(response, 504).await;
    }
    assert!(
        waited_stalled < Duration::from_millis(2500),
        "waited {waited_stalled:?}"
    );
}

/// Sends a request line as written: HTTP clients normalise `..` and `%2e` away before sending.
async fn raw_get(app: &TestApp, target: &str, browser: &Browser) -> u16 {
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {address}\r\nCookie: {}\r\nX-CSRF: 1\r\nConnection: close\r\n\r\n",
        browser.cookie_header()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    status
        .parse()
        .unwrap_or_else(|_| panic!("no status in {text}"))
}

#[tokio::test]
async fn path_escapes_are_refused_and_never_reach_the_upstream() {
    // Arrange
    let (app, upstream, browser) = spawn_relay().await;
    assert_eq!(raw_get(&app, "/api/up/fine/path", &browser).await, 200);
    let hits = upstream.hits();

    for target in [
        "/api/up/../secret",
        "/api/up/a/../../secret",
        "/api/up/./secret",
        "/api/up/%2e%2e/secret",
        "/api/up/%2E%2E/secret",
        "/api/up/%2E./secret",
        "/api/up/.%2e/secret",
        "/api/up/a%2f..%2fsecret",
        "/api/up/a%2F..%2F..%2Fsecret",
        "/api/up/a%5c..%5csecret",
        "/api/up//secret",
        "/api/up/a//b",
        "/api/up/%252e%252e/secret",
        "/api/up/a\\..\\secret",
        "/api/up/..;/secret?x=1",
    ] {
        // Act
        let status = raw_get(&app, target, &browser).await;

        // Assert
        assert_eq!(status, 400, "{target}");
    }
    assert_eq!(upstream.hits(), hits, "no escape reached the upstream");
    let problem = assert_problem(
        relay_request(&app, reqwest::Method::GET, "/api/up/a%2fb", &browser)
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(problem["type"], "urn:token-broker:problem:path-not-allowed");
}

#[tokio::test]
async fn csrf_header_session_and_route_are_required() {
    // Arrange
    let (app, upstream, browser) = spawn_relay().await;
    let url = format!("{}/api/up/x", app.address);

    // Act + Assert: no X-CSRF, or not `1`.
    let missing = app
        .http
        .post(&url)
        .header("cookie", browser.cookie_header())
        .body("a=1")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(missing, 403).await;
    assert_eq!(
        problem["type"],
        "urn:token-broker:problem:csrf-header-required"
    );
    let wrong = app
        .http
        .get(&url)
        .header("cookie", browser.cookie_header())
        .header("x-csrf", "0")
        .send()
        .await
        .unwrap();
    assert_problem(wrong, 403).await;

    // No session.
    for anonymous in [Browser::default(), {
        let mut garbage = Browser::default();
        garbage.cookies.insert("session".into(), "x".repeat(43));
        garbage
    }] {
        let response = relay_request(&app, reqwest::Method::GET, "/api/up/x", &anonymous)
            .send()
            .await
            .unwrap();
        assert_problem(response, 401).await;
    }

    // Unknown route.
    let unknown = relay_request(&app, reqwest::Method::GET, "/api/nope/x", &browser)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(unknown, 404).await;
    assert_eq!(problem["type"], "urn:token-broker:problem:not-found");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn preflights_pass_from_allowed_origins_only() {
    // Arrange
    let (app, upstream, _browser) = spawn_relay().await;
    let preflight = |origin: &'static str| {
        app.http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/up/orders", app.address),
            )
            .header("origin", origin)
            .header("access-control-request-method", "DELETE")
            .header("access-control-request-headers", "x-csrf, content-type")
            .send()
    };

    // Act
    let allowed = preflight(FRONTEND).await.unwrap();
    let foreign = preflight("https://evil.example").await.unwrap();

    // Assert
    assert_eq!(allowed.status(), 204);
    assert_eq!(allowed.headers()["access-control-allow-origin"], FRONTEND);
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        assert!(methods.split(", ").any(|m| m == method), "{methods}");
    }
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(headers.contains("x-csrf"), "{headers}");
    assert!(foreign
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    assert_problem(foreign, 403).await;
    assert_eq!(upstream.hits(), 0, "preflights are the broker's to answer");
}

#[tokio::test]
async fn an_invalid_token_is_refreshed_once_for_an_idempotent_bodiless_request_only() {
    // Arrange
    let (app, upstream, browser) = spawn_relay().await;
    let first = auth_token(&app, &browser).await;
    upstream.reject(&first);

    // Act: GET → 401 invalid_token → one refresh → retried with the new token.
    let response = relay_request(&app, reqwest::Method::GET, "/api/up/me", &browser)
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(response.status(), 200);
    let second = auth_token(&app, &browser).await;
    assert_ne!(second, first);
    assert_eq!(upstream.bearers(), [first.clone(), second.clone()]);
    assert_eq!(app.idp.stats().refresh_grants, 1);

    // Act: a POST with a body is not replayed: the 401 is the answer.
    upstream.reject(&second);
    let response = relay_request(&app, reqwest::Method::POST, "/api/up/orders", &browser)
        .body(r#"{"item": 1}"#)
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(response.status(), 401);
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert_eq!(app.idp.stats().refresh_grants, 1);
    assert_eq!(upstream.bearers().len(), 3);

    // Act: when the refreshed token is refused too, that 401 is the answer: one retry, no more.
    upstream.reject_all();
    let response = relay_request(&app, reqwest::Method::GET, "/api/up/me", &browser)
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(response.status(), 401);
    assert_eq!(app.idp.stats().refresh_grants, 2);
    assert_eq!(upstream.bearers().len(), 5);
}
