//! `POST /backchannel-logout` (OpenID Connect Back-Channel Logout 1.0): a valid logout token ends
//! the sessions it names on every replica; every way of getting one wrong is a 400
//! `invalid_request` that ends nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::*;

async fn post_logout_token(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/backchannel-logout", app.address))
        .form(&[("logout_token", token)])
        .send()
        .await
        .expect("POST /backchannel-logout")
}

async fn session_status(app: &TestApp, browser: &Browser) -> u16 {
    app.get("/session", browser).await.status().as_u16()
}

async fn session_rows(app: &TestApp) -> i64 {
    let pool = app.database.pool().await;
    let count = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    count
}

fn backchannel_uri(app: &TestApp) -> String {
    format!("{}/backchannel-logout", app.address)
}

#[tokio::test]
async fn a_logout_token_with_sid_ends_that_idp_sessions_session_on_every_replica() {
    let app = spawn_app().await;
    let replica = spawn_replica(&app).await;
    let laptop = app.logged_in_browser("alice").await;
    let phone = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;
    let laptop_sid = idp_sid(&app, &laptop).await;
    assert_ne!(
        laptop_sid,
        idp_sid(&app, &phone).await,
        "one IdP session per login"
    );
    // Both replicas have served (and cached) the session before the logout.
    assert_eq!(replica.get("/session", &laptop).await.status(), 200);
    assert_eq!(session_status(&app, &laptop).await, 200);

    let status = app
        .idp
        .send_backchannel_logout(&backchannel_uri(&app), "alice", Some(&laptop_sid))
        .await
        .unwrap();
    assert_eq!(status, 200);

    assert_problem(replica.get("/session", &laptop).await, 401).await;
    assert_problem(app.get("/session", &laptop).await, 401).await;
    assert_eq!(replica.get("/auth", &laptop).await.status(), 401);
    assert_eq!(
        session_status(&app, &phone).await,
        200,
        "the other IdP session lives"
    );
    assert_eq!(session_status(&app, &bob).await, 200);
    assert_eq!(session_rows(&app).await, 2);
}

#[tokio::test]
async fn a_logout_token_with_only_sub_ends_every_session_of_that_subject() {
    let app = spawn_app().await;
    let replica = spawn_replica(&app).await;
    let laptop = app.logged_in_browser("alice").await;
    let phone = app.logged_in_browser("alice").await;
    let bob = app.logged_in_browser("bob").await;

    let status = app
        .idp
        .send_backchannel_logout(&backchannel_uri(&app), "alice", None)
        .await
        .unwrap();
    assert_eq!(status, 200);

    for browser in [&laptop, &phone] {
        assert_problem(replica.get("/session", browser).await, 401).await;
        assert_eq!(app.get("/auth", browser).await.status(), 401);
    }
    assert_eq!(replica.get("/session", &bob).await.status(), 200);
    assert_eq!(session_rows(&app).await, 1);
}

#[tokio::test]
async fn the_answer_is_an_empty_200_with_no_store_even_when_nothing_matched() {
    let app = spawn_app().await;
    let token = app
        .idp
        .sign_logout_token(&app.idp.logout_token_claims("nobody", Some("no-such-sid")));
    let response = post_logout_token(&app, &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["cache-control"].to_str().unwrap(),
        "no-store"
    );
    assert!(response.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_token_signed_with_a_key_the_idp_just_rotated_in_is_accepted() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    app.idp.rotate_signing_key(false);
    let token = app
        .idp
        .sign_logout_token(&app.idp.logout_token_claims("alice", None));
    assert_eq!(post_logout_token(&app, &token).await.status(), 200);
    assert_problem(app.get("/session", &browser).await, 401).await;
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn unsigned(header: Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Each forgery or mistake, the reason it must be refused for, and the token that carries it. All of them name alice's sessions.
fn bad_tokens(app: &TestApp, sid: &str) -> Vec<(&'static str, &'static str, String)> {
    let valid = || app.idp.logout_token_claims("alice", Some(sid));
    let signed = |patch: &dyn Fn(&mut Value)| {
        let mut claims = valid();
        patch(&mut claims);
        app.idp.sign_logout_token(&claims)
    };
    let good = app.idp.sign_logout_token(&valid());
    let mut parts: Vec<&str> = good.split('.').collect();
    let tampered_signature = {
        let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        signature[10] ^= 0x01;
        URL_SAFE_NO_PAD.encode(signature)
    };
    let bad_signature = format!("{}.{}.{}", parts[0], parts[1], tampered_signature);
    let other_claims = {
        let mut claims = valid();
        claims["sub"] = json!("bob");
        URL_SAFE_NO_PAD.encode(claims.to_string())
    };
    parts[1] = &other_claims;
    let swapped_payload = parts.join(".");
    let hmac_with_public_key = jsonwebtoken::encode(
        &Header {
            alg: Algorithm::HS256,
            kid: Some(app.idp.current_kid()),
            typ: Some("logout+jwt".into()),
            ..Header::default()
        },
        &valid(),
        &EncodingKey::from_secret(app.idp.rsa_public_key_pem().as_bytes()),
    )
    .unwrap();

    vec![
        ("bad signature", "signature is invalid", bad_signature),
        (
            "payload swapped under a valid signature",
            "signature is invalid",
            swapped_payload,
        ),
        (
            "alg none",
            "`none`",
            unsigned(json!({"alg": "none", "typ": "logout+jwt"}), &valid()),
        ),
        (
            "HS256 keyed with the public key",
            "`HS256`",
            hmac_with_public_key,
        ),
        (
            "wrong aud",
            "aud does not contain",
            signed(&|c| c["aud"] = json!("another-client")),
        ),
        (
            "wrong iss",
            "iss is not",
            signed(&|c| c["iss"] = json!("https://evil.example")),
        ),
        (
            "missing events",
            "no back-channel logout event",
            signed(&|c| {
                c.as_object_mut().unwrap().remove("events");
            }),
        ),
        (
            "wrong event URI",
            "no back-channel logout event",
            signed(&|c| {
                c["events"] = json!({"http://schemas.openid.net/event/frontchannel-logout": {}})
            }),
        ),
        (
            "event member not an object",
            "no back-channel logout event",
            signed(&|c| {
                c["events"] = json!({"http://schemas.openid.net/event/backchannel-logout": true})
            }),
        ),
        (
            "nonce present",
            "nonce",
            signed(&|c| c["nonce"] = json!("n-0S6_WzA2Mj")),
        ),
        (
            "neither sid nor sub",
            "neither sid nor sub",
            signed(&|c| {
                let claims = c.as_object_mut().unwrap();
                claims.remove("sid");
                claims.remove("sub");
            }),
        ),
        (
            "no jti",
            "no jti",
            signed(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
        ),
        (
            "expired",
            "expired",
            signed(&|c| {
                c["iat"] = json!(now() - 100);
                c["exp"] = json!(now() - 70);
            }),
        ),
        (
            "issued too long ago, without exp",
            "too long ago",
            signed(&|c| {
                c.as_object_mut().unwrap().remove("exp");
                c["iat"] = json!(now() - 3600);
            }),
        ),
        (
            "issued in the future",
            "in the future",
            signed(&|c| c["iat"] = json!(now() + 600)),
        ),
        (
            "aud missing",
            "missing field `aud`",
            signed(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
        ),
        ("not a JWT", "not a well-formed JWS", "not-a-jwt".into()),
        ("empty", "not a well-formed JWS", String::new()),
    ]
}

#[tokio::test]
async fn every_forged_or_malformed_logout_token_is_refused_and_ends_nothing() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let sid = idp_sid(&app, &browser).await;

    for (case, reason, token) in bad_tokens(&app, &sid) {
        let response = post_logout_token(&app, &token).await;
        assert_eq!(response.status(), 400, "{case}");
        assert_eq!(
            response.headers()["cache-control"].to_str().unwrap(),
            "no-store",
            "{case}"
        );
        let body = assert_problem(response, 400).await;
        let described = body["error_description"].as_str().unwrap();
        assert!(
            described.contains(reason),
            "{case}: refused for {described:?}"
        );
        assert_eq!(body["error"], "invalid_request", "{case}: {body}");
        assert_eq!(
            body["type"], "urn:token-broker:problem:invalid-logout-token",
            "{case}"
        );
        assert_eq!(
            session_status(&app, &browser).await,
            200,
            "{case} ended the session"
        );
    }
    assert_eq!(session_rows(&app).await, 1);
}

#[tokio::test]
async fn a_replayed_logout_token_is_refused_and_spares_sessions_begun_since() {
    let app = spawn_app().await;
    let first = app.logged_in_browser("alice").await;
    let token = app
        .idp
        .sign_logout_token(&app.idp.logout_token_claims("alice", None));
    assert_eq!(post_logout_token(&app, &token).await.status(), 200);
    assert_problem(app.get("/session", &first).await, 401).await;

    let second = app.logged_in_browser("alice").await;
    let body = assert_problem(post_logout_token(&app, &token).await, 400).await;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(session_status(&app, &second).await, 200);

    // The same jti at once from many directions: exactly one is accepted.
    let token = app
        .idp
        .sign_logout_token(&app.idp.logout_token_claims("carol", None));
    let statuses = futures_util::future::join_all((0..20).map(|_| post_logout_token(&app, &token)))
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect::<Vec<_>>();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        19,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn bodies_that_are_not_a_logout_form_get_a_400_problem_never_a_500() {
    let app = spawn_app().await;
    let browser = app.logged_in_browser("alice").await;
    let url = backchannel_uri(&app);
    let token = app
        .idp
        .sign_logout_token(&app.idp.logout_token_claims("alice", None));
    let requests = [
        ("no body", app.http.post(&url)),
        (
            "JSON instead of a form",
            app.http
                .post(&url)
                .json(&json!({ "logout_token": token.clone() })),
        ),
        (
            "form without logout_token",
            app.http.post(&url).form(&[("token", token.as_str())]),
        ),
        (
            "a 64 KiB form",
            app.http
                .post(&url)
                .form(&[("logout_token", "a".repeat(64 * 1024))]),
        ),
        (
            "invalid percent-encoding",
            app.http
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("logout_token=%ZZ%"),
        ),
    ];
    for (case, request) in requests {
        let response = request.send().await.unwrap();
        let body = assert_problem(response, 400).await;
        assert_eq!(body["error"], "invalid_request", "{case}: {body}");
    }
    assert_eq!(session_status(&app, &browser).await, 200);
    assert_eq!(
        app.http.get(&url).send().await.unwrap().status(),
        405,
        "GET is not a logout"
    );
}
