//! The load generator of `scripts/soak`, with the IdP it logs in through (the development IdP,
//! in process, so that it can also send back-channel logouts).
//!
//! `soak IDP_ADDR BROKER_URL CLIENT_SECRET USERS DURATION_SECS ACCESS_TOKEN_TTL_SECS OUT_JSON`
//!
//! Serves the IdP on IDP_ADDR at once, waits for the broker's `/readyz`, then runs USERS virtual
//! users until DURATION_SECS have passed, each looping: log in (`/login` → the IdP's form →
//! `/callback`) → `GET /session` and `GET /auth` alternately, [`ROUNDS`] times with a short pause
//! (the access tokens live ACCESS_TOKEN_TTL_SECS, so `/auth` refreshes them along the way) → end the
//! session: three times in four `POST /logout`, once in four a back-channel logout sent by the IdP
//! (after which `/session` must be 401). Every user finishes its iteration, so at the end nobody is
//! logged in. Each iteration logs in a new user name (`soak-<user>-<iteration>`), so a
//! back-channel logout by `sub` ends exactly that one session.
//!
//! Every response is counted by request and status; a status other than the expected one is also
//! counted as unexpected. Writes the counts to OUT_JSON and exits 0 (the script judges them).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, COOKIE, ORIGIN};
use reqwest::redirect::Policy;
use token_broker::dev_idp::{DevIdp, DevIdpOptions};

#[path = "common/http.rs"]
mod http;
use http::{cookie, location};

/// `/session` + `/auth` pairs per logged-in iteration.
const ROUNDS: u32 = 100;
/// Pause between two requests of one user.
const PAUSE: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Counts {
    by_status: BTreeMap<String, u64>,
    unexpected: BTreeMap<String, u64>,
    logins: u64,
    logouts: u64,
    backchannel_logouts: u64,
}

type Shared = Arc<Mutex<Counts>>;

fn record(counts: &Shared, what: &str, status: u16, expected: u16) -> bool {
    let mut counts = counts.lock().unwrap();
    *counts
        .by_status
        .entry(format!("{what} {status}"))
        .or_default() += 1;
    if status != expected {
        *counts
            .unexpected
            .entry(format!("{what} {status}"))
            .or_default() += 1;
    }
    status == expected
}

struct User {
    http: reqwest::Client,
    broker: String,
    idp: DevIdp,
    counts: Shared,
    binding: Option<String>,
}

impl User {
    /// `/login` → the IdP's form → `/callback`: the session cookie, or None (counted).
    async fn login(&mut self, username: &str) -> Option<String> {
        let mut request = self.http.get(format!("{}/login?return_to=/", self.broker));
        if let Some(binding) = &self.binding {
            request = request.header(COOKIE, format!("login-binding={binding}"));
        }
        let response = request.send().await.ok()?;
        if !record(&self.counts, "GET /login", response.status().as_u16(), 302) {
            return None;
        }
        if let Some(binding) = cookie(response.headers(), "login-binding") {
            self.binding = Some(binding);
        }
        let authorize = location(response.headers());
        let (endpoint, query) = authorize.split_once('?')?;
        let response = self
            .http
            .post(endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("{query}&username={username}"))
            .send()
            .await
            .ok()?;
        if !record(
            &self.counts,
            "IdP POST /authorize",
            response.status().as_u16(),
            302,
        ) {
            return None;
        }
        let callback = location(response.headers());
        let response = self
            .http
            .get(callback)
            .header(
                COOKIE,
                format!("login-binding={}", self.binding.clone().unwrap_or_default()),
            )
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let landed = location(response.headers());
        let session = cookie(response.headers(), "session");
        let ok = status == 302 && !landed.contains("login_error") && session.is_some();
        record(
            &self.counts,
            if ok || status != 302 {
                "GET /callback"
            } else {
                "GET /callback (login_error)"
            },
            status,
            if ok { status } else { 302 },
        );
        if !ok && status == 302 {
            *self
                .counts
                .lock()
                .unwrap()
                .unexpected
                .entry(format!("GET /callback → {landed}"))
                .or_default() += 1;
        }
        self.counts.lock().unwrap().logins += u64::from(ok);
        session.filter(|_| ok)
    }

    async fn get(&self, path: &str, session: &str, expected: u16) {
        let what = format!("GET {path}");
        match self
            .http
            .get(format!("{}{path}", self.broker))
            .header(COOKIE, format!("session={session}"))
            .send()
            .await
        {
            Ok(response) => {
                record(&self.counts, &what, response.status().as_u16(), expected);
            }
            Err(_) => {
                record(
                    &self.counts,
                    &format!("{what} (transport error)"),
                    0,
                    expected,
                );
            }
        }
    }

    async fn iteration(&mut self, username: &str, backchannel: bool) {
        let Some(session) = self.login(username).await else {
            return;
        };
        for _ in 0..ROUNDS {
            self.get("/session", &session, 200).await;
            tokio::time::sleep(PAUSE).await;
            self.get("/auth", &session, 200).await;
            tokio::time::sleep(PAUSE).await;
        }
        if backchannel {
            let status = self
                .idp
                .send_backchannel_logout(
                    &format!("{}/backchannel-logout", self.broker),
                    username,
                    None,
                )
                .await
                .unwrap_or(0);
            record(&self.counts, "IdP → POST /backchannel-logout", status, 200);
            self.counts.lock().unwrap().backchannel_logouts += 1;
            // Ended everywhere: the cookie no longer works.
            self.get("/session", &session, 401).await;
        } else {
            let status = self
                .http
                .post(format!("{}/logout", self.broker))
                .header(COOKIE, format!("session={session}"))
                .header(ORIGIN, &self.broker)
                .header(ACCEPT, "application/json")
                .send()
                .await
                .map_or(0, |response| response.status().as_u16());
            record(&self.counts, "POST /logout", status, 200);
            self.counts.lock().unwrap().logouts += 1;
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: soak IDP_ADDR BROKER_URL CLIENT_SECRET USERS DURATION_SECS ACCESS_TOKEN_TTL_SECS OUT_JSON");
    std::process::exit(2)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 7 {
        usage();
    }
    let broker = args[1].trim_end_matches('/').to_string();
    let users: u32 = args[3].parse().unwrap_or_else(|_| usage());
    let duration = Duration::from_secs(args[4].parse().unwrap_or_else(|_| usage()));
    let ttl = Duration::from_secs(args[5].parse().unwrap_or_else(|_| usage()));

    let listener = TcpListener::bind(&args[0])?;
    let issuer = format!("http://{}", listener.local_addr()?);
    let idp = DevIdp::new(
        url::Url::parse(&issuer).map_err(std::io::Error::other)?,
        DevIdpOptions {
            client_id: "token-broker-soak".into(),
            client_secret: Some(args[2].clone()),
            token_endpoint_auth_methods: vec!["client_secret_basic".into()],
            redirect_uris: vec![format!("{broker}/callback")],
            access_token_ttl: ttl,
            ..DevIdpOptions::default()
        },
    );
    actix_web::rt::spawn(idp.serve(listener)?);

    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(std::io::Error::other)?;
    let ready = Instant::now();
    loop {
        let up = http
            .get(format!("{broker}/readyz"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if up {
            break;
        }
        if ready.elapsed() > Duration::from_secs(120) {
            return Err(std::io::Error::other("the broker did not become ready"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("soak: broker ready; {users} users for {duration:?}");

    let counts: Shared = Arc::default();
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for user in 0..users {
        let mut state = User {
            http: http.clone(),
            broker: broker.clone(),
            idp: idp.clone(),
            counts: counts.clone(),
            binding: None,
        };
        tasks.push(tokio::spawn(async move {
            // Staggered starts, so that logins and logouts spread over time.
            tokio::time::sleep(Duration::from_millis(u64::from(user) * 300)).await;
            let mut iteration = 0u32;
            while Instant::now() < deadline {
                let username = format!("soak-{user}-{iteration}");
                state
                    .iteration(&username, (user + iteration) % 4 == 3)
                    .await;
                iteration += 1;
            }
        }));
    }
    for task in tasks {
        task.await.map_err(std::io::Error::other)?;
    }

    let counts = counts.lock().unwrap();
    let total: u64 = counts.by_status.values().sum();
    let five_xx: u64 = counts
        .by_status
        .iter()
        .filter(|(key, _)| {
            key.rsplit(' ')
                .next()
                .and_then(|status| status.parse::<u16>().ok())
                .is_some_and(|status| status >= 500)
        })
        .map(|(_, count)| count)
        .sum();
    let summary = serde_json::json!({
        "requests": total,
        "five_xx": five_xx,
        "by_status": counts.by_status,
        "unexpected": counts.unexpected,
        "logins": counts.logins,
        "logouts": counts.logouts,
        "backchannel_logouts": counts.backchannel_logouts,
    });
    std::fs::write(&args[6], serde_json::to_string_pretty(&summary)?)?;
    Ok(())
}
