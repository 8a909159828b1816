//! `GET /session` and `POST /logout`: what the SPA calls with `credentials: 'include'`.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::cookies;
use super::problem::ApiError;
use crate::domain::UserClaims;
use crate::flows::Broker;

// `/session`'s body; written by `SessionResponse::to_json`, not serde: the claims are already a
// JSON object (`UserClaims`), and every page load asks for this. (A doc comment here would
// become the schema's description in the OpenAPI document.)
#[derive(Serialize, ToSchema)]
pub struct SessionResponse {
    /// Always true (an anonymous caller gets 401).
    pub authenticated: bool,
    pub user: UserClaims,
    /// When the session ends unless used again (idle or absolute limit, whichever is first).
    #[serde(serialize_with = "crate::rfc3339::serialize")]
    pub expires_at: DateTime<Utc>,
}

impl SessionResponse {
    /// The same text as `serde_json::to_string(self)`, by hand.
    pub fn to_json(&self) -> String {
        let user = self.user.json();
        let mut json = String::with_capacity(user.len() + 80);
        json.push_str(r#"{"authenticated":"#);
        json.push_str(if self.authenticated { "true" } else { "false" });
        json.push_str(r#","user":"#);
        json.push_str(user);
        json.push_str(r#","expires_at":""#);
        crate::rfc3339::push(&mut json, &self.expires_at, chrono::SecondsFormat::AutoSi);
        json.push_str(r#""}"#);
        json
    }
}

/// Who is logged in. Never contains a token.
#[utoipa::path(
    get, path = "/session", tag = "session",
    responses(
        (status = 200, description = "A live session (its idle timeout slides)", body = SessionResponse),
        (status = 401, description = "No live session", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Session stores unavailable", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn session(
    request: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let id = cookies::read_session(&request, &broker.config).ok_or(ApiError::NotAuthenticated)?;
    let view = broker
        .current_session(&id)
        .await?
        .ok_or(ApiError::NotAuthenticated)?;
    let response = SessionResponse {
        authenticated: true,
        user: view.user,
        expires_at: view.expires_at,
    };
    Ok(HttpResponse::Ok()
        .content_type(header::ContentType::json())
        .body(response.to_json()))
}

#[derive(Serialize, ToSchema)]
pub struct LogoutResponse {
    /// Where to send the browser: the IdP's end-session endpoint (RP-Initiated Logout 1.0) or
    /// the post-logout URL.
    pub logout_url: String,
}

/// POST is accepted only from an allowed frontend origin or the broker's own: a cross-site form
/// must not be able to log a user out.
fn require_allowed_origin(request: &HttpRequest, broker: &Broker) -> Result<(), ApiError> {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
        .ok_or(ApiError::OriginNotAllowed)?;
    let config = &broker.config;
    if config.allowed_origins.contains_origin(origin) || origin == config.public_origin() {
        Ok(())
    } else {
        Err(ApiError::OriginNotAllowed)
    }
}

fn wants_json(request: &HttpRequest) -> bool {
    request
        .headers()
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

/// End the session here and at the IdP.
#[utoipa::path(
    post, path = "/logout", tag = "session",
    responses(
        (status = 200, description = "With `Accept: application/json`: the URL to send the browser to", body = LogoutResponse),
        (status = 303, description = "Otherwise: a redirect to that URL"),
        (status = 403, description = "The Origin is not allowed", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Session stores unavailable", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn logout(
    request: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_allowed_origin(&request, &broker)?;
    let id = cookies::read_session(&request, &broker.config);
    let done = broker.logout(id).await?;
    let clear = cookies::expired_session_cookie(&broker.config);
    if wants_json(&request) {
        Ok(HttpResponse::Ok().cookie(clear).json(LogoutResponse {
            logout_url: done.logout_url,
        }))
    } else {
        Ok(HttpResponse::SeeOther()
            .cookie(clear)
            .insert_header((header::LOCATION, done.logout_url))
            .finish())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn the_hand_written_body_is_what_serde_writes() {
        let user = UserClaims::select(
            "al\"ice\u{1F600}".into(),
            serde_json::json!({"email": "a@example.com", "name": "A \\ \n B", "email_verified": true})
                .as_object()
                .unwrap(),
        );
        let stored: UserClaims =
            serde_json::from_str(r#"{"sub": "bob", "groups": ["x"], "n": 1.5e3}"#).unwrap();
        for user in [user, stored] {
            for expires_at in [
                Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap(),
                Utc.timestamp_opt(1_800_000_000, 123_456_789).unwrap(),
            ] {
                let response = SessionResponse {
                    authenticated: true,
                    user: user.clone(),
                    expires_at,
                };
                assert_eq!(
                    response.to_json(),
                    serde_json::to_string(&response).unwrap()
                );
            }
        }
    }
}
