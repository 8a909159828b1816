//! ID-token verification, step by step after OpenID Connect Core 1.0 §3.1.3.7.
//!
//! The signature and the algorithm allowlist are [`super::jws`]'s; the claims are checked here,
//! with the injected clock (jsonwebtoken's own system-clock checks are switched off).

use chrono::{DateTime, Utc};
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::error::IdpError;
use super::jws::{Audience, JwsError, LEEWAY_SECONDS};
use super::provider::Provider;
use crate::domain::{AccessToken, IdToken, Nonce};

/// Why an ID token was refused. Logged; the browser sees only `login_error=invalid_token`.
#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    #[error("the ID token is not a well-formed JWS")]
    Malformed,
    #[error("the ID token is signed with `{0}`, which is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("no JWKS key fits the ID token's kid and alg")]
    UnknownKey,
    #[error("the IdP's keys could not be fetched: {0}")]
    KeysUnavailable(#[from] IdpError),
    #[error("the ID token's signature is invalid")]
    BadSignature,
    #[error("the ID token's claims are malformed: {0}")]
    MalformedClaims(String),
    #[error("iss `{0}` is not the configured issuer")]
    WrongIssuer(String),
    #[error("aud does not contain this client")]
    WrongAudience,
    #[error("azp is missing or not this client")]
    WrongAuthorizedParty,
    #[error("the ID token expired")]
    Expired,
    #[error("iat is in the future")]
    IssuedInFuture,
    #[error("nbf is in the future")]
    NotYetValid,
    #[error("nonce does not match the login")]
    WrongNonce,
    #[error("at_hash does not match the access token")]
    WrongAccessTokenHash,
}

/// The claims of a verified ID token.
impl From<JwsError> for IdTokenError {
    fn from(error: JwsError) -> Self {
        match error {
            JwsError::Malformed => Self::Malformed,
            JwsError::AlgorithmNotAllowed(alg) => Self::AlgorithmNotAllowed(alg),
            JwsError::UnknownKey => Self::UnknownKey,
            JwsError::KeysUnavailable(error) => Self::KeysUnavailable(error),
            JwsError::BadSignature => Self::BadSignature,
            JwsError::MalformedClaims(detail) => Self::MalformedClaims(detail),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdTokenClaims {
    pub iss: String,
    pub sub: String,
    aud: Audience,
    pub exp: i64,
    pub iat: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub azp: Option<String>,
    /// The IdP's session id (OIDC Front-/Back-Channel Logout), for ending sessions by `sid`.
    #[serde(default)]
    pub sid: Option<String>,
    #[serde(default)]
    pub at_hash: Option<String>,
    /// Every claim, for selecting the profile the frontend may see.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// What the token must match: this login's nonce, at this moment.
pub struct Expectations<'a> {
    /// `None` for ID tokens from a refresh, which carry no nonce (OIDC Core §12.2).
    pub nonce: Option<&'a Nonce>,
    pub now: DateTime<Utc>,
    pub access_token: Option<&'a AccessToken>,
}

/// The `at_hash` of an access token (OIDC Core §3.1.3.6): the left half of its hash, base64url.
fn access_token_hash(alg: Algorithm, token: &str) -> String {
    let digest: Vec<u8> = match alg {
        Algorithm::RS384 | Algorithm::PS384 | Algorithm::ES384 => Sha384::digest(token).to_vec(),
        Algorithm::RS512 | Algorithm::PS512 | Algorithm::EdDSA => Sha512::digest(token).to_vec(),
        _ => Sha256::digest(token).to_vec(),
    };
    URL_SAFE_NO_PAD.encode(&digest[..digest.len() / 2])
}

impl Provider {
    /// Verifies an ID token from the token endpoint. Each step names the paragraph it implements.
    #[tracing::instrument(skip_all)]
    pub async fn verify_id_token(
        &self,
        token: &IdToken,
        expect: Expectations<'_>,
    ) -> Result<IdTokenClaims, IdTokenError> {
        // §3.1.3.7 (6, 7): the algorithm is one we allow, then the signature with the IdP's key.
        let verified = self
            .verify_signature::<IdTokenClaims>(token.secret())
            .await?;
        let (alg, claims) = (verified.alg, verified.claims);

        // (2) iss exactly equals the issuer of the discovery document.
        if claims.iss != self.issuer {
            return Err(IdTokenError::WrongIssuer(
                claims.iss.chars().take(200).collect(),
            ));
        }
        // (3) aud contains our client_id; (4, 5) with several audiences, azp must be us, and a
        // present azp must always be us.
        let audiences = claims.aud.values();
        if !audiences.contains(&self.client_id.as_str()) {
            return Err(IdTokenError::WrongAudience);
        }
        match claims.azp.as_deref() {
            Some(azp) if azp != self.client_id => return Err(IdTokenError::WrongAuthorizedParty),
            None if audiences.len() > 1 => return Err(IdTokenError::WrongAuthorizedParty),
            _ => {}
        }
        // (9) exp is in the future; (10) iat is not in the future; nbf, when present, has passed.
        let now = expect.now.timestamp();
        if now >= claims.exp.saturating_add(LEEWAY_SECONDS) {
            return Err(IdTokenError::Expired);
        }
        if claims.iat > now.saturating_add(LEEWAY_SECONDS) {
            return Err(IdTokenError::IssuedInFuture);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECONDS))
        {
            return Err(IdTokenError::NotYetValid);
        }
        // (11) nonce equals the one this login sent; compared in constant time.
        let nonce_matches = match expect.nonce {
            None => true,
            Some(expected) => claims.nonce.as_deref().is_some_and(|nonce| {
                bool::from(nonce.as_bytes().ct_eq(expected.secret().as_bytes()))
            }),
        };
        if !nonce_matches {
            return Err(IdTokenError::WrongNonce);
        }
        if claims.sub.is_empty() {
            return Err(IdTokenError::MalformedClaims("sub is empty".into()));
        }
        // §3.1.3.8: at_hash is optional in the code flow, but when present it must match.
        if let (Some(at_hash), Some(access_token)) = (&claims.at_hash, expect.access_token) {
            if *at_hash != access_token_hash(alg, access_token.secret()) {
                return Err(IdTokenError::WrongAccessTokenHash);
            }
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_hash_matches_the_oidc_core_example() {
        // OIDC Core A.3 (RS256): access token and its at_hash.
        assert_eq!(
            access_token_hash(
                Algorithm::RS256,
                "jHkWEdUXMU1BwAsC4vtUsZwnNvTIxEl0z9K3vx5KF0Y"
            ),
            "77QmUPtjPfzWtF2AnpK9RQ"
        );
    }
}
