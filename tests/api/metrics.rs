//! `GET /metrics`: Prometheus (OpenMetrics) text with every family the broker promises, counting
//! what really happened, with low-cardinality labels that never carry a subject, cookie or token.

use std::collections::HashMap;

use crate::helpers::*;

/// One sample line: `name{labels} value` or `name value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the exposition strictly enough to catch a malformed line: every line that is not a
/// comment must be a sample with a valid name, well-formed labels and a number.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                    let labels = body
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair
                                .split_once("=\"")
                                .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                            assert!(is_name(key), "bad label name in {line:?}");
                            (key.to_string(), value.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, HashMap::new()),
            };
            assert!(is_name(name), "bad metric name in {line:?}");
            Sample {
                name: name.to_string(),
                labels,
                value,
            }
        })
        .collect()
}

/// The value of the sample `name` whose labels include `labels` (summed over the others).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[tokio::test]
async fn metrics_count_logins_refreshes_and_requests_without_leaking_identities() {
    // Arrange: a login, /session, /auth, a refused login, a refresh, a bad back-channel logout.
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    assert_eq!(app.get_session(&browser).await.status(), 200);
    let first = forward_auth(&app.http, &app.address, &browser).await;
    assert_eq!(first.status(), 200);
    let first_token = first.headers()["authorization"]
        .to_str()
        .unwrap()
        .to_string();

    let mut refused = Browser::default();
    let request = app.start_login(&mut refused, None).await;
    let callback = app.deny(&request).await;
    let response = app.callback(&mut refused, &callback).await;
    assert_login_error_redirect(&response, "/", "access_denied");

    expire_cached_token(&app, &browser).await;
    let refreshed = forward_auth(&app.http, &app.address, &browser).await;
    assert_eq!(refreshed.status(), 200);
    let refreshed_token = refreshed.headers()["authorization"]
        .to_str()
        .unwrap()
        .to_string();

    let bad_logout = app
        .http
        .post(format!("{}/backchannel-logout", app.address))
        .form(&[("logout_token", "not-a-jwt")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_logout.status(), 400);
    let unknown = app.get("/users/alice/secret-path", &browser).await;
    assert_eq!(unknown.status(), 404);

    // Act
    let response = app
        .http
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();

    // Assert
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let samples = parse(&text);
    assert!(text.ends_with("# EOF\n"));

    let session_ok = [("route", "/session"), ("method", "GET"), ("status", "200")];
    assert!(value(&samples, "http_requests_total", &session_ok) >= 1.0);
    let auth_ok = [("route", "/auth"), ("method", "GET"), ("status", "200")];
    assert_eq!(value(&samples, "http_requests_total", &auth_ok), 2.0);
    let unmatched = [("route", "unmatched"), ("status", "404")];
    assert_eq!(value(&samples, "http_requests_total", &unmatched), 1.0);
    let auth = [("route", "/auth"), ("method", "GET")];
    assert_eq!(
        value(&samples, "http_request_duration_seconds_count", &auth),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "http_request_duration_seconds_bucket",
            &[("le", "+Inf"), ("route", "/auth")]
        ),
        2.0
    );
    assert_eq!(value(&samples, "logins_started_total", &[]), 2.0);
    assert_eq!(value(&samples, "logins_completed_total", &[]), 1.0);
    let denied = [("reason", "access_denied")];
    assert_eq!(value(&samples, "logins_failed_total", &denied), 1.0);
    let success = [("outcome", "success")];
    assert_eq!(value(&samples, "refreshes_total", &success), 1.0);
    for endpoint in ["discovery", "jwks", "token"] {
        let labels = [("endpoint", endpoint)];
        assert!(
            value(&samples, "idp_request_duration_seconds_count", &labels) >= 1.0,
            "{endpoint}"
        );
    }
    // The code exchange and the refresh.
    let token = [("endpoint", "token")];
    assert_eq!(
        value(&samples, "idp_request_duration_seconds_count", &token),
        2.0
    );
    assert_eq!(value(&samples, "live_sessions", &[]), 1.0);
    let invalid = [("outcome", "invalid_token")];
    assert_eq!(value(&samples, "back_channel_logouts_total", &invalid), 1.0);
    // No store failed: both series are there, at 0.
    for store in ["redis", "postgres"] {
        let labels = [("store", store)];
        assert_eq!(value(&samples, "store_errors_total", &labels), 0.0);
        assert!(samples
            .iter()
            .any(|s| s.name == "store_errors_total" && s.labels["store"] == store));
    }

    for secret in [
        "alice".to_string(),
        "secret-path".to_string(),
        browser.session().unwrap().clone(),
        session_hash_hex(&browser),
        first_token.trim_start_matches("Bearer ").to_string(),
        refreshed_token.trim_start_matches("Bearer ").to_string(),
    ] {
        assert!(!text.contains(&secret), "the scrape contains {secret:?}");
    }
}

#[tokio::test]
async fn a_store_outage_served_as_503_is_counted_once() {
    // Arrange: PostgreSQL loses the sessions table; a cookie Redis does not know must be looked
    // up there.
    let app = spawn_app().await;
    // The first scrape counts the live sessions; the next one (within 30 s) does not.
    let first = app.get("/metrics", &Browser::default()).await;
    assert_eq!(first.status(), 200);
    let pool = app.database.pool().await;
    sqlx::query("DROP TABLE sessions CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    let mut browser = Browser::default();
    let id = token_broker::domain::SessionId::generate();
    browser
        .cookies
        .insert("session".into(), id.secret().to_string());

    // Act
    let session = app.get_session(&browser).await;
    let text = app
        .get("/metrics", &Browser::default())
        .await
        .text()
        .await
        .unwrap();

    // Assert
    assert_eq!(session.status(), 503);
    let samples = parse(&text);
    let postgres = [("store", "postgres")];
    assert_eq!(value(&samples, "store_errors_total", &postgres), 1.0);
    let unavailable = [("route", "/session"), ("status", "503")];
    assert_eq!(value(&samples, "http_requests_total", &unavailable), 1.0);
    assert!(!text.contains(id.secret()));
}
