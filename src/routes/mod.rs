//! The HTTP layer: routes, cookies, CORS, and problem+json errors. Handlers parse the request
//! into domain values, call a flow, and turn its result into a response; nothing below this
//! module knows about HTTP.

pub mod backchannel;
pub mod cookies;
pub mod forward_auth;
pub mod health;
pub mod login;
pub mod middleware;
pub mod problem;
pub mod session;

use actix_web::{web, HttpResponse, ResponseError};

use problem::ApiError;

/// Declares every route once: the registration and the [`ROUTES`] list the OpenAPI test checks
/// come from the same lines, so they cannot drift apart.
macro_rules! route_table {
    ($($method:ident $path:literal => $handler:path),* $(,)?) => {
        /// Every `(method, path)` the app serves.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        fn register(config: &mut web::ServiceConfig) {
            // A resource answers a method it lacks itself (with an empty 405): give it a problem.
            $(config.service(
                web::resource($path)
                    .route(web::$method().to($handler))
                    .default_service(web::to(method_not_allowed)),
            );)*
        }
    };
}

route_table! {
    get "/login" => login::login,
    get "/callback" => login::callback,
    get "/session" => session::session,
    post "/logout" => session::logout,
    post "/backchannel-logout" => backchannel::backchannel_logout,
    get "/auth" => forward_auth::forward_auth,
    get "/healthz" => health::healthz,
    get "/readyz" => health::readyz,
    get "/openapi.json" => health::openapi_json,
}

/// Mounts the routes, with problem+json for malformed queries and for unknown routes.
pub fn configure(config: &mut web::ServiceConfig) {
    config.app_data(web::QueryConfig::default().error_handler(|error, _| {
        ApiError::InvalidRequest(format!("malformed query string: {error}")).into()
    }));
    config.app_data(backchannel::form_config());
    register(config);
    config.default_service(web::to(not_found));
}

async fn not_found() -> HttpResponse {
    ApiError::NotFound.error_response()
}

async fn method_not_allowed() -> HttpResponse {
    ApiError::MethodNotAllowed.error_response()
}
