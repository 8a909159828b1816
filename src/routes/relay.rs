//! `/api/{name}/{path…}`: the token relay's HTTP side. It owns the `X-CSRF: 1` check, the
//! session cookie, and the conversions between actix and the upstream call of
//! [`crate::flows::relay`]: the request body is pumped chunk by chunk into the upstream request
//! and the upstream's body streamed back, so neither is ever held whole in memory.

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use super::cookies;
use super::problem::ApiError;
use crate::flows::relay::{
    has_body, request_headers, response_headers, ClientInfo, Progress, Relay, RelayBody,
    RelayError, RelayRequest,
};
use crate::flows::Broker;

/// The relay's CSRF header: a custom header forces a CORS preflight, which only the allowed
/// origins pass, so a cross-site page cannot make a browser call the relay with its cookie.
pub const X_CSRF: HeaderName = HeaderName::from_static("x-csrf");
/// Request-body chunks buffered between the browser and the upstream (backpressure beyond).
const BODY_CHUNKS_IN_FLIGHT: usize = 4;

/// Token relay: forwards the request to the upstream named `name` in `BROKER_API_ROUTES`.
#[utoipa::path(
    method(get, head, post, put, patch, delete, options),
    path = "/api/{name}/{path}", tag = "relay",
    params(
        ("name" = String, Path, description = "An upstream's name in `BROKER_API_ROUTES`"),
        ("path" = String, Path, description = "The rest of the path, appended to the upstream's base URL as written (the query string too). Dot segments, encoded slashes or backslashes and empty segments are refused"),
        ("X-CSRF" = String, Header, description = "Must be `1`"),
    ),
    responses(
        (status = "default", description = "The upstream's answer: its status, headers (without hop-by-hop headers, `Set-Cookie` and CORS headers) and streamed body. The upstream got the request with `Authorization: Bearer <fresh access token>` and `X-Forwarded-*`, without the browser's cookies"),
        (status = 400, description = "The path could leave the upstream's base", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No live session", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`X-CSRF: 1` is missing", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No upstream of that name", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 502, description = "The upstream could not be reached", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The IdP could not refresh the token; the session is kept. Retry after `Retry-After`", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 504, description = "The upstream did not answer in time (`BROKER_API_CONNECT_TIMEOUT`, `BROKER_API_TIMEOUT`)", body = super::problem::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn relay(
    request: HttpRequest,
    payload: web::Payload,
    broker: web::Data<Broker>,
    relay: web::Data<Relay>,
) -> Result<HttpResponse, ApiError> {
    if request.headers().get(X_CSRF).map(HeaderValue::as_bytes) != Some(b"1") {
        return Err(ApiError::CsrfHeaderRequired);
    }
    let id = cookies::read_session(&request, &broker.config).ok_or(ApiError::NotAuthenticated)?;
    // The raw path: actix's match has already decoded some escapes.
    let target = relay
        .target(request.uri().path(), request.uri().query())
        .map_err(relay_error)?;
    let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes())
        .map_err(|_| ApiError::MethodNotAllowed)?;
    let incoming = to_upstream_headers(request.headers());
    let host = incoming.get(reqwest::header::HOST).cloned();
    let headers = request_headers(
        &incoming,
        &ClientInfo {
            peer: request.peer_addr().map(|address| address.ip()),
            proto: broker.config.public_url.scheme(),
            host: host.as_ref(),
        },
    );
    let body = has_body(&incoming).then(|| stream_body(payload));
    let response = relay
        .forward(
            &broker,
            &id,
            RelayRequest {
                method,
                target,
                headers,
                body,
            },
        )
        .await
        .map_err(relay_error)?;
    Ok(into_response(response))
}

fn relay_error(error: RelayError) -> ApiError {
    match error {
        RelayError::PathNotAllowed(reason) => ApiError::PathNotAllowed(reason),
        RelayError::UnknownRoute => ApiError::NotFound,
        RelayError::Token(error) => error.into(),
        RelayError::UpstreamUnavailable(_) => ApiError::UpstreamUnavailable,
        RelayError::UpstreamTimeout => ApiError::UpstreamTimeout,
    }
}

/// actix's headers (`http` 0.2) as reqwest's (`http` 1); both are valid in either.
fn to_upstream_headers(headers: &header::HeaderMap) -> reqwest::header::HeaderMap {
    let mut converted = reqwest::header::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(name.as_str().as_bytes()),
            reqwest::header::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            converted.append(name, value);
        }
    }
    converted
}

/// The browser's body as a reqwest body. actix's payload is not `Send`, so a task on this
/// worker pumps it through a small bounded channel: the browser is read only as fast as the
/// upstream takes it.
fn stream_body(mut payload: web::Payload) -> RelayBody {
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(BODY_CHUNKS_IN_FLIGHT);
    actix_web::rt::spawn(async move {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|error| std::io::Error::other(error.to_string()));
            let failed = chunk.is_err();
            // A closed channel: the upstream call ended (or failed); stop reading.
            if sender.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    let progress = Progress::new();
    let touched = progress.clone();
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(
        receiver,
        move |mut receiver| {
            let touched = touched.clone();
            async move {
                let chunk = receiver.recv().await?;
                touched.touch();
                Some((chunk, receiver))
            }
        },
    ));
    RelayBody { body, progress }
}

/// The upstream's status, end-to-end headers and streamed body.
fn into_response(upstream: reqwest::Response) -> HttpResponse {
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response_headers(upstream.headers());
    let mut response = HttpResponse::build(status);
    for (name, value) in &headers {
        if name == reqwest::header::CONTENT_LENGTH {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            response.append_header((name, value));
        }
    }
    let length = headers
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let body = upstream.bytes_stream();
    match length {
        // Keeps the length (progress bars, HEAD) instead of re-chunking.
        Some(length) => response.body(SizedStream::new(length, body)),
        None => response.streaming(body),
    }
}
