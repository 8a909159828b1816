//! `/backchannel-logout`: the IdP tells the broker that a user's IdP session ended (OpenID Connect
//! Back-Channel Logout 1.0), and every matching session ends on every replica at once: the rows go
//! from PostgreSQL and each cached view in Redis becomes an `ended` tombstone.
//!
//! Order matters: the `jti` is recorded before anything is ended, so a replayed token ends
//! nothing, not even sessions created after the first logout. When ending fails after that, the
//! `jti` is forgotten again so the IdP's retry is not mistaken for a replay.
//!
//! When Redis cannot record the `jti` (full, or unreachable), the logout is carried out anyway,
//! unrecorded; a `jti` recorded before is still refused when Redis can read it (full, it can).
//! Refusing instead left alive sessions that the IdP had ended (and the IdP need not retry a
//! logout: Keycloak, for one, does not), for as long as Redis stayed full; a user or an
//! administrator ending a session at the IdP must be able to rely on it. What it gives up: a
//! replay of that token while it is accepted (5 minutes from its `iat`) would end that IdP
//! session's, or that user's, sessions again, new ones included; a replay needs the token,
//! which only travels between the IdP and the broker, over TLS.

use super::Broker;
use crate::oidc::logout_token::LogoutTokenError;
use crate::oidc::IdpError;
use crate::store::StoreError;

/// Why a back-channel logout was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum BackchannelLogoutError {
    /// The token failed validation, or was seen before: `400 invalid_request`.
    #[error("{0}")]
    InvalidToken(#[from] LogoutTokenError),
    #[error("the logout token was already used")]
    Replayed,
    /// The IdP's keys could not be fetched: the IdP may retry.
    #[error("the IdP's keys could not be fetched: {0}")]
    KeysUnavailable(IdpError),
    /// A store failed: nothing or not everything was ended, and the IdP may retry.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What a back-channel logout ended.
#[derive(Debug)]
pub struct BackchannelLogoutDone {
    pub sessions_ended: usize,
}

impl Broker {
    #[tracing::instrument(skip_all)]
    pub async fn backchannel_logout(
        &self,
        logout_token: &str,
    ) -> Result<BackchannelLogoutDone, BackchannelLogoutError> {
        let now = self.clock.now();
        let claims = match self.provider.verify_logout_token(logout_token, now).await {
            Ok(claims) => claims,
            Err(LogoutTokenError::KeysUnavailable(error)) => {
                return Err(BackchannelLogoutError::KeysUnavailable(error))
            }
            Err(error) => return Err(error.into()),
        };
        let replay_key = format!("logout-jti:{}:{}", claims.issuer, claims.jti);
        let recorded = match self
            .cache
            .remember_once(&replay_key, claims.remember_for(now))
            .await
        {
            Ok(true) => true,
            Ok(false) => return Err(BackchannelLogoutError::Replayed),
            Err(error) => {
                // Redis is full or unreachable. The logout is carried out all the same (see the
                // module's documentation).
                self.metrics.store_error(&error);
                tracing::warn!(%error, "could not record the logout token's jti; ending its sessions all the same");
                false
            }
        };

        let ended = match self.end_matching_sessions(&claims.sid, &claims.sub).await {
            Ok(ended) => ended,
            Err(error) => {
                if recorded {
                    if let Err(forget_error) = self.cache.forget(&replay_key).await {
                        tracing::warn!(error = %forget_error, "could not forget the logout token's jti");
                    }
                }
                return Err(error.into());
            }
        };
        tracing::info!(
            sessions_ended = ended,
            by_sid = claims.sid.is_some(),
            "back-channel logout"
        );
        Ok(BackchannelLogoutDone {
            sessions_ended: ended,
        })
    }

    /// Ends the sessions of an IdP session (`sid`, within `sub` when both are given), or of every
    /// session of `sub` when the token names no `sid` (§2.4).
    async fn end_matching_sessions(
        &self,
        sid: &Option<String>,
        sub: &Option<String>,
    ) -> Result<usize, StoreError> {
        let hashes = match (sid, sub) {
            (Some(sid), sub) => {
                self.sessions
                    .delete_by_idp_session(sid, sub.as_deref())
                    .await?
            }
            (None, Some(sub)) => self.sessions.delete_by_subject(sub).await?,
            (None, None) => Vec::new(),
        };
        for hash in &hashes {
            self.cache.mark_ended(hash).await?;
        }
        Ok(hashes.len())
    }
}
