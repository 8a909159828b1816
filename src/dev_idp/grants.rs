//! What the IdP remembers between requests: authorization codes, refresh-token families, revoked
//! access tokens and IdP sessions. All in memory; every method is one short critical section.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::oauth::{
    has_scope, pkce_s256_matches, random_token, scope_values, ErrorCode, OAuthError,
};

/// How long an authorization code may wait for its exchange.
pub(super) const CODE_TTL: Duration = Duration::from_secs(60);
/// How long a used or expired code is remembered, to recognise a replay.
const CODE_MEMORY: Duration = Duration::from_secs(600);

/// Who logged in, for which client and what: everything tokens are minted from.
#[derive(Clone, Debug)]
pub(super) struct Authorization {
    pub client_id: String,
    pub username: String,
    pub scope: String,
    pub sid: String,
    pub nonce: Option<String>,
    /// Seconds since the epoch.
    pub auth_time: i64,
}

/// What the code was issued for; the exchange must present the same.
pub(super) struct CodeBinding {
    pub redirect_uri: String,
    pub code_challenge: String,
}

struct CodeGrant {
    authorization: Authorization,
    binding: CodeBinding,
    expires_at: Instant,
    used: bool,
    /// The refresh-token family the code produced, revoked if the code is replayed.
    family: Option<String>,
}

struct RefreshGrant {
    authorization: Authorization,
    family: String,
    /// Rotated away: presenting it again is a reuse.
    used: bool,
}

#[derive(Default)]
pub(super) struct Grants {
    codes: HashMap<String, CodeGrant>,
    refresh_tokens: HashMap<String, RefreshGrant>,
    revoked_families: HashSet<String>,
    revoked_access_tokens: HashSet<String>,
    /// IdP sessions: `sid` → user name.
    sessions: HashMap<String, String>,
    /// When codes past [`CODE_MEMORY`] were last dropped: at most once a second, because the
    /// scan is over every code of the last 11 minutes (a per-code scan made logins O(n) and the
    /// IdP the bottleneck of scripts/bench).
    codes_pruned_at: Option<Instant>,
}

fn invalid_grant(why: &str) -> OAuthError {
    OAuthError::new(ErrorCode::InvalidGrant, why)
}

impl Grants {
    /// A new IdP session for a login; returns its `sid`.
    pub fn start_session(&mut self, username: &str) -> String {
        let sid = random_token(16);
        self.sessions.insert(sid.clone(), username.to_owned());
        sid
    }

    /// Forgets the session; `true` when it existed.
    pub fn end_session(&mut self, sid: &str) -> bool {
        self.sessions.remove(sid).is_some()
    }

    pub fn is_session_active(&self, sid: &str) -> bool {
        self.sessions.contains_key(sid)
    }

    /// Issues a single-use authorization code valid for [`CODE_TTL`].
    pub fn issue_code(
        &mut self,
        authorization: Authorization,
        binding: CodeBinding,
        now: Instant,
    ) -> String {
        if self
            .codes_pruned_at
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
        {
            self.codes
                .retain(|_, grant| grant.expires_at + CODE_MEMORY > now);
            self.codes_pruned_at = Some(now);
        }
        let code = random_token(32);
        let grant = CodeGrant {
            authorization,
            binding,
            expires_at: now + CODE_TTL,
            used: false,
            family: None,
        };
        self.codes.insert(code.clone(), grant);
        code
    }

    /// Redeems a code (RFC 6749 §4.1.3, RFC 7636 §4.6). Returns the authorization and, when
    /// `offline_access` was granted, the first refresh token of a new family.
    pub fn redeem_code(
        &mut self,
        code: &str,
        client_id: &str,
        redirect_uri: &str,
        code_verifier: &str,
        now: Instant,
    ) -> Result<(Authorization, Option<String>), OAuthError> {
        let grant = self
            .codes
            .get_mut(code)
            .ok_or_else(|| invalid_grant("unknown authorization code"))?;
        if grant.used {
            // RFC 6749 §4.1.2: a replayed code revokes what it produced.
            if let Some(family) = grant.family.clone() {
                self.revoked_families.insert(family);
            }
            return Err(invalid_grant("the authorization code was already used"));
        }
        // Whatever happens next, this code has been presented once.
        grant.used = true;
        if now >= grant.expires_at {
            return Err(invalid_grant("the authorization code expired"));
        }
        if grant.authorization.client_id != client_id {
            return Err(invalid_grant(
                "the authorization code was issued to another client",
            ));
        }
        if grant.binding.redirect_uri != redirect_uri {
            return Err(invalid_grant(
                "redirect_uri differs from the authorization request",
            ));
        }
        if !pkce_s256_matches(code_verifier, &grant.binding.code_challenge) {
            return Err(invalid_grant(
                "code_verifier does not match the code_challenge",
            ));
        }
        let authorization = grant.authorization.clone();
        if !has_scope(&authorization.scope, "offline_access") {
            return Ok((authorization, None));
        }
        let family = random_token(16);
        grant.family = Some(family.clone());
        let refresh_token = self.insert_refresh_token(authorization.clone(), family);
        Ok((authorization, Some(refresh_token)))
    }

    /// Rotates a refresh token: the presented one is used up and a new one of the same family
    /// returned. `requested_scope` may narrow the scope of this response only (RFC 6749 §6).
    pub fn rotate_refresh_token(
        &mut self,
        token: &str,
        client_id: &str,
        requested_scope: Option<&str>,
    ) -> Result<(Authorization, String), OAuthError> {
        let grant = self
            .refresh_tokens
            .get_mut(token)
            .ok_or_else(|| invalid_grant("unknown refresh token"))?;
        if self.revoked_families.contains(&grant.family) {
            return Err(invalid_grant("the refresh token was revoked"));
        }
        if grant.used {
            // Reuse detection (OAuth 2.0 Security BCP §4.14.2): either the client or an attacker
            // holds a stolen token; revoke the whole family so neither can go on.
            self.revoked_families.insert(grant.family.clone());
            return Err(invalid_grant("the refresh token was already used"));
        }
        if grant.authorization.client_id != client_id {
            return Err(invalid_grant(
                "the refresh token was issued to another client",
            ));
        }
        if let Some(requested) = requested_scope {
            if !scope_values(requested).all(|value| has_scope(&grant.authorization.scope, value)) {
                let why = "the requested scope exceeds the original grant";
                return Err(OAuthError::new(ErrorCode::InvalidScope, why));
            }
        }
        grant.used = true;
        let (authorization, family) = (grant.authorization.clone(), grant.family.clone());
        let next = self.insert_refresh_token(authorization.clone(), family);
        let scope = requested_scope.map_or(authorization.scope.clone(), str::to_owned);
        Ok((
            Authorization {
                scope,
                ..authorization
            },
            next,
        ))
    }

    fn insert_refresh_token(&mut self, authorization: Authorization, family: String) -> String {
        let token = random_token(32);
        let grant = RefreshGrant {
            authorization,
            family,
            used: false,
        };
        self.refresh_tokens.insert(token.clone(), grant);
        token
    }

    /// Revokes the family of a refresh token (RFC 7009 §2.1); `false` when the token is unknown.
    pub fn revoke_refresh_token(&mut self, token: &str) -> bool {
        let Some(grant) = self.refresh_tokens.get(token) else {
            return false;
        };
        self.revoked_families.insert(grant.family.clone());
        true
    }

    pub fn revoke_access_token(&mut self, jti: &str) {
        self.revoked_access_tokens.insert(jti.to_owned());
    }

    pub fn is_access_token_revoked(&self, jti: &str) -> bool {
        self.revoked_access_tokens.contains(jti)
    }

    /// Whether the token would be accepted by a refresh grant now.
    pub fn is_refresh_token_active(&self, token: &str) -> bool {
        self.refresh_tokens
            .get(token)
            .is_some_and(|grant| !grant.used && !self.revoked_families.contains(&grant.family))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    const REDIRECT: &str = "http://app.test/callback";

    fn authorization(scope: &str) -> Authorization {
        Authorization {
            client_id: "client".into(),
            username: "alice".into(),
            scope: scope.into(),
            sid: "sid".into(),
            nonce: Some("n".into()),
            auth_time: 0,
        }
    }

    fn code(grants: &mut Grants, scope: &str, now: Instant) -> String {
        let binding = CodeBinding {
            redirect_uri: REDIRECT.into(),
            code_challenge: CHALLENGE.into(),
        };
        grants.issue_code(authorization(scope), binding, now)
    }

    fn error(result: Result<impl Sized, OAuthError>) -> String {
        match result {
            Ok(_) => "accepted".into(),
            Err(e) => format!("{}: {}", e.code, e.description),
        }
    }

    #[test]
    fn a_code_works_once_and_its_replay_revokes_the_refresh_token() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let code = code(&mut grants, "openid offline_access", now);
        let (auth, refresh) = grants
            .redeem_code(&code, "client", REDIRECT, VERIFIER, now)
            .expect("first use");
        assert_eq!(auth.username, "alice");
        let refresh = refresh.expect("offline_access gives a refresh token");
        assert!(grants.is_refresh_token_active(&refresh));

        let replay = grants.redeem_code(&code, "client", REDIRECT, VERIFIER, now);
        assert_eq!(
            error(replay),
            "invalid_grant: the authorization code was already used"
        );
        assert!(!grants.is_refresh_token_active(&refresh));
    }

    #[test]
    fn a_code_is_bound_to_client_redirect_uri_verifier_and_time() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let mut attempt = |client: &str, redirect: &str, verifier: &str, at: Instant| {
            let code = code(&mut grants, "openid", now);
            error(grants.redeem_code(&code, client, redirect, verifier, at))
        };
        assert!(attempt("other", REDIRECT, VERIFIER, now).contains("another client"));
        assert!(attempt("client", "http://app.test/other", VERIFIER, now).contains("redirect_uri"));
        assert!(attempt("client", REDIRECT, CHALLENGE, now).contains("code_verifier"));
        assert!(attempt("client", REDIRECT, VERIFIER, now + CODE_TTL).contains("expired"));
        assert_eq!(
            attempt("client", REDIRECT, VERIFIER, now + CODE_TTL / 2),
            "accepted"
        );
        assert!(
            error(grants.redeem_code("nope", "client", REDIRECT, VERIFIER, now))
                .contains("unknown")
        );
    }

    #[test]
    fn a_failed_exchange_still_uses_the_code_up() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let code = code(&mut grants, "openid", now);
        assert!(grants
            .redeem_code(&code, "client", REDIRECT, CHALLENGE, now)
            .is_err());
        assert!(grants
            .redeem_code(&code, "client", REDIRECT, VERIFIER, now)
            .is_err());
    }

    #[test]
    fn no_refresh_token_without_offline_access() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let code = code(&mut grants, "openid profile", now);
        let (_, refresh) = grants
            .redeem_code(&code, "client", REDIRECT, VERIFIER, now)
            .expect("redeem");
        assert!(refresh.is_none());
    }

    #[test]
    fn refresh_tokens_rotate_and_reuse_revokes_the_family() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let code = code(&mut grants, "openid offline_access", now);
        let first = grants
            .redeem_code(&code, "client", REDIRECT, VERIFIER, now)
            .expect("code")
            .1
            .expect("rt");

        let (_, second) = grants
            .rotate_refresh_token(&first, "client", None)
            .expect("first refresh");
        assert_ne!(first, second);
        assert!(!grants.is_refresh_token_active(&first));
        let (_, third) = grants
            .rotate_refresh_token(&second, "client", None)
            .expect("second refresh");
        assert!(grants.is_refresh_token_active(&third));

        let reuse = grants.rotate_refresh_token(&first, "client", None);
        assert_eq!(
            error(reuse),
            "invalid_grant: the refresh token was already used"
        );
        assert!(
            !grants.is_refresh_token_active(&third),
            "the whole family is revoked"
        );
        assert!(error(grants.rotate_refresh_token(&third, "client", None)).contains("revoked"));
    }

    #[test]
    fn a_refresh_may_narrow_the_scope_but_not_widen_it() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let code = code(&mut grants, "openid email offline_access", now);
        let first = grants
            .redeem_code(&code, "client", REDIRECT, VERIFIER, now)
            .expect("code")
            .1
            .expect("rt");
        let wider = grants.rotate_refresh_token(&first, "client", Some("openid admin"));
        assert!(error(wider).starts_with("invalid_scope"));
        assert!(
            grants.is_refresh_token_active(&first),
            "a refused scope does not use the token up"
        );

        let (auth, second) = grants
            .rotate_refresh_token(&first, "client", Some("openid"))
            .expect("narrower");
        assert_eq!(auth.scope, "openid");
        let (auth, _) = grants
            .rotate_refresh_token(&second, "client", None)
            .expect("again");
        assert_eq!(
            auth.scope, "openid email offline_access",
            "the grant itself keeps its scope"
        );
    }

    #[test]
    fn revocation_ends_the_family_and_unknown_tokens_are_ignored() {
        let (mut grants, now) = (Grants::default(), Instant::now());
        let code = code(&mut grants, "openid offline_access", now);
        let first = grants
            .redeem_code(&code, "client", REDIRECT, VERIFIER, now)
            .expect("code")
            .1
            .expect("rt");
        assert!(
            error(grants.rotate_refresh_token(&first, "other", None)).contains("another client")
        );
        assert!(
            grants.is_refresh_token_active(&first),
            "a refused client does not use the token up"
        );

        assert!(grants.revoke_refresh_token(&first));
        assert!(!grants.is_refresh_token_active(&first));
        assert!(!grants.revoke_refresh_token("unknown"));
    }

    #[test]
    fn sessions_start_and_end() {
        let mut grants = Grants::default();
        let sid = grants.start_session("alice");
        assert!(grants.is_session_active(&sid));
        assert!(grants.end_session(&sid));
        assert!(!grants.end_session(&sid));
    }
}
