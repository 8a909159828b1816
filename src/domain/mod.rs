//! Domain values, parsed at the edge so that nothing past `routes` holds an unchecked string.

pub mod opaque;
pub mod return_to;
pub mod secret;
pub mod user;

pub use opaque::{LoginBinding, SessionId, SessionIdHash, State};
pub use return_to::{AllowedOrigins, ReturnTo, ReturnToError};
pub use secret::{
    AccessToken, AuthorizationCode, ClientSecret, ConnectionUrl, IdToken, Nonce, PkceVerifier,
    RefreshToken,
};
pub use user::UserClaims;
