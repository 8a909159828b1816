//! `POST /backchannel-logout`: the IdP's server-to-server logout call (OpenID Connect Back-Channel
//! Logout 1.0 §2.5, §2.8). The body is a form with one `logout_token`; the answer is `200` with
//! an empty body, or `400` with `error=invalid_request` (in a problem+json document, as every error
//! of the broker), always with `Cache-Control: no-store`.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::{ApiError, PROBLEM_JSON};
use crate::flows::backchannel::BackchannelLogoutError;
use crate::flows::Broker;

/// The largest form body accepted: logout tokens are a few kilobytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Deserialize, ToSchema)]
pub struct BackchannelLogoutForm {
    /// The IdP-signed logout token (a JWT).
    pub logout_token: String,
}

/// A refused logout token: a problem document that is also an OAuth error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogoutTokenProblem {
    /// `urn:token-broker:problem:invalid-logout-token`
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// Always `invalid_request` (Back-Channel Logout 1.0 §2.8).
    pub error: String,
    /// Which check failed. Never contains the token.
    pub error_description: String,
}

/// The 400 for a logout token that is missing, malformed, or fails a check.
pub fn invalid_logout_token(reason: &str) -> HttpResponse {
    tracing::warn!(reason, "back-channel logout refused");
    let problem = LogoutTokenProblem {
        kind: "urn:token-broker:problem:invalid-logout-token".into(),
        title: "The logout token is not acceptable".into(),
        status: 400,
        error: "invalid_request".into(),
        error_description: reason.into(),
    };
    HttpResponse::BadRequest()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(serde_json::to_string(&problem).unwrap_or_default())
}

/// The form's parsing rules for this route: size limit, and a 400 of the right shape.
pub fn form_config() -> web::FormConfig {
    web::FormConfig::default()
        .limit(MAX_BODY_BYTES)
        .error_handler(|error, _| {
            let reason = format!("the body is not a form with a logout_token: {error}");
            actix_web::error::InternalError::from_response(error, invalid_logout_token(&reason))
                .into()
        })
}

/// Ends the sessions a valid logout token names, on every replica.
#[utoipa::path(
    post, path = "/backchannel-logout", tag = "identity-provider",
    request_body(content = BackchannelLogoutForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "The matching sessions (possibly none) have ended"),
        (status = 400, description = "The logout token is missing, malformed, fails a check, or was already used", body = LogoutTokenProblem, content_type = "application/problem+json"),
        (status = 503, description = "The IdP's keys or a session store are unavailable; retry", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn backchannel_logout(
    form: web::Form<BackchannelLogoutForm>,
    broker: web::Data<Broker>,
) -> HttpResponse {
    let result = broker.backchannel_logout(&form.logout_token).await;
    broker.metrics.back_channel_logout(match &result {
        Ok(_) => "ended",
        Err(BackchannelLogoutError::InvalidToken(_)) => "invalid_token",
        Err(BackchannelLogoutError::Replayed) => "replayed",
        Err(BackchannelLogoutError::KeysUnavailable(_) | BackchannelLogoutError::Store(_)) => {
            "unavailable"
        }
    });
    match result {
        Ok(_) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .finish(),
        Err(BackchannelLogoutError::InvalidToken(error)) => {
            invalid_logout_token(&error.to_string())
        }
        Err(error @ BackchannelLogoutError::Replayed) => invalid_logout_token(&error.to_string()),
        Err(BackchannelLogoutError::KeysUnavailable(error)) => {
            ApiError::IdpUnavailable(error).error_response()
        }
        Err(BackchannelLogoutError::Store(error)) => {
            ApiError::StoreUnavailable(error).error_response()
        }
    }
}
