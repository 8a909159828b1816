//! Faults under load, each with the behaviour the README promises ("Failure behaviour") and a
//! recovery without restarting the broker: Redis stopped, PostgreSQL stopped, the IdP's token
//! endpoint slower than the time-out, and a broker process SIGKILLed mid-refresh. Redis and
//! PostgreSQL are private instances on free ports (never the shared ones), killed on drop.
//!
//! "Under load": concurrent loops hammer the endpoints during the fault; every response must have
//! one of the expected statuses (never a 500) and come within the documented time-outs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::replicas::{broker_env, free_port, start_broker, wait_until_ready, TempDir};

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Default)]
struct LoadReport {
    /// Status → count.
    statuses: std::collections::BTreeMap<u16, usize>,
    unexpected: Vec<String>,
    slowest: Duration,
}

struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn new() -> Self {
        Load {
            stop: Arc::default(),
            report: Arc::default(),
            handles: Vec::new(),
        }
    }

    /// The load of the Redis fault tests: `session_loops` loops of `/session` and `auth_loops`
    /// of `/auth` for `browser`, each answer a 200, and one of `/login`, a 302 or (while Redis
    /// cannot store a pending login) a 503; none slower than 2.5 s.
    fn sessions_and_logins(
        app: &TestApp,
        browser: &Browser,
        session_loops: usize,
        auth_loops: usize,
    ) -> Self {
        let mut load = Load::new();
        let bound = Duration::from_millis(2500);
        let cookie = browser.cookie_header();
        load.hammer(
            url(app, "/session"),
            cookie.clone(),
            session_loops,
            &[200],
            bound,
        );
        load.hammer(url(app, "/auth"), cookie, auth_loops, &[200], bound);
        load.hammer(url(app, "/login"), String::new(), 1, &[302, 503], bound);
        load
    }

    /// `loops` loops of `GET url` with `cookie`, each answer one of `allowed`, none slower
    /// than `bound`.
    fn hammer(
        &mut self,
        url: String,
        cookie: String,
        loops: usize,
        allowed: &'static [u16],
        bound: Duration,
    ) {
        for _ in 0..loops {
            let (url, cookie) = (url.clone(), cookie.clone());
            let (stop, report) = (self.stop.clone(), self.report.clone());
            self.handles.push(tokio::spawn(async move {
                let http = test_client();
                let origin = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = http.get(&url).header("cookie", &cookie).send().await;
                    let outcome = match result {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let body = response.bytes().await;
                            match body {
                                Ok(_) if allowed.contains(&status) => Ok(status),
                                Ok(body) => Err(format!(
                                    "{url}: {status} {}",
                                    String::from_utf8_lossy(&body)
                                )),
                                Err(e) => Err(format!("{url}: body cut: {e:?}")),
                            }
                        }
                        Err(e) => Err(format!("{url}: {e:?}")),
                    };
                    let took = started.elapsed();
                    {
                        let mut report = report.lock().unwrap();
                        report.slowest = report.slowest.max(took);
                        if took > bound {
                            report.unexpected.push(format!(
                                "{url}: took {took:?} (started at {:?}, {outcome:?})",
                                started.duration_since(origin)
                            ));
                        }
                        match outcome {
                            Ok(status) => *report.statuses.entry(status).or_default() += 1,
                            Err(failure) => report.unexpected.push(failure),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
    }

    /// Stops the loops and asserts that nothing unexpected happened; returns the report.
    async fn finish(self, what: &str) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles {
            handle.await.unwrap();
        }
        let report = std::mem::take(&mut *self.report.lock().unwrap());
        println!(
            "{what}: {:?}, slowest {:?}",
            report.statuses, report.slowest
        );
        assert!(
            report.unexpected.is_empty(),
            "{what}: {} unexpected answers: {:#?}",
            report.unexpected.len(),
            &report.unexpected[..report.unexpected.len().min(20)]
        );
        report
    }
}

// ---------------------------------------------------------------------------------------------
// Private servers

/// A private `redis-server` on a port of its own, killed on drop.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl PrivateRedis {
    fn start() -> Self {
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
            dir: TempDir::new("redis"),
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts it on the same port, empty, and waits until it accepts connections.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `CONFIG SET name value`.
    fn config_set(&self, name: &str, value: &str) {
        self.command(&["CONFIG", "SET", name, value]);
    }

    /// Runs one command; its answer, as text.
    fn command(&self, args: &[&str]) -> String {
        let mut connection = redis::Client::open(self.url())
            .and_then(|client| client.get_connection())
            .expect("connect to the private Redis");
        let answer: redis::Value = redis::cmd(args[0])
            .arg(&args[1..])
            .query(&mut connection)
            .unwrap_or_else(|error| panic!("{args:?}: {error}"));
        match answer {
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            other => format!("{other:?}"),
        }
    }

    /// Waits until this replica's link to its master is up (it has synced).
    fn wait_for_replication_link(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .command(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the replica does not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it (SIGKILL: a crash, not a clean shutdown).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private PostgreSQL cluster (initdb in a temp dir, run as the `postgres` user when the tests
/// run as root), on a port of its own, stopped on drop.
struct PrivatePostgres {
    port: u16,
    bin: PathBuf,
    dir: TempDir,
}

impl PrivatePostgres {
    fn start() -> Self {
        // scripts/test sets TOKEN_BROKER_PG_BINDIR (scripts/lib/services.sh).
        let bin = std::env::var_os("TOKEN_BROKER_PG_BINDIR")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
                    .filter(|bin| bin.join("initdb").is_file())
                    // The newest major version (as a number: 9.6 < 15).
                    .max_by_key(|bin| {
                        let version = bin.parent().unwrap().file_name().unwrap();
                        let major = version.to_string_lossy().split('.').next().map(str::to_owned);
                        major.and_then(|m| m.parse::<u32>().ok()).unwrap_or(0)
                    })
            })
            .expect(
                "no initdb under /usr/lib/postgresql/*/bin: run the suite with scripts/test, which \
                 installs PostgreSQL, or set TOKEN_BROKER_PG_BINDIR",
            );
        let dir = TempDir::new("postgres");
        let postgres = PrivatePostgres {
            port: free_port(),
            bin,
            dir,
        };
        if let Some(user) = run_as_user() {
            let status = Command::new("chown")
                .args(["-R", &format!("{user}:")])
                .arg(&postgres.dir.0)
                .status()
                .unwrap();
            assert!(status.success(), "chown the data directory to {user}");
        }
        postgres.run(
            "initdb",
            &[
                "-D",
                &postgres.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        postgres.start_server();
        postgres
    }

    fn data(&self) -> String {
        self.dir.0.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let binary = self.bin.join(tool).display().to_string();
        let mut command = match run_as_user() {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", &user, "--", &binary]);
                command
            }
            None => Command::new(&binary),
        };
        let output = command
            .args(args)
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} {args:?}: {}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.0.display()
        );
        let log = self.dir.0.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m immediate`: the server goes away at once, as in a crash.
    fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    async fn session_rows(&self) -> i64 {
        let pool = sqlx::PgPool::connect(&self.url()).await.unwrap();
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM sessions")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        count
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let binary = self.bin.join("pg_ctl").display().to_string();
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = match run_as_user() {
            Some(user) => Command::new("runuser")
                .args(["-u", &user, "--", &binary])
                .args(args)
                .output(),
            None => Command::new(&binary).args(args).output(),
        };
    }
}

/// initdb refuses root: as root, the PostgreSQL tools run as `TOKEN_BROKER_PG_USER` (set by
/// scripts/test), else `postgres`.
fn run_as_user() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    root.then(|| {
        std::env::var("TOKEN_BROKER_PG_USER")
            .ok()
            .filter(|user| !user.is_empty() && user != "root")
            .unwrap_or_else(|| "postgres".into())
    })
}

// ---------------------------------------------------------------------------------------------
// Assertions

/// A 503 problem+json with `Retry-After`.
async fn assert_unavailable(response: reqwest::Response) -> serde_json::Value {
    assert!(
        response.headers().contains_key("retry-after"),
        "a 503 says when to retry"
    );
    assert_problem(response, 503).await
}

/// `/readyz`'s 503, naming `dependency` as the failed check.
async fn assert_not_ready_with(response: reqwest::Response, dependency: &str) {
    let body = assert_problem(response, 503).await;
    assert_eq!(body["checks"][dependency], false, "{body}");
}

/// Completes a whole login as `user`; the callback's response.
async fn complete_login(app: &TestApp, user: &str) -> (Browser, reqwest::Response) {
    let mut browser = Browser::default();
    let response = app.login_as(&mut browser, user).await;
    (browser, response)
}

fn succeeded(response: &reqwest::Response) -> bool {
    response.status() == 302 && query_param(&location(response), "login_error").is_none()
}

/// Polls until a complete login succeeds (at most 15 s), and prints how long that took.
async fn wait_until_login_works(app: &TestApp, user: &str) -> Browser {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let mut browser = Browser::default();
        let response = app.get_login(&mut browser, None).await;
        if response.status() == 302 {
            let (browser, response) = complete_login(app, user).await;
            if succeeded(&response) {
                println!("logins worked again after {:?}", started.elapsed());
                return browser;
            }
        }
        assert!(Instant::now() < deadline, "logins do not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn url(app: &TestApp, path: &str) -> String {
    format!("{}{path}", app.address)
}

// ---------------------------------------------------------------------------------------------
// Redis

#[tokio::test]
async fn redis_stopped_sessions_carry_on_from_postgresql_logins_get_503_and_all_recovers() {
    let mut redis = PrivateRedis::start();
    let redis_url = redis.url();
    let app = spawn_app_with(|s| s.settings.redis_url = Some(redis_url)).await;
    let alice = app.logged_in_browser("alice").await;
    let response = forward_auth(&app.http, &app.address, &alice).await;
    assert_eq!(response.status(), 200);
    let token_before = bearer(&response);
    let grace = app.logged_in_browser("grace").await;

    // Load throughout: /session and /auth are always 200; /login a 302 to the IdP, or 503 while
    // Redis is down. A refused connection fails at once (one connection attempt per reconnect,
    // src/store/redis/connection.rs), a hung one after the 2 s connection time-out: no answer
    // waits longer (before that fix, /auth took 7 s).
    let load = Load::sessions_and_logins(&app, &alice, 3, 2);
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A login begun before the outage (its pending state is in Redis, which loses it).
    let mut bob = Browser::default();
    let request = app.start_login(&mut bob, None).await;
    let bob_callback = app.approve(&request, "bob").await;

    println!("redis killed at {:?}", load_started.elapsed());
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // /session: from PostgreSQL.
    let started = Instant::now();
    let response = app.get_session(&alice).await;
    println!("/session during the outage took {:?}", started.elapsed());
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["user"]["sub"], "alice");
    // /auth: the access token from alice's PostgreSQL row.
    let response = forward_auth(&app.http, &app.address, &alice).await;
    assert_eq!(response.status(), 200);
    assert_eq!(bearer(&response), token_before);
    // A token due for refresh (while the load's two /auth workers ask for it too): one refresh
    // grant, single-flight on the session row's lease, stored in the row.
    let grants_before = app.idp.stats().refresh_grants;
    expire_stored_token(&app, &alice).await;
    let response = forward_auth(&app.http, &app.address, &alice).await;
    assert_eq!(response.status(), 200);
    let refreshed = bearer(&response);
    assert_ne!(refreshed, token_before);
    assert_eq!(app.idp.stats().refresh_grants - grants_before, 1);
    assert_eq!(app.idp.stats().refresh_grants_rejected, 0);
    // /login: 503 problem+json with Retry-After, no redirect.
    let mut carol = Browser::default();
    let response = app.get_login(&mut carol, None).await;
    assert!(!response.headers().contains_key("location"));
    assert_unavailable(response).await;
    // The login begun before: its pending state cannot be read.
    let response = app.callback(&mut bob, &bob_callback).await;
    assert_login_error_redirect(&response, "/", "unavailable");
    // The IdP logs grace out: her session ends, its row deleted, though Redis cannot record the
    // token's jti (before, nothing was ended: /session went on answering 200 from PostgreSQL).
    // The answer is a 503 all the same: her cached view could not be marked ended, and a Redis
    // that comes back with its data serves it until its next last-seen write finds the row gone.
    let status = app
        .idp
        .send_backchannel_logout(&url(&app, "/backchannel-logout"), "grace", None)
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_problem(app.get_session(&grace).await, 401).await;
    // /readyz says so; the Kubernetes probe keeps the pod in the Service, which it serves.
    assert_not_ready_with(app.get("/readyz", &alice).await, "redis").await;
    assert_eq!(
        app.get(KUBERNETES_READINESS_PROBE, &alice).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Recovery: the same port, empty; no broker restart.
    println!("redis restarted at {:?}", load_started.elapsed());
    redis.restart();
    let carol = wait_until_login_works(&app, "carol").await;
    assert_eq!(app.get_session(&carol).await.status(), 200);
    assert_eq!(
        forward_auth(&app.http, &app.address, &carol).await.status(),
        200
    );
    // alice's token cache went with Redis: /auth has the refreshed one from PostgreSQL, and
    // Redis caches it again.
    let response = forward_auth(&app.http, &app.address, &alice).await;
    assert_eq!(response.status(), 200);
    assert_eq!(bearer(&response), refreshed);
    assert_eq!(app.idp.stats().refresh_grants - grants_before, 1);
    assert_eq!(app.get("/readyz", &alice).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let report = load.finish("redis stopped").await;
    assert!(
        report.statuses.get(&503).copied().unwrap_or(0) > 0,
        "the outage was seen"
    );
    assert_problem(app.get_session(&grace).await, 401).await;
    assert_eq!(app.session_rows().await, 2, "alice and carol");
}

#[tokio::test]
async fn redis_full_logouts_still_end_sessions_logins_get_503_and_all_recovers() {
    // Arrange: alice logs out, bob is logged out by the IdP, carol uses her session throughout;
    // erin's logout token was used before Redis filled up. Each has a cached view and token.
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let app = spawn_app_with(|s| s.settings.redis_url = Some(redis_url)).await;
    let mut alice = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    let carol = app.logged_in_browser("carol").await;
    let erin = app.logged_in_browser("erin").await;
    for browser in [&alice, &bob, &carol, &erin] {
        cache_view_and_token(&app, browser).await;
    }
    let bob_sid = idp_sid(&app, &bob).await;
    let backchannel = format!("{}/backchannel-logout", app.address);
    let erin_token = app
        .idp
        .sign_logout_token(&app.idp.logout_token_claims("erin", None));
    let post_logout_token = |token: String| {
        app.http
            .post(&backchannel)
            .form(&[("logout_token", token)])
            .send()
    };
    assert_eq!(
        post_logout_token(erin_token.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    let load = Load::sessions_and_logins(&app, &carol, 2, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Act: Redis full. `noeviction` (its default policy): every command that may add data is
    // refused with OOM; reads and deletions are answered.
    redis.config_set("maxmemory-policy", "noeviction");
    redis.config_set("maxmemory", "1");

    // Assert: live sessions carry on; a login cannot store its state: 503 with Retry-After.
    assert_eq!(app.get_session(&alice).await.status(), 200);
    let mut dave = Browser::default();
    let response = app.get_login(&mut dave, None).await;
    assert!(!response.headers().contains_key("location"));
    assert_unavailable(response).await;
    // A logout ends the session at once, here and for /auth (before: a 503, the row deleted
    // but the cached view live, so /session and /auth kept answering 200).
    let alice_before = alice.clone();
    let response = app.post_logout(&mut alice, Some(FRONTEND), true).await;
    assert_eq!(response.status(), 200);
    assert!(alice.session().is_none(), "the cookie is cleared");
    // The cookie as it was (another tab, a copy): the session is over.
    assert_problem(app.get_session(&alice_before).await, 401).await;
    assert_eq!(
        forward_auth(&app.http, &app.address, &alice_before)
            .await
            .status(),
        401
    );
    // So does the IdP's back-channel logout (before: a 503, and bob's session kept).
    let status = app
        .idp
        .send_backchannel_logout(&backchannel, "bob", Some(&bob_sid))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_problem(app.get_session(&bob).await, 401).await;
    assert_eq!(
        forward_auth(&app.http, &app.address, &bob).await.status(),
        401
    );
    // A logout token used before Redis filled up is still refused.
    let replay = post_logout_token(erin_token).await.unwrap();
    assert_problem(replay, 400).await;

    // Recovery: room again, no broker restart.
    redis.config_set("maxmemory", "0");
    let dave = wait_until_login_works(&app, "dave").await;
    assert_eq!(app.get_session(&dave).await.status(), 200);
    assert_problem(app.get_session(&alice_before).await, 401).await;
    assert_problem(app.get_session(&bob).await, 401).await;
    let report = load.finish("redis full").await;
    assert!(
        report.statuses.get(&503).copied().unwrap_or(0) > 0,
        "the logins saw Redis full"
    );
    assert_eq!(app.session_rows().await, 2, "carol and dave");
}

#[tokio::test]
async fn after_a_managed_redis_fails_over_behind_one_address_logins_work_again() {
    // Arrange: the broker reaches Redis through one address, as a managed service's primary
    // endpoint (a DNS name) gives it: here a proxy in front of A, whose replica B is in sync.
    let old_master = PrivateRedis::start();
    let new_master = PrivateRedis::start();
    new_master.command(&["REPLICAOF", "127.0.0.1", &old_master.port.to_string()]);
    new_master.wait_for_replication_link();
    let endpoint = StallingProxy::start(&old_master.url()).await;
    let redis_url = endpoint.url.clone();
    let app = spawn_app_with(|s| s.settings.redis_url = Some(redis_url)).await;
    let alice = app.logged_in_browser("alice").await;
    let load = Load::sessions_and_logins(&app, &alice, 2, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Act: the fail-over. B is promoted, A demoted to its replica (it answers every write with
    // READONLY), and the address leads new connections to B; the broker's open connections
    // still lead to A.
    new_master.command(&["REPLICAOF", "NO", "ONE"]);
    old_master.command(&["REPLICAOF", "127.0.0.1", &new_master.port.to_string()]);
    endpoint.send_new_to(&new_master.url());

    // Assert: logins work again (before: never, every login a 503 until the broker was
    // restarted, as its connections were never replaced); live sessions never noticed.
    let bob = wait_until_login_works(&app, "bob").await;
    assert_eq!(app.get_session(&bob).await.status(), 200);
    assert_eq!(
        forward_auth(&app.http, &app.address, &bob).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish("managed redis fail-over").await;
    let failed_logins = report.statuses.get(&503).copied().unwrap_or(0);
    println!("{failed_logins} login(s) answered 503");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// What the server has written to its WAL but not yet flushed to disk, in bytes.
async fn unflushed_wal(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - pg_current_wal_flush_lsn())::bigint")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_last_seen_batch_commits_without_waiting_for_its_wal_flush_and_a_login_waits() {
    // Arrange: a private server on which nothing flushes WAL but a commit that waits for it: the
    // WAL writer at most every 10 s, no standby snapshots (wal_level minimal), no autovacuum.
    let postgres = PrivatePostgres::start();
    let admin = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
    for setting in [
        "wal_level = 'minimal'",
        "max_wal_senders = 0",
        "wal_writer_delay = '10s'",
        "autovacuum = off",
    ] {
        sqlx::query(&format!("ALTER SYSTEM SET {setting}"))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    postgres.stop();
    postgres.start_server();
    let database_url = postgres.url();
    let app = spawn_app_with(|s| s.settings.database_url = Some(database_url)).await;
    let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();

    // Act: a login (its session stored), then a last-seen batch for that session.
    let browser = app.logged_in_browser("alice").await;
    let after_login = unflushed_wal(&pool).await;
    let session = app
        .broker
        .sessions
        .find(&session_hash(&browser))
        .await
        .unwrap()
        .unwrap();
    let later = chrono::Utc::now() + chrono::Duration::minutes(5);
    let gone = app
        .broker
        .sessions
        .touch_many(&[(session.id, later)])
        .await
        .unwrap();
    let after_batch = unflushed_wal(&pool).await;

    // Assert: the login's commit waited for its WAL to reach the disk; the batch's did not (a
    // crash may lose it: README, idle timeout precision), and it was written all the same.
    assert!(gone.is_empty());
    assert_eq!(after_login, 0, "the login's commit flushed the WAL");
    assert!(
        after_batch > 0,
        "the last-seen batch waited for its WAL flush (synchronous commit)"
    );
    let stored: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_seen_at FROM session_activity WHERE id = $1")
            .bind(session.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored.timestamp_micros(), later.timestamp_micros());
    pool.close().await;
}

#[tokio::test]
async fn postgres_stopped_cached_sessions_carry_on_logins_fail_as_unavailable_and_all_recovers() {
    let postgres = PrivatePostgres::start();
    let database_url = postgres.url();
    // The broker runs its migrations against the private server at start-up.
    // A 30 s idle timeout: the last-seen time is written every 3 s of use, so the outage below
    // covers sessions whose cached view is due for that write.
    let app = spawn_app_with(|s| {
        s.settings.database_url = Some(database_url);
        s.settings.session_idle_timeout = Some("30s".into());
    })
    .await;
    let alice = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    let mut erin = app.logged_in_browser("erin").await;
    // The session views and the access tokens are cached in Redis now.
    for browser in [&alice, &erin] {
        cache_view_and_token(&app, browser).await;
    }
    let rows_before = postgres.session_rows().await;
    assert_eq!(rows_before, 3);

    // A login begun before the outage, completed during it.
    let mut carol = Browser::default();
    let request = app.start_login(&mut carol, None).await;
    let carol_callback = app.approve(&request, "carol").await;

    // Load: alice's /session and /auth answer from Redis throughout (bound: the pool's 3 s
    // acquire time-out, should anything reach PostgreSQL).
    let mut load = Load::new();
    let bound = Duration::from_secs(5);
    load.hammer(
        url(&app, "/session"),
        alice.cookie_header(),
        2,
        &[200],
        bound,
    );
    load.hammer(url(&app, "/auth"), alice.cookie_header(), 2, &[200], bound);
    load.hammer(url(&app, "/session"), bob.cookie_header(), 1, &[200], bound);
    tokio::time::sleep(Duration::from_millis(300)).await;

    postgres.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(app.get_session(&alice).await.status(), 200);
    assert_eq!(
        forward_auth(&app.http, &app.address, &alice).await.status(),
        200
    );
    // The login that cannot be stored: login_error=unavailable, within the pool's time-out.
    let started = Instant::now();
    let response = app.callback(&mut carol, &carol_callback).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_login_error_redirect(&response, "/", "unavailable");
    assert_not_ready_with(app.get("/readyz", &alice).await, "postgres").await;
    assert_eq!(
        app.get(KUBERNETES_READINESS_PROBE, &alice).await.status(),
        200
    );
    // A session the cache does not know needs PostgreSQL: 503, not 401 (it may well be live).
    let mut stranger = Browser::default();
    stranger.cookies.insert("session".into(), "A".repeat(43));
    assert_unavailable(app.get_session(&stranger).await).await;
    // Its logout cannot end anything either, and writes no tombstone for a made-up cookie.
    assert_unavailable(
        app.post_logout(&mut stranger.clone(), Some(FRONTEND), true)
            .await,
    )
    .await;
    let stranger_hash = session_hash(&stranger);
    assert!(matches!(
        app.broker.cache.get(&stranger_hash).await.unwrap(),
        token_broker::store::CacheLookup::Unknown
    ));
    // A logout cannot delete its row: a 503 (the cookie kept, so that it can be repeated), but
    // the session ends all the same (before, it went on answering 200 from its cached view).
    let response = app.post_logout(&mut erin, Some(FRONTEND), true).await;
    assert_unavailable(response).await;
    assert!(erin.session().is_some(), "the cookie is kept for a retry");
    assert_problem(app.get_session(&erin).await, 401).await;
    assert_eq!(
        forward_auth(&app.http, &app.address, &erin).await.status(),
        401
    );
    // Longer than the 3 s touch interval: the cached views become due for their write.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(app.get_session(&bob).await.status(), 200);

    // Recovery without a broker restart.
    postgres.start_server();
    let dave = wait_until_login_works(&app, "dave").await;
    assert_eq!(app.get_session(&dave).await.status(), 200);
    assert_eq!(app.get("/readyz", &alice).await.status(), 200);
    let report = load.finish("postgres stopped").await;
    assert!(report.statuses[&200] > 50, "{report:?}");

    // No session row was lost: alice's, bob's and erin's, and dave's new one. erin's session
    // stays ended, and her repeated logout deletes its row.
    assert_eq!(postgres.session_rows().await, rows_before + 1);
    assert_problem(app.get_session(&erin).await, 401).await;
    let response = app.post_logout(&mut erin, Some(FRONTEND), true).await;
    assert_eq!(response.status(), 200);
    assert_eq!(postgres.session_rows().await, rows_before);
    expire_cached_token(&app, &alice).await;
    assert_eq!(
        forward_auth(&app.http, &app.address, &alice).await.status(),
        200
    );
    assert_eq!(app.get_session(&bob).await.status(), 200);
}

#[tokio::test]
async fn after_postgresql_fails_over_behind_one_address_logins_work_again() {
    // Arrange: the broker reaches PostgreSQL through one address, as a managed service's
    // writer endpoint (a DNS name) gives it: here a proxy in front of A. B, migrated, stands
    // for the standby that will be promoted (the test needs no replication: only logins made
    // after the fail-over are asked for).
    let old_primary = PrivatePostgres::start();
    let new_primary = PrivatePostgres::start();
    let pool = sqlx::PgPool::connect(&new_primary.url()).await.unwrap();
    token_broker::store::postgres::MIGRATOR
        .run(&pool)
        .await
        .unwrap();
    pool.close().await;
    let endpoint = StallingProxy::start(&old_primary.url()).await;
    let database_url = endpoint.url.clone();
    let app = spawn_app_with(|s| s.settings.database_url = Some(database_url)).await;
    // Logins and sessions open the broker's connections to A.
    for user in ["alice", "bob", "carol"] {
        let browser = app.logged_in_browser(user).await;
        assert_eq!(app.get_session(&browser).await.status(), 200);
    }

    // Act: the fail-over. A turns read-only, as a demoted primary (a standby) does, while the
    // broker's connections to it stay open; new connections reach B.
    let pool = sqlx::PgPool::connect(&old_primary.url()).await.unwrap();
    for statement in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    pool.close().await;
    endpoint.send_new_to(&new_primary.url());

    // Assert: logins work again (before: every login ended in login_error=unavailable until
    // the connections reached their 30-minute lifetime), and their sessions are on B.
    let dave = wait_until_login_works(&app, "dave").await;
    assert_eq!(app.get_session(&dave).await.status(), 200);
    assert_eq!(new_primary.session_rows().await, 1);
}

/// The pool pings a connection idle for a second or more before handing it out, and not one in
/// constant use (src/store/postgres.rs): a restart while the connections sit idle must not cost
/// the first request after it anything.
#[tokio::test]
async fn after_a_postgres_restart_the_first_request_that_needs_it_succeeds() {
    let postgres = PrivatePostgres::start();
    let database_url = postgres.url();
    let app = spawn_app_with(|s| s.settings.database_url = Some(database_url)).await;
    // The login leaves connections in the pool, then they sit idle.
    let alice = app.logged_in_browser("alice").await;
    postgres.stop();
    postgres.start_server();
    // A real restart takes more than a second; this one is quicker, so the pause makes up the rest.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The first thing after it that needs PostgreSQL: a login, which writes its row.
    let bob = app.logged_in_browser("bob").await;
    assert_eq!(app.get_session(&bob).await.status(), 200);
    assert_eq!(app.get_session(&alice).await.status(), 200);
    assert_eq!(postgres.session_rows().await, 2);
}

// ---------------------------------------------------------------------------------------------
// IdP

/// Complements `idp_failures` and `forward_auth` (each fault alone): the token endpoint slower
/// than the 2 s time-out while /session, /auth and a login run at once.
#[tokio::test]
async fn a_slow_token_endpoint_under_load_leaves_sessions_alone_and_fails_logins_and_refreshes_fast(
) {
    let app = spawn_app().await;
    let alice = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    let mut carol = Browser::default();
    let request = app.start_login(&mut carol, None).await;
    let carol_callback = app.approve(&request, "carol").await;

    // Slow, and failing in the end (an overloaded IdP): the grants the broker gave up on are
    // not completed at the IdP either. (One the IdP *does* complete after the broker gave up
    // rotates the refresh token behind the broker's back: README "Failure behaviour".)
    app.idp
        .controls()
        .set_token_delay(Some(Duration::from_secs(3)));
    app.idp.controls().set_token_status(Some(503));
    expire_cached_token(&app, &bob).await;

    // alice: /session and /auth from the cache, unaffected. bob: /auth needs a refresh, which
    // times out (503); his concurrent requests wait on the refresh lease at most its bound
    // (BROKER_IDP_TIMEOUT + 5 s + 1 s).
    let mut load = Load::new();
    let fast = Duration::from_secs(1);
    load.hammer(
        url(&app, "/session"),
        alice.cookie_header(),
        2,
        &[200],
        fast,
    );
    load.hammer(url(&app, "/auth"), alice.cookie_header(), 2, &[200], fast);
    load.hammer(url(&app, "/session"), bob.cookie_header(), 1, &[200], fast);
    load.hammer(
        url(&app, "/auth"),
        bob.cookie_header(),
        2,
        &[503],
        // The lease bound (2 s + 5 s + 1 s), and some slack for a busy machine.
        Duration::from_secs(10),
    );

    let started = Instant::now();
    let response = app.callback(&mut carol, &carol_callback).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "the callback took {took:?}"
    );
    assert_login_error_redirect(&response, "/", "idp_unavailable");

    let response = forward_auth(&app.http, &app.address, &bob).await;
    assert_unavailable(response).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish("slow token endpoint").await;
    assert!(report.statuses[&503] >= 1, "{report:?}");

    // Recovery: the session was kept; one successful refresh grant. (The IdP reads its status
    // knob after the delay: let the requests still held there fail first.)
    tokio::time::sleep(Duration::from_millis(3200)).await;
    app.idp.controls().set_token_delay(None);
    app.idp.controls().set_token_status(None);
    let before = app.idp.stats();
    let response = forward_auth(&app.http, &app.address, &bob).await;
    assert_eq!(response.status(), 200);
    let after = app.idp.stats();
    assert_eq!(
        (after.refresh_grants - before.refresh_grants)
            - (after.refresh_grants_rejected - before.refresh_grants_rejected),
        1
    );
    assert_eq!(app.get_session(&bob).await.status(), 200);
    let (_, response) = complete_login(&app, "carol").await;
    assert!(succeeded(&response));
}

// ---------------------------------------------------------------------------------------------
// A broker killed mid-refresh

#[tokio::test]
async fn a_broker_sigkilled_mid_refresh_leaves_a_lease_that_expires_and_another_broker_refreshes() {
    // The in-process broker (B) and the real binary (A) share everything; both have
    // BROKER_IDP_TIMEOUT = 2 s, so the refresh lease lives 7 s.
    let app = spawn_app().await;
    let alice = app.logged_in_browser("alice").await;
    let port = free_port();
    let process = start_broker(&broker_env(&app, port, &[("BROKER_IDP_TIMEOUT", "2s")])).await;
    let a = format!("http://127.0.0.1:{port}");
    wait_until_ready(&a).await;

    // A's refresh is in flight: the IdP holds the token request (longer than this test runs,
    // so that request never completes at the IdP — see the README on what happens when it does).
    expire_cached_token(&app, &alice).await;
    app.idp
        .controls()
        .set_token_delay(Some(Duration::from_secs(60)));
    let stats_before = app.idp.stats();
    let in_flight = {
        let (a, cookie) = (a.clone(), alice.cookie_header());
        tokio::spawn(async move {
            test_client()
                .get(format!("{a}/auth"))
                .header("cookie", cookie)
                .send()
                .await
        })
    };
    // Wait until A's refresh grant reached the IdP (A holds the session's lease).
    let pool = app.database.pool().await;
    let hash = session_hash(&alice).as_bytes().to_vec();
    let lease_until = |pool: sqlx::PgPool, hash: Vec<u8>| async move {
        let row: (Option<chrono::DateTime<chrono::Utc>>,) =
            sqlx::query_as("SELECT refresh_lease_until FROM sessions WHERE id_hash = $1")
                .bind(hash)
                .fetch_one(&pool)
                .await
                .unwrap();
        row.0
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_until(pool.clone(), hash.clone()).await.is_none() {
        assert!(Instant::now() < deadline, "A never took the refresh lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SIGKILL (kill_on_drop): no chance to release the lease.
    let killed_at = Instant::now();
    drop(process);
    let answer = in_flight.await.unwrap();
    assert!(
        answer.is_err(),
        "A's client saw the connection die: {answer:?}"
    );
    app.idp.controls().set_token_delay(None);

    // Load on B meanwhile: /session unaffected, /auth waits for the lease (never past its bound).
    let mut load = Load::new();
    load.hammer(
        url(&app, "/session"),
        alice.cookie_header(),
        2,
        &[200],
        Duration::from_secs(1),
    );
    load.hammer(
        url(&app, "/auth"),
        alice.cookie_header(),
        3,
        &[200],
        Duration::from_secs(9),
    );

    // The next request on B refreshes once the dead holder's lease expired (2 s + 5 s).
    let response = forward_auth(&app.http, &app.address, &alice).await;
    let waited = killed_at.elapsed();
    assert_eq!(response.status(), 200);
    assert!(waited < Duration::from_secs(8), "waited {waited:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.finish("after SIGKILL mid-refresh").await;

    let stats = app.idp.stats();
    // A's grant (still held at the IdP) and exactly one more, B's, which succeeded.
    assert_eq!(
        stats.refresh_grants - stats_before.refresh_grants,
        1,
        "{stats:?}"
    );
    assert_eq!(stats.refresh_grants_rejected, 0, "{stats:?}");
    assert_eq!(app.get_session(&alice).await.status(), 200);
    assert_eq!(
        lease_until(pool.clone(), hash).await,
        None,
        "B released its lease"
    );
    pool.close().await;
    println!("SIGKILL mid-refresh: B refreshed {waited:?} after the kill");
}
