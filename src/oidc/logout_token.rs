//! Logout-token validation, step by step after OpenID Connect Back-Channel Logout 1.0 §2.6.
//!
//! The signature and the algorithm allowlist are [`super::jws`]'s. Here: `iss`, `aud`, `iat` (not
//! in the future, and not older than [`MAX_AGE_SECONDS`]: the spec leaves the age to the RP),
//! `exp` when present, the back-channel `events` member, `sid` or `sub`, and no `nonce` (which
//! keeps an ID token from passing as a logout token). Replay (`jti`) is the caller's check:
//! [`LogoutClaims::remember_for`] says how long the `jti` must be remembered.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::error::IdpError;
use super::jws::{Audience, JwsError, LEEWAY_SECONDS};
use super::provider::Provider;

/// The member of `events` that makes a JWT a logout token (§2.4).
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// A logout token issued longer ago than this is refused, whatever its `exp` says.
pub const MAX_AGE_SECONDS: i64 = 300;

/// Why a logout token was refused. The IdP gets `400 invalid_request`; the reason is logged.
#[derive(Debug, thiserror::Error)]
pub enum LogoutTokenError {
    #[error("the logout token is not acceptable: {0}")]
    Jws(JwsError),
    #[error("the IdP's keys could not be fetched: {0}")]
    KeysUnavailable(IdpError),
    #[error("the logout token's claims are malformed: {0}")]
    MalformedClaims(&'static str),
    #[error("iss is not the configured issuer")]
    WrongIssuer,
    #[error("aud does not contain this client")]
    WrongAudience,
    #[error("the logout token expired")]
    Expired,
    #[error("iat is in the future")]
    IssuedInFuture,
    #[error("the logout token was issued too long ago")]
    TooOld,
    #[error("events has no back-channel logout event")]
    NotALogoutEvent,
    #[error("the logout token names neither sid nor sub")]
    NoSubjectOrSession,
    #[error("a logout token must not contain a nonce")]
    HasNonce,
    #[error("the logout token has no jti")]
    NoTokenId,
}

impl From<JwsError> for LogoutTokenError {
    fn from(error: JwsError) -> Self {
        match error {
            JwsError::KeysUnavailable(error) => Self::KeysUnavailable(error),
            other => Self::Jws(other),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawClaims {
    iss: String,
    aud: Audience,
    iat: i64,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    events: Option<serde_json::Value>,
    #[serde(default)]
    nonce: Option<serde_json::Value>,
}

/// A logout token that passed every check but the replay check.
#[derive(Debug, Clone)]
pub struct LogoutClaims {
    pub issuer: String,
    pub jti: String,
    pub sub: Option<String>,
    pub sid: Option<String>,
    /// The last moment this token would still be accepted (its `exp` or its maximum age, plus
    /// leeway): its `jti` must be remembered until then.
    pub valid_until: DateTime<Utc>,
}

impl LogoutClaims {
    /// How long the `jti` must be remembered from `now` (at least one second).
    pub fn remember_for(&self, now: DateTime<Utc>) -> std::time::Duration {
        (self.valid_until - now)
            .to_std()
            .unwrap_or_default()
            .max(std::time::Duration::from_secs(1))
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

impl Provider {
    /// Validates a logout token (§2.6, steps 1–6; step 7, replay, is left to the caller).
    #[tracing::instrument(skip_all)]
    pub async fn verify_logout_token(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<LogoutClaims, LogoutTokenError> {
        // (3) signature by the IdP's key, algorithm from the allowlist.
        let claims: RawClaims = self.verify_signature(token).await?.claims;
        // (4) iss, aud, iat (and exp when present).
        if claims.iss != self.issuer {
            return Err(LogoutTokenError::WrongIssuer);
        }
        if !claims.aud.values().contains(&self.client_id.as_str()) {
            return Err(LogoutTokenError::WrongAudience);
        }
        let now_seconds = now.timestamp();
        if claims.iat > now_seconds.saturating_add(LEEWAY_SECONDS) {
            return Err(LogoutTokenError::IssuedInFuture);
        }
        let too_old_at = claims
            .iat
            .saturating_add(MAX_AGE_SECONDS)
            .saturating_add(LEEWAY_SECONDS);
        if now_seconds >= too_old_at {
            return Err(LogoutTokenError::TooOld);
        }
        let expires_at = claims.exp.map(|exp| exp.saturating_add(LEEWAY_SECONDS));
        if expires_at.is_some_and(|expires_at| now_seconds >= expires_at) {
            return Err(LogoutTokenError::Expired);
        }
        // (5) events holds the back-channel logout event, whose value is a JSON object.
        let is_logout_event = claims
            .events
            .as_ref()
            .and_then(|events| events.get(BACKCHANNEL_LOGOUT_EVENT))
            .is_some_and(serde_json::Value::is_object);
        if !is_logout_event {
            return Err(LogoutTokenError::NotALogoutEvent);
        }
        // (6) sid or sub; (7) no nonce.
        let (sub, sid) = (non_empty(claims.sub), non_empty(claims.sid));
        if sub.is_none() && sid.is_none() {
            return Err(LogoutTokenError::NoSubjectOrSession);
        }
        if claims.nonce.is_some() {
            return Err(LogoutTokenError::HasNonce);
        }
        // jti is REQUIRED (§2.4): without it, replay could not be detected.
        let jti = non_empty(claims.jti).ok_or(LogoutTokenError::NoTokenId)?;
        if jti.len() > 256 {
            return Err(LogoutTokenError::MalformedClaims(
                "jti is longer than 256 bytes",
            ));
        }
        let valid_until_seconds = expires_at.map_or(too_old_at, |exp| exp.min(too_old_at));
        let valid_until = DateTime::from_timestamp(valid_until_seconds, 0).unwrap_or(now);
        Ok(LogoutClaims {
            issuer: claims.iss,
            jti,
            sub,
            sid,
            valid_until,
        })
    }
}
