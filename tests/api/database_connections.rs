//! The broker's own PostgreSQL connections (`store::postgres::Connections`): a connection goes
//! back without a round trip, never with a transaction left open on it, never after an operation
//! given up on; no more of them than their bound, and no unbounded wait for one.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use token_broker::store::postgres::Connections;

use crate::helpers::*;

/// At most `max` connections to `url`, with a time-out of one second (the wait for a connection
/// too).
fn connections(url: &str, max: u32) -> Connections {
    Connections::new(
        url.parse().expect("a PostgreSQL URL"),
        max,
        Duration::from_secs(1),
    )
}

async fn backend_pid(connection: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(connection)
        .await
        .expect("the backend's pid")
}

#[tokio::test]
async fn a_connection_goes_back_without_a_round_trip_and_serves_the_next_operation() {
    let database = TestDatabase::create().await;
    let proxy = StallingProxy::start(&database.url).await;
    let connections = connections(&proxy.url, 2);

    let mut checkout = connections.checkout().await.unwrap();
    let first = backend_pid(checkout.connection()).await;
    checkout.give_back().await;
    let mut checkout = connections.checkout().await.unwrap();
    assert_eq!(
        backend_pid(checkout.connection()).await,
        first,
        "the connection put back serves the next operation"
    );

    // From here on the server answers nothing on that connection: giving it back must not wait
    // for an answer (sqlx's own pool pings every connection it takes back, a round trip after
    // every operation, which would wait here for ever).
    proxy.silence_existing();
    tokio::time::timeout(Duration::from_millis(500), checkout.give_back())
        .await
        .expect("given back at once: nothing was owed, so nothing was sent");
}

#[tokio::test]
async fn a_transaction_dropped_unfinished_is_rolled_back_before_its_connection_goes_back() {
    let database = TestDatabase::create().await;
    let mut other = PgConnection::connect(&database.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE counters (id int PRIMARY KEY, n int); INSERT INTO counters VALUES (1, 0)",
    )
    .execute(&mut other)
    .await
    .unwrap();
    let connections = connections(&database.url, 2);

    let mut checkout = connections.checkout().await.unwrap();
    {
        let mut transaction = checkout.connection().begin().await.unwrap();
        sqlx::query("UPDATE counters SET n = n + 1 WHERE id = 1")
            .execute(&mut *transaction)
            .await
            .unwrap();
        // Dropped here, neither committed nor rolled back: an operation that returned early.
        // sqlx only queues its ROLLBACK.
    }
    checkout.give_back().await;

    // The connection now idles in the pool; its transaction must not idle with it, holding the
    // row's lock until the connection's next use.
    sqlx::raw_sql("SET lock_timeout = '1s'")
        .execute(&mut other)
        .await
        .unwrap();
    let n: i32 = sqlx::query_scalar("UPDATE counters SET n = n + 10 WHERE id = 1 RETURNING n")
        .fetch_one(&mut other)
        .await
        .expect("the row is not locked by a transaction left open on an idle connection");
    assert_eq!(n, 10, "the dropped transaction's update was rolled back");
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(&mut other)
    .await
    .unwrap();
    assert_eq!(open, 0);
}

#[tokio::test]
async fn an_operation_given_up_on_closes_its_connection() {
    let database = TestDatabase::create().await;
    let connections = connections(&database.url, 2);

    let mut checkout = connections.checkout().await.unwrap();
    let abandoned = backend_pid(checkout.connection()).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        sqlx::query("SELECT pg_sleep(30)").execute(checkout.connection()),
    )
    .await;
    assert!(gave_up.is_err(), "the statement was given up on");
    // Not given back: its answer is still owed, and whoever used it next would read it.
    drop(checkout);

    let mut checkout = connections.checkout().await.unwrap();
    assert_ne!(
        backend_pid(checkout.connection()).await,
        abandoned,
        "a new connection, not the one given up on"
    );
}

#[tokio::test]
async fn no_more_connections_than_the_bound_and_a_bounded_wait_for_one() {
    let database = TestDatabase::create().await;
    let connections = connections(&database.url, 2);
    let mut observer = PgConnection::connect(&database.url).await.unwrap();
    let opened = async |observer: &mut PgConnection| -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(observer)
        .await
        .unwrap()
    };

    let mut first = connections.checkout().await.unwrap();
    backend_pid(first.connection()).await;
    let second = connections.checkout().await.unwrap();
    assert_eq!(opened(&mut observer).await, 2);

    let started = Instant::now();
    let third = connections.checkout().await;
    assert!(
        matches!(third, Err(sqlx::Error::PoolTimedOut)),
        "a third waits for one of the two, one second at most: {:?}",
        third.err()
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&waited),
        "waited {waited:?}"
    );
    assert_eq!(opened(&mut observer).await, 2, "no third connection");

    // One given back serves the next at once.
    first.give_back().await;
    let started = Instant::now();
    let mut third = connections.checkout().await.unwrap();
    backend_pid(third.connection()).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(opened(&mut observer).await, 2);
    drop(second);
}
