//! OAuth 2.0 building blocks shared by the endpoints: request parameters, error codes, PKCE, random values.

use std::collections::HashMap;

use actix_web::http::header::{CACHE_CONTROL, PRAGMA};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The OAuth 2.0 / OpenID Connect error codes this IdP answers with; `as_str` is the RFC string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    UnsupportedGrantType,
    UnsupportedResponseType,
    AccessDenied,
    LoginRequired,
    ServerError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::UnsupportedResponseType => "unsupported_response_type",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::LoginRequired => "login_required",
            ErrorCode::ServerError => "server_error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: the error code and a description for the client's logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct OAuthError {
    pub code: ErrorCode,
    pub description: String,
}

impl OAuthError {
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }

    /// The JSON error response of the token and revocation endpoints (RFC 6749 §5.2).
    pub fn response(&self) -> HttpResponse {
        let status = match self.code {
            ErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            ErrorCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        json_error(status, self.code.as_str(), &self.description)
    }
}

/// A JSON OAuth error with any status and code (the test knobs inject codes this IdP never uses).
pub(super) fn json_error(status: StatusCode, error: &str, description: &str) -> HttpResponse {
    let mut response = no_store(HttpResponse::build(status));
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6749 §5.2: a 401 for invalid_client carries the scheme the client should use.
        response.insert_header(("WWW-Authenticate", "Basic realm=\"token-broker dev IdP\""));
    }
    response.json(serde_json::json!({"error": error, "error_description": description}))
}

/// RFC 6749 §5.1: responses carrying tokens (and their errors) must not be cached.
pub(super) fn no_store(
    mut builder: actix_web::HttpResponseBuilder,
) -> actix_web::HttpResponseBuilder {
    builder
        .insert_header((CACHE_CONTROL, "no-store"))
        .insert_header((PRAGMA, "no-cache"));
    builder
}

/// Request parameters from a query string or a form body.
#[derive(Debug, Default)]
pub(super) struct Params(HashMap<String, String>);

impl Params {
    /// RFC 6749 §3.1: parameters must not be repeated; the error names the repeated one.
    pub fn parse(encoded: &[u8]) -> Result<Params, OAuthError> {
        let mut params = HashMap::new();
        for (name, value) in url::form_urlencoded::parse(encoded) {
            if params
                .insert(name.to_string(), value.into_owned())
                .is_some()
            {
                return Err(OAuthError::new(
                    ErrorCode::InvalidRequest,
                    format!("the parameter {name} is repeated"),
                ));
            }
        }
        Ok(Params(params))
    }

    /// RFC 6749 §3.1: a parameter without a value is treated as omitted.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }

    /// Whether the parameter was sent at all, even empty.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name).ok_or_else(|| {
            OAuthError::new(
                ErrorCode::InvalidRequest,
                format!("the parameter {name} is missing"),
            )
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }
}

/// RFC 7636 §4.6: BASE64URL(SHA256(code_verifier)) must equal the S256 `code_challenge`.
pub(super) fn pkce_s256_matches(verifier: &str, challenge: &str) -> bool {
    // §4.1: 43 to 128 unreserved characters.
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    well_formed && bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

/// An S256 challenge is the base64url of a SHA-256: exactly 43 characters of that alphabet.
pub(super) fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && URL_SAFE_NO_PAD
            .decode(challenge)
            .is_ok_and(|digest| digest.len() == 32)
}

/// `bytes` random bytes from the OS CSPRNG, base64url without padding.
pub(super) fn random_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buffer);
    URL_SAFE_NO_PAD.encode(buffer)
}

/// Compares two secrets in time independent of where they differ. Hashing first also hides the
/// length of the expected secret.
pub(super) fn secrets_equal(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

/// The scope values in a space-separated `scope` parameter.
pub(super) fn scope_values(scope: &str) -> impl Iterator<Item = &str> {
    scope.split(' ').filter(|value| !value.is_empty())
}

pub(super) fn has_scope(scope: &str, wanted: &str) -> bool {
    scope_values(scope).any(|value| value == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7636 Appendix B.
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    #[test]
    fn pkce_accepts_the_rfc_example_and_nothing_else() {
        assert!(pkce_s256_matches(VERIFIER, CHALLENGE));
        assert!(
            !pkce_s256_matches(CHALLENGE, CHALLENGE),
            "plain is not S256"
        );
        assert!(!pkce_s256_matches(&VERIFIER.replace('d', "e"), CHALLENGE));
        assert!(!pkce_s256_matches(
            "short",
            &URL_SAFE_NO_PAD.encode(Sha256::digest(b"short"))
        ));
        assert!(is_s256_challenge(CHALLENGE));
        assert!(!is_s256_challenge(VERIFIER.trim_end_matches('k')));
        assert!(!is_s256_challenge("plain-challenge"));
    }

    #[test]
    fn repeated_parameters_are_refused_and_empty_ones_are_absent() {
        let error = Params::parse(b"code=a&code=b").expect_err("repeated");
        assert_eq!(error.code, ErrorCode::InvalidRequest);
        let params = Params::parse(b"state=&scope=openid+email&x=%26").expect("parses");
        assert_eq!(params.get("state"), None);
        assert_eq!(params.get("scope"), Some("openid email"));
        assert_eq!(params.get("x"), Some("&"));
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(secrets_equal("s3cret", "s3cret"));
        assert!(!secrets_equal("s3cret", "s3cre"));
        assert!(!secrets_equal("", "s3cret"));
    }

    #[test]
    fn random_tokens_are_256_bits_and_differ() {
        let (a, b) = (random_token(32), random_token(32));
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
    }
}
