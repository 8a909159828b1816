//! A small but real OpenID Connect provider: the login page of `token-broker dev` and the IdP of
//! the integration tests.
//!
//! It speaks the protocol the broker's production code path expects — discovery, JWKS, the
//! authorization endpoint with PKCE (S256 only), the token endpoint with rotating refresh tokens,
//! revocation (RFC 7009), RP-Initiated Logout and Back-Channel Logout — and it can misbehave on
//! purpose through [`Controls`], counting what it served in [`Stats`]. Everything lives in memory.
//!
//! # Layout
//! - this file: [`DevIdp`], its options, shared state, and mounting into an actix app.
//! - `metadata`: discovery and the JWKS. `authorize`: the login page and the authorization response.
//! - `token`: the token and revocation endpoints; `mint`: the claims and signing of issued tokens.
//! - `logout`: end-session and back-channel logout. `client_auth`: client authentication.
//! - `grants`: codes, refresh-token families, sessions. `keys`: signing keys and the JWKS.
//! - `controls`: test knobs and counters. `oauth`: parameters, error codes, PKCE. `html`: pages.
//! - `http_tests` (tests only): every endpoint, end to end, through an actix test service.

mod authorize;
mod client_auth;
mod controls;
mod grants;
mod html;
mod keys;
mod logout;
mod metadata;
mod mint;
mod oauth;
mod token;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::{web, App, HttpServer};

pub use controls::{Controls, IdTokenContext, IdTokenOverride, IssMode, Stats};
pub use keys::KeyMaterial;

use grants::Grants;
use keys::KeyRing;

/// How the development IdP is set up: one registered client.
#[derive(Clone)]
pub struct DevIdpOptions {
    pub client_id: String,
    /// `None`: a public client (`token_endpoint_auth_method` `none`, PKCE only).
    pub client_secret: Option<String>,
    /// Advertised and accepted, e.g. `client_secret_basic`, `client_secret_post`. A public client
    /// can only use `none`; a client with a secret never `none`, and `client_secret_basic` (the
    /// OpenID Connect default) when the list names no other method.
    pub token_endpoint_auth_methods: Vec<String>,
    /// Registered redirect URIs, matched exactly.
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub access_token_ttl: Duration,
    /// What new tokens are signed with; tests can change it later with [`Controls::set_signing_alg`].
    pub signing_alg: SigningAlg,
    /// Pre-generated keys (tests share one set); `None` generates fresh ones.
    pub keys: Option<KeyMaterial>,
}

impl Default for DevIdpOptions {
    fn default() -> Self {
        Self {
            client_id: "token-broker-dev".into(),
            client_secret: None,
            token_endpoint_auth_methods: Vec::new(),
            redirect_uris: vec![],
            post_logout_redirect_uris: vec![],
            access_token_ttl: Duration::from_secs(300),
            signing_alg: SigningAlg::Rs256,
            keys: None,
        }
    }
}

impl std::fmt::Debug for DevIdpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdpOptions")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "token_endpoint_auth_methods",
                &self.token_endpoint_auth_methods,
            )
            .field("redirect_uris", &self.redirect_uris)
            .field("post_logout_redirect_uris", &self.post_logout_redirect_uris)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("signing_alg", &self.signing_alg)
            .field("keys", &self.keys)
            .finish()
    }
}

/// The JWS algorithm of issued tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SigningAlg {
    #[default]
    Rs256,
    Es256,
}

/// The one registered client, as the endpoints check it.
struct Client {
    id: String,
    secret: Option<String>,
    auth_methods: Vec<String>,
    redirect_uris: Vec<String>,
    post_logout_redirect_uris: Vec<String>,
}

/// The provider's shared state; cheap to clone.
#[derive(Clone)]
pub struct DevIdp {
    inner: Arc<Inner>,
}

struct Inner {
    /// Without a trailing slash; every endpoint URL is this plus a path.
    issuer: String,
    client: Client,
    access_token_ttl: Duration,
    keys: Mutex<KeyRing>,
    grants: Mutex<Grants>,
    controls: Controls,
    stats: Mutex<Stats>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DevIdp {
    /// `issuer` is the externally visible base URL, e.g. `http://127.0.0.1:4321` or
    /// `http://127.0.0.1:8080/dev-idp`; it must match where [`DevIdp::configure`] mounts the endpoints.
    pub fn new(issuer: url::Url, options: DevIdpOptions) -> DevIdp {
        let mut auth_methods = options.token_endpoint_auth_methods;
        match options.client_secret {
            None => auth_methods = vec!["none".to_owned()],
            Some(_) => auth_methods.retain(|method| method != "none"),
        }
        if auth_methods.is_empty() {
            auth_methods.push("client_secret_basic".to_owned());
        }
        let client = Client {
            id: options.client_id,
            secret: options.client_secret,
            auth_methods,
            redirect_uris: options.redirect_uris,
            post_logout_redirect_uris: options.post_logout_redirect_uris,
        };
        let keys = options.keys.unwrap_or_else(KeyMaterial::generate);
        DevIdp {
            inner: Arc::new(Inner {
                issuer: issuer.as_str().trim_end_matches('/').to_owned(),
                client,
                access_token_ttl: options.access_token_ttl,
                keys: Mutex::new(KeyRing {
                    current: Arc::new(keys),
                    retired: Vec::new(),
                }),
                grants: Mutex::new(Grants::default()),
                controls: Controls::new(options.signing_alg),
                stats: Mutex::new(Stats::default()),
            }),
        }
    }

    pub fn issuer(&self) -> String {
        self.inner.issuer.clone()
    }

    /// Mounts every endpoint under `path_prefix` (`""` when the IdP owns the server, `"/dev-idp"`
    /// inside the broker). Routes are registered one by one, not as a scope, so that the IdP never
    /// answers for paths outside its own.
    pub fn configure(&self, path_prefix: &str) -> impl FnOnce(&mut web::ServiceConfig) + 'static {
        let data = web::Data::new(self.clone());
        let prefix = path_prefix.trim_end_matches('/').to_owned();
        move |config| {
            let at = |path: &str| web::resource(format!("{prefix}{path}")).app_data(data.clone());
            config
                .service(
                    at("/.well-known/openid-configuration")
                        .route(web::get().to(metadata::discovery)),
                )
                .service(at("/jwks").route(web::get().to(metadata::jwks)))
                .service(
                    at("/authorize")
                        .route(web::get().to(authorize::show))
                        .route(web::post().to(authorize::submit)),
                )
                .service(at("/token").route(web::post().to(token::token)))
                .service(at("/revoke").route(web::post().to(token::revoke)))
                .service(
                    at("/end-session")
                        .route(web::get().to(logout::end_session))
                        .route(web::post().to(logout::end_session)),
                );
        }
    }

    /// A standalone server on an already bound listener; the caller spawns it (`tokio::spawn`).
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
    ) -> std::io::Result<actix_web::dev::Server> {
        let idp = self.clone();
        let server = HttpServer::new(move || App::new().configure(idp.configure("")))
            .workers(1)
            .disable_signals()
            .shutdown_timeout(1)
            .listen(listener)?
            .run();
        Ok(server)
    }

    pub fn controls(&self) -> &Controls {
        &self.inner.controls
    }

    pub fn stats(&self) -> Stats {
        lock(&self.inner.stats).clone()
    }

    /// Replaces the key of the current signing algorithm by a new one with a new kid. With
    /// `keep_old_in_jwks` the old public key stays published, as during a real IdP's rollover.
    pub fn rotate_signing_key(&self, keep_old_in_jwks: bool) {
        let alg = self.controls().signing_alg();
        let current = self.current_keys();
        // Generated outside the lock: RSA key generation is slow.
        let next = current.with_new_key(alg);
        lock(&self.inner.keys).rotate(next, alg, keep_old_in_jwks);
    }

    /// Signs arbitrary claims with the current key (header: `alg`, `kid`, `typ: JWT`), for tests
    /// that craft tokens, e.g. logout tokens.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let alg = self.controls().signing_alg();
        match self.current_keys().sign(alg, "JWT", claims) {
            Ok(token) => token,
            // Cannot happen with keys generated by `KeyMaterial`; a test would see the empty token fail.
            Err(error) => {
                tracing::error!(%error, "the development IdP could not sign");
                String::new()
            }
        }
    }

    /// The current RSA public key as PEM (tests forge "HS256 signed with the public key" with it).
    pub fn rsa_public_key_pem(&self) -> String {
        self.current_keys().rsa_public_key_pem().to_owned()
    }

    /// The kid new tokens carry.
    pub fn current_kid(&self) -> String {
        let alg = self.controls().signing_alg();
        self.current_keys().kid(alg).to_owned()
    }

    /// Whether a refresh grant would accept this token now (not rotated away, revoked or unknown).
    pub fn is_refresh_token_active(&self, token: &str) -> bool {
        self.grants().is_refresh_token_active(token)
    }

    /// Whether the IdP session `sid` (from an ID token) is still open.
    pub fn is_session_active(&self, sid: &str) -> bool {
        self.grants().is_session_active(sid)
    }

    /// Whether this access token was revoked (RFC 7009); `false` for tokens this IdP did not issue.
    pub fn is_access_token_revoked(&self, access_token: &str) -> bool {
        let jti = self
            .verify_own_token(access_token)
            .and_then(|claims| claims["jti"].as_str().map(str::to_owned));
        jti.is_some_and(|jti| self.grants().is_access_token_revoked(&jti))
    }

    fn current_keys(&self) -> Arc<KeyMaterial> {
        lock(&self.inner.keys).current.clone()
    }

    fn jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        lock(&self.inner.keys).jwks()
    }

    fn grants(&self) -> MutexGuard<'_, Grants> {
        lock(&self.inner.grants)
    }

    fn client(&self) -> &Client {
        &self.inner.client
    }

    fn count(&self, update: impl FnOnce(&mut Stats)) {
        update(&mut lock(&self.inner.stats));
    }

    /// The absolute URL of one of the IdP's endpoints.
    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.inner.issuer)
    }

    /// Claims of a token this IdP issued to its client, any expiry.
    fn verify_own_token(&self, token: &str) -> Option<serde_json::Value> {
        keys::verify_own_token(
            &self.jwks(),
            token,
            &self.inner.issuer,
            &self.inner.client.id,
        )
    }
}

impl std::fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdp")
            .field("issuer", &self.inner.issuer)
            .field("client_id", &self.inner.client.id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod http_tests;
