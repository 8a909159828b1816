//! The authorization endpoint (OpenID Connect Core §3.1.2): the login page and the authorization response.
//!
//! This is a development IdP: anyone can sign in as any user, and the form carries no CSRF token
//! and needs no cookie, so that tests can log in by POSTing the authorization parameters plus
//! `username` directly. A real IdP must bind its login form to the browser.

use std::time::Instant;

use actix_web::http::header::{CACHE_CONTROL, LOCATION};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::controls::IssMode;
use super::grants::{Authorization, CodeBinding};
use super::html::{self, LoginForm};
use super::oauth::{has_scope, is_s256_challenge, ErrorCode, OAuthError, Params};
use super::DevIdp;

/// `GET /authorize`: validates the request and shows the login form.
pub(super) async fn show(idp: web::Data<DevIdp>, req: HttpRequest) -> HttpResponse {
    idp.count(|stats| stats.authorize_requests += 1);
    let params = match Params::parse(req.query_string().as_bytes()) {
        Ok(params) => params,
        Err(error) => return html::error_page(&error.description),
    };
    match validate(&idp, &params) {
        Ok(request) => login_form(&idp, &request, &params, "", None, StatusCode::OK),
        Err(refusal) => refusal.response(&idp),
    }
}

/// `POST /authorize`: the submitted login form. Validates everything again, then cancels or logs
/// in. An authorization request sent by POST (OpenID Connect Core §3.1.2.1) gets the form.
pub(super) async fn submit(idp: web::Data<DevIdp>, body: web::Bytes) -> HttpResponse {
    idp.count(|stats| stats.authorize_requests += 1);
    let params = match Params::parse(&body) {
        Ok(params) => params,
        Err(error) => return html::error_page(&error.description),
    };
    let request = match validate(&idp, &params) {
        Ok(request) => request,
        Err(refusal) => return refusal.response(&idp),
    };
    if params.get("cancel").is_some() {
        let error = OAuthError::new(ErrorCode::AccessDenied, "the user cancelled");
        return Refusal::Redirect {
            reply_to: request.reply_to,
            error,
        }
        .response(&idp);
    }
    if !params.has("username") {
        return login_form(&idp, &request, &params, "", None, StatusCode::OK);
    }
    let username = params.get("username").unwrap_or_default();
    if !is_valid_username(username) {
        let error = "A user name is 1 to 64 letters, digits, or . _ @ -";
        return login_form(
            &idp,
            &request,
            &params,
            username,
            Some(error),
            StatusCode::BAD_REQUEST,
        );
    }

    let mut grants = idp.grants();
    let sid = grants.start_session(username);
    let authorization = Authorization {
        client_id: idp.client().id.clone(),
        username: username.to_owned(),
        scope: request.scope.clone(),
        sid,
        nonce: Some(request.nonce.clone()),
        auth_time: chrono::Utc::now().timestamp(),
    };
    let binding = CodeBinding {
        redirect_uri: request.reply_to.redirect_uri.clone(),
        code_challenge: request.code_challenge.clone(),
    };
    let code = grants.issue_code(authorization, binding, Instant::now());
    drop(grants);
    tracing::info!(username, "development IdP: signed in");
    redirect(&idp, &request.reply_to, &[("code", &code)])
}

/// Where the authorization response goes: a registered redirect URI, and the client's `state`.
struct ReplyTo {
    redirect_uri: String,
    state: Option<String>,
}

/// A valid authorization request.
struct AuthorizeRequest {
    reply_to: ReplyTo,
    scope: String,
    nonce: String,
    code_challenge: String,
}

enum Refusal {
    /// The client or redirect URI is not registered: never redirect (RFC 6749 §4.1.2.1).
    Page(String),
    /// Reported to the client at its redirect URI.
    Redirect {
        reply_to: ReplyTo,
        error: OAuthError,
    },
}

impl Refusal {
    fn response(self, idp: &DevIdp) -> HttpResponse {
        match self {
            Refusal::Page(message) => html::error_page(&message),
            Refusal::Redirect { reply_to, error } => redirect(
                idp,
                &reply_to,
                &[
                    ("error", error.code.as_str()),
                    ("error_description", &error.description),
                ],
            ),
        }
    }
}

fn validate(idp: &DevIdp, params: &Params) -> Result<AuthorizeRequest, Refusal> {
    let client = idp.client();
    if params.get("client_id") != Some(client.id.as_str()) {
        return Err(Refusal::Page("Unknown client_id.".into()));
    }
    let Some(redirect_uri) = params
        .get("redirect_uri")
        .filter(|uri| client.redirect_uris.iter().any(|r| r == uri))
    else {
        return Err(Refusal::Page(
            "redirect_uri is missing or not registered for this client.".into(),
        ));
    };
    let request = AuthorizeRequest {
        reply_to: ReplyTo {
            redirect_uri: redirect_uri.to_owned(),
            state: params.get("state").map(str::to_owned),
        },
        scope: params.get("scope").unwrap_or_default().to_owned(),
        nonce: params.get("nonce").unwrap_or_default().to_owned(),
        code_challenge: params.get("code_challenge").unwrap_or_default().to_owned(),
    };
    let refuse = |code, description: &str| Some(OAuthError::new(code, description));
    let error = if params.get("response_type") != Some("code") {
        refuse(
            ErrorCode::UnsupportedResponseType,
            "response_type must be code",
        )
    } else if !has_scope(&request.scope, "openid") {
        refuse(ErrorCode::InvalidScope, "scope must contain openid")
    } else if params.get("code_challenge_method") != Some("S256") {
        // RFC 7636 §4.3 defaults a missing method to plain; this IdP accepts S256 only.
        refuse(
            ErrorCode::InvalidRequest,
            "PKCE with code_challenge_method=S256 is required",
        )
    } else if !is_s256_challenge(&request.code_challenge) {
        refuse(
            ErrorCode::InvalidRequest,
            "code_challenge is missing or not an S256 challenge",
        )
    } else if request.reply_to.state.is_none() {
        refuse(ErrorCode::InvalidRequest, "state is required")
    } else if request.nonce.is_empty() {
        refuse(ErrorCode::InvalidRequest, "nonce is required")
    } else if params
        .get("prompt")
        .is_some_and(|prompt| prompt.split(' ').any(|p| p == "none"))
    {
        // There is no IdP session cookie, so there is never a session to reuse silently.
        refuse(
            ErrorCode::LoginRequired,
            "prompt=none but the user must sign in",
        )
    } else {
        None
    };
    match error {
        None => Ok(request),
        Some(error) => Err(Refusal::Redirect {
            reply_to: request.reply_to,
            error,
        }),
    }
}

/// 1 to 64 characters of `[A-Za-z0-9._@-]`.
fn is_valid_username(username: &str) -> bool {
    (1..=64).contains(&username.len())
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
}

/// The authorization response: `redirect_uri` plus `response`, `state` and `iss` (RFC 9207).
fn redirect(idp: &DevIdp, reply_to: &ReplyTo, response: &[(&str, &str)]) -> HttpResponse {
    let Ok(mut location) = url::Url::parse(&reply_to.redirect_uri) else {
        return html::error_page("The registered redirect_uri is not a valid URL.");
    };
    {
        let mut query = location.query_pairs_mut();
        query.extend_pairs(response);
        if let Some(state) = &reply_to.state {
            query.append_pair("state", state);
        }
        match idp.controls().snapshot().response_iss {
            IssMode::Correct => {
                query.append_pair("iss", &idp.issuer());
            }
            IssMode::Value(iss) => {
                query.append_pair("iss", &iss);
            }
            IssMode::Omit => {}
        }
    }
    HttpResponse::Found()
        .insert_header((LOCATION, location.as_str()))
        .insert_header((CACHE_CONTROL, "no-store"))
        .finish()
}

fn login_form(
    idp: &DevIdp,
    request: &AuthorizeRequest,
    params: &Params,
    username: &str,
    error: Option<&str>,
    status: StatusCode,
) -> HttpResponse {
    let mut hidden: Vec<(&str, &str)> = params
        .iter()
        .filter(|(name, _)| !["username", "cancel", "signin"].contains(name))
        .collect();
    hidden.sort_unstable();
    let mut claims = vec![("sub", "your user name")];
    if has_scope(&request.scope, "profile") {
        claims.extend([
            ("name", "your user name"),
            ("preferred_username", "your user name"),
        ]);
    }
    if has_scope(&request.scope, "email") {
        claims.extend([
            (
                "email",
                "<user name>@example.com, or the user name if it has an @",
            ),
            ("email_verified", "true"),
        ]);
    }
    let action = idp.endpoint("/authorize");
    let form = LoginForm {
        action: &action,
        client_id: &idp.client().id,
        hidden,
        claims,
        username,
        error,
    };
    html::respond(status, html::login_page(&form))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_short_and_plain() {
        for good in [
            "alice",
            "a",
            "alice.smith@example.com",
            "x_y-z",
            &"a".repeat(64),
        ] {
            assert!(is_valid_username(good), "{good}");
        }
        for bad in ["", "al ice", "<script>", "ålice", &"a".repeat(65), "a/b"] {
            assert!(!is_valid_username(bad), "{bad}");
        }
    }
}
