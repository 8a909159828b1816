//! `/logout`: end the session everywhere, revoke its refresh and access tokens (RFC 7009), and build the
//! RP-Initiated Logout 1.0 URL that signs the user out at the IdP too.

use url::Url;

use super::Broker;
use crate::domain::{SessionId, SessionIdHash};
use crate::store::{CacheLookup, StoreError};

#[derive(Debug)]
pub struct LogoutDone {
    /// Where the browser goes next: the IdP's end-session endpoint, or the post-logout URL.
    pub logout_url: String,
}

impl Broker {
    /// Logging out without a (live) session still answers with a logout URL: logout is idempotent.
    #[tracing::instrument(skip_all)]
    pub async fn logout(&self, id: Option<SessionId>) -> Result<LogoutDone, StoreError> {
        let (record, access_token) = match id {
            Some(id) => {
                let hash = id.hash();
                // Read before the session ends: ending it drops the cached access token. The row
                // has it too (Redis down, or its cache entry evicted).
                let cached = self.cache.get_access_token(&hash).await.ok().flatten();
                let record = match self.sessions.delete(&hash).await {
                    Ok(record) => record,
                    Err(error) => {
                        self.end_cached_view_of_undeleted_session(&hash).await;
                        return Err(error);
                    }
                };
                self.cache.mark_ended(&hash).await?;
                let stored = record
                    .as_ref()
                    .and_then(|record| record.access_token.clone());
                (record, cached.or(stored))
            }
            None => (None, None),
        };
        if let Some(record) = &record {
            tracing::info!(session = %record.id, "logged out");
            // RFC 7009. A failed revocation is logged; it never keeps the session alive.
            let revoke = |token: Option<String>, hint: &'static str| async move {
                let Some(token) = token else { return };
                if let Err(error) = self.provider.revoke(&token, hint).await {
                    tracing::warn!(%error, hint, "token revocation failed");
                }
            };
            tokio::join!(
                revoke(
                    record
                        .refresh_token
                        .as_ref()
                        .map(|t| t.secret().to_string()),
                    "refresh_token"
                ),
                revoke(
                    access_token.map(|t| t.token.secret().to_string()),
                    "access_token"
                ),
            );
        }

        let post_logout = self.config.post_logout_redirect_url.to_string();
        let end_session = match self.provider.metadata().await {
            Ok(metadata) => metadata.end_session_endpoint.clone(),
            Err(error) => {
                tracing::warn!(%error, "IdP discovery unavailable; logging out locally only");
                None
            }
        };
        let logout_url = match end_session.and_then(|endpoint| Url::parse(&endpoint).ok()) {
            Some(mut url) => {
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(record) = &record {
                        query.append_pair("id_token_hint", record.id_token.secret());
                    }
                    query
                        .append_pair("post_logout_redirect_uri", &post_logout)
                        .append_pair("client_id", &self.config.client_id);
                }
                url.to_string()
            }
            None => post_logout,
        };
        Ok(LogoutDone { logout_url })
    }
}

impl Broker {
    /// A logout whose row PostgreSQL could not delete (down, hung): the session ends all the same
    /// where every request looks first, so that the logout's 503 means "not finished", not "still
    /// logged in". Before, the cached view stayed live and the session went on working while
    /// PostgreSQL was away. The tombstone outlives the row's own life: unused (a request that
    /// finds the tombstone moves no last-seen time), the row is past its idle timeout by the time
    /// the tombstone lapses, so a cache miss then ends it rather than serving it. What remains
    /// undone until the logout is repeated (the cookie stays, so it can be): the row (the sweep
    /// takes it after its idle timeout) and the revocation of its refresh token at the IdP.
    ///
    /// Only over a view Redis holds: a session it does not know is served by nobody while
    /// PostgreSQL is away (each request needs the row: 503), and a cookie made up by a client
    /// must not get a tombstone written for half a day.
    async fn end_cached_view_of_undeleted_session(&self, hash: &SessionIdHash) {
        match self.cache.get(hash).await {
            Ok(CacheLookup::Live(_)) => {}
            Ok(_) => return,
            Err(error) => {
                self.metrics.store_error(&error);
                tracing::warn!(%error, "logout: neither PostgreSQL nor Redis could end the session");
                return;
            }
        }
        let outlive_the_row = self.config.session_idle_timeout + std::time::Duration::from_secs(60);
        match self.cache.mark_ended_for(hash, outlive_the_row).await {
            Ok(()) => tracing::warn!(
                "logout: PostgreSQL could not delete the session; its cached view is marked ended"
            ),
            Err(error) => {
                self.metrics.store_error(&error);
                tracing::warn!(%error, "logout: neither PostgreSQL nor Redis could end the session");
            }
        }
    }
}
