//! `/login`: start the authorization-code flow with PKCE (RFC 7636) and a pending login in Redis.

use url::Url;

use super::Broker;
use crate::crypto::{random_token, sha256_base64url};
use crate::domain::{LoginBinding, Nonce, PkceVerifier, ReturnTo, State};
use crate::oidc::IdpError;
use crate::store::{PendingLogin, StoreError};

/// Where to send the browser, and the binding cookie value to set on it.
#[derive(Debug)]
pub struct LoginRedirect {
    pub authorization_url: String,
    pub binding: LoginBinding,
}

#[derive(Debug, thiserror::Error)]
pub enum StartLoginError {
    #[error("IdP discovery failed: {0}")]
    IdpUnavailable(#[from] IdpError),
    #[error("the pending login could not be stored: {0}")]
    Store(#[from] StoreError),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Broker {
    /// Stores a pending login and builds the authorization request. An existing binding cookie is
    /// reused, so two tabs that start logins at once can both finish.
    #[tracing::instrument(skip_all)]
    pub async fn start_login(
        &self,
        return_to: ReturnTo,
        binding: Option<LoginBinding>,
    ) -> Result<LoginRedirect, StartLoginError> {
        let metadata = self.provider.metadata().await?;
        let mut authorization_url = Url::parse(&metadata.authorization_endpoint)
            .map_err(|_| IdpError::InvalidResponse("authorization_endpoint is not a URL".into()))?;

        let binding = binding.unwrap_or_else(LoginBinding::generate);
        let state = State::generate();
        let nonce = Nonce::new(random_token());
        let verifier = PkceVerifier::new(random_token());
        let challenge = sha256_base64url(verifier.secret());

        let pending = PendingLogin {
            code_verifier: verifier,
            nonce: nonce.clone(),
            return_to,
            binding_hash: hex(&binding.hash()),
            created_at: self.clock.now(),
        };
        self.logins
            .put_pending(&state, &pending, self.config.login_ttl)
            .await?;

        authorization_url
            .query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.config.redirect_uri())
            .append_pair("scope", &self.config.scopes)
            .append_pair("state", state.secret())
            .append_pair("nonce", nonce.secret())
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        self.metrics.login_started();
        Ok(LoginRedirect {
            authorization_url: authorization_url.into(),
            binding,
        })
    }
}
