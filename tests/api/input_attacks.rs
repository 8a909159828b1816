//! Hostile input at the edge: open-redirect `return_to` values, malformed and oversized query
//! strings and cookies, unknown routes. Each must end in a problem+json 4xx, never a 500, and
//! must leave PostgreSQL and Redis exactly as they were.

use crate::helpers::*;

const INVALID_RETURN_TO: &str = "urn:token-broker:problem:invalid-return-to";
const INVALID_REQUEST: &str = "urn:token-broker:problem:invalid-request";
const NOT_AUTHENTICATED: &str = "urn:token-broker:problem:not-authenticated";

/// `return_to` values as the broker sees them after its one percent-decoding of the query.
/// Each is sent with `urlencode()`, so it arrives exactly as written here.
fn open_redirect_attacks() -> Vec<String> {
    let mut attacks: Vec<String> = [
        // Scheme-relative and slash/backslash confusion: browsers read all of these as //evil.com.
        "//evil.com",
        "///evil.com",
        "////evil.com/x",
        "/\\evil.com",
        "\\\\evil.com",
        "\\/evil.com",
        "/\\/evil.com",
        // Tabs and newlines are stripped by browsers: `/<TAB>/evil.com` becomes `//evil.com`.
        "/\t/evil.com",
        "/\n/evil.com",
        "/\r/evil.com",
        "\t//evil.com",
        "/\0/evil.com",
        // Special-scheme shorthand that the WHATWG parser completes to https://evil.com.
        "https:evil.com",
        "https:/evil.com",
        "https:\\\\evil.com",
        "HTTPS://EVIL.COM",
        "hTtP://evil.com/",
        "https://evil.com",
        "http://evil.com",
        "evil.com",
        // The allowed origin as userinfo, fragment or subdomain of a foreign host.
        "https://localhost:3000@evil.com",
        "http://localhost:3000@evil.com/",
        "//localhost:3000@evil.com",
        "https://evil.com#@localhost:3000",
        "http://evil.com#@localhost:3000",
        "http://evil.com\\@localhost:3000",
        "http://evil.com/\\@localhost:3000",
        "https://localhost:3000.evil.com",
        "http://localhost:3000.evil.com/",
        "http://user:pass@localhost:3000/",
        // Near misses of the allowed origins: port, scheme, address.
        "http://localhost:3001/",
        "https://localhost:3000/",
        "http://127.0.0.1:3000/",
        "http://app.example.com/y",
        "https://app.example.com:8443/y",
        "ftp://localhost:3000/",
        // Script and data URLs.
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "javascript://localhost:3000/%0aalert(1)",
        "data:text/html,x",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        // An encoded `//`: the literal text `%2F%2Fevil.com` is not a path or URL.
        "%2F%2Fevil.com",
        "%5C%5Cevil.com",
        // Leading and trailing white space.
        " /x",
        "/x ",
        " https://evil.com",
        "http://localhost:3000/ ",
        "\u{a0}/x",
        // Header injection.
        "/\r\nLocation: https://evil.com",
        "/x\r\nSet-Cookie: session=planted",
        // Unicode look-alike hosts (Cyrillic `о` and `а`) and an ideographic full stop, which IDNA
        // maps to `.`.
        "http://lоcalhost:3000/",
        "https://аpp.example.com/",
        "https://app.example.com\u{3002}evil.com/",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    attacks.push(format!("/{}", "a".repeat(2999)));
    attacks
}

/// Sends `/login?return_to=<raw>` (`raw` is already percent-encoded) and checks the refusal.
/// Returns a description of what went wrong, for a report covering every attack at once.
async fn refused_without_trace(
    app: &TestApp,
    raw_query_value: &str,
    shown: &str,
) -> Option<String> {
    let keys_before = app.redis.keys().await;
    let response = app
        .get(
            &format!("/login?return_to={raw_query_value}"),
            &Browser::default(),
        )
        .await;

    let status = response.status().as_u16();
    let sets_cookie = response.headers().contains_key("set-cookie");
    let location = response
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap_or("?").to_string());
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string());
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let keys_after = app.redis.keys().await;

    let mut wrong = Vec::new();
    if status != 400 {
        wrong.push(format!("status {status}, Location {location:?}"));
    }
    if content_type.as_deref() != Some("application/problem+json") {
        wrong.push(format!("content-type {content_type:?}"));
    }
    if body["type"] != INVALID_RETURN_TO || body["status"] != 400 {
        wrong.push(format!("body {body}"));
    }
    if sets_cookie {
        wrong.push("sets a cookie".into());
    }
    if keys_after != keys_before {
        wrong.push(format!("stored a pending login: {keys_after:?}"));
    }
    (!wrong.is_empty()).then(|| format!("{shown:?}: {}", wrong.join("; ")))
}

#[tokio::test]
async fn open_redirect_return_to_values_are_refused_and_store_no_pending_login() {
    // Arrange
    let app = spawn_app().await;
    let attacks = open_redirect_attacks();
    assert!(attacks.len() >= 25);

    // Act
    let mut accepted = Vec::new();
    for attack in &attacks {
        if let Some(problem) = refused_without_trace(&app, &urlencode(attack), attack).await {
            accepted.push(problem);
        }
    }

    // Assert
    assert!(
        accepted.is_empty(),
        "not refused cleanly:\n{}",
        accepted.join("\n")
    );
    assert!(app.redis.keys().await.is_empty());
    assert_eq!(app.session_rows().await, 0);
    assert_eq!(app.idp.stats().authorize_requests, 0);
}

#[tokio::test]
async fn encoded_slashes_are_refused_however_many_times_they_are_encoded() {
    // Arrange: raw query values, as they travel on the wire.
    let app = spawn_app().await;
    let raw = [
        // Decoded once by the server: `//evil.com`.
        "%2F%2Fevil.com",
        // Decoded once: the literal `%2F%2Fevil.com`, which is neither a path nor a URL.
        "%252F%252Fevil.com",
        // Decoded once: `/\evil.com` and `/<TAB>/evil.com`.
        "%2F%5Cevil.com",
        "/%09/evil.com",
        "%2F%0D%0ALocation:%20https://evil.com",
        // `+` is a space in a query: ` https://evil.com`.
        "+https://evil.com",
        // Mixed-case hex and a doubly encoded scheme separator.
        "%2f%2fevil.com",
        "https%253A%252F%252Fevil.com",
    ];

    // Act
    let mut accepted = Vec::new();
    for value in raw {
        if let Some(problem) = refused_without_trace(&app, value, value).await {
            accepted.push(problem);
        }
    }

    // Assert
    assert!(
        accepted.is_empty(),
        "not refused cleanly:\n{}",
        accepted.join("\n")
    );
}

#[tokio::test]
async fn safe_return_to_values_land_exactly_on_their_normalised_url() {
    // Arrange: paths resolve against the first allowed origin; absolute URLs keep their own.
    let app = spawn_app().await;
    let safe = [
        ("/", "http://localhost:3000/"),
        ("/a/b?c=d#e", "http://localhost:3000/a/b?c=d#e"),
        ("http://localhost:3000/x", "http://localhost:3000/x"),
        ("https://app.example.com/y", "https://app.example.com/y"),
        ("HTTPS://APP.EXAMPLE.COM:443/y", "https://app.example.com/y"),
        // Encoded slashes and tabs inside a path stay encoded: a path on the allowed origin.
        ("/%2F%2Fevil.com", "http://localhost:3000/%2F%2Fevil.com"),
        ("/%09/evil.com", "http://localhost:3000/%09/evil.com"),
        ("/a/../b", "http://localhost:3000/b"),
    ];

    for (return_to, expected) in safe {
        // Act
        let mut browser = Browser::default();
        let request = app.start_login(&mut browser, Some(return_to)).await;
        let callback = app.approve(&request, "alice").await;
        let response = app.callback(&mut browser, &callback).await;

        // Assert
        assert_eq!(response.status(), 302, "{return_to}");
        assert_eq!(location(&response), expected, "return_to {return_to:?}");
        assert!(browser.session().is_some(), "{return_to}");
    }
}

#[tokio::test]
async fn a_duplicated_return_to_is_refused_whichever_copy_is_evil() {
    // Arrange
    let app = spawn_app().await;

    for query in [
        "return_to=a&return_to=b",
        "return_to=%2Fok&return_to=%2F%2Fevil.com",
        "return_to=%2F%2Fevil.com&return_to=%2Fok",
    ] {
        // Act
        let response = app
            .get(&format!("/login?{query}"), &Browser::default())
            .await;

        // Assert
        assert!(!response.headers().contains_key("set-cookie"), "{query}");
        let body = assert_problem(response, 400).await;
        let kind = body["type"].as_str().unwrap();
        assert!(
            [INVALID_REQUEST, INVALID_RETURN_TO].contains(&kind),
            "{query}: {body}"
        );
    }
    assert!(app.redis.keys().await.is_empty());
}

#[tokio::test]
async fn malformed_or_oversized_callback_parameters_get_problems_and_consume_nothing() {
    // Arrange: a real pending login whose state the malformed callbacks reuse.
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, Some("/after")).await;
    let state = request.params["state"].clone();
    let keys_before = app.redis.keys().await;
    assert_eq!(keys_before.len(), 1, "one pending login");

    let queries = [
        format!("state={}&code=abc", "s".repeat(10 * 1024)),
        format!("state={state}&code={}", "c".repeat(5 * 1024)),
        format!("state={state}&code="),
        "state=%zz&code=abc".to_string(),
        "state=%ff%fe&code=abc".to_string(),
        format!("state=%ff%fe{}&code=abc", &state[2..]),
        format!("state={state}&state={state}&code=abc"),
        format!("state={state}&code=a&code=b"),
        "code=abc".to_string(),
        String::new(),
    ];

    for query in &queries {
        // Act
        let response = app.get(&format!("/callback?{query}"), &browser).await;

        // Assert
        let shown: String = query.chars().take(80).collect();
        assert!(!response.headers().contains_key("set-cookie"), "{shown}");
        let body = assert_problem(response, 400).await;
        assert_eq!(body["type"], INVALID_REQUEST, "{shown}: {body}");
        assert_eq!(app.redis.keys().await, keys_before, "{shown} touched Redis");
    }
    assert_eq!(app.session_rows().await, 0);
    assert_eq!(
        app.idp.stats().code_grants,
        0,
        "nothing reached the token endpoint"
    );

    // The pending login was not consumed by any of them: the real callback still finishes.
    let callback = app.approve(&request, "alice").await;
    let response = app.callback(&mut browser, &callback).await;
    assert_eq!(location(&response), "http://localhost:3000/after");
}

#[tokio::test]
async fn garbage_session_cookies_get_401_problems() {
    // Arrange
    let app = spawn_app().await;
    let _someone_else = app.logged_in_browser("alice").await;
    let keys_before = app.redis.keys().await;
    let many_cookies: String = (0..200)
        .map(|i| format!("c{i:03}={}", "v".repeat(29)))
        .collect::<Vec<_>>()
        .join("; ");
    assert!(many_cookies.len() > 7000 && many_cookies.len() < 8 * 1024);

    let headers = [
        "session=%00%ff".to_string(),
        format!("session={}", "A".repeat(5 * 1024)),
        format!("session={}", "A".repeat(44)),
        format!("session={}=", "A".repeat(42)),
        format!("session=\"{}\"", "A".repeat(43)),
        "session=".to_string(),
        "session".to_string(),
        ";;;=;=session=;".to_string(),
        many_cookies,
    ];

    for header in &headers {
        // Act
        let response = app
            .http
            .get(format!("{}/session", app.address))
            .header("cookie", header)
            .send()
            .await
            .unwrap();

        // Assert
        let shown: String = header.chars().take(60).collect();
        let body = assert_problem(response, 401).await;
        assert_eq!(body["type"], NOT_AUTHENTICATED, "{shown}");
    }
    // Raw bytes that are not even valid header text.
    let response = app
        .http
        .get(format!("{}/session", app.address))
        .header(
            "cookie",
            reqwest::header::HeaderValue::from_bytes(b"session=\xff\xfe\x80").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_problem(response, 401).await;

    assert_eq!(app.redis.keys().await, keys_before);
    assert_eq!(app.session_rows().await, 1);
}

#[tokio::test]
async fn a_malformed_or_crowded_cookie_header_does_not_hide_a_valid_session() {
    // Arrange
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let session = browser.session().unwrap().clone();
    let crowd: String = (0..200)
        .map(|i| format!("c{i:03}={}", "v".repeat(29)))
        .collect::<Vec<_>>()
        .join("; ");

    for header in [
        format!("broken; theme=\"dark; =; session={session}"),
        format!("{crowd}; session={session}"),
    ] {
        // Act
        let response = app
            .http
            .get(format!("{}/session", app.address))
            .header("cookie", &header)
            .send()
            .await
            .unwrap();

        // Assert
        assert_eq!(response.status(), 200, "{}", &header[..40]);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["user"]["sub"], "alice");
    }
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_problems() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let unknown = app.get("/no/such/route", &Browser::default()).await;
    let put = app
        .http
        .put(format!("{}/session", app.address))
        .send()
        .await
        .unwrap();
    let get_logout = app.get("/logout", &Browser::default()).await;

    // Assert
    assert_eq!(
        assert_problem(unknown, 404).await["type"],
        "urn:token-broker:problem:not-found"
    );
    assert_eq!(
        assert_problem(put, 405).await["type"],
        "urn:token-broker:problem:method-not-allowed"
    );
    assert_eq!(
        assert_problem(get_logout, 405).await["type"],
        "urn:token-broker:problem:method-not-allowed"
    );
}

/// Found by schemathesis (`scripts/test`, stage "schemathesis"): a 405 must carry `Allow`
/// (RFC 9110 §15.5.6), listing what the resource does serve.
#[tokio::test]
async fn a_wrong_method_gets_a_405_with_an_allow_header() {
    // Arrange
    let app = spawn_app().await;
    let trace = reqwest::Method::from_bytes(b"TRACE").unwrap();

    // Act
    let put_session = app
        .http
        .put(format!("{}/session", app.address))
        .send()
        .await
        .unwrap();
    let get_logout = app.get("/logout", &Browser::default()).await;
    let trace_auth = app
        .http
        .request(trace, format!("{}/auth", app.address))
        .send()
        .await
        .unwrap();

    // Assert
    for (response, allow) in [
        (put_session, "GET"),
        (get_logout, "POST"),
        (trace_auth, "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    ] {
        assert_eq!(response.headers()["allow"], allow);
        assert_problem(response, 405).await;
    }
}

#[tokio::test]
async fn a_15_kb_url_is_refused_with_a_client_error() {
    // Arrange
    let app = spawn_app().await;
    let path = format!("/login?return_to=%2F{}", "a".repeat(15 * 1024));

    // Act
    let response = app.get(&path, &Browser::default()).await;

    // Assert: our own length check answers 400 problem+json; actix could also refuse the head
    // itself (414/431) before our code runs. Either way a 4xx, never a 5xx.
    let status = response.status();
    assert!(status.is_client_error(), "{status}");
    assert_problem(response, 400).await;
    assert!(app.redis.keys().await.is_empty());
}
