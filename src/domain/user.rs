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
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UserClaims {
    /// The IdP's subject identifier.
    pub sub: String,
    /// Selected profile claims (`name`, `email`, `preferred_username`, …) when the IdP sent them.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub profile: serde_json::Map<String, serde_json::Value>,
}

/// Read as one map from which `sub` is taken: the derived `Deserialize` of a `flatten`ed field
/// buffers every member into serde's intermediate `Content` first, and this is read on every
/// cached `/session` and `/auth`. The same JSON either way.
impl<'de> Deserialize<'de> for UserClaims {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut profile = serde_json::Map::deserialize(deserializer)?;
        match profile.remove("sub") {
            Some(serde_json::Value::String(sub)) => Ok(Self { sub, profile }),
            Some(_) => Err(serde::de::Error::custom("`sub` is not a string")),
            None => Err(serde::de::Error::missing_field("sub")),
        }
    }
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
    fn reads_back_what_it_writes_and_requires_a_string_sub() {
        let user = UserClaims::select(
            "alice".into(),
            serde_json::json!({"email": "a@example.com", "email_verified": true})
                .as_object()
                .unwrap(),
        );
        let json = serde_json::to_string(&user).unwrap();
        assert_eq!(serde_json::from_str::<UserClaims>(&json).unwrap(), user);
        for bad in [
            r#"{"email":"a@example.com"}"#,
            r#"{"sub":7}"#,
            r#"["alice"]"#,
        ] {
            assert!(serde_json::from_str::<UserClaims>(bad).is_err(), "{bad}");
        }
    }

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
