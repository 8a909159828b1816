//! Access tokens for servers (`/auth` and the relay): the cached token, or a refresh — exactly one refresh grant
//! per session at a time, across all replicas (SPEC "Refresh").
//!
//! Whoever takes the session's Redis lock refreshes; everyone else waits (bounded) for the token
//! it caches. The holder first looks again for a token (another replica may have refreshed while
//! it waited) and re-reads the stored refresh token, and it commits a rotated refresh token to
//! PostgreSQL before it releases the lock, so an IdP that rotates refresh tokens never sees the
//! old one twice. `invalid_grant` ends the session; a network failure or 5xx keeps it.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{chrono_duration, Broker};
use crate::domain::{AccessToken, SessionId, SessionIdHash};
use crate::metrics::RefreshOutcome;
use crate::oidc::id_token::Expectations;
use crate::oidc::{IdpError, OAuthErrorCode, TokenResponse};
use crate::store::{CachedAccessToken, SessionRecord, StoreError};

/// A token is refreshed when it has less than this left.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// The lifetime assumed when the token response has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// How often a request waiting for another replica's refresh looks for its result.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// A token for the upstream, and whose it is.
#[derive(Debug)]
pub struct ForwardedToken {
    pub access_token: AccessToken,
    pub subject: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No live session, or it just ended (the IdP refused its refresh token): 401.
    #[error("no live session")]
    NoSession,
    /// The IdP could not refresh right now; the session is kept: 503, try again.
    #[error("the IdP could not refresh the token: {0}")]
    IdpUnavailable(IdpError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Broker {
    /// Caches the access token of a token response, with its expiry and refresh time.
    pub(crate) async fn cache_access_token(
        &self,
        hash: &SessionIdHash,
        tokens: &TokenResponse,
        now: DateTime<Utc>,
    ) {
        let lifetime = tokens
            .expires_in
            .filter(|seconds| *seconds > 0)
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let cached = CachedAccessToken {
            token: tokens.access_token.clone(),
            expires_at: now + chrono_duration(lifetime),
            refresh_at: now + chrono_duration(lifetime - margin),
        };
        if let Err(error) = self.cache.put_access_token(hash, &cached, lifetime).await {
            self.metrics.store_error(&error);
            tracing::warn!(%error, "could not cache the access token");
        }
    }

    /// The session's access token if cached, not due for refresh, and not the `stale` one.
    async fn fresh_cached_token(
        &self,
        hash: &SessionIdHash,
        stale: Option<&AccessToken>,
    ) -> Result<Option<AccessToken>, StoreError> {
        let cached = self.cache.get_access_token(hash).await?;
        Ok(self.fresh(cached, stale))
    }

    /// The token of `cached` if it is not due for refresh and not the `stale` one.
    fn fresh(
        &self,
        cached: Option<CachedAccessToken>,
        stale: Option<&AccessToken>,
    ) -> Option<AccessToken> {
        let now = self.clock.now();
        cached
            .filter(|cached| now < cached.refresh_at && Some(&cached.token) != stale)
            .map(|cached| cached.token)
    }

    /// A fresh access token for the session behind the cookie (forward-auth and the relay).
    /// No span of its own: it is every `/auth` call's path, inside the request's span.
    pub async fn access_token(&self, id: &SessionId) -> Result<ForwardedToken, TokenError> {
        self.access_token_other_than(id, None).await
    }

    /// A fresh access token other than `stale`, which an upstream refused (the relay's retry
    /// after `invalid_token`): a refresh, through the same single-flight lock, unless another
    /// request already replaced `stale`.
    #[tracing::instrument(skip_all)]
    pub async fn replace_access_token(
        &self,
        id: &SessionId,
        stale: &AccessToken,
    ) -> Result<ForwardedToken, TokenError> {
        self.access_token_other_than(id, Some(stale)).await
    }

    async fn access_token_other_than(
        &self,
        id: &SessionId,
        stale: Option<&AccessToken>,
    ) -> Result<ForwardedToken, TokenError> {
        let hash = id.hash();
        // The session and its cached token in one Redis round trip.
        let (session, prefetched) = self
            .live_session(&hash, true)
            .await?
            .ok_or(TokenError::NoSession)?;
        let cached = match prefetched {
            Some(cached) => self.fresh(cached, stale),
            None => self.fresh_cached_token(&hash, stale).await?,
        };
        let access_token = match cached {
            Some(token) => token,
            None => self.refresh_single_flight(&hash, stale).await?,
        };
        Ok(ForwardedToken {
            access_token,
            subject: session.user.sub,
        })
    }

    async fn refresh_single_flight(
        &self,
        hash: &SessionIdHash,
        stale: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        // The lock outlives the longest refresh (one IdP call), so it only expires on its own
        // when its holder died; waiters give up a little after that.
        let lock_ttl = self.config.idp_timeout + Duration::from_secs(5);
        let give_up = Instant::now() + lock_ttl + Duration::from_secs(1);
        loop {
            if let Some(lock) = self.cache.try_lock_refresh(hash, lock_ttl).await? {
                let result = self.refresh_holding_lock(hash, stale).await;
                if let Err(error) = self.cache.unlock_refresh(hash, &lock).await {
                    self.metrics.store_error(&error);
                    tracing::warn!(%error, "could not release the refresh lock; it expires on its own");
                }
                return result;
            }
            tokio::time::sleep(WAIT_POLL).await;
            if let Some(token) = self.fresh_cached_token(hash, stale).await? {
                return Ok(token);
            }
            if Instant::now() >= give_up {
                return Err(TokenError::IdpUnavailable(IdpError::Unreachable(
                    "waited too long for another refresh of this session".into(),
                )));
            }
        }
    }

    async fn refresh_holding_lock(
        &self,
        hash: &SessionIdHash,
        stale: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        // Another replica may have refreshed between our look and our lock.
        if let Some(token) = self.fresh_cached_token(hash, stale).await? {
            return Ok(token);
        }
        let (result, outcome) = self.refresh_grant(hash).await;
        self.metrics.refresh(outcome);
        result
    }

    /// One refresh grant for the session, with how it ended (`refreshes_total{outcome}`).
    async fn refresh_grant(
        &self,
        hash: &SessionIdHash,
    ) -> (Result<AccessToken, TokenError>, RefreshOutcome) {
        let gone = |result: Result<Option<SessionRecord>, StoreError>| match result {
            Ok(_) => (Err(TokenError::NoSession), RefreshOutcome::SessionGone),
            Err(error) => (Err(error.into()), RefreshOutcome::StoreError),
        };
        // The stored refresh token, read now: the one we may have seen before could be spent.
        let record = match self.sessions.find(hash).await {
            Ok(Some(record)) => record,
            Ok(None) => return gone(Ok(None)),
            Err(StoreError::Sealed(error)) => {
                tracing::warn!(%error, "ending a session whose tokens cannot be opened");
                return gone(self.end_session(hash).await);
            }
            Err(error) => return gone(Err(error)),
        };
        let Some(refresh_token) = record.refresh_token.clone() else {
            tracing::info!(session = %record.id, "no refresh token (no offline_access): the session cannot get a new access token");
            return (Err(TokenError::NoSession), RefreshOutcome::NoRefreshToken);
        };
        let tokens = match self.provider.refresh(&refresh_token).await {
            Ok(tokens) => tokens,
            Err(IdpError::OAuth {
                error: OAuthErrorCode::InvalidGrant,
                description,
            }) => {
                tracing::info!(session = %record.id, idp_error_description = description.as_deref().unwrap_or(""),
                    "the IdP refused the refresh token (invalid_grant): ending the session");
                let result = match self.end_session(hash).await {
                    Ok(_) => Err(TokenError::NoSession),
                    Err(error) => Err(error.into()),
                };
                return (result, RefreshOutcome::InvalidGrant);
            }
            Err(error) => {
                tracing::warn!(session = %record.id, %error, "refresh failed; the session is kept");
                return (
                    Err(TokenError::IdpUnavailable(error)),
                    RefreshOutcome::IdpUnavailable,
                );
            }
        };
        let id_token = self.refreshed_id_token(&record, &tokens).await;
        // RFC 6749 §6: without a new refresh token, the old one stays valid.
        let refresh_token = tokens.refresh_token.clone().unwrap_or(refresh_token);
        // Committed before the lock is released: nobody can present the old token again.
        match self
            .sessions
            .update_tokens(record.id, Some(&refresh_token), &id_token)
            .await
        {
            Ok(true) => {}
            Ok(false) => return gone(Ok(None)),
            Err(error) => return gone(Err(error)),
        }
        self.cache_access_token(hash, &tokens, self.clock.now())
            .await;
        tracing::info!(session = %record.id, "access token refreshed");
        (Ok(tokens.access_token), RefreshOutcome::Success)
    }

    /// The ID token to keep after a refresh: a new one if it verifies and names the same subject
    /// (OIDC Core §12.2), else the one we had.
    async fn refreshed_id_token(
        &self,
        record: &SessionRecord,
        tokens: &TokenResponse,
    ) -> crate::domain::IdToken {
        let Some(new) = &tokens.id_token else {
            return record.id_token.clone();
        };
        let expect = Expectations {
            nonce: None,
            now: self.clock.now(),
            access_token: Some(&tokens.access_token),
        };
        match self.provider.verify_id_token(new, expect).await {
            Ok(claims) if claims.sub == record.user.sub => new.clone(),
            Ok(_) => {
                tracing::warn!(session = %record.id, "refreshed ID token names another subject; kept the old one");
                record.id_token.clone()
            }
            Err(error) => {
                tracing::warn!(session = %record.id, %error, "refreshed ID token rejected; kept the old one");
                record.id_token.clone()
            }
        }
    }
}
