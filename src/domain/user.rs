//! The user as the frontend may see them: the subject and a fixed set of profile claims.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Profile claims copied from the ID token into the session; nothing else reaches the browser.
pub const SELECTED_CLAIMS: &[&str] = &[
    "name",
    "given_name",
    "family_name",
    "preferred_username",
    "email",
    "email_verified",
    "picture",
    "locale",
];

/// `{"sub": …, "name": …, …}` as `/session` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserClaims {
    /// The IdP's subject identifier.
    pub sub: String,
    /// Selected profile claims (`name`, `email`, `preferred_username`, …) when the IdP sent them.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub profile: serde_json::Map<String, serde_json::Value>,
}

impl UserClaims {
    /// Keeps `sub` and the claims of [`SELECTED_CLAIMS`] that are plain strings or booleans.
    pub fn select(sub: String, claims: &serde_json::Map<String, serde_json::Value>) -> Self {
        let profile = SELECTED_CLAIMS
            .iter()
            .filter_map(|name| {
                let value = claims.get(*name)?;
                let plain = value.is_string() || value.is_boolean();
                plain.then(|| (name.to_string(), value.clone()))
            })
            .collect();
        Self { sub, profile }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selected_plain_claims_are_kept() {
        let claims = serde_json::json!({
            "sub": "ignored-here", "email": "a@example.com", "email_verified": true,
            "nonce": "n", "at_hash": "x", "name": {"nested": 1}, "groups": ["admin"]
        });
        let user = UserClaims::select("alice".into(), claims.as_object().unwrap());
        let json = serde_json::to_value(&user).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"sub": "alice", "email": "a@example.com", "email_verified": true})
        );
    }
}
