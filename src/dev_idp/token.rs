//! The token endpoint (RFC 6749 §3.2: authorization-code and refresh grants) and revocation (RFC 7009).

use std::time::Instant;

use actix_web::http::header::{AUTHORIZATION, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::client_auth::authenticate;
use super::controls::Knobs;
use super::mint::token_response;
use super::oauth::{json_error, no_store, ErrorCode, OAuthError, Params};
use super::DevIdp;

#[derive(Clone, Copy)]
enum Grant {
    AuthorizationCode,
    RefreshToken,
}

impl Grant {
    fn name(self) -> &'static str {
        match self {
            Grant::AuthorizationCode => "authorization_code",
            Grant::RefreshToken => "refresh_token",
        }
    }
}

/// Why a grant was refused: by the protocol, or by a test knob.
enum Refusal {
    OAuth(OAuthError),
    Injected { status: StatusCode, error: String },
}

impl From<OAuthError> for Refusal {
    fn from(error: OAuthError) -> Self {
        Refusal::OAuth(error)
    }
}

impl Refusal {
    fn response(&self) -> HttpResponse {
        match self {
            Refusal::OAuth(error) => error.response(),
            Refusal::Injected { status, error } => {
                json_error(*status, error, "failure injected by the test controls")
            }
        }
    }
}

/// `POST /token`. Requests from an authenticated client with a supported `grant_type` are counted
/// in [`super::Stats`] (refused ones also as `*_rejected`), including failures injected by the controls.
pub(super) async fn token(
    idp: web::Data<DevIdp>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    if let Some(delay) = idp.controls().snapshot().token_delay {
        tokio::time::sleep(delay).await;
    }
    let knobs = idp.controls().snapshot();
    let params = match authenticated_params(&idp, &req, &body) {
        Ok(params) => params,
        Err(error) => return error.response(),
    };
    let grant = match params.get("grant_type") {
        Some("authorization_code") => Grant::AuthorizationCode,
        Some("refresh_token") => Grant::RefreshToken,
        Some(_) => {
            let error = OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                "supported: authorization_code, refresh_token",
            );
            return error.response();
        }
        None => {
            return OAuthError::new(ErrorCode::InvalidRequest, "grant_type is missing").response()
        }
    };

    let result = match (injected_failure(&knobs, grant), grant) {
        (Some(refusal), _) => Err(refusal),
        (None, Grant::AuthorizationCode) => code_grant(&idp, &knobs, &params),
        (None, Grant::RefreshToken) => refresh_grant(&idp, &knobs, &params),
    };
    let rejected = u64::from(result.is_err());
    idp.count(|stats| match grant {
        Grant::AuthorizationCode => {
            stats.code_grants += 1;
            stats.code_grants_rejected += rejected;
        }
        Grant::RefreshToken => {
            stats.refresh_grants += 1;
            stats.refresh_grants_rejected += rejected;
        }
    });
    match result {
        Ok(response) => no_store(HttpResponse::Ok()).json(response),
        Err(refusal) => {
            if let Refusal::OAuth(error) = &refusal {
                tracing::info!(grant = grant.name(), error = %error.code, description = %error.description,
                    "development IdP: grant refused");
            }
            refusal.response()
        }
    }
}

fn injected_failure(knobs: &Knobs, grant: Grant) -> Option<Refusal> {
    let injected = |status, error: &str| Refusal::Injected {
        status,
        error: error.to_owned(),
    };
    if let Some(status) = knobs.token_status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Some(injected(status, "server_error"));
    }
    if let Some(error) = &knobs.token_error {
        return Some(injected(StatusCode::BAD_REQUEST, error));
    }
    match (grant, &knobs.refresh_error) {
        (Grant::RefreshToken, Some(error)) => Some(injected(StatusCode::BAD_REQUEST, error)),
        _ => None,
    }
}

fn code_grant(idp: &DevIdp, knobs: &Knobs, params: &Params) -> Result<serde_json::Value, Refusal> {
    let code = params.require("code")?;
    let redirect_uri = params.require("redirect_uri")?;
    let verifier = params.require("code_verifier")?;
    let client_id = &idp.client().id;
    let (authorization, refresh_token) =
        idp.grants()
            .redeem_code(code, client_id, redirect_uri, verifier, Instant::now())?;
    minted(token_response(
        idp,
        knobs,
        &authorization,
        Grant::AuthorizationCode.name(),
        refresh_token,
    ))
}

fn refresh_grant(
    idp: &DevIdp,
    knobs: &Knobs,
    params: &Params,
) -> Result<serde_json::Value, Refusal> {
    let presented = params.require("refresh_token")?;
    let client_id = &idp.client().id;
    let (authorization, next) =
        idp.grants()
            .rotate_refresh_token(presented, client_id, params.get("scope"))?;
    minted(token_response(
        idp,
        knobs,
        &authorization,
        Grant::RefreshToken.name(),
        Some(next),
    ))
}

fn minted(
    result: Result<serde_json::Value, jsonwebtoken::errors::Error>,
) -> Result<serde_json::Value, Refusal> {
    result.map_err(|error| {
        tracing::error!(%error, "development IdP: signing failed");
        OAuthError::new(ErrorCode::ServerError, "the IdP could not sign the tokens").into()
    })
}

/// `POST /revoke` (RFC 7009 §2).
pub(super) async fn revoke(
    idp: web::Data<DevIdp>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let params = match authenticated_params(&idp, &req, &body) {
        Ok(params) => params,
        Err(error) => return error.response(),
    };
    idp.count(|stats| stats.revocations += 1);
    let Some(token) = params.get("token") else {
        return OAuthError::new(ErrorCode::InvalidRequest, "token is missing").response();
    };
    // §2.1: `token_type_hint` only speeds up the lookup; both kinds are looked for anyway.
    if !idp.grants().revoke_refresh_token(token) {
        let jti = idp
            .verify_own_token(token)
            .and_then(|claims| claims["jti"].as_str().map(str::to_owned));
        if let Some(jti) = jti {
            idp.grants().revoke_access_token(&jti);
        }
    }
    // §2.2: unknown and already revoked tokens are answered 200 too.
    no_store(HttpResponse::Ok()).finish()
}

/// The form parameters of a request from the authenticated client.
fn authenticated_params(
    idp: &DevIdp,
    req: &HttpRequest,
    body: &[u8],
) -> Result<Params, OAuthError> {
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !is_form {
        let why = "the body must be application/x-www-form-urlencoded";
        return Err(OAuthError::new(ErrorCode::InvalidRequest, why));
    }
    let params = Params::parse(body)?;
    let authorization = match req.headers().get(AUTHORIZATION) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            OAuthError::new(
                ErrorCode::InvalidClient,
                "the Authorization header is not ASCII",
            )
        })?),
    };
    authenticate(idp.client(), authorization, &params)?;
    Ok(params)
}
