//! The broker as an OpenID Connect client: everything it says to and hears from the IdP.
//!
//! - [`provider`]: discovery and JWKS, fetched once and cached, and the HTTP client they share.
//! - [`jws`]: signature verification with the JWKS and an algorithm allowlist.
//! - [`logout_token`]: Back-Channel Logout 1.0 logout-token validation.
//! - [`id_token`]: ID-token verification, step by step after OpenID Connect Core §3.1.3.7.
//! - [`token`]: the token endpoint (code exchange) and revocation (RFC 7009).
//! - [`error`]: OAuth error codes and the errors of talking to the IdP.

pub mod error;
pub mod id_token;
pub mod jws;
pub mod logout_token;
pub mod provider;
pub mod token;

pub use error::{IdpError, OAuthErrorCode};
pub use id_token::{IdTokenClaims, IdTokenError};
pub use provider::{Provider, ProviderMetadata};
pub use token::TokenResponse;
