//! Signature verification of the JWSs the IdP sends (ID tokens, logout tokens).
//!
//! The algorithm comes from an allowlist of asymmetric algorithms, never from trust in the header:
//! `none` and the HMAC family are refused before any key is looked at, and a key is used only
//! for the algorithms its type fits (an RSA key never verifies an HS256 token). Time claims are
//! not checked here: each token type checks them against the injected clock with its own rules.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::IdpError;
use super::provider::Provider;

/// Clock skew tolerated between the IdP and the broker.
pub const LEEWAY_SECONDS: i64 = 60;

const ALLOWED_ALGORITHMS: &[(&str, Algorithm)] = &[
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// Why a JWS was refused before its claims were looked at.
#[derive(Debug, thiserror::Error)]
pub enum JwsError {
    #[error("not a well-formed JWS")]
    Malformed,
    #[error("signed with `{0}`, which is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("no JWKS key fits its kid and alg")]
    UnknownKey,
    #[error("the IdP's keys could not be fetched: {0}")]
    KeysUnavailable(#[from] IdpError),
    #[error("the signature is invalid")]
    BadSignature,
    #[error("the claims are malformed: {0}")]
    MalformedClaims(String),
}

#[derive(Debug, Deserialize)]
pub(crate) struct Header {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
}

/// A JWS whose signature checked out: its algorithm and its (not yet validated) claims.
pub(super) struct Verified<T> {
    pub alg: Algorithm,
    pub claims: T,
}

pub(crate) fn read_header(token: &str) -> Result<Header, JwsError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwsError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| JwsError::Malformed)
}

/// `aud` as a JWT carries it: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn values(&self) -> Vec<&str> {
        match self {
            Self::One(aud) => vec![aud.as_str()],
            Self::Many(auds) => auds.iter().map(String::as_str).collect(),
        }
    }
}

impl Provider {
    /// Checks the algorithm against the allowlist and the signature with the IdP's key (refetching
    /// the JWKS at most once per interval for an unknown `kid`), then parses the claims.
    pub(super) async fn verify_signature<T: DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<Verified<T>, JwsError> {
        let header = read_header(token)?;
        let alg = ALLOWED_ALGORITHMS
            .iter()
            .find(|(name, _)| *name == header.alg)
            .map(|(_, alg)| *alg)
            .ok_or_else(|| JwsError::AlgorithmNotAllowed(header.alg.chars().take(16).collect()))?;
        let (keys, index) = self
            .verification_key(header.kid.as_deref(), alg)
            .await?
            .ok_or(JwsError::UnknownKey)?;

        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<T>(token, &keys[index].key, &validation)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::Json(e) => {
                    JwsError::MalformedClaims(e.to_string())
                }
                _ => JwsError::BadSignature,
            })?
            .claims;
        Ok(Verified { alg, claims })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing_refuses_garbage() {
        assert!(matches!(read_header("a.b"), Err(JwsError::Malformed)));
        assert!(matches!(read_header("a.b.c.d"), Err(JwsError::Malformed)));
        assert!(matches!(read_header("!!.b.c"), Err(JwsError::Malformed)));
        let none = format!("{}.e30.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
        assert_eq!(read_header(&none).unwrap().alg, "none");
    }
}
