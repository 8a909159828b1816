//! The HTTP layer: routes, cookies, CORS, and problem+json errors. Handlers parse the request
//! into domain values, call a flow, and turn its result into a response; nothing below this
//! module knows about HTTP.

pub mod backchannel;
pub mod cookies;
pub mod forward_auth;
pub mod health;
pub mod login;
pub mod metrics;
pub mod middleware;
pub mod problem;
pub mod relay;
pub mod session;

use actix_web::{web, HttpResponse, ResponseError};

use problem::ApiError;

/// A route for each method (`get()`, …, `options()`), guarded by [`method::Is`] rather than by
/// actix's own method guards (`web::get()` and its siblings): those also record each method
/// they test in the request's extensions, for a 405's `Allow` header that the route table
/// writes itself ([`method_not_allowed`]). That record cost every request three allocations (a
/// vector, the extensions' table and its box) and some 870 instructions: 1.3 % of a cached
/// `/session` (`scripts/profile`, 2026-12-07).
mod method {
    use actix_web::guard::{Guard, GuardContext};
    use actix_web::http::Method;
    use actix_web::{web, Route};

    /// Matches requests of one method, and records nothing.
    pub struct Is(pub Method);

    impl Guard for Is {
        fn check(&self, context: &GuardContext<'_>) -> bool {
            context.head().method == self.0
        }
    }

    macro_rules! methods {
        ($($name:ident => $method:ident),*) => {
            $(pub fn $name() -> Route {
                web::route().guard(Is(Method::$method))
            })*
        };
    }

    methods!(get => GET, head => HEAD, post => POST, put => PUT, patch => PATCH,
             delete => DELETE, options => OPTIONS);
}

/// Declares every route once: the registration and the [`ROUTES`] list the OpenAPI test checks
/// come from the same lines, so they cannot drift apart. A line may name several methods
/// (`get | post "/path"`), and a documented path may be matched by another actix pattern
/// (`"/a/{rest}" matching "/a/{rest:.*}"`).
macro_rules! route_table {
    ($($($method:ident)|+ $path:literal $(matching $pattern:literal)? => $handler:path),* $(,)?) => {
        /// Every `(method, path)` the app serves, paths as the OpenAPI document writes them.
        pub const ROUTES: &[(&str, &str)] = &[$($((stringify!($method), $path),)+)*];

        fn register(config: &mut web::ServiceConfig) {
            // A resource answers a method it lacks itself (with an empty 405): give it a problem
            // and the `Allow` header RFC 9110 requires on a 405.
            $({
                let allow: &'static [&'static str] = &[$(stringify!($method)),+];
                config.service(
                    web::resource(route_table!(@pattern $path $(, $pattern)?))
                        $(.route(method::$method().to($handler)))+
                        .default_service(web::to(move || method_not_allowed(allow))),
                );
            })*
        }
    };
    (@pattern $path:literal) => { $path };
    (@pattern $path:literal, $pattern:literal) => { $pattern };
}

route_table! {
    get "/login" => login::login,
    get "/callback" => login::callback,
    get "/session" => session::session,
    post "/logout" => session::logout,
    post "/backchannel-logout" => backchannel::backchannel_logout,
    get | head | post | put | patch | delete | options "/auth" => forward_auth::forward_auth,
    get | head | post | put | patch | delete | options "/auth/{path}" matching "/auth/{path:.*}" => forward_auth::forward_auth_with_path,
    get "/healthz" => health::healthz,
    get "/readyz" => health::readyz,
    get "/metrics" => metrics::metrics,
    get "/openapi.json" => health::openapi_json,
    get | head | post | put | patch | delete | options "/api/{name}/{path}" matching "/api/{name}/{path:.*}" => relay::relay,
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

async fn method_not_allowed(allow: &'static [&'static str]) -> HttpResponse {
    let mut response = ApiError::MethodNotAllowed.error_response();
    let allow = allow
        .iter()
        .map(|method| method.to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&allow) {
        response
            .headers_mut()
            .insert(actix_web::http::header::ALLOW, value);
    }
    response
}
