//! Whole-protocol tests of the development IdP through its HTTP endpoints, and their helpers.
//!
//! `login`: discovery, the code flow, refresh rotation, client authentication.
//! `operations`: test controls, revocation, end-session, key rotation, the standalone server.

use std::fmt::Debug;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use actix_web::App;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;

use super::keys::tests::{tamper, test_keys};
use super::*;

const ISSUER: &str = "http://idp.test/dev-idp";
const REDIRECT: &str = "http://app.test/callback";
const LOGGED_OUT: &str = "http://app.test/logged-out";
const SECRET: &str = "s3cret/+:?&";
// RFC 7636 Appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const SCOPE: &str = "openid profile email offline_access";

fn options() -> DevIdpOptions {
    DevIdpOptions {
        client_id: "broker".into(),
        client_secret: Some(SECRET.into()),
        token_endpoint_auth_methods: vec![
            "client_secret_basic".into(),
            "client_secret_post".into(),
        ],
        redirect_uris: vec![REDIRECT.into()],
        post_logout_redirect_uris: vec![LOGGED_OUT.into()],
        keys: Some(test_keys()),
        ..DevIdpOptions::default()
    }
}

fn new_idp(options: DevIdpOptions) -> DevIdp {
    DevIdp::new(url::Url::parse(ISSUER).expect("issuer"), options)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The query parameters of the `Location` header.
    fn redirect_params(&self) -> Vec<(String, String)> {
        let location = self
            .headers
            .get(header::LOCATION)
            .expect("a redirect")
            .to_str()
            .expect("ascii");
        let url = url::Url::parse(location).expect("absolute");
        assert_eq!(&url[..url::Position::AfterPath], REDIRECT);
        url.query_pairs().into_owned().collect()
    }

    fn redirect_param(&self, name: &str) -> Option<String> {
        self.redirect_params()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

async fn send<S, R, B, E>(app: &S, request: R) -> Reply
where
    S: Service<R, Response = ServiceResponse<B>, Error = E>,
    E: Debug,
    B: MessageBody,
{
    let response = test::call_service(app, request).await;
    let (status, headers) = (response.status(), response.headers().clone());
    let body = String::from_utf8(test::read_body(response).await.to_vec()).expect("utf-8");
    Reply {
        status,
        headers,
        body,
    }
}

fn authorize_params(overrides: &[(&str, &str)]) -> String {
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", "broker"),
        ("redirect_uri", REDIRECT),
        ("scope", SCOPE),
        ("state", "st-1"),
        ("nonce", "n-1"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    for (name, value) in overrides {
        params.retain(|(n, _)| n != name);
        if !value.is_empty() {
            params.push((name, value));
        }
    }
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

fn form(uri: &str, body: String) -> TestRequest {
    TestRequest::post()
        .uri(uri)
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload(body)
}

fn basic() -> (header::HeaderName, String) {
    let credentials = format!(
        "broker:{}",
        url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect::<String>()
    );
    (
        header::AUTHORIZATION,
        format!("Basic {}", STANDARD.encode(credentials)),
    )
}

fn code_exchange(code: &str) -> TestRequest {
    let body = format!("grant_type=authorization_code&code={code}&redirect_uri={REDIRECT}&code_verifier={VERIFIER}");
    form("/dev-idp/token", body).insert_header(basic())
}

fn refresh(token: &str) -> TestRequest {
    form(
        "/dev-idp/token",
        format!("grant_type=refresh_token&refresh_token={token}"),
    )
    .insert_header(basic())
}

/// Verifies an ID token the way a relying party would: JWKS by kid, iss, aud.
fn verify(jwks: &JwkSet, token: &str) -> Value {
    let header = jsonwebtoken::decode_header(token).expect("header");
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("published key");
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&["broker"]);
    let key = DecodingKey::from_jwk(jwk).expect("key");
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("valid token")
        .claims
}

macro_rules! app {
    ($idp:expr) => {
        test::init_service(App::new().configure($idp.configure("/dev-idp"))).await
    };
}

/// Logs `username` in through the form and returns the authorization response.
macro_rules! login {
    ($app:expr, $username:expr) => {
        send(
            &$app,
            form(
                "/dev-idp/authorize",
                format!("{}&username={}", authorize_params(&[]), $username),
            )
            .to_request(),
        )
        .await
    };
}

mod login;
mod operations;
