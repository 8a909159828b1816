//! Access tokens for servers (`/auth` and the relay): the cached token, or a refresh — exactly one refresh grant
//! per session at a time, across all replicas (SPEC "Refresh").
//!
//! The lock is a lease on the session's PostgreSQL row (README "Choices": it lives with the
//! tokens it guards, and single-flight holds while Redis is down). Whoever takes the lease
//! refreshes; everyone else waits (bounded) for the token it stores. Taking the lease re-reads
//! the row, so the holder first looks at the stored access token (another replica may have
//! refreshed while it waited) and refreshes with the stored refresh token; it commits the new
//! tokens and releases the lease in one statement, fenced by the lease, so an IdP that rotates
//! refresh tokens never sees the old one twice. The access token is kept in PostgreSQL as well
//! as in Redis's cache: without Redis, `/auth` carries on from PostgreSQL. `invalid_grant` ends
//! the session; a network failure or 5xx keeps it.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{chrono_duration, Broker};
use crate::domain::{AccessToken, SessionId, SessionIdHash};
use crate::metrics::RefreshOutcome;
use crate::oidc::id_token::Expectations;
use crate::oidc::{IdpError, OAuthErrorCode, TokenResponse};
use crate::store::{
    CachedAccessToken, LeaseAttempt, RefreshCommit, RefreshedTokens, SessionRecord, StoreError,
};

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
    /// The access token of a token response, with its expiry and refresh time.
    pub(crate) fn access_token_entry(
        &self,
        tokens: &TokenResponse,
        now: DateTime<Utc>,
    ) -> CachedAccessToken {
        let lifetime = tokens
            .expires_in
            .filter(|seconds| *seconds > 0)
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        CachedAccessToken {
            token: tokens.access_token.clone(),
            expires_at: now + chrono_duration(lifetime),
            refresh_at: now + chrono_duration(lifetime - margin),
        }
    }

    /// Caches an access token in Redis until it expires. The cache only saves work (PostgreSQL
    /// has the token too), so a failure is logged, not returned.
    pub(crate) async fn cache_access_token(&self, hash: &SessionIdHash, entry: &CachedAccessToken) {
        let Ok(ttl) = (entry.expires_at - self.clock.now()).to_std() else {
            return;
        };
        if let Err(error) = self.cache.put_access_token(hash, entry, ttl).await {
            self.metrics.store_error(&error);
            tracing::warn!(%error, "could not cache the access token");
        }
    }

    /// The session's latest access token if it is not due for refresh and not the `stale` one:
    /// from Redis, or from PostgreSQL when Redis fails.
    async fn fresh_stored_token(
        &self,
        hash: &SessionIdHash,
        stale: Option<&AccessToken>,
    ) -> Result<Option<AccessToken>, StoreError> {
        let latest = match self.cache.get_access_token(hash).await {
            Ok(cached) => cached,
            Err(error) => {
                self.metrics.store_error(&error);
                match self.sessions.find(hash).await? {
                    Some(record) => record.access_token,
                    None => None,
                }
            }
        };
        Ok(self.fresh(latest, stale))
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
    /// after `invalid_token`): a refresh, through the same single-flight lease, unless another
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
        // The reads and the refresh that a cached token makes unnecessary are boxed, allocated
        // only when taken: inlined, their futures (a refresh holds the IdP call's) made this
        // future 3,136 bytes instead of 688, and actix allocates and copies the handler's
        // future, this one inside it, for every `/auth` request.
        let cached = match prefetched {
            Some(cached) => self.fresh(cached, stale),
            None => Box::pin(self.fresh_stored_token(&hash, stale)).await?,
        };
        let access_token = match cached {
            Some(token) => token,
            None => Box::pin(self.refresh_single_flight(&hash, stale)).await?,
        };
        Ok(ForwardedToken {
            access_token,
            subject: session.user.into_sub(),
        })
    }

    async fn refresh_single_flight(
        &self,
        hash: &SessionIdHash,
        stale: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        // The lease outlives the longest refresh (one IdP call), so it only expires on its own
        // when its holder died; waiters give up a little after that.
        let lease_ttl = self.config.idp_timeout + Duration::from_secs(5);
        let give_up = Instant::now() + lease_ttl + Duration::from_secs(1);
        loop {
            match self.sessions.try_lease_refresh(hash, lease_ttl).await {
                Ok(LeaseAttempt::Taken { lease, record }) => {
                    return self.refresh_under_lease(hash, lease, *record, stale).await;
                }
                Ok(LeaseAttempt::Held) => {}
                Ok(LeaseAttempt::Gone) => return Err(TokenError::NoSession),
                Err(StoreError::Sealed(error)) => {
                    tracing::warn!(%error, "ending a session whose tokens cannot be opened");
                    self.end_session(hash).await?;
                    return Err(TokenError::NoSession);
                }
                Err(error) => {
                    self.metrics.store_error(&error);
                    return Err(error.into());
                }
            }
            tokio::time::sleep(WAIT_POLL).await;
            if let Some(token) = self.fresh_stored_token(hash, stale).await? {
                return Ok(token);
            }
            if Instant::now() >= give_up {
                return Err(TokenError::IdpUnavailable(IdpError::Unreachable(
                    "waited too long for another refresh of this session".into(),
                )));
            }
        }
    }

    /// Holding the lease, with the record read under it: the stored access token if another
    /// request refreshed meanwhile, else one refresh grant. The lease is released on every path
    /// (the commit releases it; a deleted row takes it along).
    async fn refresh_under_lease(
        &self,
        hash: &SessionIdHash,
        lease: uuid::Uuid,
        record: SessionRecord,
        stale: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        let session = record.id;
        let result = if let Some(token) = self.fresh(record.access_token.clone(), stale) {
            // Refreshed by someone else while we waited: put it back in the cache for the rest.
            if let Some(entry) = &record.access_token {
                self.cache_access_token(hash, entry).await;
            }
            Ok(token)
        } else {
            let (result, outcome) = self.refresh_grant(hash, lease, record).await;
            self.metrics.refresh(outcome);
            if outcome == RefreshOutcome::Success {
                // The commit released the lease.
                return result;
            }
            result
        };
        if let Err(error) = self.sessions.release_refresh_lease(session, lease).await {
            self.metrics.store_error(&error);
            tracing::warn!(%error, "could not release the refresh lease; it expires on its own");
        }
        result
    }

    /// One refresh grant for the session, with how it ended (`refreshes_total{outcome}`).
    async fn refresh_grant(
        &self,
        hash: &SessionIdHash,
        lease: uuid::Uuid,
        record: SessionRecord,
    ) -> (Result<AccessToken, TokenError>, RefreshOutcome) {
        let gone = |result: Result<Option<SessionRecord>, StoreError>| match result {
            Ok(_) => (Err(TokenError::NoSession), RefreshOutcome::SessionGone),
            Err(error) => (Err(error.into()), RefreshOutcome::StoreError),
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
        let now = self.clock.now();
        let entry = self.access_token_entry(&tokens, now);
        // Committed with the lease's release: nobody can present the old token again.
        let stored = RefreshedTokens {
            refresh_token: Some(&refresh_token),
            id_token: &id_token,
            access_token: &entry,
            used_at: now,
        };
        match self
            .sessions
            .commit_refresh(record.id, lease, &stored)
            .await
        {
            Ok(RefreshCommit::Committed) => {}
            Ok(RefreshCommit::Gone) => return gone(Ok(None)),
            Ok(RefreshCommit::LeaseLost) => {
                // Only when this refresh outlived its lease (a stalled process): the next holder
                // may have stored newer tokens, which ours must not overwrite. The access token
                // is good; the rotated refresh token is lost, and with it, at worst, the session.
                tracing::warn!(session = %record.id, "the refresh lease expired during the refresh; its tokens were not stored");
                return (Ok(tokens.access_token), RefreshOutcome::Success);
            }
            Err(error) => {
                self.metrics.store_error(&error);
                return gone(Err(error));
            }
        }
        self.cache_access_token(hash, &entry).await;
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
            Ok(claims) if claims.sub == record.user.sub() => new.clone(),
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
