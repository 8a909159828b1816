//! The test knobs that make the development IdP misbehave on purpose, and the counters of what it served.
//!
//! Every knob is off by default, can be changed while the IdP is serving, and is read once per request.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::SigningAlg;

/// What a test-supplied ID-token override gets to look at.
#[derive(Clone, Debug)]
pub struct IdTokenContext {
    /// The claims the IdP would have signed (after `id_token_claims_patch`).
    pub claims: serde_json::Value,
    /// The ID token the IdP would have returned, correctly signed: tamper with it to break the signature.
    pub signed: String,
    /// The key id and algorithm that `signed` carries in its header.
    pub kid: String,
    pub alg: SigningAlg,
    /// `"authorization_code"` or `"refresh_token"`: the grant this ID token answers.
    pub grant_type: &'static str,
}

/// Replaces the ID token in token responses with any string a test likes.
pub type IdTokenOverride = Arc<dyn Fn(&IdTokenContext) -> String + Send + Sync>;

/// How the `iss` parameter of authorization responses (RFC 9207) is written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum IssMode {
    /// The IdP's own issuer, as RFC 9207 §2 requires.
    #[default]
    Correct,
    /// No `iss` parameter, although discovery advertises it.
    Omit,
    /// This value instead of the issuer (a mix-up attack).
    Value(String),
}

/// Test knobs; see each setter. Cheap to read: one short lock per request.
pub struct Controls {
    initial_alg: SigningAlg,
    state: Mutex<Knobs>,
}

#[derive(Clone)]
pub(super) struct Knobs {
    pub token_status: Option<u16>,
    pub token_delay: Option<Duration>,
    pub token_error: Option<String>,
    pub refresh_error: Option<String>,
    pub discovery_status: Option<u16>,
    pub jwks_status: Option<u16>,
    pub id_token_claims_patch: Option<serde_json::Value>,
    pub id_token_override: Option<IdTokenOverride>,
    pub response_iss: IssMode,
    pub signing_alg: SigningAlg,
}

impl Knobs {
    fn new(signing_alg: SigningAlg) -> Self {
        Self {
            token_status: None,
            token_delay: None,
            token_error: None,
            refresh_error: None,
            discovery_status: None,
            jwks_status: None,
            id_token_claims_patch: None,
            id_token_override: None,
            response_iss: IssMode::Correct,
            signing_alg,
        }
    }
}

impl Controls {
    pub(super) fn new(signing_alg: SigningAlg) -> Self {
        Self {
            initial_alg: signing_alg,
            state: Mutex::new(Knobs::new(signing_alg)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Knobs> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of every knob, taken once per request so that a test flipping a knob mid-request
    /// cannot leave it half applied.
    pub(super) fn snapshot(&self) -> Knobs {
        self.lock().clone()
    }

    /// Turns every knob off again and restores the signing algorithm the IdP was created with.
    pub fn reset(&self) {
        *self.lock() = Knobs::new(self.initial_alg);
    }

    /// The token endpoint answers every authenticated request with this status and `server_error`.
    pub fn set_token_status(&self, status: Option<u16>) {
        self.lock().token_status = status;
    }

    /// The token endpoint waits this long before doing anything.
    pub fn set_token_delay(&self, delay: Option<Duration>) {
        self.lock().token_delay = delay;
    }

    /// The token endpoint answers every authenticated request 400 with this OAuth error code.
    pub fn set_token_error(&self, error: Option<&str>) {
        self.lock().token_error = error.map(str::to_owned);
    }

    /// Refresh grants fail with this OAuth error code (the presented refresh token stays valid).
    pub fn set_refresh_error(&self, error: Option<&str>) {
        self.lock().refresh_error = error.map(str::to_owned);
    }

    /// Discovery answers with this status.
    pub fn set_discovery_status(&self, status: Option<u16>) {
        self.lock().discovery_status = status;
    }

    /// The JWKS endpoint answers with this status.
    pub fn set_jwks_status(&self, status: Option<u16>) {
        self.lock().jwks_status = status;
    }

    /// Shallow-merged into the ID-token claims before signing; a `null` value removes the claim.
    pub fn set_id_token_claims_patch(&self, patch: Option<serde_json::Value>) {
        self.lock().id_token_claims_patch = patch;
    }

    /// Token responses carry whatever this function returns instead of the ID token.
    pub fn set_id_token_override(&self, issue: Option<IdTokenOverride>) {
        self.lock().id_token_override = issue;
    }

    /// How the `iss` authorization-response parameter is written.
    pub fn set_response_iss(&self, mode: IssMode) {
        self.lock().response_iss = mode;
    }

    /// The algorithm of the tokens issued from now on (both keys are always in the JWKS).
    pub fn set_signing_alg(&self, alg: SigningAlg) {
        self.lock().signing_alg = alg;
    }

    pub(super) fn signing_alg(&self) -> SigningAlg {
        self.lock().signing_alg
    }
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let knobs = self.lock();
        f.debug_struct("Controls")
            .field("token_status", &knobs.token_status)
            .field("token_delay", &knobs.token_delay)
            .field("token_error", &knobs.token_error)
            .field("refresh_error", &knobs.refresh_error)
            .field("discovery_status", &knobs.discovery_status)
            .field("jwks_status", &knobs.jwks_status)
            .field("id_token_claims_patch", &knobs.id_token_claims_patch)
            .field("id_token_override", &knobs.id_token_override.is_some())
            .field("response_iss", &knobs.response_iss)
            .field("signing_alg", &knobs.signing_alg)
            .finish()
    }
}

/// A snapshot of what the IdP served since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub discovery_requests: u64,
    pub jwks_requests: u64,
    /// Every request to `/authorize`, GET (the login page) or POST (the submitted form).
    pub authorize_requests: u64,
    /// Every authenticated `authorization_code` grant request, successful or not.
    pub code_grants: u64,
    /// The `authorization_code` grant requests that were refused (included in `code_grants`).
    pub code_grants_rejected: u64,
    /// Every authenticated `refresh_token` grant request, successful or not.
    pub refresh_grants: u64,
    /// The `refresh_token` grant requests that were refused (included in `refresh_grants`).
    pub refresh_grants_rejected: u64,
    /// Every authenticated revocation request (RFC 7009), known token or not.
    pub revocations: u64,
    pub end_sessions: u64,
}
