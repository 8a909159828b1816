//! Cross-cutting HTTP concerns, in one layer ([`EveryRequest`]): request IDs and access logs, CORS,
//! response headers, and closing connections while the replica drains.

use std::future::{ready, Ready};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::ConnectionType;
use actix_web::http::Method;
use actix_web::{web, Error, HttpResponse, ResponseError};
use futures_util::future::LocalBoxFuture;

use super::health::Readiness;
use super::problem::{ApiError, StoreFailure};
use crate::flows::Broker;
use crate::telemetry;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers a cross-origin frontend may send (the relay's `X-CSRF` among them).
const ALLOWED_REQUEST_HEADERS: &[&str] = &["accept", "content-type", "x-csrf", "x-request-id"];
/// Every method the relay forwards.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// An incoming `X-Request-Id` is kept when it is short and plain; otherwise a new one is made.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 64)
        .filter(|id| {
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        // A random (v4) UUID from the thread's CSPRNG: unique without a system call per request.
        .unwrap_or_else(|| {
            let mut text = uuid::Uuid::encode_buffer();
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .hyphenated()
                .encode_lower(&mut text)
                .to_string()
        })
}

/// Everything every request goes through, as one actix layer: its ID and access log line, CORS,
/// and the security headers. One layer instead of three (`from_fn` twice and `DefaultHeaders`):
/// each `from_fn` layer boxed the service below it, and each layer added a future to every
/// request. With the access line written straight to the log writer, a cached `/session` went
/// from 68.5k to 64.6k instructions (`scripts/profile`).
///
/// In order, as the three layers did: the request's ID and start time; a CORS preflight is answered
/// here (the routes never see it), any other request goes on and gets the CORS headers for its
/// origin; the security headers that the response lacks; the access log line and the metrics;
/// `X-Request-Id` on the response; and, once the replica drains, `Connection: close`.
///
/// Why the last: a load balancer keeps connections to the replicas alive and reuses them. Closing
/// an idle one races with the balancer sending a request on it, and a request it had sent is one
/// it retries only when the method is idempotent (nginx never retries a `POST` that went out), so
/// a relayed `POST` or a `/logout` failed (502) when a replica shut down (seen in the rolling
/// restart test: 1 to 3 `POST`s in nine restarts). From SIGTERM on, every answer tells the client
/// to close the connection after it, which is race-free: the client closes, knowing, and opens a
/// new connection for its next request (refused once the listener closes, which every balancer
/// retries elsewhere). What is left idle when the workers stop is a connection nobody used for
/// the whole `BROKER_SHUTDOWN_DELAY` and the moment after it (see `startup`).
pub struct EveryRequest {
    pub readiness: web::Data<Readiness>,
}

impl<S, B> Transform<S, ServiceRequest> for EveryRequest
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = Error;
    type Transform = EveryRequestService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(EveryRequestService {
            service: Rc::new(service),
            readiness: self.readiness.clone(),
        }))
    }
}

pub struct EveryRequestService<S> {
    service: Rc<S>,
    readiness: web::Data<Readiness>,
}

impl<S, B> Service<ServiceRequest> for EveryRequestService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let service = Rc::clone(&self.service);
        let id = request_id(request.headers());
        let echoed = HeaderValue::from_str(&id).ok();
        let started = Instant::now();
        // Read as the request starts: one that began before SIGTERM leaves its connection open,
        // and the next request on it is answered with the close.
        let draining = self.readiness.is_draining();
        let route = request
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        let broker = request.app_data::<web::Data<Broker>>().cloned();
        let method = request.method().clone();
        let origin = broker
            .as_ref()
            .and_then(|broker| allowed_origin(&request, broker));
        Box::pin(telemetry::with_request_id(id, async move {
            let mut response = if preflight(&request) {
                let answer = preflight_response(&request, origin);
                request.into_response(answer)
            } else {
                let mut response = service.call(request).await?.map_into_boxed_body();
                cors_headers(response.headers_mut(), origin);
                response
            };
            security_headers(response.headers_mut());
            let status = response.status().as_u16();
            let elapsed = started.elapsed();
            if tracing::enabled!(tracing::Level::INFO) {
                log_response(method.as_str(), &route, status, elapsed);
            }
            if let Some(broker) = broker {
                if let Some(failure) = response.response().extensions().get::<StoreFailure>() {
                    broker.metrics.store_error_in(failure.0);
                }
                broker
                    .metrics
                    .http_request(route, method.as_str(), status, elapsed);
            }
            if let Some(value) = echoed {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            if draining {
                let head = response.response_mut().head_mut();
                head.set_connection_type(ConnectionType::Close);
            }
            Ok(response)
        }))
    }
}

/// The access log line: only the route pattern, never the path or query (a callback's query
/// holds the code). JSON lines go straight to the log writer ([`telemetry::write_access_line`]).
fn log_response(method: &str, route: &str, status: u16, elapsed: Duration) {
    if !telemetry::write_access_line(module_path!(), method, route, status, elapsed) {
        tracing::info!(
            method,
            route,
            status,
            latency_ms = telemetry::millis(elapsed),
            "request"
        );
    }
}

fn allowed_origin(request: &ServiceRequest, broker: &Broker) -> Option<HeaderValue> {
    let origin = request.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    broker
        .config
        .allowed_origins
        .contains_origin(text)
        .then(|| origin.clone())
}

fn preflight(request: &ServiceRequest) -> bool {
    request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// CORS with credentials, for the allowed origins only. A preflight from any other origin is
/// refused with 403; other cross-origin responses simply lack the headers ([`cors_headers`]), so
/// browsers withhold them from the calling page.
fn preflight_response(request: &ServiceRequest, origin: Option<HeaderValue>) -> HttpResponse {
    let Some(origin) = origin else {
        let mut refused = ApiError::OriginNotAllowed.error_response();
        // The answer depends on the origin, as every answer does.
        refused
            .headers_mut()
            .append(header::VARY, HeaderValue::from_static("Origin"));
        return refused;
    };
    let requested: String = request
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| ALLOWED_REQUEST_HEADERS.contains(&h.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut response = HttpResponse::NoContent();
    response
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
        .insert_header((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
        .insert_header((
            header::VARY,
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        ));
    if !requested.is_empty() {
        response.insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, requested));
    }
    response.finish()
}

/// The CORS headers of an answer to an allowed origin; `Vary: Origin` on every answer.
fn cors_headers(headers: &mut HeaderMap, origin: Option<HeaderValue>) {
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id"),
        );
    }
}

/// Headers every response carries: nothing here may be cached, sniffed, framed, or leak a
/// Referer (the callback URL holds a code until the redirect). A header the route set itself
/// (the relay passes the upstream's on) is left as it is.
fn security_headers(headers: &mut HeaderMap) {
    const SECURITY_HEADERS: [(HeaderName, HeaderValue); 4] = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    for (name, value) in SECURITY_HEADERS {
        if !headers.contains_key(&name) {
            headers.insert(name, value);
        }
    }
}
