//! Attacks on ID-token validation (OpenID Connect Core §3.1.3.7): forged, tampered, misaddressed,
//! stale and replayed ID tokens, each of which must end in `login_error=invalid_token` with no
//! session; plus the legitimate variants (ES256, key rotation, a token without `kid`) that must
//! still log in.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use token_broker::dev_idp::{IdTokenContext, IssMode, SigningAlg};
use token_broker::domain::SessionId;

use crate::helpers::*;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The ID tokens of every token response are replaced by what `forge` makes of the real one.
fn forge_id_tokens(
    app: &TestApp,
    forge: impl Fn(&IdTokenContext) -> String + Send + Sync + 'static,
) {
    app.idp
        .controls()
        .set_id_token_override(Some(Arc::new(forge)));
}

/// A login as alice with whatever ID token the IdP is set up to issue.
async fn attempt_login(app: &TestApp) -> (Browser, reqwest::Response) {
    let mut browser = Browser::default();
    let response = app.login_as(&mut browser, "alice").await;
    (browser, response)
}

/// Logs in with the ID-token claims patched as given and asserts the broker refuses the token.
async fn assert_patched_claims_are_refused(patch: Value) {
    // Arrange
    let app = spawn_app().await;
    app.idp.controls().set_id_token_claims_patch(Some(patch));

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
    assert_eq!(
        app.idp.stats().code_grants,
        1,
        "the refusal happened after the code exchange"
    );
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.payload.signature` of a compact JWS.
fn split(token: &str) -> (String, String, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS");
    (parts[0].into(), parts[1].into(), parts[2].into())
}

/// The stored ID token of a browser's session.
async fn stored_id_token(app: &TestApp, browser: &Browser) -> String {
    let id = SessionId::parse(browser.session().expect("session cookie")).unwrap();
    let record = app
        .broker
        .sessions
        .find(&id.hash())
        .await
        .unwrap()
        .expect("stored session");
    record.id_token.secret().to_string()
}

/// A fresh P-256 key the IdP does not publish, and its JWK.
fn foreign_es256_key(kid: &str) -> (EncodingKey, Jwk) {
    use p256::pkcs8::EncodePrivateKey;
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let key = EncodingKey::from_ec_der(secret.to_pkcs8_der().unwrap().as_bytes());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    (key, jwk)
}

/// A fresh RSA-2048 key the IdP does not publish, and its JWK.
fn foreign_rs256_key(kid: &str) -> (EncodingKey, Jwk) {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let key = EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.into());
    (key, jwk)
}

/// The broker, with an issuer of our own in front of the test IdP: its discovery document is the
/// IdP's except for `issuer` and `jwks_uri`, and its JWKS is `jwks(the IdP's keys)`. This is how
/// a test signs ID tokens with a published key whose private half it holds. The IdP's
/// authorization responses and ID-token claims name this issuer.
async fn spawn_app_with_own_jwks(jwks: impl FnOnce(Vec<Jwk>) -> Vec<Jwk>) -> (TestApp, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let issuer = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let app = spawn_app_with(|s| s.settings.oidc_issuer = Some(issuer.clone())).await;

    let idp = app.idp.issuer();
    let get = |path: &str| app.http.get(format!("{idp}{path}")).send();
    let mut discovery: Value = get("/.well-known/openid-configuration")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    discovery["issuer"] = json!(issuer);
    discovery["jwks_uri"] = json!(format!("{issuer}/jwks"));
    let idp_keys: JwkSet = get("/jwks").await.unwrap().json().await.unwrap();
    let published = json!({ "keys": jwks(idp_keys.keys) });

    let server = actix_web::HttpServer::new(move || {
        let (discovery, published) = (discovery.clone(), published.clone());
        actix_web::App::new()
            .route(
                "/.well-known/openid-configuration",
                actix_web::web::get().to(move || {
                    let discovery = discovery.clone();
                    async move { actix_web::HttpResponse::Ok().json(discovery) }
                }),
            )
            .route(
                "/jwks",
                actix_web::web::get().to(move || {
                    let published = published.clone();
                    async move { actix_web::HttpResponse::Ok().json(published) }
                }),
            )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    app.idp
        .controls()
        .set_response_iss(IssMode::Value(issuer.clone()));
    (app, issuer)
}

/// ID tokens with the claims the IdP would have issued, `iss` set to `issuer`, signed by `key`
/// with a header that has no `kid`.
fn forge_kidless_rs256(app: &TestApp, issuer: &str, key: EncodingKey) {
    let issuer = issuer.to_string();
    forge_id_tokens(app, move |ctx| {
        let mut claims = ctx.claims.clone();
        claims["iss"] = json!(issuer);
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
    });
}

#[tokio::test]
async fn an_id_token_with_another_logins_nonce_is_refused() {
    assert_patched_claims_are_refused(
        json!({ "nonce": "the-nonce-of-another-login-AAAAAAAAAAAAAAAAAA" }),
    )
    .await;
}

#[tokio::test]
async fn an_id_token_without_a_nonce_is_refused() {
    assert_patched_claims_are_refused(json!({ "nonce": null })).await;
}

#[tokio::test]
async fn an_id_token_from_another_issuer_is_refused() {
    assert_patched_claims_are_refused(json!({ "iss": "https://evil.example.com" })).await;
}

#[tokio::test]
async fn an_id_token_for_another_audience_is_refused() {
    assert_patched_claims_are_refused(json!({ "aud": "another-client", "azp": null })).await;
}

#[tokio::test]
async fn an_id_token_with_several_audiences_and_no_azp_is_refused() {
    assert_patched_claims_are_refused(json!({ "aud": [CLIENT_ID, "another-client"], "azp": null }))
        .await;
}

#[tokio::test]
async fn an_id_token_whose_azp_names_another_client_is_refused() {
    // Our client is in `aud`, but the token was issued to (authorized for) someone else.
    assert_patched_claims_are_refused(
        json!({ "aud": [CLIENT_ID, "another-client"], "azp": "another-client" }),
    )
    .await;
}

#[tokio::test]
async fn an_id_token_expired_beyond_the_leeway_is_refused() {
    // 60 s leeway: expired two minutes ago is expired.
    let now = now();
    assert_patched_claims_are_refused(json!({ "iat": now - 600, "exp": now - 120 })).await;
}

#[tokio::test]
async fn an_id_token_issued_in_the_future_beyond_the_leeway_is_refused() {
    let now = now();
    assert_patched_claims_are_refused(json!({ "iat": now + 180, "exp": now + 600 })).await;
}

#[tokio::test]
async fn an_id_token_not_yet_valid_is_refused() {
    let now = now();
    assert_patched_claims_are_refused(json!({ "nbf": now + 180, "exp": now + 600 })).await;
}

#[tokio::test]
async fn an_id_token_without_sub_is_refused() {
    assert_patched_claims_are_refused(json!({ "sub": null })).await;
}

#[tokio::test]
async fn an_id_token_with_an_empty_sub_is_refused() {
    assert_patched_claims_are_refused(json!({ "sub": "" })).await;
}

#[tokio::test]
async fn an_id_token_whose_at_hash_does_not_match_the_access_token_is_refused() {
    // A well-formed at_hash (16 bytes, base64url) of some other access token.
    assert_patched_claims_are_refused(json!({ "at_hash": "77QmUPtjPfzWtF2AnpK9RQ" })).await;
}

#[tokio::test]
async fn an_unsigned_alg_none_id_token_is_refused() {
    // Arrange: the claims the IdP would have signed, with `alg: none` and an empty signature.
    let app = spawn_app().await;
    forge_id_tokens(&app, |ctx| {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64(ctx.claims.to_string().as_bytes());
        format!("{header}.{payload}.")
    });

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
}

#[tokio::test]
async fn an_hs256_id_token_keyed_with_the_idps_public_key_is_refused() {
    // Arrange: the classic key confusion: the RSA public key (which anyone can fetch) as the
    // HMAC secret, under the real kid, so a verifier that trusts the header's alg accepts it.
    let app = spawn_app().await;
    let public_pem = app.idp.rsa_public_key_pem();
    assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    forge_id_tokens(&app, move |ctx| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(ctx.kid.clone());
        let key = EncodingKey::from_secret(public_pem.as_bytes());
        jsonwebtoken::encode(&header, &ctx.claims, &key).unwrap()
    });

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
}

#[tokio::test]
async fn an_id_token_signed_by_a_key_the_idp_does_not_publish_is_refused() {
    // Arrange: correctly signed, but by an attacker's key under a kid the JWKS does not have.
    let app = spawn_app().await;
    let (key, _) = foreign_es256_key("attacker-key");
    forge_id_tokens(&app, move |ctx| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("attacker-key".into());
        jsonwebtoken::encode(&header, &ctx.claims, &key).unwrap()
    });

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
    assert!(
        app.idp.stats().jwks_requests >= 1,
        "the unknown kid was looked up in the JWKS"
    );
}

#[tokio::test]
async fn a_flood_of_unknown_kids_refetches_the_jwks_at_most_once_per_interval() {
    // Arrange: the production refetch interval, and the JWKS already cached by a normal login.
    let app = spawn_app_with(|s| {
        s.customize_config = Box::new(|c| c.jwks_refetch_interval = Duration::from_secs(60))
    })
    .await;
    app.logged_in_browser("bob").await;
    let (key, _) = foreign_es256_key("made-up-kid");
    let key = Arc::new(key);
    forge_id_tokens(&app, move |ctx| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(format!("made-up-kid-{}", uuid::Uuid::new_v4()));
        jsonwebtoken::encode(&header, &ctx.claims, &key).unwrap()
    });
    let jwks_before = app.idp.stats().jwks_requests;

    // Act: 20 concurrent logins, each with a kid never seen before.
    let attempts = (0..20).map(|_| attempt_login(&app));
    let results = futures_util::future::join_all(attempts).await;

    // Assert
    for (_, response) in &results {
        assert_login_error_redirect(response, "/", "invalid_token");
    }
    let extra_fetches = app.idp.stats().jwks_requests - jwks_before;
    assert!(
        extra_fetches <= 1,
        "{extra_fetches} JWKS fetches for 20 unknown kids within one interval"
    );
    assert_eq!(app.session_rows().await, 1, "only bob's session");
    let (browser, _) = &results[0];
    assert_problem(app.get_session(browser).await, 401).await;
}

#[tokio::test]
async fn an_id_token_with_a_tampered_signature_is_refused() {
    // Arrange: one character in the middle of the signature changed.
    let app = spawn_app().await;
    forge_id_tokens(&app, |ctx| {
        let (header, payload, signature) = split(&ctx.signed);
        let middle = signature.len() / 2;
        let flipped = if &signature[middle..=middle] == "A" {
            "B"
        } else {
            "A"
        };
        format!(
            "{header}.{payload}.{}{flipped}{}",
            &signature[..middle],
            &signature[middle + 1..]
        )
    });

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
}

#[tokio::test]
async fn an_id_token_with_a_tampered_payload_is_refused() {
    // Arrange: the subject swapped for another user's, keeping the original signature.
    let app = spawn_app().await;
    forge_id_tokens(&app, |ctx| {
        let (header, payload, signature) = split(&ctx.signed);
        let mut claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["sub"], "alice");
        claims["sub"] = json!("admin");
        format!(
            "{header}.{}.{signature}",
            b64(claims.to_string().as_bytes())
        )
    });

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
}

#[tokio::test]
async fn an_id_token_without_kid_is_accepted_when_exactly_one_published_key_fits() {
    // Arrange: the JWKS holds our RSA key and the IdP's EC key: one key fits RS256.
    let (key, jwk) = foreign_rs256_key("our-rsa-key");
    let (app, issuer) = spawn_app_with_own_jwks(|idp_keys| {
        [vec![jwk], idp_keys.into_iter().filter(is_ec).collect()].concat()
    })
    .await;
    forge_kidless_rs256(&app, &issuer, key);

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_eq!(response.status(), 302);
    assert_eq!(location(&response), format!("{FRONTEND}/"));
    assert_eq!(app.session_rows().await, 1);
    assert_eq!(app.get_session(&browser).await.status(), 200);
    let header = jsonwebtoken::decode_header(&stored_id_token(&app, &browser).await).unwrap();
    assert_eq!((header.alg, header.kid), (Algorithm::RS256, None));
}

#[tokio::test]
async fn an_id_token_without_kid_is_refused_when_several_published_keys_fit() {
    // Arrange: our RSA key (first, and the one that signed) and the IdP's RSA key both fit RS256:
    // the choice is ambiguous, so no key may be picked, not even the one that would verify.
    let (key, jwk) = foreign_rs256_key("our-rsa-key");
    let (app, issuer) = spawn_app_with_own_jwks(|idp_keys| [vec![jwk], idp_keys].concat()).await;
    forge_kidless_rs256(&app, &issuer, key);

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
}

fn is_ec(jwk: &Jwk) -> bool {
    matches!(
        jwk.algorithm,
        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)
    )
}

#[tokio::test]
async fn es256_signed_id_tokens_log_in() {
    // Arrange
    let app = spawn_app().await;
    app.idp.controls().set_signing_alg(SigningAlg::Es256);

    // Act
    let browser = app.logged_in_browser("alice").await;

    // Assert
    let header = jsonwebtoken::decode_header(&stored_id_token(&app, &browser).await).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid, Some(app.idp.current_kid()));
    assert_eq!(app.get_session(&browser).await.status(), 200);
}

#[tokio::test]
async fn a_login_after_the_idp_rotated_its_key_refetches_the_jwks_and_succeeds() {
    // Arrange: the old key is cached, then replaced (and unpublished) by the IdP.
    let app = spawn_app().await;
    app.logged_in_browser("alice").await;
    let old_kid = app.idp.current_kid();
    let jwks_before = app.idp.stats().jwks_requests;
    app.idp.rotate_signing_key(false);

    // Act
    let browser = app.logged_in_browser("bob").await;

    // Assert
    let new_kid = app.idp.current_kid();
    assert_ne!(new_kid, old_kid);
    let header = jsonwebtoken::decode_header(&stored_id_token(&app, &browser).await).unwrap();
    assert_eq!(header.kid, Some(new_kid));
    assert_eq!(
        app.idp.stats().jwks_requests,
        jwks_before + 1,
        "one refetch for the unknown kid"
    );
    assert_eq!(app.session_rows().await, 2);
}
