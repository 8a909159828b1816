//! `/callback`: finish a login — or fail it safely, with a `login_error` the frontend can show.
//!
//! Order matters: the pending login is consumed first (single use, even when a later check
//! fails), then the browser binding and the RFC 9207 `iss` are checked before anything reaches
//! the IdP; only then is the code exchanged and the ID token verified.

use chrono::{DateTime, Utc};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{chrono_duration, Broker, LoginErrorCode};
use crate::domain::{AuthorizationCode, LoginBinding, ReturnTo, SessionId, State, UserClaims};
use crate::oidc::id_token::Expectations;
use crate::oidc::{IdTokenError, IdpError, OAuthErrorCode};
use crate::store::{Replacing, SessionRecord};

/// The callback's query, parsed.
#[derive(Debug)]
pub struct CallbackParams {
    pub state: State,
    pub code: Option<AuthorizationCode>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub iss: Option<String>,
}

#[derive(Debug)]
pub struct LoginSuccess {
    pub session_id: SessionId,
    pub return_to: ReturnTo,
    pub expires_at: DateTime<Utc>,
}

/// A failed login: where to send the browser, and the code to show there.
#[derive(Debug)]
pub struct LoginFailure {
    pub code: LoginErrorCode,
    pub return_to: ReturnTo,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Broker {
    #[tracing::instrument(skip_all)]
    pub async fn finish_login(
        &self,
        params: CallbackParams,
        binding: Option<LoginBinding>,
        replaced_session: Option<SessionId>,
    ) -> Result<LoginSuccess, LoginFailure> {
        let fallback = || self.config.default_return_to.clone();
        let fail = |code: LoginErrorCode, return_to: ReturnTo, reason: &dyn std::fmt::Display| {
            tracing::warn!(login_error = %code, reason = %reason, "login failed");
            self.metrics.login_failed(code);
            LoginFailure { code, return_to }
        };

        // The pending login is consumed atomically: a replayed state finds nothing.
        let pending = match self.logins.take_pending(&params.state).await {
            Ok(Some(pending)) => pending,
            Ok(None) => {
                return Err(fail(
                    LoginErrorCode::LoginExpired,
                    fallback(),
                    &"unknown, used or expired state",
                ))
            }
            Err(error) => {
                self.metrics.store_error(&error);
                return Err(fail(LoginErrorCode::Unavailable, fallback(), &error));
            }
        };
        let return_to = pending.return_to.clone();
        let failed = |code, reason: &dyn std::fmt::Display| fail(code, return_to.clone(), reason);

        // Only the browser that started this login may finish it.
        let Some(binding) = binding else {
            return Err(failed(
                LoginErrorCode::LoginExpired,
                &"the login-binding cookie is missing",
            ));
        };
        let binding_matches: bool = hex(&binding.hash())
            .as_bytes()
            .ct_eq(pending.binding_hash.as_bytes())
            .into();
        if !binding_matches {
            return Err(failed(
                LoginErrorCode::LoginExpired,
                &"the login-binding cookie belongs to another login",
            ));
        }

        // RFC 9207 §2.4: `iss` must equal the issuer when present, and must be present when the
        // IdP says it sends it. Checked for error responses too: they can be mixed up as well.
        let metadata = match self.provider.metadata().await {
            Ok(metadata) => metadata,
            Err(error) => return Err(failed(LoginErrorCode::IdpUnavailable, &error)),
        };
        match params.iss.as_deref() {
            Some(iss) if iss != self.provider.issuer() => {
                return Err(failed(
                    LoginErrorCode::InvalidToken,
                    &"the iss parameter names another issuer",
                ))
            }
            None if metadata.authorization_response_iss_parameter_supported => {
                return Err(failed(
                    LoginErrorCode::InvalidToken,
                    &"the iss parameter is missing",
                ))
            }
            _ => {}
        }

        if let Some(error) = params.error.as_deref() {
            let error = OAuthErrorCode::parse(error);
            let description: String = params
                .error_description
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            let code = if error.is_user_refusal() {
                LoginErrorCode::AccessDenied
            } else {
                LoginErrorCode::IdpError
            };
            tracing::warn!(idp_error = %error, idp_error_description = %description, "the IdP refused the login");
            return Err(failed(code, &format_args!("the IdP answered {error}")));
        }
        let Some(code) = params.code.as_ref() else {
            return Err(failed(
                LoginErrorCode::IdpError,
                &"the callback has neither code nor error",
            ));
        };

        let tokens = match self
            .provider
            .exchange_code(code, &pending.code_verifier)
            .await
        {
            Ok(tokens) => tokens,
            Err(error @ IdpError::OAuth { .. }) => {
                if let IdpError::OAuth {
                    description: Some(description),
                    ..
                } = &error
                {
                    tracing::warn!(idp_error_description = %description, "token endpoint refused the code");
                }
                return Err(failed(LoginErrorCode::TokenExchangeFailed, &error));
            }
            Err(error) if error.is_unavailable() => {
                return Err(failed(LoginErrorCode::IdpUnavailable, &error))
            }
            Err(error) => return Err(failed(LoginErrorCode::TokenExchangeFailed, &error)),
        };
        let Some(id_token) = tokens.id_token.clone() else {
            return Err(failed(
                LoginErrorCode::InvalidToken,
                &"the token response has no id_token",
            ));
        };

        let now = self.clock.now();
        let expect = Expectations {
            nonce: Some(&pending.nonce),
            now,
            access_token: Some(&tokens.access_token),
        };
        let claims = match self.provider.verify_id_token(&id_token, expect).await {
            Ok(claims) => claims,
            Err(IdTokenError::KeysUnavailable(error)) => {
                return Err(failed(LoginErrorCode::IdpUnavailable, &error))
            }
            Err(error) => return Err(failed(LoginErrorCode::InvalidToken, &error)),
        };

        // A new ID at every login: whatever session cookie the browser had is replaced, and its
        // session ended, so a planted cookie is never promoted to a logged-in session.
        if let Some(old) = replaced_session {
            if let Err(error) = self.end_session(&old.hash()).await {
                self.metrics.store_error(&error);
                tracing::warn!(%error, "could not end the session this login replaces");
            }
        }
        let session_id = SessionId::generate();
        let hash = session_id.hash();
        let access_token = self.access_token_entry(&tokens, now);
        let record = SessionRecord {
            id: Uuid::new_v4(),
            id_hash: hash,
            user: UserClaims::select(claims.sub.clone(), &claims.other),
            idp_sid: claims.sid.clone(),
            id_token,
            refresh_token: tokens.refresh_token.clone(),
            access_token: Some(access_token.clone()),
            created_at: now,
            last_seen_at: now,
            expires_at: now + chrono_duration(self.config.session_max_lifetime),
        };
        if let Err(error) = self.sessions.insert(&record).await {
            self.metrics.store_error(&error);
            return Err(failed(LoginErrorCode::Unavailable, &error));
        }
        // PostgreSQL is the truth; the caches only save work, so their failure is not the login's.
        if let Err(error) = self
            .cache
            .put(
                &hash,
                &record.view(),
                self.cache_ttl(&record.view(), now),
                Replacing::Nothing,
            )
            .await
        {
            self.metrics.store_error(&error);
            tracing::warn!(%error, "could not cache the new session");
        }
        self.cache_access_token(&hash, &access_token).await;
        tracing::info!(session = %record.id, "login completed");
        self.metrics.login_completed();
        Ok(LoginSuccess {
            session_id,
            return_to,
            expires_at: self.session_end(&record.view()),
        })
    }
}
