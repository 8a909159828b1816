//! The OpenAPI document, generated from the handlers' annotations by utoipa. It is committed as
//! `openapi/openapi.json`, printed by `token-broker openapi` and served at `/openapi.json`; tests
//! fail when the committed file or the route table disagree with it.

use utoipa::OpenApi;

use crate::routes::{backchannel, forward_auth, health, login, problem, session};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "token-broker",
        description = "OAuth 2.0 / OpenID Connect backend-for-frontend: browsers get one HttpOnly session cookie, never a token.",
        license(name = "Apache-2.0"),
    ),
    paths(
        login::login,
        login::callback,
        session::session,
        session::logout,
        backchannel::backchannel_logout,
        forward_auth::forward_auth,
        health::healthz,
        health::readyz,
        health::openapi_json,
    ),
    components(schemas(problem::Problem, backchannel::LogoutTokenProblem)),
    tags(
        (name = "login", description = "The authorization-code flow with PKCE"),
        (name = "session", description = "What the frontend calls"),
        (name = "identity-provider", description = "What the IdP calls: back-channel logout"),
        (name = "forward-auth", description = "What a gateway calls: access tokens for upstream APIs"),
        (name = "operations", description = "Probes and the API description"),
    )
)]
pub struct ApiDoc;

/// The document as pretty-printed JSON with a final newline, exactly as committed.
pub fn document_json() -> String {
    let mut json = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}
