//! token-broker: an OAuth 2.0 / OpenID Connect backend-for-frontend.
//!
//! Browsers get one opaque, HttpOnly session cookie; the broker is the confidential OIDC client,
//! keeps pending logins in Redis and sessions (with encrypted refresh tokens) in PostgreSQL, and
//! hands access tokens only to servers. The contract is `SPEC.md`; this crate is laid out in layers
//! through which data flows one way:
//!
//! # Layout
//! - [`routes`]: HTTP only — the route table, extractors, cookies, CORS, problem+json errors.
//!   Turns requests into domain values and flow results into responses.
//! - [`flows`]: the OAuth logic (login, callback, session, logout, refresh) and the API relay's
//!   upstream calls, on plain Rust types; no actix.
//! - [`domain`]: parsed, validated values (`ReturnTo`, `SessionId`, `State`, …) and the secret types.
//! - [`oidc`]: the IdP client — discovery, JWKS, ID-token verification, token and revocation calls.
//! - [`store`]: the store traits and their Redis and PostgreSQL implementations.
//! - [`crypto`]: randomness, hashing, and AES-256-GCM encryption at rest with key rotation.
//! - [`metrics`]: the Prometheus registry behind `/metrics`.
//! - [`config`], [`telemetry`], [`clock`], [`startup`], [`cli`]: wiring.
//! - [`admin`]: operator commands — `sessions list|revoke`, `rotate-keys`.
//! - [`dev`]: `token-broker dev` — in-memory stores, the built-in IdP, a demo page.
//! - [`dev_idp`]: a small real OpenID provider for `token-broker dev` and the test suite.

// No unwrap/expect/panic outside tests: a request path must answer, not abort. A justified
// exception carries a local #[allow] with its reason.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod dev_idp;
pub mod domain;
pub mod flows;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod oidc;
pub mod openapi;
pub mod rfc3339;
pub mod routes;
pub mod startup;
pub mod store;
pub mod telemetry;
