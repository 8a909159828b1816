//! Discovery, the authorization-code flow, refresh rotation and client authentication.

use serde_json::json;

use super::*;

#[actix_web::test]
async fn discovery_and_jwks_describe_the_provider() {
    let idp = new_idp(options());
    let app = app!(idp);

    let discovery = send(
        &app,
        TestRequest::get()
            .uri("/dev-idp/.well-known/openid-configuration")
            .to_request(),
    )
    .await;
    assert_eq!(discovery.status, StatusCode::OK);
    let document = discovery.json();
    assert_eq!(document["issuer"], ISSUER);
    assert_eq!(document["token_endpoint"], "http://idp.test/dev-idp/token");
    assert_eq!(document["jwks_uri"], "http://idp.test/dev-idp/jwks");
    assert_eq!(
        document["token_endpoint_auth_methods_supported"],
        json!(["client_secret_basic", "client_secret_post"])
    );
    assert_eq!(
        document["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(
        document["authorization_response_iss_parameter_supported"],
        true
    );

    let jwks: JwkSet = serde_json::from_str(
        &send(&app, TestRequest::get().uri("/dev-idp/jwks").to_request())
            .await
            .body,
    )
    .expect("a JWK set");
    assert_eq!(jwks.keys.len(), 2);

    idp.controls().set_discovery_status(Some(503));
    let failing = send(
        &app,
        TestRequest::get()
            .uri("/dev-idp/.well-known/openid-configuration")
            .to_request(),
    )
    .await;
    assert_eq!(failing.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        (idp.stats().discovery_requests, idp.stats().jwks_requests),
        (2, 1)
    );

    let outside = send(&app, TestRequest::get().uri("/jwks").to_request()).await;
    assert_eq!(
        outside.status,
        StatusCode::NOT_FOUND,
        "only the prefix is served"
    );
}

#[actix_web::test]
async fn code_flow_refresh_rotation_and_reuse_detection() {
    let idp = new_idp(options());
    let app = app!(idp);

    let page = send(
        &app,
        TestRequest::get()
            .uri(&format!("/dev-idp/authorize?{}", authorize_params(&[])))
            .to_request(),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains("action=\"http://idp.test/dev-idp/authorize\""),
        "{}",
        page.body
    );
    assert!(page
        .body
        .contains("name=\"code_challenge\" value=\"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM\""));

    let response = login!(app, "alice");
    assert_eq!(response.status, StatusCode::FOUND);
    assert_eq!(response.redirect_param("state").as_deref(), Some("st-1"));
    assert_eq!(response.redirect_param("iss").as_deref(), Some(ISSUER));
    let code = response.redirect_param("code").expect("a code");

    let tokens = send(&app, code_exchange(&code).to_request()).await;
    assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.body);
    assert_eq!(
        tokens
            .headers
            .get(header::CACHE_CONTROL)
            .map(|v| v.as_bytes()),
        Some(&b"no-store"[..])
    );
    let tokens = tokens.json();
    assert_eq!(
        (tokens["token_type"].as_str(), tokens["expires_in"].as_u64()),
        (Some("Bearer"), Some(300))
    );
    let jwks = idp.jwks();
    let id = verify(&jwks, tokens["id_token"].as_str().expect("id_token"));
    assert_eq!(
        (id["sub"].as_str(), id["nonce"].as_str(), id["azp"].as_str()),
        (Some("alice"), Some("n-1"), Some("broker"))
    );
    assert_eq!(id["email"], "alice@example.com");
    assert!(idp.is_session_active(id["sid"].as_str().expect("sid")));
    let access = verify(
        &jwks,
        tokens["access_token"].as_str().expect("access_token"),
    );
    assert_eq!(
        (access["client_id"].as_str(), access["scope"].as_str()),
        (Some("broker"), Some(SCOPE))
    );

    let replay = send(&app, code_exchange(&code).to_request()).await;
    assert_eq!(replay.json()["error"], "invalid_grant");

    // The replay revoked the refresh token the code produced: log in again for a fresh one.
    let first_refresh = tokens["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned();
    assert!(!idp.is_refresh_token_active(&first_refresh));
    let code = login!(app, "bob").redirect_param("code").expect("code");
    let first = send(&app, code_exchange(&code).to_request()).await.json()["refresh_token"]
        .as_str()
        .expect("rt")
        .to_owned();

    let rotated = send(&app, refresh(&first).to_request()).await.json();
    let second = rotated["refresh_token"]
        .as_str()
        .expect("a new refresh token")
        .to_owned();
    assert_ne!(first, second);
    assert_eq!(
        verify(&jwks, rotated["id_token"].as_str().expect("id_token"))["sub"],
        "bob"
    );
    assert!(!idp.is_refresh_token_active(&first) && idp.is_refresh_token_active(&second));

    let reuse = send(&app, refresh(&first).to_request()).await;
    assert_eq!(
        (reuse.status, reuse.json()["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    assert!(
        !idp.is_refresh_token_active(&second),
        "reuse revokes the family"
    );

    let stats = idp.stats();
    assert_eq!((stats.code_grants, stats.code_grants_rejected), (3, 1));
    assert_eq!(
        (stats.refresh_grants, stats.refresh_grants_rejected),
        (2, 1)
    );
    assert_eq!(stats.authorize_requests, 3);
}

#[actix_web::test]
async fn authorization_errors_never_redirect_to_unregistered_uris() {
    let idp = new_idp(options());
    let app = app!(idp);
    let get = |overrides: &[(&str, &str)]| {
        TestRequest::get()
            .uri(&format!(
                "/dev-idp/authorize?{}",
                authorize_params(overrides)
            ))
            .to_request()
    };

    for bad in [
        [("redirect_uri", "http://evil.test/callback")],
        [("client_id", "other")],
        [("redirect_uri", "")],
    ] {
        let page = send(&app, get(&bad)).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST);
        assert!(page.headers.get(header::LOCATION).is_none());
    }

    for (bad, error) in [
        (("code_challenge_method", "plain"), "invalid_request"),
        (("code_challenge_method", ""), "invalid_request"),
        (("code_challenge", ""), "invalid_request"),
        (("scope", "profile"), "invalid_scope"),
        (("response_type", "token"), "unsupported_response_type"),
        (("nonce", ""), "invalid_request"),
        (("prompt", "none"), "login_required"),
    ] {
        let reply = send(&app, get(&[bad])).await;
        assert_eq!(reply.status, StatusCode::FOUND, "{bad:?}");
        assert_eq!(
            reply.redirect_param("error").as_deref(),
            Some(error),
            "{bad:?}"
        );
        assert_eq!(reply.redirect_param("state").as_deref(), Some("st-1"));
        assert_eq!(reply.redirect_param("iss").as_deref(), Some(ISSUER));
    }

    let cancel = send(
        &app,
        form(
            "/dev-idp/authorize",
            format!("{}&cancel=1", authorize_params(&[])),
        )
        .to_request(),
    )
    .await;
    assert_eq!(
        cancel.redirect_param("error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(
        cancel.redirect_param("error_description").as_deref(),
        Some("the user cancelled")
    );

    let bad_name = login!(app, "%3Cb%3E");
    assert_eq!(bad_name.status, StatusCode::BAD_REQUEST);
    assert!(
        bad_name.body.contains("value=\"&lt;b&gt;\""),
        "the form comes back, escaped: {}",
        bad_name.body
    );

    // An authorization request sent by POST, without the form's fields, gets the form.
    let posted = send(
        &app,
        form("/dev-idp/authorize", authorize_params(&[])).to_request(),
    )
    .await;
    assert_eq!(posted.status, StatusCode::OK);
    assert!(posted.body.contains("name=\"username\""));
}

#[actix_web::test]
async fn client_authentication_by_each_method() {
    let idp = new_idp(options());
    let app = app!(idp);
    let code = login!(app, "alice").redirect_param("code").expect("code");

    let wrong = form(
        "/dev-idp/token",
        format!("grant_type=authorization_code&code={code}"),
    )
    .insert_header((
        header::AUTHORIZATION,
        format!("Basic {}", STANDARD.encode("broker:wrong")),
    ));
    let reply = send(&app, wrong.to_request()).await;
    assert_eq!(
        (reply.status, reply.json()["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );

    let secret = url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect::<String>();
    let post = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={REDIRECT}&code_verifier={VERIFIER}&client_id=broker&client_secret={secret}"
    );
    assert_eq!(
        send(&app, form("/dev-idp/token", post).to_request())
            .await
            .status,
        StatusCode::OK
    );

    let public = new_idp(DevIdpOptions {
        client_secret: None,
        ..options()
    });
    let app = app!(public);
    let code = login!(app, "alice").redirect_param("code").expect("code");
    let none = format!("grant_type=authorization_code&code={code}&redirect_uri={REDIRECT}&code_verifier={VERIFIER}&client_id=broker");
    assert_eq!(
        send(&app, form("/dev-idp/token", none).to_request())
            .await
            .status,
        StatusCode::OK
    );
    let unknown = send(
        &app,
        form(
            "/dev-idp/token",
            "grant_type=password&client_id=broker".into(),
        )
        .to_request(),
    )
    .await;
    assert_eq!(unknown.json()["error"], "unsupported_grant_type");
}

#[test]
fn auth_methods_follow_the_kind_of_client() {
    let advertised = |options: DevIdpOptions| {
        let idp = new_idp(options);
        metadata::document(&idp)["token_endpoint_auth_methods_supported"].clone()
    };
    let defaults = DevIdpOptions {
        keys: Some(test_keys()),
        ..DevIdpOptions::default()
    };
    assert_eq!(advertised(defaults.clone()), json!(["none"]));
    let confidential = DevIdpOptions {
        client_secret: Some("s".into()),
        ..defaults.clone()
    };
    assert_eq!(
        advertised(confidential.clone()),
        json!(["client_secret_basic"])
    );
    let with_none = DevIdpOptions {
        token_endpoint_auth_methods: vec!["none".into(), "client_secret_post".into()],
        ..confidential
    };
    assert_eq!(advertised(with_none), json!(["client_secret_post"]));
    let public = DevIdpOptions {
        token_endpoint_auth_methods: vec!["client_secret_basic".into()],
        ..defaults
    };
    assert_eq!(advertised(public), json!(["none"]));
}
