//! `/auth`: forward-auth for ingress-nginx `auth-url`, Traefik ForwardAuth, Caddy `forward_auth`
//! and Envoy ext_authz (HTTP service). Any method is answered, and `/auth/{path}` too, because
//! Envoy checks with the original request's method and appends its path to the check URL; the
//! method, path and body of the check request are ignored. The gateway forwards the browser's request headers; a live session
//! gets 200 with `Authorization: Bearer <fresh access token>` and `X-Auth-Subject` for the
//! gateway to pass upstream, anything else a 401 the gateway turns into a login redirect.

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};

use super::cookies;
use super::problem::ApiError;
use crate::flows::{Broker, TokenError};

pub const AUTH_SUBJECT: HeaderName = HeaderName::from_static("x-auth-subject");

/// Forward-auth: a fresh access token for the session in the forwarded cookie.
#[utoipa::path(
    method(get, head, post, put, patch, delete, options), path = "/auth", tag = "forward-auth",
    responses(
        (status = 200, description = "A live session: `Authorization: Bearer <access token>` and `X-Auth-Subject: <sub>` headers, empty body",
            headers(("authorization" = String, description = "Bearer <access token>"), ("x-auth-subject" = String, description = "The session's subject"))),
        (status = 401, description = "No live session (or its refresh token was refused)", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The IdP could not refresh the token; the session is kept. Retry after `Retry-After`", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn forward_auth(
    request: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    check(request, broker).await
}

/// Forward-auth as Envoy's ext_authz asks: the original path appended to `/auth`.
#[utoipa::path(
    method(get, head, post, put, patch, delete, options), path = "/auth/{path}", tag = "forward-auth",
    params(("path" = String, Path, description = "The original request's path (ignored)")),
    responses(
        (status = 200, description = "As `/auth`",
            headers(("authorization" = String, description = "Bearer <access token>"), ("x-auth-subject" = String, description = "The session's subject"))),
        (status = 401, description = "As `/auth`", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "As `/auth`", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn forward_auth_with_path(
    request: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    check(request, broker).await
}

async fn check(request: HttpRequest, broker: web::Data<Broker>) -> Result<HttpResponse, ApiError> {
    let id = cookies::read_session(&request, &broker.config).ok_or(ApiError::NotAuthenticated)?;
    let token = broker
        .access_token(&id)
        .await
        .map_err(|error| match error {
            TokenError::NoSession => ApiError::NotAuthenticated,
            TokenError::IdpUnavailable(cause) => ApiError::IdpUnavailable(cause),
            TokenError::Store(cause) => ApiError::StoreUnavailable(cause),
        })?;
    let secret = token.access_token.secret();
    let mut bearer = String::with_capacity(7 + secret.len());
    bearer.push_str("Bearer ");
    bearer.push_str(secret);
    let bearer = HeaderValue::try_from(bearer).map_err(|_| {
        ApiError::InvalidRequest("the IdP issued an access token that is not a header value".into())
    })?;
    let mut response = HttpResponse::Ok();
    response.insert_header((header::AUTHORIZATION, bearer));
    // A subject that is not a plain header value is left out rather than mangled.
    if let Ok(subject) = HeaderValue::try_from(token.subject.as_str()) {
        response.insert_header((AUTH_SUBJECT, subject));
    }
    Ok(response.finish())
}
