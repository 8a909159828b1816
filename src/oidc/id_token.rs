//! ID-token verification, step by step after OpenID Connect Core 1.0 §3.1.3.7.
//!
//! The algorithm comes from an allowlist of asymmetric algorithms, never from trust in the header:
//! `none` and the HMAC family are refused before any key is looked at, and a key is used only
//! for the algorithms its type fits (an RSA key never verifies an HS256 token). Time checks use
//! the injected clock, so jsonwebtoken's own (system-clock) checks are switched off and done here.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;

use super::error::IdpError;
use super::provider::Provider;
use crate::domain::{AccessToken, IdToken, Nonce};

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

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims of a verified ID token.
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

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// What the token must match: this login's nonce, at this moment.
pub struct Expectations<'a> {
    /// `None` for ID tokens from a refresh, which carry no nonce (OIDC Core §12.2).
    pub nonce: Option<&'a Nonce>,
    pub now: DateTime<Utc>,
    pub access_token: Option<&'a AccessToken>,
}

fn read_header(token: &str) -> Result<Header, IdTokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdTokenError::Malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| IdTokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| IdTokenError::Malformed)
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
        let header = read_header(token.secret())?;
        let alg = ALLOWED_ALGORITHMS
            .iter()
            .find(|(name, _)| *name == header.alg)
            .map(|(_, alg)| *alg)
            .ok_or_else(|| {
                IdTokenError::AlgorithmNotAllowed(header.alg.chars().take(16).collect())
            })?;
        let (keys, index) = self
            .verification_key(header.kid.as_deref(), alg)
            .await?
            .ok_or(IdTokenError::UnknownKey)?;

        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        validation.leeway = 0;
        let claims =
            jsonwebtoken::decode::<IdTokenClaims>(token.secret(), &keys[index].key, &validation)
                .map_err(|error| match error.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => IdTokenError::BadSignature,
                    jsonwebtoken::errors::ErrorKind::Json(e) => {
                        IdTokenError::MalformedClaims(e.to_string())
                    }
                    _ => IdTokenError::BadSignature,
                })?
                .claims;

        // (2) iss exactly equals the issuer of the discovery document.
        if claims.iss != self.issuer {
            return Err(IdTokenError::WrongIssuer(
                claims.iss.chars().take(200).collect(),
            ));
        }
        // (3) aud contains our client_id; (4, 5) with several audiences, azp must be us, and a
        // present azp must always be us.
        let audiences: Vec<&str> = match &claims.aud {
            Audience::One(aud) => vec![aud.as_str()],
            Audience::Many(auds) => auds.iter().map(String::as_str).collect(),
        };
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
    fn header_parsing_refuses_garbage() {
        assert!(matches!(read_header("a.b"), Err(IdTokenError::Malformed)));
        assert!(matches!(
            read_header("a.b.c.d"),
            Err(IdTokenError::Malformed)
        ));
        assert!(matches!(
            read_header("!!.b.c"),
            Err(IdTokenError::Malformed)
        ));
        let none = format!("{}.e30.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
        assert_eq!(read_header(&none).unwrap().alg, "none");
    }

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
