//! The OAuth logic of the broker, on plain Rust types: no actix, no HTTP.
//!
//! [`Broker`] holds what every flow needs (configuration, the IdP, the stores, the clock); each
//! flow is an `impl Broker` block in its own module:
//! - [`login`]: `/login` — PKCE, state, nonce, the pending login and the binding.
//! - [`callback`]: `/callback` — consume the pending login, check, exchange, verify, create the session.
//! - [`session`]: `/session` — the hot path, the sliding idle timeout and the absolute lifetime.
//! - [`touch`]: the last-seen times of used sessions, written to PostgreSQL once a second.
//! - [`logout`]: `/logout` — end the session everywhere, revoke, build the RP-initiated logout URL.
//! - [`refresh`]: `/auth` and the relay — the cached access token, or one refresh per session across replicas.
//! - [`relay`]: `/api/{name}/…` — upstream paths, the headers that cross, the bearer and its one retry.

pub mod backchannel;
pub mod callback;
pub mod login;
pub mod logout;
pub mod refresh;
pub mod relay;
pub mod session;
pub mod sweep;
pub mod touch;

use std::fmt;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oidc::Provider;
use crate::store::{LoginStore, SessionCache, SessionRepository};

pub use callback::{CallbackParams, LoginFailure, LoginSuccess};
pub use login::{LoginRedirect, StartLoginError};
pub use logout::LogoutDone;
pub use refresh::{ForwardedToken, TokenError};
pub use session::SessionView;

/// Everything a flow needs, built once at start-up and shared by all workers.
pub struct Broker {
    pub config: Arc<Config>,
    pub provider: Arc<Provider>,
    pub logins: Arc<dyn LoginStore>,
    pub cache: Arc<dyn SessionCache>,
    pub sessions: Arc<dyn SessionRepository>,
    pub clock: Arc<dyn Clock>,
    /// Shared with the provider (IdP call durations) and the request log.
    pub metrics: Arc<Metrics>,
    /// Last-seen times waiting to be written to PostgreSQL.
    pub touches: touch::TouchQueue,
}

/// A broker on process-local stores with a manual clock, for the flows' unit tests: an https
/// broker for `app.example.com`, idle timeout 1 h, lifetime 1 d, as `configure` leaves it.
#[cfg(test)]
pub(crate) fn in_memory_broker(
    clock: crate::clock::ManualClock,
    configure: impl FnOnce(&mut Config),
) -> Broker {
    let settings = crate::config::Settings {
        public_url: Some("https://app.example.com/auth".into()),
        oidc_issuer: Some("https://idp.example.com".into()),
        client_id: Some("broker".into()),
        allowed_origins: Some("https://app.example.com".into()),
        encryption_keys: Some(crate::crypto::EncryptionKey::generate().secret_base64()),
        database_url: Some("postgres://localhost/unused".into()),
        redis_url: Some("redis://localhost".into()),
        session_idle_timeout: Some("1h".into()),
        session_max_lifetime: Some("1d".into()),
        ..Default::default()
    };
    let mut config = Config::from_settings(&settings).unwrap();
    configure(&mut config);
    let clock: Arc<dyn Clock> = Arc::new(clock);
    let stores = crate::startup::Stores::in_memory(clock.clone());
    Broker {
        provider: Arc::new(Provider::new(&config).unwrap()),
        config: Arc::new(config),
        logins: stores.logins,
        cache: stores.cache,
        sessions: stores.sessions,
        clock,
        metrics: Default::default(),
        touches: Default::default(),
    }
}

/// The `login_error` codes a frontend can see (SPEC "Login errors the frontend can see").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginErrorCode {
    AccessDenied,
    LoginExpired,
    IdpError,
    TokenExchangeFailed,
    InvalidToken,
    IdpUnavailable,
    Unavailable,
}

impl LoginErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessDenied => "access_denied",
            Self::LoginExpired => "login_expired",
            Self::IdpError => "idp_error",
            Self::TokenExchangeFailed => "token_exchange_failed",
            Self::InvalidToken => "invalid_token",
            Self::IdpUnavailable => "idp_unavailable",
            Self::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for LoginErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A background task owned by the application: aborted when this is dropped.
#[derive(Debug)]
pub struct BackgroundTask(tokio::task::JoinHandle<()>);

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `std::time::Duration` as chrono's, saturating instead of failing on absurd values.
pub(crate) fn chrono_duration(duration: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}
