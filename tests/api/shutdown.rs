//! SIGTERM under load, on the real binary: `/readyz` turns 503 at once, every answer from then on
//! closes its connection, requests in flight (a slow refresh among them) finish, new connections
//! are refused once the listener closes, no request is closed unanswered, and the process exits
//! 0 soon after, having logged no error; with `BROKER_SHUTDOWN_DELAY` it serves on until then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// How a load request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    /// The connection could not be opened (the listener is closed).
    Refused,
    /// The server closed the connection without reading the request: a kept-alive connection
    /// closed while idle, or one accepted by the kernel but not yet by the server (the classic
    /// keep-alive race; clients retry idempotent requests, RFC 9112 §9.3.1).
    ClosedUnanswered,
    /// Anything else: a response cut short, a time-out.
    Broken(String),
}

#[derive(Debug)]
struct Record {
    started: Instant,
    path: &'static str,
    outcome: Outcome,
    /// The answer said `Connection: close`.
    closes: bool,
}

/// Sends and reads the whole response.
async fn outcome(request: reqwest::RequestBuilder) -> Outcome {
    outcome_and_close(request).await.0
}

/// Sends and reads the whole response; and whether it said `Connection: close`.
async fn outcome_and_close(request: reqwest::RequestBuilder) -> (Outcome, bool) {
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return (failed(error), false),
    };
    let closes = response
        .headers()
        .get("connection")
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
    let status = response.status().as_u16();
    match response.bytes().await {
        Ok(_) => (Outcome::Status(status), closes),
        Err(error) => (Outcome::Broken(format!("body cut: {error:?}")), closes),
    }
}

fn failed(error: reqwest::Error) -> Outcome {
    match error {
        error if error.is_connect() => Outcome::Refused,
        // No response head: the connection was closed (FIN) or reset (RST, a connection still
        // in the listen backlog when the listener closed) before the server read the request.
        error
            if ["IncompleteMessage", "ConnectionReset"]
                .iter()
                .any(|kind| format!("{error:?}").contains(kind)) =>
        {
            Outcome::ClosedUnanswered
        }
        error => Outcome::Broken(format!("{error:?}")),
    }
}

fn client(keep_alive: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20));
    let builder = if keep_alive {
        builder.pool_idle_timeout(Duration::from_secs(30))
    } else {
        // A new connection for every request.
        builder.pool_max_idle_per_host(0)
    };
    builder.build().unwrap()
}

/// The real binary as another replica of `app`: same database, Redis prefix, keys and IdP.
async fn spawn_binary(app: &TestApp, shutdown_delay: &str) -> (BrokerProcess, String) {
    let s = &app.settings;
    let env = [
        ("BROKER_LISTEN_ADDR", "127.0.0.1:0".to_string()),
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
        ("BROKER_IDP_TIMEOUT", "10s".to_string()),
        ("BROKER_LOG_FORMAT", "json".to_string()),
        ("BROKER_SHUTDOWN_DELAY", shutdown_delay.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut process = BrokerProcess::spawn(&["serve"], &env);
    let line = process.wait_for_line("token-broker listening").await;
    let port: String = line
        .split("\"port\":")
        .nth(1)
        .expect("the listening line names the port")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (process, format!("http://127.0.0.1:{port}"))
}

#[tokio::test]
async fn sigterm_under_load_drains_in_flight_requests_and_exits_zero() {
    let report = sigterm_under_load(Duration::ZERO).await;
    // Requests on the wire when the listener closed may be closed unanswered; every one that
    // started earlier than that was answered.
    assert!(report.closed_unanswered <= UNANSWERED_AT_MOST, "{report:?}");
    assert!(report.refused_after_signal > 0, "{report:?}");
}

#[tokio::test]
async fn with_a_shutdown_delay_it_serves_on_with_readyz_503_before_draining() {
    let report = sigterm_under_load(Duration::from_secs(1)).await;
    assert!(report.readyz_503 >= 2, "{report:?}");
    assert!(report.probe_503 >= 2, "{report:?}");
    assert!(report.served_after_signal > 20, "{report:?}");
    assert!(report.exited_after >= Duration::from_secs(1), "{report:?}");
    assert!(report.closed_unanswered <= UNANSWERED_AT_MOST, "{report:?}");
}

const LOOPS: usize = 8;
/// Requests closed unanswered at shutdown. Before the broker answered with `Connection: close`
/// from the signal on and turned new connections away before its workers stopped, a kept-alive
/// connection could be closed under a request and one just accepted (or still queued in the
/// kernel) closed before its request was read: 1 to 7 such requests per shutdown here (six
/// runs); since, none. One is allowed for a machine so starved that the accept thread does not
/// take a queued connection within the broker's 50 ms; it must still have started within 500 ms
/// of the close.
const UNANSWERED_AT_MOST: usize = 1;

#[derive(Debug)]
#[allow(dead_code)] // Debug-printed
struct Report {
    before_signal: usize,
    /// Answers before the signal that kept their connection open.
    kept_open_before_signal: usize,
    served_after_signal: usize,
    /// Answers to requests sent after the signal that did not say `Connection: close`.
    kept_open_after_signal: usize,
    refused_after_signal: usize,
    closed_unanswered: usize,
    /// `/readyz` answers 503 after the signal.
    readyz_503: usize,
    /// The same of the Kubernetes readiness probe's `/readyz?exclude=…`.
    probe_503: usize,
    readyz_refused: usize,
    exited_after: Duration,
    slow_took: Duration,
}

/// Starts the binary, loads it from 8 loops (half on kept-alive connections, half on a new
/// connection per request), has alice's `/auth` mid-refresh (the IdP's token endpoint takes
/// 3 s), sends SIGTERM, probes `/readyz` and the Kubernetes readiness probe's path in turn on
/// new connections, and checks what every request got.
async fn sigterm_under_load(delay: Duration) -> Report {
    // Arrange: the binary serving two logged-in users; alice's access token expired and the
    // IdP's token endpoint slow, so her /auth will be mid-refresh when the signal comes.
    let app = spawn_app().await;
    let alice = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    let (process, base) = spawn_binary(&app, &format!("{}s", delay.as_secs())).await;
    let probe = client(false);
    for path in ["/readyz", KUBERNETES_READINESS_PROBE] {
        assert_eq!(
            outcome(probe.get(format!("{base}{path}"))).await,
            Outcome::Status(200)
        );
    }
    assert_eq!(
        forward_auth(&probe, &base, &bob).await.status(),
        200,
        "bob's cached token"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let mut loops = Vec::new();
    for n in 0..LOOPS {
        let (stop, records, base, bob) = (stop.clone(), records.clone(), base.clone(), bob.clone());
        loops.push(tokio::spawn(async move {
            let http = client(n % 2 == 0);
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let (path, cookie): (&'static str, String) = match (n + i) % 4 {
                    0 => ("/session", bob.cookie_header()),
                    1 => ("/session", String::new()),
                    2 => ("/auth", bob.cookie_header()),
                    _ => ("/healthz", String::new()),
                };
                let started = Instant::now();
                let request = http.get(format!("{base}{path}")).header("cookie", cookie);
                let (outcome, closes) = outcome_and_close(request).await;
                let refused = outcome == Outcome::Refused;
                records.lock().unwrap().push(Record {
                    started,
                    path,
                    outcome,
                    closes,
                });
                if refused {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    expire_cached_token(&app, &alice).await;
    app.idp
        .controls()
        .set_token_delay(Some(Duration::from_secs(3)));
    let slow = {
        let (base, alice) = (base.clone(), alice.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let response = forward_auth(&client(false), &base, &alice).await;
            (response.status().as_u16(), started.elapsed())
        })
    };
    // Let the slow request reach the IdP.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!slow.is_finished(), "the slow /auth is in flight");

    // Act
    let signal_at = Instant::now();
    let exit = tokio::spawn(process.terminate());
    let mut readyz = Vec::new();
    while !exit.is_finished() && signal_at.elapsed() < Duration::from_secs(30) {
        let path = ["/readyz", KUBERNETES_READINESS_PROBE][readyz.len() % 2];
        let answer = outcome(probe.get(format!("{base}{path}"))).await;
        readyz.push((signal_at.elapsed(), answer.clone()));
        if answer == Outcome::Refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, output) = exit.await.unwrap();
    let exited_after = signal_at.elapsed();
    stop.store(true, Ordering::SeqCst);
    for task in loops {
        task.await.unwrap();
    }
    let (slow_status, slow_took) = slow.await.unwrap();

    // Assert
    assert!(status.success(), "{status}: {output}");
    assert!(
        exited_after < delay + Duration::from_secs(8),
        "exit {exited_after:?} after SIGTERM"
    );
    assert_eq!(
        slow_status, 200,
        "the refresh in flight at SIGTERM finished; the broker's output: {output}"
    );
    assert!(slow_took >= Duration::from_secs(3), "{slow_took:?}");
    assert!(output.contains("shutdown signal received"), "{output}");
    // Closing the listener on purpose is no error (actix-server's accept thread reports one).
    assert!(!output.contains("\"level\":\"ERROR\""), "{output}");

    // Both readiness paths: 503 from the signal on (a probe already on its way may still see
    // 200), never 200 after a 503, refused once the listener is closed.
    let first_503 = readyz.iter().position(|(_, o)| *o == Outcome::Status(503));
    for (i, (at, answer)) in readyz.iter().enumerate() {
        match answer {
            Outcome::Status(503) | Outcome::Refused | Outcome::ClosedUnanswered => {}
            Outcome::Status(200)
                if *at < Duration::from_secs(1) && first_503.is_none_or(|f| i < f) => {}
            other => panic!("/readyz after SIGTERM: {other:?} in {readyz:?}"),
        }
    }

    let records = records.lock().unwrap();
    let expected = |r: &Record| {
        matches!(
            (r.path, &r.outcome),
            ("/healthz" | "/auth", Outcome::Status(200)) | ("/session", Outcome::Status(200 | 401))
        )
    };
    // The listener closes `delay` after the signal: a request may be closed unanswered only if
    // it was on its way then (started at most 500 ms before, for a loaded machine).
    let close_at = signal_at + delay;
    let mut report = Report {
        before_signal: records.iter().filter(|r| r.started < signal_at).count(),
        kept_open_before_signal: records
            .iter()
            .filter(|r| r.started < signal_at && matches!(r.outcome, Outcome::Status(_)))
            .filter(|r| !r.closes)
            .count(),
        served_after_signal: 0,
        // (The signal is handled a moment after it is sent: 100 ms of margin.)
        kept_open_after_signal: records
            .iter()
            .filter(|r| r.started > signal_at + Duration::from_millis(100))
            .filter(|r| matches!(r.outcome, Outcome::Status(_)) && !r.closes)
            .count(),
        refused_after_signal: 0,
        closed_unanswered: 0,
        readyz_503: readyz
            .iter()
            .step_by(2)
            .filter(|(_, o)| *o == Outcome::Status(503))
            .count(),
        probe_503: readyz
            .iter()
            .skip(1)
            .step_by(2)
            .filter(|(_, o)| *o == Outcome::Status(503))
            .count(),
        readyz_refused: readyz
            .iter()
            .filter(|(_, o)| *o == Outcome::Refused)
            .count(),
        exited_after,
        slow_took,
    };
    let mut failures = Vec::new();
    for record in records.iter() {
        let after = record.started >= signal_at;
        match &record.outcome {
            _ if expected(record) => report.served_after_signal += usize::from(after),
            Outcome::Refused if record.started >= close_at => report.refused_after_signal += 1,
            Outcome::ClosedUnanswered
                if record.started + Duration::from_millis(500) >= close_at =>
            {
                report.closed_unanswered += 1
            }
            other => failures.push((
                record.started.duration_since(signal_at),
                signal_at.saturating_duration_since(record.started),
                record.path,
                other,
            )),
        }
    }
    eprintln!(
        "shutdown under load (delay {delay:?}): {report:?}; /readyz after SIGTERM: {readyz:?}"
    );
    assert!(report.before_signal > 50, "the load ran: {report:?}");
    assert!(report.kept_open_before_signal > 50, "{report:?}");
    assert_eq!(report.kept_open_after_signal, 0, "{report:?}");
    // (time after the signal, time before the signal, path, outcome)
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    report
}
