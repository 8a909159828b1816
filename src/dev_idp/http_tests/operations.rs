//! The test controls, revocation, end-session, key rotation and the standalone server.

use serde_json::json;

use super::*;

#[actix_web::test]
async fn controls_break_the_token_endpoint_on_purpose() {
    let idp = new_idp(options());
    let app = app!(idp);
    let exchange = |app_code: String| code_exchange(&app_code).to_request();

    idp.controls().set_token_status(Some(502));
    let code = login!(app, "alice").redirect_param("code").expect("code");
    let reply = send(&app, exchange(code)).await;
    assert_eq!(
        (reply.status, reply.json()["error"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("server_error"))
    );
    idp.controls().reset();

    idp.controls()
        .set_id_token_claims_patch(Some(json!({"nonce": "evil", "azp": null})));
    idp.controls().set_signing_alg(SigningAlg::Es256);
    let code = login!(app, "alice").redirect_param("code").expect("code");
    let tokens = send(&app, exchange(code)).await.json();
    let id_token = tokens["id_token"].as_str().expect("id_token");
    assert_eq!(
        jsonwebtoken::decode_header(id_token).expect("header").alg,
        jsonwebtoken::Algorithm::ES256
    );
    let claims = verify(&idp.jwks(), id_token);
    assert_eq!(claims["nonce"], "evil");
    assert!(claims.get("azp").is_none());

    let forged = std::sync::Arc::new(|context: &IdTokenContext| tamper(&context.signed));
    idp.controls().set_id_token_override(Some(forged));
    idp.controls().set_response_iss(IssMode::Omit);
    let response = login!(app, "alice");
    assert_eq!(response.redirect_param("iss"), None);
    let tokens = send(
        &app,
        exchange(response.redirect_param("code").expect("code")),
    )
    .await
    .json();
    assert!(crate::dev_idp::keys::verify_own_token(
        &idp.jwks(),
        tokens["id_token"].as_str().expect("id"),
        ISSUER,
        "broker"
    )
    .is_none());

    idp.controls().reset();
    idp.controls().set_refresh_error(Some("invalid_grant"));
    let code = login!(app, "alice").redirect_param("code").expect("code");
    let refresh_token = send(&app, exchange(code)).await.json()["refresh_token"]
        .as_str()
        .expect("rt")
        .to_owned();
    let refused = send(&app, refresh(&refresh_token).to_request()).await;
    assert_eq!(refused.json()["error"], "invalid_grant");
    assert!(
        idp.is_refresh_token_active(&refresh_token),
        "an injected failure does not use the token"
    );
}

#[actix_web::test]
async fn revocation_and_end_session() {
    let idp = new_idp(options());
    let app = app!(idp);
    let code = login!(app, "alice").redirect_param("code").expect("code");
    let tokens = send(&app, code_exchange(&code).to_request()).await.json();
    let refresh_token = tokens["refresh_token"].as_str().expect("rt");
    let access_token = tokens["access_token"].as_str().expect("at");

    for token in [refresh_token, access_token, "unknown"] {
        let revoke = form(
            "/dev-idp/revoke",
            format!("token={token}&token_type_hint=refresh_token"),
        )
        .insert_header(basic());
        assert_eq!(send(&app, revoke.to_request()).await.status, StatusCode::OK);
    }
    assert!(!idp.is_refresh_token_active(refresh_token));
    assert!(idp.is_access_token_revoked(access_token));
    let unauthenticated = send(
        &app,
        form("/dev-idp/revoke", format!("token={refresh_token}")).to_request(),
    )
    .await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    assert_eq!(idp.stats().revocations, 3);

    let id_token = tokens["id_token"].as_str().expect("id");
    let sid = verify(&idp.jwks(), id_token)["sid"]
        .as_str()
        .expect("sid")
        .to_owned();
    let end = |query: String| {
        TestRequest::get()
            .uri(&format!("/dev-idp/end-session?{query}"))
            .to_request()
    };
    let unregistered = send(
        &app,
        end(format!(
            "id_token_hint={id_token}&post_logout_redirect_uri=http://evil.test/"
        )),
    )
    .await;
    assert_eq!(unregistered.status, StatusCode::BAD_REQUEST);
    let forged = send(&app, end(format!("id_token_hint={}", tamper(id_token)))).await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);
    assert!(idp.is_session_active(&sid));

    let signed_out = send(
        &app,
        end(format!(
            "id_token_hint={id_token}&post_logout_redirect_uri={LOGGED_OUT}&state=s%26t"
        )),
    )
    .await;
    assert_eq!(signed_out.status, StatusCode::OK);
    assert!(signed_out.body.contains("You are signed out"));
    assert!(
        signed_out
            .body
            .contains("href=\"http://app.test/logged-out?state=s%26t\""),
        "{}",
        signed_out.body
    );
    assert!(!idp.is_session_active(&sid));
    assert_eq!(idp.stats().end_sessions, 3);
}

#[actix_web::test]
async fn key_rotation_keeps_or_drops_the_old_key() {
    let idp = new_idp(options());
    let old_kid = idp.current_kid();
    let old_token =
        idp.sign(&json!({"iss": ISSUER, "aud": "broker", "sub": "alice", "exp": 4_000_000_000u64}));

    idp.rotate_signing_key(true);
    assert_ne!(idp.current_kid(), old_kid);
    assert_eq!(idp.jwks().keys.len(), 3);
    assert!(idp.jwks().find(&old_kid).is_some());
    assert_eq!(verify(&idp.jwks(), &old_token)["sub"], "alice");

    idp.rotate_signing_key(false);
    assert_eq!(
        idp.jwks().keys.len(),
        3,
        "the key just replaced is dropped, the older retired one stays"
    );
    assert!(idp
        .rsa_public_key_pem()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let new_token = idp.sign(&json!({"iss": ISSUER, "aud": "broker", "sub": "bob"}));
    assert_eq!(
        jsonwebtoken::decode_header(&new_token).expect("header").kid,
        Some(idp.current_kid())
    );
}

#[actix_web::test]
async fn a_standalone_server_serves_discovery_and_logout_tokens_reach_the_client() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let issuer = format!("http://{}", listener.local_addr().expect("addr"));
    let idp = DevIdp::new(url::Url::parse(&issuer).expect("url"), options());
    let server = idp.serve(listener).expect("serve");
    let handle = server.handle();
    tokio::spawn(server);

    let document: Value = reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
        .await
        .expect("discovery")
        .json()
        .await
        .expect("json");
    assert_eq!(document["issuer"], issuer.as_str());

    // The client's back-channel logout endpoint: records what it receives.
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<String>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!(
        "http://{}/backchannel-logout",
        listener.local_addr().expect("addr")
    );
    let receiver = actix_web::HttpServer::new(move || {
        let sender = sender.clone();
        App::new().route(
            "/backchannel-logout",
            actix_web::web::post().to(move |body: String| {
                let _ = sender.send(body);
                async { actix_web::HttpResponse::Ok().finish() }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .expect("listen")
    .run();
    let receiver_handle = receiver.handle();
    tokio::spawn(receiver);

    let status = idp
        .send_backchannel_logout(&uri, "alice", Some("sid-1"))
        .await
        .expect("sent");
    assert_eq!(status, 200);
    let body = received.recv().await.expect("a logout request");
    let token = url::form_urlencoded::parse(body.as_bytes())
        .find(|(name, _)| name == "logout_token")
        .map(|(_, value)| value.into_owned())
        .expect("logout_token");
    let claims = crate::dev_idp::keys::verify_own_token(&idp.jwks(), &token, &issuer, "broker")
        .expect("signed by the IdP");
    assert_eq!(
        (claims["sub"].as_str(), claims["sid"].as_str()),
        (Some("alice"), Some("sid-1"))
    );
    assert!(claims["events"]
        .get("http://schemas.openid.net/event/backchannel-logout")
        .is_some());
    handle.stop(false).await;
    receiver_handle.stop(false).await;
}
