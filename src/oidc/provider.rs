//! Discovery and JWKS: fetched from the IdP, cached, and refreshed with restraint.
//!
//! Discovery is fetched on first use and again after [`METADATA_MAX_AGE`]; when a refresh fails,
//! the last good document keeps serving. The JWKS is refetched when a token names a `kid` we do
//! not know (the IdP rotated its keys), but at most once per `jwks_refetch_interval`, so a flood
//! of tokens with made-up `kid`s cannot be turned into a flood of requests to the IdP.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use std::sync::Arc;

use super::error::IdpError;
use crate::config::Config;
use crate::domain::ClientSecret;
use crate::metrics::{IdpEndpoint, Metrics};

const METADATA_MAX_AGE: Duration = Duration::from_secs(3600);
/// Discovery and JWKS documents larger than this are refused.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 512 * 1024;

/// The parts of the discovery document (OIDC Discovery 1.0 §3) the broker uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderMetadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// Absent means `client_secret_basic` (OIDC Discovery §3).
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    pub revocation_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    pub code_challenge_methods_supported: Option<Vec<String>>,
    /// RFC 9207 §3: when true, the `iss` authorization-response parameter is mandatory.
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
}

/// A public key from the JWKS, ready to verify.
pub struct VerificationKey {
    pub kid: Option<String>,
    /// The `alg` the JWK pins, if it names one.
    pub alg: Option<Algorithm>,
    pub fits: fn(Algorithm) -> bool,
    pub key: DecodingKey,
}

struct CachedMetadata {
    metadata: Arc<ProviderMetadata>,
    fetched_at: Instant,
}

/// The IdP as the broker knows it. One per process, shared by all requests.
pub struct Provider {
    pub(crate) http: reqwest::Client,
    pub(crate) issuer: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: Option<ClientSecret>,
    pub(crate) redirect_uri: String,
    jwks_refetch_interval: Duration,
    metadata: RwLock<Option<CachedMetadata>>,
    metadata_refresh: tokio::sync::Mutex<()>,
    keys: RwLock<Option<Arc<Vec<VerificationKey>>>>,
    keys_refresh: tokio::sync::Mutex<Option<Instant>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Provider {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.idp_timeout)
            .connect_timeout(config.idp_timeout.min(Duration::from_secs(5)))
            // A followed redirect is an SSRF door: the IdP's endpoints are used as published.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            issuer: config.issuer.clone(),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            redirect_uri: config.redirect_uri(),
            jwks_refetch_interval: config.jwks_refetch_interval,
            metadata: RwLock::new(None),
            metadata_refresh: tokio::sync::Mutex::new(()),
            keys: RwLock::new(None),
            keys_refresh: tokio::sync::Mutex::new(None),
            metrics: Arc::default(),
        })
    }

    /// Records the durations of IdP calls in `metrics` (shared with the broker's).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    fn cached_metadata(&self, max_age: Duration) -> Option<Arc<ProviderMetadata>> {
        let guard = self.metadata.read().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .filter(|cached| cached.fetched_at.elapsed() < max_age)
            .map(|cached| cached.metadata.clone())
    }

    /// The discovery document: cached; refreshed hourly; the stale copy serves while the IdP is down.
    pub async fn metadata(&self) -> Result<Arc<ProviderMetadata>, IdpError> {
        if let Some(fresh) = self.cached_metadata(METADATA_MAX_AGE) {
            return Ok(fresh);
        }
        // One fetch at a time; whoever waited finds the result of the fetch before them.
        let _refresh = self.metadata_refresh.lock().await;
        if let Some(fresh) = self.cached_metadata(METADATA_MAX_AGE) {
            return Ok(fresh);
        }
        match self.fetch_metadata().await {
            Ok(metadata) => {
                let metadata = Arc::new(metadata);
                *self.metadata.write().unwrap_or_else(|e| e.into_inner()) = Some(CachedMetadata {
                    metadata: metadata.clone(),
                    fetched_at: Instant::now(),
                });
                Ok(metadata)
            }
            Err(error) => match self.cached_metadata(Duration::MAX) {
                Some(stale) => {
                    tracing::warn!(%error, "discovery refresh failed; using the cached document");
                    Ok(stale)
                }
                None => Err(error),
            },
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        endpoint: IdpEndpoint,
    ) -> Result<T, IdpError> {
        let started = Instant::now();
        let result = self.get_json_untimed(url).await;
        self.metrics.idp_request(endpoint, started.elapsed());
        result
    }

    async fn get_json_untimed<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<T, IdpError> {
        let response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(IdpError::Status(response.status().as_u16()));
        }
        let body = read_limited(response, MAX_DOCUMENT_BYTES).await?;
        serde_json::from_slice(&body).map_err(|e| IdpError::InvalidResponse(e.to_string()))
    }

    #[tracing::instrument(skip_all, fields(issuer = %self.issuer))]
    async fn fetch_metadata(&self) -> Result<ProviderMetadata, IdpError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let metadata: ProviderMetadata = self.get_json(&url, IdpEndpoint::Discovery).await?;
        // OIDC Discovery §4.3: the issuer in the document must be exactly the one we asked.
        if metadata.issuer != self.issuer {
            return Err(IdpError::InvalidResponse(format!(
                "discovery names issuer `{}`, expected `{}`",
                metadata.issuer, self.issuer
            )));
        }
        let issuer_is_https = self.issuer.starts_with("https://");
        for (name, endpoint) in [
            (
                "authorization_endpoint",
                Some(&metadata.authorization_endpoint),
            ),
            ("token_endpoint", Some(&metadata.token_endpoint)),
            ("jwks_uri", Some(&metadata.jwks_uri)),
            (
                "end_session_endpoint",
                metadata.end_session_endpoint.as_ref(),
            ),
            ("revocation_endpoint", metadata.revocation_endpoint.as_ref()),
        ] {
            let Some(endpoint) = endpoint else { continue };
            let valid = url::Url::parse(endpoint)
                .is_ok_and(|u| u.scheme() == "https" || (!issuer_is_https && u.scheme() == "http"));
            if !valid {
                return Err(IdpError::InvalidResponse(format!(
                    "{name} is not an https URL"
                )));
            }
        }
        if let Some(methods) = &metadata.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                return Err(IdpError::InvalidResponse(
                    "the IdP does not support PKCE S256".into(),
                ));
            }
        }
        Ok(metadata)
    }

    fn cached_keys(&self) -> Option<Arc<Vec<VerificationKey>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The key that verifies a token with this header, refetching the JWKS at most once per
    /// interval when the `kid` is unknown.
    pub async fn verification_key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Option<(Arc<Vec<VerificationKey>>, usize)>, IdpError> {
        if let Some(keys) = self.cached_keys() {
            if let Some(index) = select_key(&keys, kid, alg) {
                return Ok(Some((keys, index)));
            }
        }
        // The lock holds the time of the last fetch attempt, failed ones included: while the
        // JWKS endpoint is down, a flood of logins still costs it one request per interval.
        let mut last_attempt = self.keys_refresh.lock().await;
        let cached = self.cached_keys();
        if let Some(keys) = &cached {
            if let Some(index) = select_key(keys, kid, alg) {
                return Ok(Some((keys.clone(), index)));
            }
        }
        if last_attempt.is_some_and(|at| at.elapsed() < self.jwks_refetch_interval) {
            return match cached {
                Some(_) => Ok(None),
                None => Err(IdpError::Unreachable(
                    "the JWKS could not be fetched moments ago".into(),
                )),
            };
        }
        *last_attempt = Some(Instant::now());
        let metadata = self.metadata().await?;
        let set: JwkSet = self.get_json(&metadata.jwks_uri, IdpEndpoint::Jwks).await?;
        let keys = Arc::new(usable_keys(&set));
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(keys.clone());
        Ok(select_key(&keys, kid, alg).map(|index| (keys, index)))
    }
}

/// Reads a response body, refusing one larger than `limit`.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, IdpError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(IdpError::InvalidResponse(format!(
                "answer larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn is_rsa(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    )
}
fn is_es256(alg: Algorithm) -> bool {
    alg == Algorithm::ES256
}
fn is_es384(alg: Algorithm) -> bool {
    alg == Algorithm::ES384
}
fn is_eddsa(alg: Algorithm) -> bool {
    alg == Algorithm::EdDSA
}

/// The signing keys of a JWKS. Symmetric (`oct`) keys and encryption keys are dropped: a public
/// JWKS has no business holding them, and using one would open the HMAC-with-public-key attack.
fn usable_keys(set: &JwkSet) -> Vec<VerificationKey> {
    set.keys
        .iter()
        .filter(|jwk| !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .filter_map(|jwk| {
            let fits: fn(Algorithm) -> bool = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => is_rsa,
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => is_es256,
                    EllipticCurve::P384 => is_es384,
                    _ => return None,
                },
                AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                    is_eddsa
                }
                _ => return None,
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(VerificationKey {
                kid: jwk.common.key_id.clone(),
                alg,
                fits,
                key,
            })
        })
        .collect()
}

/// With a `kid`: the key of that id, if it fits the algorithm. Without: the one key that fits
/// (OIDC Core §10.1: a `kid` may be omitted when the choice is unambiguous).
fn select_key(keys: &[VerificationKey], kid: Option<&str>, alg: Algorithm) -> Option<usize> {
    let fits =
        |key: &VerificationKey| (key.fits)(alg) && key.alg.is_none_or(|pinned| pinned == alg);
    match kid {
        Some(kid) => keys
            .iter()
            .position(|key| key.kid.as_deref() == Some(kid) && fits(key)),
        None => {
            let mut candidates = keys.iter().enumerate().filter(|(_, key)| fits(key));
            match (candidates.next(), candidates.next()) {
                (Some((index, _)), None) => Some(index),
                _ => None,
            }
        }
    }
}
