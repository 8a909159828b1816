//! The tokens a successful grant returns: the access token (an RFC 9068 JWT), the ID token
//! (OpenID Connect Core §2), and the token response around them (RFC 6749 §5.1).

use serde_json::{json, Map, Value};

use super::controls::{IdTokenContext, Knobs};
use super::grants::Authorization;
use super::oauth::has_scope;
use super::DevIdp;

/// ID tokens are valid this long, whatever the access-token lifetime.
const ID_TOKEN_TTL_SECS: i64 = 300;

/// The token response for `authorization`, signed with the current key of the configured algorithm.
pub(super) fn token_response(
    idp: &DevIdp,
    knobs: &Knobs,
    authorization: &Authorization,
    grant_type: &'static str,
    refresh_token: Option<String>,
) -> Result<Value, jsonwebtoken::errors::Error> {
    let now = chrono::Utc::now().timestamp();
    let ttl = idp.inner.access_token_ttl.as_secs();
    let (alg, keys) = (knobs.signing_alg, idp.current_keys());

    let access_claims = json!({
        "iss": idp.issuer(),
        "sub": authorization.username,
        "aud": authorization.client_id,
        "client_id": authorization.client_id,
        "exp": now + i64::try_from(ttl).unwrap_or(i64::MAX / 2),
        "iat": now,
        "jti": uuid::Uuid::new_v4().to_string(),
        "scope": authorization.scope,
        "sid": authorization.sid,
    });
    let access_token = keys.sign(alg, "at+jwt", &access_claims)?;

    let mut id_claims = id_token_claims(&idp.issuer(), authorization, now, grant_type);
    if let Some(patch) = &knobs.id_token_claims_patch {
        merge(&mut id_claims, patch);
    }
    let signed = keys.sign(alg, "JWT", &id_claims)?;
    let id_token = match &knobs.id_token_override {
        None => signed,
        Some(issue) => issue(&IdTokenContext {
            claims: id_claims,
            signed,
            kid: keys.kid(alg).to_owned(),
            alg,
            grant_type,
        }),
    };

    let mut response = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": ttl,
        "id_token": id_token,
        "scope": authorization.scope,
    });
    if let Some(refresh_token) = refresh_token {
        response["refresh_token"] = Value::String(refresh_token);
    }
    Ok(response)
}

/// The ID-token claims; `profile` and `email` claims only when those scopes were granted (§5.4).
fn id_token_claims(
    issuer: &str,
    authorization: &Authorization,
    now: i64,
    grant_type: &str,
) -> Value {
    let user = &authorization.username;
    let mut claims = json!({
        "iss": issuer,
        "sub": user,
        "aud": authorization.client_id,
        "exp": now + ID_TOKEN_TTL_SECS,
        "iat": now,
        "auth_time": authorization.auth_time,
        "sid": authorization.sid,
        "azp": authorization.client_id,
    });
    // §12.2: an ID token from a refresh keeps the original authentication but has no nonce to
    // compare with, since the client's nonce was for the original request.
    if grant_type == "authorization_code" {
        if let Some(nonce) = &authorization.nonce {
            claims["nonce"] = json!(nonce);
        }
    }
    if has_scope(&authorization.scope, "profile") {
        claims["name"] = json!(user);
        claims["preferred_username"] = json!(user);
    }
    if has_scope(&authorization.scope, "email") {
        let email = if user.contains('@') {
            user.clone()
        } else {
            format!("{user}@example.com")
        };
        claims["email"] = json!(email);
        claims["email_verified"] = json!(true);
    }
    claims
}

/// Shallow merge; a `null` in the patch removes the claim.
fn merge(claims: &mut Value, patch: &Value) {
    let (Some(claims), Some(patch)) = (claims.as_object_mut(), patch.as_object()) else {
        return;
    };
    for (name, value) in patch {
        if value.is_null() {
            claims.remove(name);
        } else {
            claims.insert(name.clone(), value.clone());
        }
    }
}

/// A back-channel logout token (Back-Channel Logout 1.0 §2.4): no nonce, an event instead.
pub(super) fn logout_token_claims(
    issuer: &str,
    audience: &str,
    sub: &str,
    sid: Option<&str>,
) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(issuer));
    claims.insert("aud".into(), json!(audience));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + 120));
    claims.insert("jti".into(), json!(uuid::Uuid::new_v4().to_string()));
    if !sub.is_empty() {
        claims.insert("sub".into(), json!(sub));
    }
    if let Some(sid) = sid {
        claims.insert("sid".into(), json!(sid));
    }
    claims.insert(
        "events".into(),
        json!({"http://schemas.openid.net/event/backchannel-logout": {}}),
    );
    Value::Object(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorization(user: &str, scope: &str) -> Authorization {
        Authorization {
            client_id: "client".into(),
            username: user.into(),
            scope: scope.into(),
            sid: "sid-1".into(),
            nonce: Some("n-1".into()),
            auth_time: 1_700_000_000,
        }
    }

    #[test]
    fn id_token_claims_follow_the_granted_scopes() {
        let claims = id_token_claims(
            "http://idp",
            &authorization("alice", "openid profile email"),
            100,
            "authorization_code",
        );
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["aud"], "client");
        assert_eq!(claims["azp"], "client");
        assert_eq!(claims["exp"], 400);
        assert_eq!(claims["nonce"], "n-1");
        assert_eq!(claims["sid"], "sid-1");
        assert_eq!(claims["email"], "alice@example.com");
        assert_eq!(claims["email_verified"], true);
        assert_eq!(claims["preferred_username"], "alice");

        let bare = id_token_claims(
            "http://idp",
            &authorization("bob@corp.test", "openid email"),
            100,
            "refresh_token",
        );
        assert_eq!(bare["email"], "bob@corp.test");
        assert!(bare.get("name").is_none());
        assert!(bare.get("nonce").is_none(), "no nonce after a refresh");
        assert_eq!(
            bare["auth_time"], 1_700_000_000,
            "the original authentication time"
        );
    }

    #[test]
    fn a_patch_replaces_adds_and_removes_claims() {
        let mut claims = json!({"nonce": "n", "iss": "i", "sub": "s"});
        merge(
            &mut claims,
            &json!({"nonce": "other", "iss": null, "extra": 1}),
        );
        assert_eq!(claims, json!({"nonce": "other", "sub": "s", "extra": 1}));
    }

    #[test]
    fn logout_tokens_carry_the_event_and_no_nonce() {
        let claims = logout_token_claims("http://idp", "client", "alice", Some("sid-1"));
        assert_eq!(
            claims["events"],
            json!({"http://schemas.openid.net/event/backchannel-logout": {}})
        );
        assert_eq!(
            (claims["sub"].as_str(), claims["sid"].as_str()),
            (Some("alice"), Some("sid-1"))
        );
        assert!(claims.get("nonce").is_none());
        let sid_only = logout_token_claims("http://idp", "client", "", Some("sid-1"));
        assert!(sid_only.get("sub").is_none());
    }
}
