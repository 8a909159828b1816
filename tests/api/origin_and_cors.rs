//! Cross-origin rules: `POST /logout` only from an allowed or the broker's own `Origin`, and CORS
//! with credentials for the allowed frontend origins only — never `*`, never a foreign origin.

use crate::helpers::*;

const ORIGIN_NOT_ALLOWED: &str = "urn:token-broker:problem:origin-not-allowed";

/// The refresh token of the session behind `browser`, decrypted from PostgreSQL.
async fn refresh_token_of(app: &TestApp, browser: &Browser) -> String {
    let id = token_broker::domain::SessionId::parse(browser.session().unwrap()).unwrap();
    let record = app
        .broker
        .sessions
        .find(&id.hash())
        .await
        .unwrap()
        .expect("stored session");
    record
        .refresh_token
        .expect("offline_access gives a refresh token")
        .secret()
        .to_string()
}

fn header<'r>(response: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn logout_from_a_foreign_null_or_missing_origin_is_refused_and_changes_nothing() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = app.logged_in_browser("alice").await;
    let refresh_token = refresh_token_of(&app, &browser).await;
    let revocations_before = app.idp.stats().revocations;
    let keys_before = app.redis.keys().await;

    for origin in [
        Some("https://evil.com"),
        Some("null"),
        None,
        Some(""),
        Some("http://localhost:3000.evil.com"),
        Some("http://localhost:3001"),
        Some("https://localhost:3000"),
        Some("http://127.0.0.1:1"),
        Some("https://app.example.com.evil.com"),
    ] {
        // Act: with and without `Accept: application/json`.
        for json in [true, false] {
            let response = app.post_logout(&mut browser, origin, json).await;

            // Assert
            assert!(
                !response.headers().contains_key("set-cookie"),
                "{origin:?} cleared the cookie"
            );
            let body = assert_problem(response, 403).await;
            assert_eq!(body["type"], ORIGIN_NOT_ALLOWED, "{origin:?}");
        }
    }
    assert_eq!(
        app.get_session(&browser).await.status(),
        200,
        "the session still works"
    );
    assert_eq!(
        app.idp.stats().revocations,
        revocations_before,
        "nothing was revoked"
    );
    assert!(app.idp.is_refresh_token_active(&refresh_token));
    assert_eq!(app.idp.stats().end_sessions, 0);
    assert_eq!(app.session_rows().await, 1);
    assert_eq!(app.redis.keys().await, keys_before);
}

#[tokio::test]
async fn logout_from_the_brokers_own_origin_or_an_allowed_origin_works() {
    // Arrange
    let app = spawn_app().await;
    let own = app.address.clone();

    for origin in [own.as_str(), FRONTEND, "https://app.example.com"] {
        let mut browser = app.logged_in_browser("alice").await;
        let refresh_token = refresh_token_of(&app, &browser).await;

        // Act
        let response = app.post_logout(&mut browser, Some(origin), true).await;

        // Assert
        assert_eq!(response.status(), 200, "{origin}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["logout_url"]
                .as_str()
                .unwrap()
                .starts_with(&app.idp.issuer()),
            "{body}"
        );
        assert!(browser.session().is_none(), "{origin}: cookie cleared");
        assert!(
            !app.idp.is_refresh_token_active(&refresh_token),
            "{origin}: refresh token revoked"
        );
    }
    assert_eq!(app.session_rows().await, 0);
}

#[tokio::test]
async fn a_form_logout_is_a_303_to_the_logout_url() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = app.logged_in_browser("alice").await;

    // Act
    let response = app.post_logout(&mut browser, Some(FRONTEND), false).await;

    // Assert
    assert_eq!(response.status(), 303);
    let logout_url = location(&response);
    assert!(
        logout_url.starts_with(&format!("{}/end-session?", app.idp.issuer())),
        "{logout_url}"
    );
    assert!(query_param(&logout_url, "id_token_hint").is_some());
    assert_eq!(
        query_param(&logout_url, "post_logout_redirect_uri").as_deref(),
        Some("http://localhost:3000/")
    );
    assert_eq!(
        query_param(&logout_url, "client_id").as_deref(),
        Some(CLIENT_ID)
    );
    assert!(browser.session().is_none());
    assert_eq!(app.session_rows().await, 0);
}

#[tokio::test]
async fn cors_allows_credentials_for_an_allowed_origin_only() {
    // Arrange
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let get_session = |origin: &'static str| {
        app.http
            .get(format!("{}/session", app.address))
            .header("cookie", browser.cookie_header())
            .header("origin", origin)
            .send()
    };

    // Act
    let allowed = get_session(FRONTEND).await.unwrap();
    let foreign = get_session("https://evil.com").await.unwrap();
    let null = get_session("null").await.unwrap();

    // Assert
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        Some(FRONTEND)
    );
    assert_eq!(
        header(&allowed, "access-control-allow-credentials"),
        Some("true")
    );
    for response in [&allowed, &foreign, &null] {
        // Vary: Origin on every response, or a shared cache could serve one origin's answer to another.
        let vary: Vec<&str> = response
            .headers()
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(
            vary.iter()
                .any(|v| v.to_ascii_lowercase().contains("origin")),
            "Vary: {vary:?}"
        );
    }
    for response in [&foreign, &null] {
        assert_eq!(header(response, "access-control-allow-origin"), None);
        assert_eq!(header(response, "access-control-allow-credentials"), None);
    }
}

#[tokio::test]
async fn a_401_to_an_allowed_origin_is_readable_by_the_frontend() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = app
        .http
        .get(format!("{}/session", app.address))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();

    // Assert: without CORS headers the SPA could not tell "logged out" from a network error.
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        header(&response, "access-control-allow-credentials"),
        Some("true")
    );
    assert_problem(response, 401).await;
}

async fn preflight(app: &TestApp, origin: &str, request_headers: &str) -> reqwest::Response {
    app.http
        .request(reqwest::Method::OPTIONS, format!("{}/logout", app.address))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", request_headers)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_gets_the_cors_headers() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = preflight(&app, FRONTEND, "content-type, x-csrf").await;

    // Assert
    assert_eq!(response.status(), 204);
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(FRONTEND)
    );
    assert_eq!(
        header(&response, "access-control-allow-credentials"),
        Some("true")
    );
    let methods = header(&response, "access-control-allow-methods").unwrap();
    assert!(methods.split(',').any(|m| m.trim() == "POST"), "{methods}");
    let allowed: Vec<String> = header(&response, "access-control-allow-headers")
        .unwrap()
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    assert!(
        allowed.contains(&"content-type".into()) && allowed.contains(&"x-csrf".into()),
        "{allowed:?}"
    );
    let vary = header(&response, "vary").unwrap_or("").to_ascii_lowercase();
    assert!(vary.contains("origin"), "Vary: {vary}");
}

#[tokio::test]
async fn a_preflight_from_a_foreign_origin_is_refused() {
    // Arrange
    let app = spawn_app().await;

    for origin in [
        "https://evil.com",
        "null",
        "http://localhost:3000.evil.com",
        "https://localhost:3000",
    ] {
        // Act
        let response = preflight(&app, origin, "content-type, x-csrf").await;

        // Assert
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            None,
            "{origin}"
        );
        assert_eq!(
            header(&response, "access-control-allow-credentials"),
            None,
            "{origin}"
        );
        assert_eq!(
            header(&response, "access-control-allow-headers"),
            None,
            "{origin}"
        );
        let body = assert_problem(response, 403).await;
        assert_eq!(body["type"], ORIGIN_NOT_ALLOWED);
    }
}

#[tokio::test]
async fn a_preflight_does_not_echo_headers_outside_the_allowlist() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = preflight(
        &app,
        FRONTEND,
        "x-csrf, authorization, cookie, x-forwarded-host, X-Evil",
    )
    .await;

    // Assert
    assert_eq!(response.status(), 204);
    let allowed: Vec<String> = header(&response, "access-control-allow-headers")
        .unwrap_or("")
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    assert_eq!(allowed, ["x-csrf"]);
}

#[tokio::test]
async fn no_response_ever_allows_every_origin() {
    // Arrange
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let mut responses = Vec::new();

    // Act: every route, with allowed, foreign, `*` and absent Origins.
    for origin in [
        Some(FRONTEND),
        Some("https://evil.com"),
        Some("*"),
        Some("null"),
        None,
    ] {
        for path in [
            "/session",
            "/login",
            "/healthz",
            "/readyz",
            "/openapi.json",
            "/nope",
        ] {
            let mut request = app
                .http
                .get(format!("{}{path}", app.address))
                .header("cookie", browser.cookie_header());
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            responses.push((
                format!("GET {path} from {origin:?}"),
                request.send().await.unwrap(),
            ));
        }
        if let Some(origin) = origin {
            responses.push((
                format!("preflight from {origin}"),
                preflight(&app, origin, "x-csrf").await,
            ));
        }
    }

    // Assert
    for (what, response) in &responses {
        let acao = header(response, "access-control-allow-origin");
        assert_ne!(acao, Some("*"), "{what}");
        if let Some(acao) = acao {
            assert!(
                [FRONTEND, "https://app.example.com"].contains(&acao),
                "{what}: {acao}"
            );
        }
        assert!(
            response.status().as_u16() < 500,
            "{what}: {}",
            response.status()
        );
    }
}

#[tokio::test]
async fn an_origin_header_that_is_not_a_serialized_origin_is_neither_accepted_nor_echoed() {
    // Arrange: browsers send `scheme://host[:port]` exactly (RFC 6454 §6.1); anything else is
    // forged, and must not be parsed into an allowed origin and reflected back.
    let app = spawn_app().await;
    let mut browser = app.logged_in_browser("alice").await;

    for origin in [
        "http://evil.com@localhost:3000",
        "http://localhost:3000/",
        "http://localhost:3000/path?x",
    ] {
        // Act
        let session = app
            .http
            .get(format!("{}/session", app.address))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        let preflight = preflight(&app, origin, "x-csrf").await;
        let logout = app.post_logout(&mut browser, Some(origin), true).await;

        // Assert
        assert_eq!(
            header(&session, "access-control-allow-origin"),
            None,
            "{origin} echoed"
        );
        assert_problem(preflight, 403).await;
        assert_problem(logout, 403).await;
    }
    assert_eq!(app.get_session(&browser).await.status(), 200);
}

#[tokio::test]
async fn every_kind_of_answer_carries_the_security_headers_and_its_request_id() {
    // Arrange: one layer answers preflights itself and wraps everything else; each branch of it.
    let app = spawn_app().await;
    let session = format!("{}/session", app.address);
    let unknown = format!("{}/no-such-route", app.address);
    let cases = [
        (
            "a 401",
            app.http.get(&session).header("origin", FRONTEND),
            401,
        ),
        ("a 404", app.http.get(&unknown), 404),
        (
            "a preflight",
            app.http
                .request(reqwest::Method::OPTIONS, format!("{}/logout", app.address))
                .header("origin", FRONTEND)
                .header("access-control-request-method", "POST"),
            204,
        ),
        (
            "a refused preflight",
            app.http
                .request(reqwest::Method::OPTIONS, format!("{}/logout", app.address))
                .header("origin", "https://evil.example")
                .header("access-control-request-method", "POST"),
            403,
        ),
        (
            "the OpenAPI document",
            app.http.get(format!("{}/openapi.json", app.address)),
            200,
        ),
    ];

    for (what, request, status) in cases {
        for (sent_id, kept) in [
            (Some("plain-id_1.2"), true),
            (Some("has space"), false),
            (Some(&*"x".repeat(65)), false),
            (None, false),
        ] {
            // Act
            let request = request.try_clone().unwrap();
            let request = match sent_id {
                Some(id) => request.header("x-request-id", id),
                None => request,
            };
            let response = request.send().await.unwrap();

            // Assert
            assert_eq!(response.status(), status, "{what}");
            for (name, value) in [
                ("cache-control", "no-store"),
                ("referrer-policy", "no-referrer"),
                ("x-frame-options", "DENY"),
                ("x-content-type-options", "nosniff"),
            ] {
                assert_eq!(header(&response, name), Some(value), "{what}: {name}");
            }
            let echoed = header(&response, "x-request-id").expect("x-request-id");
            if kept {
                assert_eq!(Some(echoed), sent_id, "{what}");
            } else {
                assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{what}: {echoed}");
            }
            let vary = header(&response, "vary").unwrap_or("").to_ascii_lowercase();
            assert!(vary.contains("origin"), "{what}: Vary: {vary}");
        }
    }
}
