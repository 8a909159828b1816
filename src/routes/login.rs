//! `GET /login` and `GET /callback`: the browser's way through the authorization-code flow.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use utoipa::IntoParams;

use super::cookies;
use super::problem::ApiError;
use crate::domain::{AuthorizationCode, ReturnTo, State};
use crate::flows::{Broker, CallbackParams, StartLoginError};

/// Longest accepted authorization code; real ones are far shorter.
const MAX_CODE_LEN: usize = 2048;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LoginQuery {
    /// Where to land after login: a path, or an absolute URL on an allowed origin.
    pub return_to: Option<String>,
}

/// Start a login: redirect to the IdP.
#[utoipa::path(
    get, path = "/login", tag = "login", params(LoginQuery),
    responses(
        (status = 302, description = "Redirect to the IdP's authorization endpoint; sets the login-binding cookie"),
        (status = 400, description = "return_to is not allowed", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The IdP or Redis is unavailable", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn login(
    request: HttpRequest,
    query: web::Query<LoginQuery>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let return_to = match query.return_to.as_deref() {
        None | Some("") => broker.config.default_return_to.clone(),
        Some(raw) => ReturnTo::parse(raw, &broker.config.allowed_origins)?,
    };
    let binding = cookies::read_binding(&request, &broker.config);
    let redirect = broker
        .start_login(return_to, binding)
        .await
        .map_err(|error| match error {
            StartLoginError::IdpUnavailable(e) => ApiError::IdpUnavailable(e),
            StartLoginError::Store(e) => ApiError::StoreUnavailable(e),
        })?;
    Ok(HttpResponse::Found()
        .insert_header((header::LOCATION, redirect.authorization_url))
        .cookie(cookies::binding_cookie(&broker.config, &redirect.binding))
        .finish())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    /// The authorization code (absent when the IdP reports an `error`).
    #[param(min_length = 1, max_length = 2048)]
    pub code: Option<String>,
    /// The `state` `/login` sent: 43 base64url characters. Required: a callback without a
    /// well-formed one is a 400.
    #[param(required = true, pattern = "^[A-Za-z0-9_-]{43}$")]
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    /// RFC 9207 issuer identifier.
    pub iss: Option<String>,
}

impl CallbackQuery {
    pub(crate) fn parse(self) -> Result<CallbackParams, ApiError> {
        let state = self
            .state
            .as_deref()
            .and_then(State::parse)
            .ok_or_else(|| ApiError::InvalidRequest("the callback has no valid state".into()))?;
        if self
            .code
            .as_ref()
            .is_some_and(|code| code.is_empty() || code.len() > MAX_CODE_LEN)
        {
            return Err(ApiError::InvalidRequest(
                "the authorization code is malformed".into(),
            ));
        }
        Ok(CallbackParams {
            state,
            code: self.code.map(AuthorizationCode::new),
            error: self.error,
            error_description: self.error_description,
            iss: self.iss,
        })
    }
}

/// Finish a login: the IdP's redirect back to the broker.
#[utoipa::path(
    get, path = "/callback", tag = "login", params(CallbackQuery),
    responses(
        (status = 302, description = "Login complete: sets the session cookie and redirects to return_to. Login failed: redirects to the frontend with `login_error=<code>`"),
        (status = 400, description = "Malformed callback", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn callback(
    request: HttpRequest,
    query: web::Query<CallbackQuery>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let params = query.into_inner().parse()?;
    let binding = cookies::read_binding(&request, &broker.config);
    let previous_session = cookies::read_session(&request, &broker.config);
    // The binding cookie is left to expire on its own: another tab may still be logging in with it.
    match broker.finish_login(params, binding, previous_session).await {
        Ok(success) => Ok(HttpResponse::Found()
            .insert_header((header::LOCATION, success.return_to.as_str()))
            .cookie(cookies::session_cookie(&broker.config, &success.session_id))
            .finish()),
        Err(failure) => Ok(HttpResponse::Found()
            .insert_header((
                header::LOCATION,
                failure.return_to.with_login_error(failure.code.as_str()),
            ))
            .finish()),
    }
}
