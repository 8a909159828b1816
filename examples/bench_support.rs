//! Servers that `scripts/bench` measures the broker against, started as separate processes:
//!
//! - `bare ADDR BODY_FILE`: an actix-web handler answering every GET with a constant JSON body
//!   (the body `/session` returned, so both answers have the same size; for `/auth`, its token
//!   and subject as JSON): the baseline.
//! - `redis-get ADDR BODY_FILE REDIS_URL [KEY]`: the same, its answer read by one Redis `GET` per
//!   request: the body is stored under KEY (default `bench:baseline`) at start, for a day.
//! - `cache-aside ADDR BODY_FILE REDIS_URL DATABASE_URL KEY_PREFIX`: the least a `/session` can do
//!   when Redis caches what PostgreSQL holds, the cold path's baseline: one Redis `GET` by the
//!   `session` cookie's hash; on a miss, one `SELECT` of the session's claims from the broker's
//!   `sessions` table (the broker's own connections), the answer, and then a `SET` of them in a
//!   task of its own. Nothing decrypted, no expiry checked, no last-seen time written: what is
//!   left is the round trips.
//! - `idp ADDR REDIRECT_URI CLIENT_SECRET`: the development IdP (ES256), for the broker's logins.
//! - `logins BROKER_URL COUNT CONCURRENCY`: COUNT logins (`/login` → the IdP's form →
//!   `/callback`, each a new browser) from CONCURRENCY workers; prints `logins failed seconds`.
//! - `seed-sessions DATABASE_URL ENCRYPTION_KEYS COUNT COOKIE_FILE`: COUNT live sessions, last used
//!   five minutes ago (past the touch interval: their next use is due to slide the idle timeout;
//!   read on a cache miss, that is the re-cached view's, not a PostgreSQL write, since 2026-12-07), written
//!   to PostgreSQL as the broker writes them (sealed under the key), their cookies to COOKIE_FILE.
//! - `fixed-rate URL COOKIE_FILE RATE SECONDS`: GET URL at RATE requests a second for SECONDS,
//!   each with a random `session` cookie from COOKIE_FILE, whether or not earlier ones were
//!   answered (an open loop, as users arrive; wrk's closed loop only sends when one returns),
//!   after one second of warm-up. Prints `sent non_2xx p50_ms p99_ms max_ms late_p99_ms`, the
//!   last being how late the sender itself was (a sender that falls behind would hide latency).

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::{stream, StreamExt};
use redis::AsyncCommands;
use reqwest::header::COOKIE;
use token_broker::crypto::{random_token, Cipher, EncryptionKey};
use token_broker::dev_idp::{DevIdp, DevIdpOptions, SigningAlg};
use token_broker::domain::{AccessToken, IdToken, RefreshToken, SessionId, UserClaims};
use token_broker::store::postgres::{Connections, PgSessionRepository, Pools};
use token_broker::store::{CachedAccessToken, SessionRecord, SessionRepository};

#[path = "common/http.rs"]
mod http;
use http::{cookie, location};

fn usage() -> ! {
    eprintln!("usage: bench_support bare ADDR BODY_FILE | redis-get ADDR BODY_FILE REDIS_URL [KEY] | idp ADDR REDIRECT_URI CLIENT_SECRET");
    eprintln!("       | cache-aside ADDR BODY_FILE REDIS_URL DATABASE_URL KEY_PREFIX");
    eprintln!("       | logins BROKER_URL COUNT CONCURRENCY | seed-sessions DATABASE_URL ENCRYPTION_KEYS COUNT COOKIE_FILE");
    eprintln!("       | fixed-rate URL COOKIE_FILE RATE SECONDS");
    std::process::exit(2)
}

/// One login as a new browser: the session cookie, or what went wrong.
async fn login(http: &reqwest::Client, broker: &str, username: &str) -> Result<String, String> {
    let response = http
        .get(format!("{broker}/login?return_to=/"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let binding = cookie(response.headers(), "login-binding").ok_or("no login-binding cookie")?;
    let authorize = location(response.headers());
    let (endpoint, query) = authorize.split_once('?').ok_or("no authorize URL")?;
    let response = http
        .post(endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("{query}&username={username}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let callback = location(response.headers());
    let response = http
        .get(callback)
        .header(COOKIE, format!("login-binding={binding}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    cookie(response.headers(), "session")
        .ok_or_else(|| format!("no session: {}", location(response.headers())))
}

async fn logins(broker: String, count: u64, concurrency: usize) -> std::io::Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(std::io::Error::other)?;
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    stream::iter(0..count)
        .for_each_concurrent(concurrency, |n| {
            let (http, broker, failed) = (&http, &broker, failed.clone());
            async move {
                if let Err(error) = login(http, broker, &format!("user-{}", n % 1000)).await {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("login {n} failed: {error}");
                    }
                }
            }
        })
        .await;
    println!(
        "{count} {} {:.3}",
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn seed_sessions(
    database_url: String,
    keys: String,
    count: usize,
    cookie_file: String,
) -> std::io::Result<()> {
    let keys = keys
        .split(',')
        .map(|key| EncryptionKey::from_base64(key.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    // Seeding is not what is measured: no wait for the WAL flush of every insert.
    let options: sqlx::postgres::PgConnectOptions = database_url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(std::io::Error::other)?
        .options([("synchronous_commit", "off")]);
    let time_out = std::time::Duration::from_secs(30);
    let repository = PgSessionRepository::new(
        Connections::new(options, 16, time_out),
        Cipher::new(&keys),
        time_out,
    );
    let mut cookies = std::io::BufWriter::new(std::fs::File::create(cookie_file)?);
    // Tokens the size of real ones: an RS256 ID token with a few claims, opaque access and
    // refresh tokens.
    let pad = |len: usize| random_token().repeat(len / 43 + 1)[..len].to_string();
    let now = chrono::Utc::now();
    let ids: Vec<SessionId> = (0..count).map(|_| SessionId::generate()).collect();
    for id in &ids {
        writeln!(cookies, "{}", id.secret())?;
    }
    cookies.flush()?;
    let written = AtomicU64::new(0);
    stream::iter(ids.iter().enumerate())
        .for_each_concurrent(32, |(n, id)| {
            let (repository, pad, written) = (&repository, &pad, &written);
            async move {
                let sub = format!("user-{n}");
                let record = SessionRecord {
                    id: uuid::Uuid::new_v4(),
                    id_hash: id.hash(),
                    user: UserClaims::select(
                        sub.clone(),
                        serde_json::json!({"name": format!("User {n}"), "email": format!("{sub}@example.com")})
                            .as_object()
                            .expect("an object"),
                    ),
                    idp_sid: Some(pad(36)),
                    id_token: IdToken::new(pad(900)),
                    refresh_token: Some(RefreshToken::new(pad(64))),
                    access_token: Some(CachedAccessToken {
                        token: AccessToken::new(pad(64)),
                        expires_at: now + chrono::Duration::hours(1),
                        refresh_at: now + chrono::Duration::minutes(59),
                    }),
                    created_at: now - chrono::Duration::minutes(5),
                    // Last used longer ago than the touch interval (a minute by default): a
                    // returning user, whose first request after a Redis flush slides the idle
                    // timeout, as in service. Seeded as just used, the sessions seeded within a
                    // minute of a run would not, and how many those were depended on how long
                    // the seeding took. Within the miss interval (72 minutes by default), so a
                    // build since 2026-12-07 caches that use's time without writing it to
                    // PostgreSQL (src/flows/session.rs); earlier builds wrote each.
                    last_seen_at: now - chrono::Duration::minutes(5),
                    expires_at: now + chrono::Duration::hours(12),
                };
                repository.insert(&record).await.expect("insert a session");
                let done = written.fetch_add(1, Ordering::Relaxed) + 1;
                if done % 100_000 == 0 {
                    eprintln!("seeded {done} sessions");
                }
            }
        })
        .await;
    Ok(())
}

/// What the `cache-aside` server shares between its workers.
struct CacheAside {
    body: String,
    redis: redis::aio::ConnectionManager,
    pools: Pools,
    prefix: String,
}

/// One `cache-aside` request: the session's cached claims, or (on a miss) its row's, then the
/// constant body; 401 for no such session, 503 when a store fails.
async fn cache_aside(request: HttpRequest, state: web::Data<CacheAside>) -> HttpResponse {
    let Some(id) = request
        .cookie("session")
        .and_then(|cookie| SessionId::parse(cookie.value()))
    else {
        return HttpResponse::Unauthorized().finish();
    };
    let hash = id.hash();
    let mut key = state.prefix.clone();
    hash.push_hex(&mut key);
    let mut redis = state.redis.clone();
    match redis.get::<_, Option<Vec<u8>>>(&key).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let read = async {
                let mut checkout = state.pools.get().checkout().await?;
                let claims: Option<String> =
                    sqlx::query_scalar("SELECT user_claims::text FROM sessions WHERE id_hash = $1")
                        .bind(hash.as_bytes())
                        .fetch_optional(checkout.connection())
                        .await?;
                checkout.give_back().await;
                Ok::<_, sqlx::Error>(claims)
            };
            match read.await {
                Ok(Some(claims)) => {
                    tokio::spawn(async move {
                        let _: Result<(), _> = redis.set_ex(key, claims, 600).await;
                    });
                }
                Ok(None) => return HttpResponse::Unauthorized().finish(),
                Err(_) => return HttpResponse::ServiceUnavailable().finish(),
            }
        }
        Err(_) => return HttpResponse::ServiceUnavailable().finish(),
    }
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.body.clone())
}

async fn fixed_rate(
    url: String,
    cookie_file: String,
    rate: u32,
    seconds: u32,
) -> std::io::Result<()> {
    use rand::Rng;
    let cookies: Vec<String> = std::fs::read_to_string(cookie_file)?
        .lines()
        .map(|line| format!("session={line}"))
        .collect();
    if cookies.is_empty() || rate == 0 {
        usage();
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1024)
        .build()
        .map_err(std::io::Error::other)?;
    let every = Duration::from_secs(1) / rate;
    // One second of warm-up (connections opened, pools filled) before the measured requests.
    let (warm_up, total) = (rate, rate * (seconds + 1));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut requests = tokio::task::JoinSet::new();
    let reported = Arc::new(AtomicU64::new(0));
    for n in 0..total {
        let due = start + every * n;
        tokio::time::sleep_until(due).await;
        let cookie = cookies[rand::thread_rng().gen_range(0..cookies.len())].clone();
        let request = http.get(&url).header(COOKIE, cookie);
        let measured = n >= warm_up;
        let reported = reported.clone();
        requests.spawn(async move {
            // Timed from when it was sent: tokio's timer wakes up to a millisecond after `due`,
            // which would add up to 1 ms to every figure. How late sends were is reported apart,
            // so a stalled sender (coordinated omission) shows instead of hiding.
            let sent = tokio::time::Instant::now();
            let failure = match request.send().await {
                Ok(response) if !response.status().is_success() => {
                    Some(format!("status {}", response.status()))
                }
                Ok(response) => response.bytes().await.err().map(|e| e.to_string()),
                Err(error) => Some(format!("{error:?}")),
            };
            let ok = failure.is_none();
            if let Some(failure) = failure.filter(|_| measured) {
                if reported.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("request {n} failed: {failure}");
                }
            }
            (measured, ok, sent.elapsed(), sent - due)
        });
    }
    let (mut latencies, mut lateness) = (Vec::new(), Vec::new());
    let mut failed = 0;
    while let Some(outcome) = requests.join_next().await {
        let (measured, ok, latency, late) = outcome.map_err(std::io::Error::other)?;
        if measured {
            failed += u64::from(!ok);
            latencies.push(latency);
            lateness.push(late);
        }
    }
    let quantile = |values: &mut Vec<Duration>, q: f64| {
        values.sort_unstable();
        let index = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
        values[index - 1].as_secs_f64() * 1000.0
    };
    println!(
        "{} {failed} {:.2} {:.2} {:.2} {:.2}",
        latencies.len(),
        quantile(&mut latencies, 0.50),
        quantile(&mut latencies, 0.99),
        quantile(&mut latencies, 1.0),
        quantile(&mut lateness, 0.99),
    );
    Ok(())
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    match arg(0).as_str() {
        "bare" => {
            let body = web::Data::new(std::fs::read_to_string(arg(2))?);
            HttpServer::new(move || {
                App::new().app_data(body.clone()).default_service(web::to(
                    |body: web::Data<String>| async move {
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body.get_ref().clone())
                    },
                ))
            })
            .bind(arg(1))?
            .run()
            .await
        }
        "redis-get" => {
            let body = std::fs::read_to_string(arg(2))?;
            let client = redis::Client::open(arg(3)).map_err(std::io::Error::other)?;
            let mut connection = redis::aio::ConnectionManager::new(client)
                .await
                .map_err(std::io::Error::other)?;
            // The answer is what the GET returns: the body stored under the key (for a day, in
            // case the caller's clean-up misses it).
            let key = web::Data::new(
                args.get(4)
                    .cloned()
                    .unwrap_or_else(|| "bench:baseline".into()),
            );
            let _: () = connection
                .set_ex(key.get_ref(), &body, 86_400)
                .await
                .map_err(std::io::Error::other)?;
            let connection = web::Data::new(connection);
            HttpServer::new(move || {
                App::new().app_data(key.clone()).app_data(connection.clone()).default_service(web::to(
                    |key: web::Data<String>, connection: web::Data<redis::aio::ConnectionManager>| async move {
                        let mut connection = connection.get_ref().clone();
                        match connection.get::<_, Option<Vec<u8>>>(key.get_ref()).await {
                            Ok(Some(body)) => HttpResponse::Ok().content_type("application/json").body(body),
                            _ => HttpResponse::InternalServerError().finish(),
                        }
                    },
                ))
            })
            .bind(arg(1))?
            .run()
            .await
        }
        "cache-aside" => {
            let client = redis::Client::open(arg(3)).map_err(std::io::Error::other)?;
            let state = web::Data::new(CacheAside {
                body: std::fs::read_to_string(arg(2))?,
                redis: redis::aio::ConnectionManager::new(client)
                    .await
                    .map_err(std::io::Error::other)?,
                // As the broker's: a few connections per worker thread, no ping per query.
                pools: Pools::per_thread(&arg(4), Duration::from_secs(5))
                    .map_err(std::io::Error::other)?,
                prefix: arg(5),
            });
            HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .default_service(web::to(cache_aside))
            })
            .bind(arg(1))?
            .run()
            .await
        }
        "idp" => {
            let listener = TcpListener::bind(arg(1))?;
            let issuer = format!("http://{}", listener.local_addr()?);
            let idp = DevIdp::new(
                url::Url::parse(&issuer).map_err(std::io::Error::other)?,
                DevIdpOptions {
                    client_id: "token-broker-bench".into(),
                    client_secret: Some(arg(3)),
                    token_endpoint_auth_methods: vec!["client_secret_basic".into()],
                    redirect_uris: vec![arg(2)],
                    // ES256: RS256 signing (2048-bit, the `rsa` crate) made this IdP, not the
                    // broker, the bound on logins per second (94 % of a core at ~136 logins/s).
                    signing_alg: SigningAlg::Es256,
                    ..DevIdpOptions::default()
                },
            );
            idp.serve(listener)?.await
        }
        "logins" => {
            let count = arg(2).parse().unwrap_or_else(|_| usage());
            let concurrency = arg(3).parse().unwrap_or_else(|_| usage());
            logins(arg(1).trim_end_matches('/').to_string(), count, concurrency).await
        }
        "seed-sessions" => {
            let count = arg(3).parse().unwrap_or_else(|_| usage());
            seed_sessions(arg(1), arg(2), count, arg(4)).await
        }
        "fixed-rate" => {
            let rate = arg(3).parse().unwrap_or_else(|_| usage());
            let seconds = arg(4).parse().unwrap_or_else(|_| usage());
            fixed_rate(arg(1), arg(2), rate, seconds).await
        }
        _ => usage(),
    }
}
