//! Logout: RP-Initiated Logout 1.0 (the end-session endpoint) and Back-Channel Logout 1.0 (sending).

use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::html;
use super::mint::logout_token_claims;
use super::oauth::Params;
use super::DevIdp;

/// `GET` or `POST /end-session` (RP-Initiated Logout 1.0 §2 requires both).
pub(super) async fn end_session(
    idp: web::Data<DevIdp>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    idp.count(|stats| stats.end_sessions += 1);
    let encoded = if req.method() == Method::POST {
        &body[..]
    } else {
        req.query_string().as_bytes()
    };
    let params = match Params::parse(encoded) {
        Ok(params) => params,
        Err(error) => return html::error_page(&error.description),
    };
    match end(&idp, &params) {
        Ok(redirect) => html::respond(StatusCode::OK, html::signed_out_page(redirect.as_deref())),
        Err(message) => html::error_page(message),
    }
}

/// Ends the IdP session named by the `id_token_hint` and returns where to send the browser.
fn end(idp: &DevIdp, params: &Params) -> Result<Option<String>, &'static str> {
    let client = idp.client();
    let hint = match params.get("id_token_hint") {
        None => None,
        // Signature by one of this IdP's keys, `iss` and `aud`; an expired token is fine (§2).
        Some(token) => Some(
            idp.verify_own_token(token)
                .ok_or("id_token_hint is not an ID token this IdP issued to this client.")?,
        ),
    };
    if params.get("client_id").is_some_and(|id| id != client.id) {
        return Err("Unknown client_id.");
    }
    let redirect = match params.get("post_logout_redirect_uri") {
        None => None,
        Some(uri) => {
            // §2: the client must be identified for its redirect URI to be checked.
            if hint.is_none() && params.get("client_id").is_none() {
                return Err("post_logout_redirect_uri needs id_token_hint or client_id.");
            }
            if !client
                .post_logout_redirect_uris
                .iter()
                .any(|registered| registered == uri)
            {
                return Err("post_logout_redirect_uri is not registered for this client.");
            }
            let mut url = url::Url::parse(uri)
                .map_err(|_| "The registered post_logout_redirect_uri is not a URL.")?;
            if let Some(state) = params.get("state") {
                url.query_pairs_mut().append_pair("state", state);
            }
            Some(url.into())
        }
    };
    if let Some(sid) = hint.as_ref().and_then(|claims| claims["sid"].as_str()) {
        idp.grants().end_session(sid);
    }
    Ok(redirect)
}

impl DevIdp {
    /// The claims of a valid logout token of this IdP for its client, issued now, for tests that
    /// tamper with them before [`DevIdp::sign_logout_token`]. An empty `sub` is left out.
    pub fn logout_token_claims(&self, sub: &str, sid: Option<&str>) -> serde_json::Value {
        logout_token_claims(&self.issuer(), &self.client().id, sub, sid)
    }

    /// Signs claims as a logout token (`typ: logout+jwt`) with the current key.
    pub fn sign_logout_token(&self, claims: &serde_json::Value) -> String {
        let alg = self.controls().signing_alg();
        self.current_keys()
            .sign(alg, "logout+jwt", claims)
            .unwrap_or_default()
    }

    /// POSTs a logout token (Back-Channel Logout 1.0 §2.4) for `sub` and/or `sid` to the client's
    /// back-channel logout URI and returns the HTTP status it answered. An empty `sub` is left out.
    pub async fn send_backchannel_logout(
        &self,
        backchannel_logout_uri: &str,
        sub: &str,
        sid: Option<&str>,
    ) -> Result<u16, String> {
        let claims = self.logout_token_claims(sub, sid);
        // §2.4: explicit typing, so that a logout token cannot pass for an ID token.
        let alg = self.controls().signing_alg();
        let logout_token = self
            .current_keys()
            .sign(alg, "logout+jwt", &claims)
            .map_err(|error| format!("signing the logout token: {error}"))?;
        // Built per call: logouts are rare, and this is a development and test tool.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| format!("building the HTTP client: {error}"))?;
        let response = http
            .post(backchannel_logout_uri)
            .form(&[("logout_token", logout_token)])
            .send()
            .await
            .map_err(|error| format!("POST {backchannel_logout_uri}: {error}"))?;
        Ok(response.status().as_u16())
    }
}
