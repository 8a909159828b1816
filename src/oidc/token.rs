//! The token endpoint (RFC 6749 §4.1.3) and token revocation (RFC 7009).
//!
//! Client authentication follows what the IdP advertises: `client_secret_basic` when offered (the
//! default of OIDC Discovery), else `client_secret_post`; a broker without a client secret is a
//! public client and relies on PKCE alone.

use serde::Deserialize;

use super::error::{IdpError, OAuthErrorCode};
use super::provider::{read_limited, Provider};
use crate::domain::{AccessToken, AuthorizationCode, IdToken, PkceVerifier, RefreshToken};
use crate::metrics::IdpEndpoint;

const MAX_TOKEN_RESPONSE_BYTES: usize = 256 * 1024;

/// A successful token response (RFC 6749 §5.1, OIDC Core §3.1.3.3).
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    pub access_token: AccessToken,
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<RefreshToken>,
    #[serde(default)]
    pub id_token: Option<IdToken>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    Basic,
    Post,
    None,
}

fn client_auth(advertised: Option<&Vec<String>>, has_secret: bool) -> ClientAuth {
    if !has_secret {
        return ClientAuth::None;
    }
    let offers =
        |method: &str| advertised.is_none_or(|methods| methods.iter().any(|m| m == method));
    if offers("client_secret_basic") {
        ClientAuth::Basic
    } else if offers("client_secret_post") {
        ClientAuth::Post
    } else {
        ClientAuth::Basic
    }
}

/// RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined and base64-encoded.
fn basic_credentials(client_id: &str, secret: &str) -> String {
    use base64::Engine;
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let joined = format!("{}:{}", encode(client_id), encode(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined)
    )
}

impl Provider {
    /// POSTs a form to a token or revocation endpoint, authenticated as this client.
    async fn post_form(
        &self,
        endpoint: &str,
        kind: IdpEndpoint,
        advertised_methods: Option<&Vec<String>>,
        mut form: Vec<(&str, &str)>,
    ) -> Result<reqwest::Response, IdpError> {
        let secret = self.client_secret.as_ref().map(|s| s.secret());
        let auth = client_auth(advertised_methods, secret.is_some());
        let mut request = self
            .http
            .post(endpoint)
            .header("accept", "application/json");
        match (auth, secret) {
            (ClientAuth::Basic, Some(secret)) => {
                request =
                    request.header("authorization", basic_credentials(&self.client_id, secret));
            }
            (ClientAuth::Post, Some(secret)) => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret));
            }
            _ => form.push(("client_id", &self.client_id)),
        }
        // Timed to the response head; the body (a few hundred bytes) follows.
        let started = std::time::Instant::now();
        let response = request.form(&form).send().await;
        self.metrics.idp_request(kind, started.elapsed());
        Ok(response?)
    }

    async fn read_token_response(
        &self,
        response: reqwest::Response,
    ) -> Result<TokenResponse, IdpError> {
        let status = response.status();
        let body = read_limited(response, MAX_TOKEN_RESPONSE_BYTES).await?;
        if status.is_success() {
            let tokens: TokenResponse = serde_json::from_slice(&body)
                .map_err(|e| IdpError::InvalidResponse(format!("token response: {e}")))?;
            // RFC 6750: the broker only knows how to use bearer tokens.
            if !tokens.token_type.eq_ignore_ascii_case("bearer") {
                return Err(IdpError::InvalidResponse("token_type is not Bearer".into()));
            }
            return Ok(tokens);
        }
        match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(error) if status.is_client_error() => Err(IdpError::OAuth {
                error: OAuthErrorCode::parse(&error.error),
                description: error
                    .error_description
                    .map(|d| d.chars().take(300).collect()),
            }),
            // A 4xx without an OAuth error body is still a refusal, not an outage.
            _ if status.is_client_error() => Err(IdpError::InvalidResponse(format!(
                "HTTP {status} without an OAuth error"
            ))),
            _ => Err(IdpError::Status(status.as_u16())),
        }
    }

    /// Exchanges an authorization code, proving possession of the PKCE verifier.
    #[tracing::instrument(skip_all)]
    pub async fn exchange_code(
        &self,
        code: &AuthorizationCode,
        verifier: &PkceVerifier,
    ) -> Result<TokenResponse, IdpError> {
        let metadata = self.metadata().await?;
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.secret()),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", verifier.secret()),
        ];
        let response = self
            .post_form(
                &metadata.token_endpoint,
                IdpEndpoint::Token,
                metadata.token_endpoint_auth_methods_supported.as_ref(),
                form,
            )
            .await?;
        self.read_token_response(response).await
    }

    /// Refreshes the access token (RFC 6749 §6). An IdP that rotates refresh tokens returns a new
    /// one; the caller must store it before anyone can use the old one again.
    #[tracing::instrument(skip_all)]
    pub async fn refresh(&self, refresh_token: &RefreshToken) -> Result<TokenResponse, IdpError> {
        let metadata = self.metadata().await?;
        let form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.secret()),
        ];
        let response = self
            .post_form(
                &metadata.token_endpoint,
                IdpEndpoint::Token,
                metadata.token_endpoint_auth_methods_supported.as_ref(),
                form,
            )
            .await?;
        self.read_token_response(response).await
    }

    /// Revokes a token (RFC 7009). `Ok(false)` when the IdP offers no revocation endpoint.
    #[tracing::instrument(skip_all, fields(hint = hint))]
    pub async fn revoke(&self, token: &str, hint: &'static str) -> Result<bool, IdpError> {
        let metadata = self.metadata().await?;
        let Some(endpoint) = metadata.revocation_endpoint.as_deref() else {
            return Ok(false);
        };
        let methods = metadata
            .revocation_endpoint_auth_methods_supported
            .as_ref()
            .or(metadata.token_endpoint_auth_methods_supported.as_ref());
        let response = self
            .post_form(
                endpoint,
                IdpEndpoint::Revocation,
                methods,
                vec![("token", token), ("token_type_hint", hint)],
            )
            .await?;
        // RFC 7009 §2.2: 200 whether or not the token was valid.
        if response.status().is_success() {
            Ok(true)
        } else {
            Err(IdpError::Status(response.status().as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        // "a b:c" / "p@ss:w%rd" → "a+b%3Ac:p%40ss%3Aw%25rd"
        let header = basic_credentials("a b:c", "p@ss:w%rd");
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(header.trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "a+b%3Ac:p%40ss%3Aw%25rd"
        );
    }

    #[test]
    fn client_auth_follows_what_the_idp_offers() {
        let methods = |m: &[&str]| Some(m.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(client_auth(None, true), ClientAuth::Basic);
        assert_eq!(
            client_auth(methods(&["client_secret_post"]).as_ref(), true),
            ClientAuth::Post
        );
        assert_eq!(
            client_auth(
                methods(&["client_secret_post", "client_secret_basic"]).as_ref(),
                true
            ),
            ClientAuth::Basic
        );
        assert_eq!(
            client_auth(methods(&["client_secret_basic"]).as_ref(), false),
            ClientAuth::None
        );
    }
}
