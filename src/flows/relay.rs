//! The token relay (`/api/{name}/{path…}`, SPEC "HTTP API"): which upstream a raw request path
//! names and whether it tries to escape it, which headers cross the broker in each direction, and
//! the call itself — the session's fresh access token as `Authorization: Bearer`, one refresh and
//! retry when the upstream calls that token `invalid_token`, time-outs as typed errors.
//!
//! Bodies are never read here: the caller hands over a streaming [`reqwest::Body`] and gets the
//! [`reqwest::Response`] back to stream on. Headers are `http` 1 types (reqwest's); the HTTP layer
//! converts from and to actix's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use url::Url;

use super::{Broker, TokenError};
use crate::config::Config;
use crate::domain::{AccessToken, SessionId};

/// The route prefix, as the browser writes it (no encoding is accepted in it).
const PREFIX: &str = "/api/";

/// RFC 9110 §7.6.1: connection-specific headers, never forwarded (nor any header that
/// `Connection` names). `Proxy-Connection` is the non-standard legacy one.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Browser headers the upstream must not see: the broker's own credentials (`Cookie`), what
/// the bearer replaces, the relay's CSRF marker, and `Origin` (the upstream should not believe a
/// browser called it). Forwarding headers are rebuilt; `Host` follows the upstream URL; `Expect`
/// was answered by the broker already.
const REQUEST_ONLY: &[&str] = &[
    "cookie",
    "authorization",
    "x-csrf",
    "origin",
    "host",
    "expect",
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Upstream headers the browser must not see: its cookies would land on the broker's site
/// (where the session cookie lives), and CORS is the broker's to answer.
fn is_upstream_only(name: &HeaderName) -> bool {
    name == header::SET_COOKIE || name.as_str().starts_with("access-control-")
}

/// The relay's upstreams and their HTTP client (not the IdP's: other time-outs, other hosts).
pub struct Relay {
    client: reqwest::Client,
    routes: HashMap<String, Url>,
    response_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The path could escape the upstream's base path, or is not plainly written: 400.
    #[error("the path is not allowed: {0}")]
    PathNotAllowed(&'static str),
    /// No upstream of that name: 404.
    #[error("no API route of that name")]
    UnknownRoute,
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The upstream could not be reached, or failed mid-request: 502.
    #[error("the upstream is unavailable: {0}")]
    UpstreamUnavailable(reqwest::Error),
    /// No connection or no response headers in time: 504.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
}

/// What to call: the upstream URL, built from the raw request path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub route: String,
    pub url: Url,
}

/// A request to relay. `body` is `None` for a request without one (it can then be retried).
pub struct RelayRequest {
    pub method: Method,
    pub target: Target,
    /// Already filtered by [`request_headers`].
    pub headers: HeaderMap,
    pub body: Option<RelayBody>,
}

/// A streaming request body, and when the upstream last took a chunk of it.
pub struct RelayBody {
    pub body: reqwest::Body,
    pub progress: Progress,
}

/// When a request body last moved: the response time-out counts from there, so a long upload
/// is not a slow upstream, while a stalled one still ends.
#[derive(Clone)]
pub struct Progress(Arc<Mutex<Instant>>);

impl Progress {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }

    /// Called as each chunk is handed to the upstream.
    pub fn touch(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Relay {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A followed redirect is an SSRF door, and the browser should see it anyway.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.api_connect_timeout)
            .build()?;
        Ok(Self {
            client,
            routes: config
                .api_routes
                .iter()
                .map(|route| (route.name.clone(), route.base_url.clone()))
                .collect(),
            response_timeout: config.api_timeout,
        })
    }

    /// The upstream URL for a raw request path (`/api/{name}/{tail}`, exactly as received, not
    /// decoded) and raw query, which is kept byte for byte.
    pub fn target(&self, raw_path: &str, raw_query: Option<&str>) -> Result<Target, RelayError> {
        let rest = raw_path
            .strip_prefix(PREFIX)
            .ok_or(RelayError::PathNotAllowed("the path must start with /api/"))?;
        let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
        check_tail(tail)?;
        let base = self.routes.get(name).ok_or(RelayError::UnknownRoute)?;
        let mut url = format!("{}/{tail}", base.as_str().trim_end_matches('/'));
        if let Some(query) = raw_query {
            url.push('?');
            url.push_str(query);
        }
        let url =
            Url::parse(&url).map_err(|_| RelayError::PathNotAllowed("not a valid URL path"))?;
        // The URL parser normalises some spellings; anything that moved the path out of the base
        // (which `check_tail` should already have refused) is refused here too.
        if !url.path().starts_with(base.path().trim_end_matches('/')) {
            return Err(RelayError::PathNotAllowed(
                "the path leaves the route's base",
            ));
        }
        Ok(Target {
            route: name.to_string(),
            url,
        })
    }

    /// Calls the upstream with the session's fresh access token. When the upstream answers 401
    /// with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3.1) and the request is
    /// idempotent and bodiless, the token is refreshed once and the request sent once more;
    /// otherwise the upstream's answer is the answer.
    #[tracing::instrument(skip_all, fields(route = %request.target.route))]
    pub async fn forward(
        &self,
        broker: &Broker,
        session: &SessionId,
        request: RelayRequest,
    ) -> Result<reqwest::Response, RelayError> {
        let token = broker.access_token(session).await?.access_token;
        let retryable = request.body.is_none() && is_idempotent(&request.method);
        let RelayRequest {
            method,
            target,
            headers,
            body,
        } = request;
        let response = self
            .send(&method, &target.url, &headers, &token, body)
            .await?;
        if !(retryable && rejects_token(&response)) {
            return Ok(response);
        }
        tracing::info!("the upstream refused the access token (invalid_token): refreshing once");
        let token = broker
            .replace_access_token(session, &token)
            .await?
            .access_token;
        self.send(&method, &target.url, &headers, &token, None)
            .await
    }

    async fn send(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        token: &AccessToken,
        body: Option<RelayBody>,
    ) -> Result<reqwest::Response, RelayError> {
        let mut builder = self
            .client
            .request(method.clone(), url.clone())
            .headers(headers.clone())
            .bearer_auth(token.secret());
        let progress = body.as_ref().map(|body| body.progress.clone());
        if let Some(body) = body {
            builder = builder.body(body.body);
        }
        // Only the wait for the response headers is bounded, counted from the request body's
        // last chunk: either body may stream for as long as it takes (a large transfer is not
        // a hung upstream).
        let started = Instant::now();
        let send = builder.send();
        tokio::pin!(send);
        let result = loop {
            let moved = progress.as_ref().map_or(started, Progress::last);
            let deadline =
                tokio::time::Instant::from_std(moved.max(started) + self.response_timeout);
            if let Ok(result) = tokio::time::timeout_at(deadline, &mut send).await {
                break result;
            }
            if progress.as_ref().map_or(started, Progress::last) <= moved {
                tracing::warn!("the upstream did not answer in time");
                return Err(RelayError::UpstreamTimeout);
            }
        };
        match result {
            Err(error) if error.is_timeout() => {
                tracing::warn!(error = %error.without_url(), "the upstream did not accept a connection in time");
                Err(RelayError::UpstreamTimeout)
            }
            Err(error) => {
                // `without_url`: the path and query may carry what the access log never shows.
                let error = error.without_url();
                tracing::warn!(%error, "the upstream is unavailable");
                Err(RelayError::UpstreamUnavailable(error))
            }
            Ok(response) => Ok(response),
        }
    }
}

/// RFC 9110 §9.2.2, without the ones nobody relays (TRACE) or that are no requests (CONNECT).
fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// A 401 whose Bearer challenge says `error="invalid_token"` (RFC 6750 §3), parsed leniently:
/// scheme and parameter names case-insensitive, the value quoted or not.
fn rejects_token(response: &reqwest::Response) -> bool {
    response.status() == StatusCode::UNAUTHORIZED
        && response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(challenge_is_invalid_token)
}

fn challenge_is_invalid_token(challenge: &str) -> bool {
    let challenge = challenge.trim_start();
    let Some(scheme) = challenge.get(..6) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    challenge[6..].split(',').any(|param| {
        param.split_once('=').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("error")
                && value
                    .trim()
                    .trim_matches('"')
                    .eq_ignore_ascii_case("invalid_token")
        })
    })
}

/// Refuses a raw tail that could name something outside the route's base once anyone decodes
/// or normalises it: dot segments (plain or percent-encoded, in any case), encoded slashes or
/// backslashes, raw backslashes, empty segments (`//`), and control bytes. A trailing `/` is kept.
fn check_tail(tail: &str) -> Result<(), RelayError> {
    if tail.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return Err(RelayError::PathNotAllowed("backslash or control character"));
    }
    let segments: Vec<&str> = tail.split('/').collect();
    let last = segments.len() - 1;
    for (index, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            if index == last {
                continue;
            }
            return Err(RelayError::PathNotAllowed("empty path segment"));
        }
        let decoded = percent_decode(segment)
            .ok_or(RelayError::PathNotAllowed("malformed percent-encoding"))?;
        // `..;x` is `..` to servers that strip path parameters (Tomcat, Spring).
        let name = decoded.split(|b| *b == b';').next().unwrap_or_default();
        if name == b"." || name == b".." {
            return Err(RelayError::PathNotAllowed("dot segment"));
        }
        if decoded
            .iter()
            .any(|b| matches!(b, b'/' | b'\\') || b.is_ascii_control())
        {
            return Err(RelayError::PathNotAllowed(
                "encoded slash, backslash or control character",
            ));
        }
        // An upstream that decodes twice would see `%2e%2e` as `..`: refuse double encodings.
        let twice = percent_decode_lenient(name);
        if twice == b"." || twice == b".." || twice.iter().any(|b| matches!(b, b'/' | b'\\')) {
            return Err(RelayError::PathNotAllowed("double-encoded path"));
        }
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// `%XX` decoding; `None` for a `%` without two hex digits.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = hex(*bytes.get(i + 1)?)?;
            let low = hex(*bytes.get(i + 2)?)?;
            out.push(high << 4 | low);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// `%XX` decoding that leaves malformed escapes as they are.
fn percent_decode_lenient(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? << 4 | hex(*bytes.get(i + 2)?)?))
            .flatten();
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// Headers named by `Connection` (RFC 9110 §7.6.1), lower-cased.
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect()
}

fn without_hop_by_hop(headers: &HeaderMap, also_drop: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let named = connection_named(headers);
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let text = name.as_str();
        if HOP_BY_HOP.contains(&text) || named.iter().any(|n| n == text) || also_drop(name) {
            continue;
        }
        kept.append(name.clone(), value.clone());
    }
    kept
}

/// Where the browser's request came from, for the `X-Forwarded-*` headers.
pub struct ClientInfo<'a> {
    /// The peer of the broker's connection (the browser, or the proxy in front of the broker).
    pub peer: Option<IpAddr>,
    /// The scheme the browser used: the broker's public URL's.
    pub proto: &'a str,
    /// The `Host` the browser asked for.
    pub host: Option<&'a HeaderValue>,
}

/// The browser's headers as the upstream gets them: no hop-by-hop headers, none of
/// [`REQUEST_ONLY`], and `X-Forwarded-For` (peer appended), `-Proto` and `-Host` set.
pub fn request_headers(incoming: &HeaderMap, client: &ClientInfo<'_>) -> HeaderMap {
    let mut headers = without_hop_by_hop(incoming, |name| {
        REQUEST_ONLY.contains(&name.as_str()) || name.as_str() == "x-forwarded-for"
    });
    let earlier: Vec<&str> = incoming
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let mut chain = earlier.join(", ");
    if let Some(peer) = client.peer {
        if !chain.is_empty() {
            chain.push_str(", ");
        }
        chain.push_str(&peer.to_string());
    }
    if let Ok(value) = HeaderValue::from_str(&chain) {
        if !chain.is_empty() {
            headers.insert("x-forwarded-for", value);
        }
    }
    if let Ok(value) = HeaderValue::from_str(client.proto) {
        headers.insert("x-forwarded-proto", value);
    }
    if let Some(host) = client.host {
        headers.insert("x-forwarded-host", host.clone());
    }
    headers
}

/// The upstream's headers as the browser gets them: no hop-by-hop headers, no `Set-Cookie`,
/// no CORS headers.
pub fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    without_hop_by_hop(upstream, is_upstream_only)
}

/// Whether a request carries a body (RFC 9112 §6.3): `Transfer-Encoding`, or a non-zero
/// `Content-Length`.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|value| value.as_bytes() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiRoute;

    fn relay() -> Relay {
        Relay {
            client: reqwest::Client::new(),
            routes: [
                ApiRoute {
                    name: "orders".into(),
                    base_url: Url::parse("https://orders.internal/v1").unwrap(),
                },
                ApiRoute {
                    name: "root".into(),
                    base_url: Url::parse("http://users:8080/").unwrap(),
                },
            ]
            .into_iter()
            .map(|r| (r.name, r.base_url))
            .collect(),
            response_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn targets_keep_the_raw_tail_and_query() {
        let relay = relay();
        let target = relay
            .target("/api/orders/items/42", Some("a=1&b=%20x&a=2"))
            .unwrap();
        assert_eq!(target.route, "orders");
        assert_eq!(
            target.url.as_str(),
            "https://orders.internal/v1/items/42?a=1&b=%20x&a=2"
        );
        assert_eq!(
            relay.target("/api/root/x/", None).unwrap().url.as_str(),
            "http://users:8080/x/"
        );
        assert_eq!(
            relay.target("/api/orders/", None).unwrap().url.as_str(),
            "https://orders.internal/v1/"
        );
        assert_eq!(
            relay
                .target("/api/orders/a%20b", None)
                .unwrap()
                .url
                .as_str(),
            "https://orders.internal/v1/a%20b"
        );
        assert!(matches!(
            relay.target("/api/nope/x", None),
            Err(RelayError::UnknownRoute)
        ));
    }

    #[test]
    fn escapes_are_refused_in_every_spelling() {
        let relay = relay();
        for path in [
            "/api/orders/../x",
            "/api/orders/..",
            "/api/orders/./x",
            "/api/orders/a/../../x",
            "/api/orders/%2e%2e/x",
            "/api/orders/%2E%2E/x",
            "/api/orders/%2E./x",
            "/api/orders/.%2e/x",
            "/api/orders/%2e/x",
            "/api/orders/a%2fb",
            "/api/orders/a%2F..%2Fb",
            "/api/orders/a%5cb",
            "/api/orders/a\\b",
            "/api/orders//x",
            "/api/orders/a//b",
            "/api/orders/%252e%252e/x",
            "/api/orders/a%252fb",
            "/api/orders/%zz",
            "/api/orders/a%00b",
            "/api/orders/..;/x",
            "/api/orders/.;jsessionid=1/x",
            "/%61pi/orders/x",
        ] {
            assert!(
                matches!(relay.target(path, None), Err(RelayError::PathNotAllowed(_))),
                "{path}"
            );
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn browser_credentials_and_hop_by_hop_headers_stay_behind() {
        let incoming = map(&[
            ("cookie", "session=abc"),
            ("authorization", "Bearer forged"),
            ("x-csrf", "1"),
            ("origin", "https://app.example.com"),
            ("connection", "keep-alive, X-Private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", "evil"),
            ("accept", "application/json"),
            ("x-custom", "kept"),
        ]);
        let host = HeaderValue::from_static("app.example.com");
        let headers = request_headers(
            &incoming,
            &ClientInfo {
                peer: Some([10, 0, 0, 7].into()),
                proto: "https",
                host: Some(&host),
            },
        );
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "x-custom",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 10.0.0.7");
        assert_eq!(headers["x-forwarded-host"], "app.example.com");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn upstream_cookies_and_cors_headers_stay_behind() {
        let upstream = map(&[
            ("set-cookie", "session=evil"),
            ("access-control-allow-origin", "*"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("content-type", "application/json"),
            ("etag", "\"1\""),
        ]);
        let headers = response_headers(&upstream);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "etag"]);
    }

    #[test]
    fn invalid_token_challenges_parse_leniently() {
        for yes in [
            r#"Bearer error="invalid_token""#,
            r#"bearer realm="api", error="invalid_token", error_description="expired""#,
            r#"BEARER error=INVALID_TOKEN"#,
        ] {
            assert!(challenge_is_invalid_token(yes), "{yes}");
        }
        for no in [
            r#"Bearer error="insufficient_scope""#,
            r#"Basic realm="x""#,
            r#"Bearer realm="api""#,
            "",
        ] {
            assert!(!challenge_is_invalid_token(no), "{no}");
        }
    }

    #[test]
    fn bodies_are_seen_in_the_framing_headers() {
        assert!(!has_body(&map(&[])));
        assert!(!has_body(&map(&[("content-length", "0")])));
        assert!(has_body(&map(&[("content-length", "5")])));
        assert!(has_body(&map(&[("transfer-encoding", "chunked")])));
    }
}
