//! The OpenAPI document, generated from the handlers' annotations by utoipa. It is committed as
//! `openapi/openapi.json`, printed by `token-broker openapi` and served at `/openapi.json`; tests
//! fail when the committed file or the route table disagree with it.

use utoipa::OpenApi;

use crate::routes::{backchannel, forward_auth, health, login, metrics, problem, relay, session};

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
        forward_auth::forward_auth_with_path,
        health::healthz,
        health::readyz,
        metrics::metrics,
        health::openapi_json,
        relay::relay,
    ),
    components(schemas(problem::Problem, backchannel::LogoutTokenProblem)),
    tags(
        (name = "login", description = "The authorization-code flow with PKCE"),
        (name = "session", description = "What the frontend calls"),
        (name = "identity-provider", description = "What the IdP calls: back-channel logout"),
        (name = "forward-auth", description = "What a gateway calls: access tokens for upstream APIs"),
        (name = "relay", description = "What the frontend calls: upstream APIs with the session's access token"),
        (name = "operations", description = "Probes, metrics and the API description"),
    )
)]
pub struct ApiDoc;

/// The document as pretty-printed JSON with a final newline, exactly as committed.
pub fn document_json() -> String {
    let mut document = ApiDoc::openapi();
    unique_operation_ids(&mut document);
    let mut json = document.to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}

/// One handler serving several methods gets one `operationId` from utoipa, but OpenAPI wants them
/// unique: those shared by several operations get the method appended (`relay_get`, …).
fn unique_operation_ids(document: &mut utoipa::openapi::OpenApi) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for_each_operation(document, |_, operation| {
        if let Some(id) = &operation.operation_id {
            *seen.entry(id.clone()).or_default() += 1;
        }
    });
    for_each_operation(document, |method, operation| {
        if let Some(id) = &mut operation.operation_id {
            if seen.get(id.as_str()).is_some_and(|count| *count > 1) {
                id.push('_');
                id.push_str(method);
            }
        }
    });
}

fn for_each_operation(
    document: &mut utoipa::openapi::OpenApi,
    mut visit: impl FnMut(&str, &mut utoipa::openapi::path::Operation),
) {
    for item in document.paths.paths.values_mut() {
        let operations = [
            ("get", &mut item.get),
            ("head", &mut item.head),
            ("post", &mut item.post),
            ("put", &mut item.put),
            ("patch", &mut item.patch),
            ("delete", &mut item.delete),
            ("options", &mut item.options),
            ("trace", &mut item.trace),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation.as_mut() {
                visit(method, operation);
            }
        }
    }
}
