//! Errors as HTTP sees them: one enum, mapped to RFC 9457 problem+json once.
//!
//! Expected failures have their own variant and a stable `type`; internal causes are logged with
//! their chain and leave as an opaque 500 or 503. Nothing here ever carries a token or an IdP
//! `error_description`.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::ReturnToError;
use crate::flows::TokenError;
use crate::oidc::IdpError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";
/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "5";

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A stable URI naming the kind of problem, e.g. `urn:token-broker:problem:not-authenticated`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no live session")]
    NotAuthenticated,
    #[error("invalid return_to: {0}")]
    InvalidReturnTo(#[from] ReturnToError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the request's Origin is not allowed")]
    OriginNotAllowed,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the identity provider is unavailable: {0}")]
    IdpUnavailable(#[from] IdpError),
    #[error("a store is unavailable: {0}")]
    StoreUnavailable(#[from] StoreError),
    /// The relay's `X-CSRF: 1` is missing: a cross-site form or `<img>` cannot send it.
    #[error("the X-CSRF: 1 header is required")]
    CsrfHeaderRequired,
    #[error("the relay path is not allowed: {0}")]
    PathNotAllowed(&'static str),
    /// Logged where it happens (without the URL); the browser learns nothing more.
    #[error("the upstream API is unavailable")]
    UpstreamUnavailable,
    #[error("the upstream API did not answer in time")]
    UpstreamTimeout,
}

/// Marks a response that a store outage caused: the one place such outages are counted.
#[derive(Debug, Clone, Copy)]
pub struct StoreFailure(pub &'static str);

impl From<TokenError> for ApiError {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::NoSession => Self::NotAuthenticated,
            TokenError::IdpUnavailable(cause) => Self::IdpUnavailable(cause),
            TokenError::Store(cause) => Self::StoreUnavailable(cause),
        }
    }
}

impl ApiError {
    fn slug_and_title(&self) -> (&'static str, &'static str) {
        match self {
            Self::NotAuthenticated => ("not-authenticated", "No live session"),
            Self::InvalidReturnTo(_) => (
                "invalid-return-to",
                "return_to is not an allowed destination",
            ),
            Self::InvalidRequest(_) => ("invalid-request", "The request is malformed"),
            Self::OriginNotAllowed => ("origin-not-allowed", "The request's Origin is not allowed"),
            Self::NotFound => ("not-found", "No such resource"),
            Self::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            Self::IdpUnavailable(_) => ("idp-unavailable", "The identity provider is unavailable"),
            Self::StoreUnavailable(_) => ("unavailable", "The service is temporarily unavailable"),
            Self::CsrfHeaderRequired => {
                ("csrf-header-required", "The X-CSRF: 1 header is required")
            }
            Self::PathNotAllowed(_) => ("path-not-allowed", "The API path is not allowed"),
            Self::UpstreamUnavailable => {
                ("upstream-unavailable", "The upstream API is unavailable")
            }
            Self::UpstreamTimeout => (
                "upstream-timeout",
                "The upstream API did not answer in time",
            ),
        }
    }

    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug_and_title();
        let detail = match self {
            Self::InvalidReturnTo(reason) => Some(reason.to_string()),
            Self::InvalidRequest(reason) => Some(reason.clone()),
            Self::PathNotAllowed(reason) => Some((*reason).to_string()),
            _ => None,
        };
        Problem {
            kind: format!("urn:token-broker:problem:{slug}"),
            title: title.to_string(),
            status: self.status_code().as_u16(),
            detail,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::NotAuthenticated => StatusCode::UNAUTHORIZED,
            Self::InvalidReturnTo(_) | Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::OriginNotAllowed | Self::CsrfHeaderRequired => StatusCode::FORBIDDEN,
            Self::PathNotAllowed(_) => StatusCode::BAD_REQUEST,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::IdpUnavailable(_) | Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::IdpUnavailable(cause) => {
                tracing::error!(error = %cause, "identity provider unavailable")
            }
            Self::StoreUnavailable(cause) => tracing::error!(error = %cause, "store unavailable"),
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code());
        if let Self::StoreUnavailable(cause) = self {
            // Counted by the request log, which holds the metrics (`store_errors_total`).
            if let Some(store) = crate::metrics::store_label(cause) {
                response.extensions_mut().insert(StoreFailure(store));
            }
        }
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        if self.status_code() == StatusCode::UNAUTHORIZED {
            // RFC 9110 §15.5.2 wants a challenge; the credential here is the session cookie.
            response.insert_header((header::WWW_AUTHENTICATE, r#"Cookie realm="token-broker""#));
        }
        response.body(serde_json::to_string(&self.problem()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_have_stable_types_and_no_internal_detail() {
        let error = ApiError::StoreUnavailable(StoreError::Corrupt("row 42 secret".into()));
        let problem = error.problem();
        assert_eq!(problem.kind, "urn:token-broker:problem:unavailable");
        assert_eq!(problem.status, 503);
        assert!(problem.detail.is_none());
        assert_eq!(ApiError::NotAuthenticated.problem().status, 401);
    }
}
