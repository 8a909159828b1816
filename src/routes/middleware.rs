//! Cross-cutting HTTP concerns: request IDs and access logs, CORS, and response headers.

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpResponse, ResponseError};

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

/// One log line per response, every line of the request with its ID ([`telemetry::with_request_id`]),
/// `X-Request-Id` echoed. Only the route pattern is logged, never the path or query (a callback's
/// query holds the code).
pub async fn request_log(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let id = request_id(request.headers());
    let echoed = HeaderValue::from_str(&id).ok();
    let started = Instant::now();
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    let metrics = request
        .app_data::<web::Data<Broker>>()
        .map(|broker| broker.metrics.clone());
    let method = request.method().clone();
    telemetry::with_request_id(id, async move {
        let mut response = next.call(request).await?;
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        tracing::info!(
            method = method.as_str(),
            route = route.as_str(),
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        if let Some(metrics) = metrics {
            if let Some(failure) = response.response().extensions().get::<StoreFailure>() {
                metrics.store_error_in(failure.0);
            }
            metrics.http_request(route, method.as_str(), status, elapsed);
        }
        if let Some(value) = echoed {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        Ok(response)
    })
    .await
}

fn allowed_origin(request: &ServiceRequest) -> Option<HeaderValue> {
    let origin = request.headers().get(header::ORIGIN)?;
    let broker = request.app_data::<web::Data<Broker>>()?;
    let text = origin.to_str().ok()?;
    broker
        .config
        .allowed_origins
        .contains_origin(text)
        .then(|| origin.clone())
}

/// CORS with credentials, for the allowed origins only. A preflight from any other origin is
/// refused with 403; other cross-origin responses simply lack the headers, so browsers withhold
/// them from the calling page.
pub async fn cors(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let origin = allowed_origin(&request);
    let is_preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if is_preflight {
        let Some(origin) = origin else {
            let response = ApiError::OriginNotAllowed.error_response();
            return Ok(request.into_response(response));
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
        return Ok(request.into_response(response.finish()));
    }
    let mut response = next.call(request).await?.map_into_boxed_body();
    let headers = response.headers_mut();
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
    Ok(response)
}

/// Headers every response carries: nothing here may be cached, sniffed, framed, or leak a
/// Referer (the callback URL holds a code until the redirect).
pub fn security_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add((header::CACHE_CONTROL, "no-store"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::REFERRER_POLICY, "no-referrer"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
}
