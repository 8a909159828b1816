//! Redis connections (`src/store/redis/connection.rs`): a thread is served by the start-up
//! connection until its own is made in the background, so no request waits for a connection to
//! be made, not even when Redis stops answering new connections; a connection that goes silent
//! is replaced at its first time-out; and with Redis hung, no request waits for another's attempt
//! at a new connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use token_broker::crypto::{Cipher, EncryptionKey};
use token_broker::store::redis::RedisStore;
use token_broker::store::SessionCache;

use crate::helpers::{StallingProxy, TestRedis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_is_served_at_once_while_its_own_connection_cannot_be_made() {
    let redis = TestRedis::new();
    let proxy = StallingProxy::start(&redis.url).await;
    let cipher = Cipher::new(&[EncryptionKey::generate()]);
    let store = RedisStore::connect(&proxy.url, &redis.prefix, cipher)
        .await
        .expect("connect through the proxy");
    let hang_new = Arc::clone(&proxy.hang_new);

    // Like an actix worker: a thread with a single-threaded runtime of its own.
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            // Redis stops answering new connections before this thread made its own.
            hang_new.store(true, Ordering::SeqCst);
            let started = Instant::now();
            // Past the 2 s connection time-out: attempts fail and are made again, meanwhile
            // every command is answered through the start-up connection.
            while started.elapsed() < Duration::from_secs(3) {
                let asked = Instant::now();
                store
                    .ping()
                    .await
                    .expect("answered through the start-up connection");
                assert!(
                    asked.elapsed() < Duration::from_millis(500),
                    "a command waited {:?} for a connection being made",
                    asked.elapsed()
                );
                assert!(!store.thread_has_own_connection());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            // Redis answers again: the thread gets its own connection, and it works.
            hang_new.store(false, Ordering::SeqCst);
            let started = Instant::now();
            while !store.thread_has_own_connection() {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no connection of its own 10 s after Redis answered again"
                );
                store.ping().await.expect("ping");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            store
                .ping()
                .await
                .expect("ping on the thread's own connection");
        });
    });
    tokio::task::spawn_blocking(move || worker.join())
        .await
        .unwrap()
        .expect("the worker thread's checks passed");
}

/// The broker reaching Redis through a [`StallingProxy`], and alice logged in.
async fn app_behind_a_redis_proxy() -> (
    StallingProxy,
    crate::helpers::TestApp,
    crate::helpers::Browser,
) {
    let proxy = StallingProxy::start(&std::env::var("REDIS_URL").unwrap()).await;
    let proxied = proxy.url.clone();
    let app = crate::helpers::spawn_app_with(|setup| {
        setup.settings.redis_url = Some(proxied);
    })
    .await;
    let alice = app.logged_in_browser("alice").await;
    (proxy, app, alice)
}

#[tokio::test]
async fn connections_to_a_redis_gone_silent_are_replaced_without_a_restart() {
    // Arrange: the broker reaches Redis through a proxy; a live session.
    let (proxy, app, alice) = app_behind_a_redis_proxy().await;

    // Act: every Redis connection made so far goes silent (a failover that left the old
    // master's address unanswered), while new connections reach Redis.
    proxy.silence_existing();

    // Assert: the session is answered meanwhile (from PostgreSQL once Redis times out), and
    // within seconds Redis works again: a new login, which needs it, succeeds.
    let started = Instant::now();
    loop {
        let asked = Instant::now();
        let session = app.get_session(&alice).await;
        assert_eq!(session.status(), 200);
        assert!(
            asked.elapsed() < Duration::from_secs(6),
            "/session answered after {:?}",
            asked.elapsed()
        );
        let mut browser = crate::helpers::Browser::default();
        let login = app.get_login(&mut browser, None).await;
        if login.status() == 302 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "/login still {} 20 s after Redis's connections went silent",
            login.status()
        );
    }
    app.logged_in_browser("bob").await;
}

#[tokio::test]
async fn with_redis_hung_each_request_waits_for_one_time_out_not_for_each_others() {
    // Arrange: the broker reaches Redis through a proxy; a live session.
    let (proxy, app, alice) = app_behind_a_redis_proxy().await;

    // Act: Redis hangs altogether (its connections go silent, new ones are never answered),
    // and two dozen requests come at once.
    proxy.hang_new.store(true, Ordering::SeqCst);
    proxy.silence_existing();
    let requests: Vec<_> = (0..24)
        .map(|_| {
            let (http, url, cookie) = (
                app.http.clone(),
                format!("{}/session", app.address),
                alice.cookie_header(),
            );
            tokio::spawn(async move {
                let started = Instant::now();
                let response = http.get(url).header("cookie", cookie).send().await.unwrap();
                (response.status(), started.elapsed())
            })
        })
        .collect();

    // Assert: each is answered from PostgreSQL after its own time-out (2 s) and at most one
    // attempt at a new connection (2 s), not after the attempts of the requests before it.
    for request in requests {
        let (status, took) = request.await.unwrap();
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(7), "answered after {took:?}");
    }
}
