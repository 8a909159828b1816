//! The user as the frontend may see them: the subject and a fixed set of profile claims.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
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
///
/// Kept as the JSON object itself, next to its `sub`: every cached `/session` and `/auth` reads
/// it from the stored session and `/session` writes it back out unchanged, so it is copied,
/// never built into a map of values and serialised again. It is checked to be JSON where it
/// enters from outside the broker's own sealed values (the ID token, PostgreSQL's `jsonb`), and
/// not again on every cache read (see [`UserClaims::from_stored_parts`]).
#[derive(Clone)]
pub struct UserClaims {
    sub: String,
    /// The whole object, `sub` included; always a JSON object whose `sub` is `self.sub`.
    json: String,
}

/// `{"sub": …, "name": …, …}` as `/session` returns it.
#[derive(Serialize, ToSchema)]
#[schema(as = UserClaims)]
// The document's description of `UserClaims` (the object it holds), and how `select` writes it.
struct UserClaimsSchema {
    /// The IdP's subject identifier.
    sub: String,
    /// Selected profile claims (`name`, `email`, `preferred_username`, …) when the IdP sent them.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    profile: serde_json::Map<String, serde_json::Value>,
}

impl utoipa::PartialSchema for UserClaims {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        UserClaimsSchema::schema()
    }
}

impl ToSchema for UserClaims {
    fn name() -> Cow<'static, str> {
        UserClaimsSchema::name()
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
        Self::write(sub, profile)
    }

    /// The same claims written as [`UserClaims::select`] writes them (compact, `sub` first):
    /// PostgreSQL's `jsonb` gives an object back with its own spacing and member order, and
    /// `/session` returns the object as it is held.
    pub fn normalized(self) -> Self {
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&self.json) {
            Ok(mut profile) => {
                profile.remove("sub");
                Self::write(self.sub, profile)
            }
            Err(_) => self,
        }
    }

    // serde_json fails only on maps with non-string keys and on a `Serialize` that errors:
    // neither can occur for strings and a map of JSON values.
    #[allow(clippy::expect_used)]
    fn write(sub: String, profile: serde_json::Map<String, serde_json::Value>) -> Self {
        let object = UserClaimsSchema { sub, profile };
        let json = serde_json::to_string(&object).expect("a map of JSON values always serialises");
        Self {
            sub: object.sub,
            json,
        }
    }

    /// The claims from parts stored side by side (the binary session cache value), taken as
    /// they are: the parts were written together from one `UserClaims` and sealed with AES-GCM,
    /// so only a holder of the encryption key could have made them, and that holder could seal
    /// any claims it liked. Parsing the object again on every cached `/session` and `/auth` was
    /// 2 % of their instructions. Only its braces are checked, against the broker's own bugs.
    pub fn from_stored_parts(sub: String, json: String) -> Result<Self, String> {
        if !(json.starts_with('{') && json.ends_with('}')) {
            return Err("user claims are not a JSON object".into());
        }
        Ok(Self { sub, json })
    }

    /// The IdP's subject identifier.
    pub fn sub(&self) -> &str {
        &self.sub
    }

    pub fn into_sub(self) -> String {
        self.sub
    }

    /// The claims as the JSON object `/session` returns.
    pub fn json(&self) -> &str {
        &self.json
    }
}

impl std::fmt::Debug for UserClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UserClaims").field(&self.json).finish()
    }
}

impl PartialEq for UserClaims {
    /// The same claims, written the same way.
    fn eq(&self, other: &Self) -> bool {
        self.json == other.json
    }
}

impl Serialize for UserClaims {
    /// The object as held (written into PostgreSQL's `jsonb`; `/session` writes its body by
    /// hand). Checked to be JSON here, so a bad object fails to serialise rather than writing
    /// broken JSON.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RawValue::from_string(self.json.clone())
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

/// Only `sub` is read from the object; the other members are skipped, not built.
#[derive(Deserialize)]
struct SubOnly<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
}

impl<'de> Deserialize<'de> for UserClaims {
    /// Only from serde_json (the one format claims are stored in): the object is taken as it is
    /// written, and must be an object with a string `sub`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = Box::<RawValue>::deserialize(deserializer)?;
        if !json.get().starts_with('{') {
            return Err(serde::de::Error::custom(
                "user claims are not a JSON object",
            ));
        }
        let sub = serde_json::from_str::<SubOnly<'_>>(json.get())
            .map_err(serde::de::Error::custom)?
            .sub
            .into_owned();
        Ok(Self {
            sub,
            json: Box::<str>::from(json).into_string(),
        })
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
            r#"{"sub":"a","sub":"b"}"#,
            r#"["alice"]"#,
            r#""alice""#,
            r#"{"sub":"alice""#,
        ] {
            assert!(serde_json::from_str::<UserClaims>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stored_object_is_returned_as_it_was_written() {
        // PostgreSQL's jsonb writes spaces and escapes its own way; the claims go out as read.
        let stored = r#"{"sub": "al\u0069ce", "email": "a@example.com", "groups": ["x"]}"#;
        let user: UserClaims = serde_json::from_str(stored).unwrap();
        assert_eq!(user.sub(), "alice");
        assert_eq!(user.json(), stored);
        #[derive(Serialize)]
        struct Wrapper<'a> {
            user: &'a UserClaims,
        }
        let written = serde_json::to_string(&Wrapper { user: &user }).unwrap();
        assert_eq!(written, format!(r#"{{"user":{stored}}}"#));
        let back: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(back["user"]["sub"], "alice");
        // Read back from PostgreSQL, it is written again as the broker writes it.
        let selected = UserClaims::select(
            "alice".into(),
            serde_json::json!({"email": "a@example.com"})
                .as_object()
                .unwrap(),
        );
        let from_jsonb: UserClaims =
            serde_json::from_str(r#"{"sub": "alice", "email": "a@example.com"}"#).unwrap();
        assert_ne!(from_jsonb, selected);
        assert_eq!(from_jsonb.normalized(), selected);
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
        assert_eq!(user.sub(), "alice");
    }
}
