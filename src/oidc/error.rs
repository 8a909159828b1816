//! OAuth 2.0 error codes (RFC 6749 §4.1.2.1, §5.2; OIDC Core §3.1.2.6) and IdP call failures.

use std::fmt;

/// An OAuth error code. `Display` is the RFC string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    UnauthorizedClient,
    AccessDenied,
    UnsupportedResponseType,
    InvalidScope,
    ServerError,
    TemporarilyUnavailable,
    InvalidClient,
    InvalidGrant,
    UnsupportedGrantType,
    InteractionRequired,
    LoginRequired,
    AccountSelectionRequired,
    ConsentRequired,
    /// A code outside the RFCs; kept (bounded) for the log.
    Other(String),
}

impl OAuthErrorCode {
    pub fn parse(code: &str) -> Self {
        match code {
            "invalid_request" => Self::InvalidRequest,
            "unauthorized_client" => Self::UnauthorizedClient,
            "access_denied" => Self::AccessDenied,
            "unsupported_response_type" => Self::UnsupportedResponseType,
            "invalid_scope" => Self::InvalidScope,
            "server_error" => Self::ServerError,
            "temporarily_unavailable" => Self::TemporarilyUnavailable,
            "invalid_client" => Self::InvalidClient,
            "invalid_grant" => Self::InvalidGrant,
            "unsupported_grant_type" => Self::UnsupportedGrantType,
            "interaction_required" => Self::InteractionRequired,
            "login_required" => Self::LoginRequired,
            "account_selection_required" => Self::AccountSelectionRequired,
            "consent_required" => Self::ConsentRequired,
            other => Self::Other(other.chars().take(64).collect()),
        }
    }

    /// Whether the user, not the system, said no (the frontend shows "login cancelled").
    pub fn is_user_refusal(&self) -> bool {
        matches!(
            self,
            Self::AccessDenied
                | Self::ConsentRequired
                | Self::LoginRequired
                | Self::InteractionRequired
                | Self::AccountSelectionRequired
        )
    }
}

impl fmt::Display for OAuthErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidRequest => "invalid_request",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::AccessDenied => "access_denied",
            Self::UnsupportedResponseType => "unsupported_response_type",
            Self::InvalidScope => "invalid_scope",
            Self::ServerError => "server_error",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InteractionRequired => "interaction_required",
            Self::LoginRequired => "login_required",
            Self::AccountSelectionRequired => "account_selection_required",
            Self::ConsentRequired => "consent_required",
            Self::Other(code) => code,
        })
    }
}

/// A call to the IdP that did not give a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// Connection refused, DNS, TLS, or the time-out: the IdP is unavailable.
    #[error("the IdP could not be reached: {0}")]
    Unreachable(String),
    /// A 5xx (or other non-OAuth) answer.
    #[error("the IdP answered HTTP {0}")]
    Status(u16),
    /// A well-formed OAuth error answer (RFC 6749 §5.2).
    #[error("the IdP refused the request: {error}")]
    OAuth {
        error: OAuthErrorCode,
        /// Logged, never shown to a browser.
        description: Option<String>,
    },
    #[error("the IdP's answer is invalid: {0}")]
    InvalidResponse(String),
}

impl IdpError {
    /// True when trying again later may work (network trouble, IdP overloaded).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Status(_))
    }
}

impl From<reqwest::Error> for IdpError {
    fn from(error: reqwest::Error) -> Self {
        // Without the URL's query; our IdP URLs carry no secrets, but keep the habit.
        let error = error.without_url();
        if error.is_timeout() {
            Self::Unreachable(format!("timed out: {error}"))
        } else if error.is_decode() {
            Self::InvalidResponse(error.to_string())
        } else {
            Self::Unreachable(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_bounded() {
        for code in [
            "invalid_grant",
            "access_denied",
            "consent_required",
            "server_error",
        ] {
            assert_eq!(OAuthErrorCode::parse(code).to_string(), code);
        }
        let long = "x".repeat(500);
        assert_eq!(OAuthErrorCode::parse(&long).to_string().len(), 64);
        assert!(OAuthErrorCode::parse("login_required").is_user_refusal());
        assert!(!OAuthErrorCode::parse("invalid_scope").is_user_refusal());
    }
}
