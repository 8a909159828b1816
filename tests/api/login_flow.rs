//! The happy path of login, session and logout, and what ends up stored.

use crate::helpers::*;

#[tokio::test]
async fn a_full_login_creates_a_session_the_frontend_can_read() {
    let app = spawn_app().await;
    let mut browser = Browser::default();

    // /login redirects to the IdP with every parameter of an authorization-code + PKCE request.
    let request = app
        .start_login(&mut browser, Some("/dashboard?tab=2"))
        .await;
    let p = &request.params;
    assert_eq!(p["response_type"], "code");
    assert_eq!(p["client_id"], CLIENT_ID);
    assert_eq!(p["redirect_uri"], format!("{}/callback", app.address));
    assert_eq!(p["scope"], "openid profile email offline_access");
    assert_eq!(p["code_challenge_method"], "S256");
    assert_eq!(p["code_challenge"].len(), 43);
    assert_eq!(p["state"].len(), 43);
    assert_eq!(p["nonce"].len(), 43);
    assert!(request
        .url
        .as_str()
        .starts_with(&format!("{}/authorize?", app.idp.issuer())));

    let callback = app.approve(&request, "alice").await;
    let response = app.callback(&mut browser, &callback).await;
    assert_eq!(response.status(), 302);
    assert_eq!(location(&response), format!("{FRONTEND}/dashboard?tab=2"));

    let set_cookie: Vec<String> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session_cookie = set_cookie
        .iter()
        .find(|c| c.starts_with("session="))
        .expect("session cookie");
    assert!(session_cookie.contains("HttpOnly"), "{session_cookie}");
    assert!(
        session_cookie.contains("SameSite=Strict"),
        "{session_cookie}"
    );
    assert!(session_cookie.contains("Path=/"), "{session_cookie}");
    assert!(!session_cookie.contains("Domain"), "{session_cookie}");
    assert!(
        !session_cookie.contains("Secure"),
        "plain-http development cookie must not be Secure"
    );

    let session = app.get_session(&browser).await;
    assert_eq!(session.status(), 200);
    for (header, value) in [
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(session.headers()[header], value, "{header}");
    }
    assert!(session.headers().contains_key("x-request-id"));
    let body: serde_json::Value = session.json().await.unwrap();
    assert_eq!(body["authenticated"], true);
    assert_eq!(body["user"]["sub"], "alice");
    assert_eq!(body["user"]["email"], "alice@example.com");
    assert_eq!(body["user"]["preferred_username"], "alice");
    assert!(chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).is_ok());
    let text = body.to_string();
    for forbidden in ["token", "nonce", "sid", "refresh"] {
        assert!(
            !text.contains(forbidden),
            "/session leaks `{forbidden}`: {text}"
        );
    }
    assert_eq!(app.session_rows().await, 1);
    assert_eq!(app.idp.stats().code_grants, 1);
}

#[tokio::test]
async fn two_tabs_of_one_browser_can_log_in_at_the_same_time() {
    let app = spawn_app().await;
    let mut browser = Browser::default();

    let first = app.start_login(&mut browser, Some("/tab-one")).await;
    let binding_after_first = browser.cookies["login-binding"].clone();
    let second = app.start_login(&mut browser, Some("/tab-two")).await;
    assert_eq!(
        browser.cookies["login-binding"], binding_after_first,
        "the binding cookie is reused"
    );
    assert_ne!(first.params["state"], second.params["state"]);

    // The second tab finishes first; the first tab must still be able to finish.
    let second_callback = app.approve(&second, "alice").await;
    let response = app.callback(&mut browser, &second_callback).await;
    assert_eq!(location(&response), format!("{FRONTEND}/tab-two"));
    let first_session = browser.session().cloned().unwrap();

    let first_callback = app.approve(&first, "alice").await;
    let response = app.callback(&mut browser, &first_callback).await;
    assert_eq!(location(&response), format!("{FRONTEND}/tab-one"));
    assert_ne!(
        browser.session().unwrap(),
        &first_session,
        "each login gets a new session ID"
    );
    assert_eq!(app.get_session(&browser).await.status(), 200);
}

#[tokio::test]
async fn logout_ends_the_session_revokes_its_tokens_and_signs_out_at_the_idp() {
    let app = spawn_app().await;
    let mut browser = app.logged_in_browser("bob").await;
    let old_cookie = browser.session().cloned().unwrap();
    let record = app
        .broker
        .sessions
        .find(
            &token_broker::domain::SessionId::parse(browser.session().unwrap())
                .unwrap()
                .hash(),
        )
        .await
        .unwrap()
        .expect("stored session");
    let refresh_token = record
        .refresh_token
        .clone()
        .expect("offline_access gives a refresh token");
    assert!(app.idp.is_refresh_token_active(refresh_token.secret()));

    let response = app.post_logout(&mut browser, Some(FRONTEND), true).await;
    assert_eq!(response.status(), 200);
    let cleared = response.headers().get_all("set-cookie").iter().any(|c| {
        let c = c.to_str().unwrap();
        c.starts_with("session=") && c.contains("Max-Age=0")
    });
    assert!(cleared, "logout clears the session cookie");
    let body: serde_json::Value = response.json().await.unwrap();
    let logout_url = body["logout_url"].as_str().unwrap();
    assert!(
        logout_url.starts_with(&format!("{}/end-session?", app.idp.issuer())),
        "{logout_url}"
    );
    assert_eq!(
        query_param(logout_url, "id_token_hint").as_deref(),
        Some(record.id_token.secret())
    );
    assert_eq!(
        query_param(logout_url, "post_logout_redirect_uri").as_deref(),
        Some("http://localhost:3000/")
    );
    assert_eq!(
        query_param(logout_url, "client_id").as_deref(),
        Some(CLIENT_ID)
    );

    assert!(
        !app.idp.is_refresh_token_active(refresh_token.secret()),
        "refresh token revoked (RFC 7009)"
    );
    assert_eq!(app.session_rows().await, 0);
    // The old cookie, replayed after logout, is worth nothing.
    let mut replay = Browser::default();
    replay.cookies.insert("session".into(), old_cookie);
    assert_problem(app.get_session(&replay).await, 401).await;
}
