//! Discovery (OpenID Connect Discovery 1.0 §3) and the JWKS.

use actix_web::http::header::CACHE_CONTROL;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde_json::json;

use super::oauth::json_error;
use super::DevIdp;

pub(super) async fn discovery(idp: web::Data<DevIdp>) -> HttpResponse {
    idp.count(|stats| stats.discovery_requests += 1);
    if let Some(status) = idp.controls().snapshot().discovery_status {
        return injected_failure(status);
    }
    HttpResponse::Ok().json(document(&idp))
}

pub(super) async fn jwks(idp: web::Data<DevIdp>) -> HttpResponse {
    idp.count(|stats| stats.jwks_requests += 1);
    if let Some(status) = idp.controls().snapshot().jwks_status {
        return injected_failure(status);
    }
    // Short caching, like real IdPs; clients must still refetch on an unknown kid.
    HttpResponse::Ok()
        .insert_header((CACHE_CONTROL, "public, max-age=60"))
        .json(idp.jwks())
}

fn injected_failure(status: u16) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_error(
        status,
        "server_error",
        "failure injected by the test controls",
    )
}

pub(super) fn document(idp: &DevIdp) -> serde_json::Value {
    let auth_methods = &idp.client().auth_methods;
    json!({
        "issuer": idp.issuer(),
        "authorization_endpoint": idp.endpoint("/authorize"),
        "token_endpoint": idp.endpoint("/token"),
        "jwks_uri": idp.endpoint("/jwks"),
        "end_session_endpoint": idp.endpoint("/end-session"),
        "revocation_endpoint": idp.endpoint("/revoke"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "claims_supported": [
            "iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "sid", "azp",
            "name", "preferred_username", "email", "email_verified"
        ],
        // RFC 9207 §3.
        "authorization_response_iss_parameter_supported": true,
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
        "frontchannel_logout_supported": false,
    })
}
