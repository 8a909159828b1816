//! Secret value types: their `Debug` prints `[redacted]` and the value leaves only through `secret()`.
//!
//! Modelled on oauth2-rs `new_secret_type!`: a token cannot reach a log line or an error message by
//! accident, because formatting it shows nothing and there is no `Display`.

/// Declares a newtype around `String` whose contents cannot be formatted.
macro_rules! secret_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The secret itself. Every call site is a place where the value leaves the type.
            pub fn secret(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret_type!(
    /// An OAuth 2.0 access token.
    AccessToken
);
secret_type!(
    /// An OAuth 2.0 refresh token.
    RefreshToken
);
secret_type!(
    /// A signed OpenID Connect ID token (a JWT), kept for `id_token_hint` at logout.
    IdToken
);
secret_type!(
    /// The authorization code returned to `/callback`.
    AuthorizationCode
);
secret_type!(
    /// The PKCE `code_verifier` (RFC 7636).
    PkceVerifier
);
secret_type!(
    /// The OpenID Connect `nonce` bound into the ID token.
    Nonce
);
secret_type!(
    /// The OAuth client secret.
    ClientSecret
);
secret_type!(
    /// A connection URL (`DATABASE_URL`, `REDIS_URL`): it may carry a password.
    ConnectionUrl
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let token = RefreshToken::new("very-secret-refresh-token");
        let printed = format!("{token:?} {:?}", Some(&token));
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(printed.contains("[redacted]"));
        assert_eq!(token.secret(), "very-secret-refresh-token");
    }

    #[test]
    fn serde_is_transparent_for_storage() {
        let nonce = Nonce::new("n-123");
        assert_eq!(serde_json::to_string(&nonce).unwrap(), "\"n-123\"");
    }
}
