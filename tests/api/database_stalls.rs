//! A PostgreSQL that stops answering, rather than one that is down (`faults.rs`): a lock an
//! operator holds on `sessions`, and connections gone silent (a network partition, a failover
//! that left the old primary's address unanswered). Each costs requests that need PostgreSQL a
//! 503 within `BROKER_DATABASE_TIMEOUT` (here 1 s), never a hang; nothing is left waiting in
//! PostgreSQL or holding the broker's pool; and requests succeed again as soon as PostgreSQL
//! answers, without a restart.

use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::helpers::*;

/// The time-out the tests run with, and the most a request may take under it: the wait for a
/// connection (at most the time-out), the time-out, and the broker's one-second grace, with room
/// for a loaded machine.
const DATABASE_TIMEOUT: &str = "1s";
const ANSWERED_WITHIN: Duration = Duration::from_secs(8);

async fn spawn_app_with_database_timeout(database_url: Option<String>) -> TestApp {
    spawn_app_with(|setup| {
        setup.settings.database_timeout = Some(DATABASE_TIMEOUT.into());
        if let Some(url) = database_url {
            // The test's own database, through the proxy.
            let mut proxied = url::Url::parse(&url).unwrap();
            let own = url::Url::parse(setup.settings.database_url.as_deref().unwrap()).unwrap();
            proxied.set_path(own.path());
            setup.settings.database_url = Some(proxied.to_string());
        }
    })
    .await
}

/// `GET /session`, timed.
async fn timed_session(app: &TestApp, browser: &Browser) -> (reqwest::Response, Duration) {
    let started = Instant::now();
    let response = app.get_session(browser).await;
    (response, started.elapsed())
}

/// A 503 problem+json with `Retry-After`, answered in time.
async fn assert_unavailable_in_time(response: reqwest::Response, took: Duration) {
    assert!(
        took < ANSWERED_WITHIN,
        "answered after {took:?}: the time-out is {DATABASE_TIMEOUT}"
    );
    assert!(
        response.headers().contains_key("retry-after"),
        "a 503 says when to retry"
    );
    assert_problem(response, 503).await;
}

/// Backends of the test's database waiting for a lock, other than `except` (the holder's).
async fn backends_waiting_for_a_lock(admin: &mut sqlx::PgConnection, except: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> $1",
    )
    .bind(except)
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_lock_held_on_the_sessions_table_costs_a_503_in_time_and_leaves_nothing_waiting() {
    // Arrange: two sessions whose views Redis has lost, so `/session` needs PostgreSQL; an
    // operator's transaction holds the sessions table (an ALTER TABLE, a VACUUM FULL, …).
    let app = spawn_app_with_database_timeout(None).await;
    let alice = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    delete_redis_keys(&app).await;
    let mut operator = sqlx::PgConnection::connect(&app.database.url)
        .await
        .unwrap();
    let operator_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut operator)
        .await
        .unwrap();
    let mut lock = operator.begin().await.unwrap();
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    // Act: a cold `/session`, and a login, whose session cannot be stored.
    let (response, took) = timed_session(&app, &alice).await;
    let started = Instant::now();
    let mut carol = Browser::default();
    let login = app.login_as(&mut carol, "carol").await;
    let login_took = started.elapsed();

    // Assert: a 503 in time; the login fails cleanly with `unavailable`, without a session.
    assert_unavailable_in_time(response, took).await;
    assert!(
        login_took < ANSWERED_WITHIN,
        "login answered after {login_took:?}"
    );
    assert_login_error_redirect(&login, "/", "unavailable");
    assert!(carol.session().is_none());
    // PostgreSQL cancelled the broker's statements itself (`statement_timeout`): none is left
    // waiting for the lock, as one per request given up on would be without it.
    let mut admin = sqlx::PgConnection::connect(&app.database.url)
        .await
        .unwrap();
    let waiting = backends_waiting_for_a_lock(&mut admin, operator_pid).await;
    assert_eq!(waiting, 0, "broker statements still waiting for the lock");

    // Act: the operator is done.
    lock.commit().await.unwrap();

    // Assert: everything works again, without a restart; nothing was stored by the failed login.
    assert_eq!(app.get_session(&alice).await.status(), 200);
    assert_eq!(app.get_session(&bob).await.status(), 200);
    assert_eq!(app.session_rows().await, 2);
    app.logged_in_browser("carol").await;
    assert_eq!(app.session_rows().await, 3);
}

#[tokio::test]
async fn connections_gone_silent_cost_a_503_in_time_and_never_hold_the_pool() {
    // Arrange: the broker reaches PostgreSQL through a proxy; eight sessions whose views Redis
    // has lost.
    let proxy = StallingProxy::start(&std::env::var("DATABASE_URL").unwrap()).await;
    let app = spawn_app_with_database_timeout(Some(proxy.url.clone())).await;
    let mut browsers = Vec::new();
    for user in 0..8 {
        browsers.push(app.logged_in_browser(&format!("user-{user}")).await);
    }
    delete_redis_keys(&app).await;
    // Every connection the workers' pools may hold (16 per replica, split between its threads)
    // is made and idle: 24 cold `/session`s wait together behind a lock, then all are answered.
    let mut admin = sqlx::PgConnection::connect(&app.database.url)
        .await
        .unwrap();
    let mut lock = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let waiting: Vec<_> = (0..24)
        .map(|i| {
            let (http, url, cookie) = (
                app.http.clone(),
                format!("{}/session", app.address),
                browsers[i % browsers.len()].cookie_header(),
            );
            tokio::spawn(
                async move { http.get(url).header("cookie", cookie).send().await.unwrap() },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.commit().await.unwrap();
    for request in waiting {
        assert_eq!(request.await.unwrap().status(), 200);
    }
    delete_redis_keys(&app).await;

    // Act: every connection made so far goes silent (the old primary is gone; its address no
    // longer answers), while new connections reach PostgreSQL.
    proxy.silence_existing();
    let answers: Vec<_> = browsers
        .iter()
        .cycle()
        .take(24)
        .map(|browser| {
            let (http, url, cookie) = (
                app.http.clone(),
                format!("{}/session", app.address),
                browser.cookie_header(),
            );
            tokio::spawn(async move {
                let started = Instant::now();
                let response = http.get(url).header("cookie", cookie).send().await.unwrap();
                (response, started.elapsed())
            })
        })
        .collect();

    // Assert: each of those requests is answered in time: a 503 when it met a silent connection,
    // else a 200 over a new one.
    let mut unavailable = 0;
    for answer in answers {
        let (response, took) = answer.await.unwrap();
        if response.status() == 200 {
            assert!(took < ANSWERED_WITHIN, "answered after {took:?}");
        } else {
            unavailable += 1;
            assert_unavailable_in_time(response, took).await;
        }
    }
    assert!(unavailable > 0, "no request met a silent connection");
    // The silent connections were closed, not kept waiting for an answer in the pool: requests
    // get new connections, and succeed, within a few seconds; then every one succeeds.
    let started = Instant::now();
    loop {
        delete_redis_keys(&app).await;
        let (response, took) = timed_session(&app, &browsers[0]).await;
        assert!(took < ANSWERED_WITHIN, "answered after {took:?}");
        if response.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {} 15 s after the connections went silent",
            response.status()
        );
    }
    delete_redis_keys(&app).await;
    for browser in &browsers {
        assert_eq!(app.get_session(browser).await.status(), 200);
    }
    assert_eq!(app.session_rows().await, 8);
}
