//! The Prometheus metrics of one process: the registry, its typed families, and the one place
//! that turns events (a request, a login, a refresh, an IdP call, a store failure) into samples.
//!
//! Labels are low-cardinality by construction: route *patterns* (never a path), a fixed set of
//! methods, status codes, and the fixed codes of enums. No subject, session, token, path with IDs
//! or upstream URL can become a label, so a scrape leaks nothing; still, `/metrics` is meant for
//! the cluster's Prometheus, not for the public route.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::flows::LoginErrorCode;
use crate::store::StoreError;

/// The media type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `live_sessions` gauge is recounted at most this often per replica, however often it is
/// scraped: a `count(*)` over the sessions table is not free under load.
pub const LIVE_SESSIONS_MAX_AGE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 5 ms … ~20 s: broker requests are milliseconds, IdP calls and relayed requests seconds.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// How a refresh attempt (`/auth`, the relay) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Success,
    /// The IdP refused the refresh token: the session ended.
    InvalidGrant,
    /// A network failure, time-out or 5xx (or waiting too long for another replica's refresh).
    IdpUnavailable,
    StoreError,
    /// The session has no refresh token (no `offline_access`), or it ended meanwhile.
    NoRefreshToken,
    SessionGone,
}

impl RefreshOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::InvalidGrant => "invalid_grant",
            Self::IdpUnavailable => "idp_unavailable",
            Self::StoreError => "store_error",
            Self::NoRefreshToken => "no_refresh_token",
            Self::SessionGone => "session_gone",
        }
    }
}

/// The IdP endpoints the broker calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdpEndpoint {
    Discovery,
    Jwks,
    Token,
    Revocation,
}

impl IdpEndpoint {
    fn as_str(self) -> &'static str {
        match self {
            Self::Discovery => "discovery",
            Self::Jwks => "jwks",
            Self::Token => "token",
            Self::Revocation => "revocation",
        }
    }
}

/// The method label: the methods the broker serves, anything else `other` (a client can send
/// any token as a method; it must not mint label values).
fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("other")
}

/// The `store` label of an outage: `redis` or `postgres`; `None` for data that is unreadable or
/// sealed under a key no longer configured (no outage; logged where it happens).
pub fn store_label(error: &StoreError) -> Option<&'static str> {
    match error {
        StoreError::Redis(_) => Some("redis"),
        StoreError::Postgres(_) | StoreError::PostgresSilent(_) => Some("postgres"),
        StoreError::Corrupt(_) | StoreError::Sealed(_) => None,
    }
}

/// Every metric of the process. Built once at start-up and shared (cheap clones inside).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    logins_started: Counter,
    logins_completed: Counter,
    logins_failed: Family<ReasonLabels, Counter>,
    refreshes: Family<OutcomeLabels, Counter>,
    idp_duration: HistogramFamily<EndpointLabels>,
    live_sessions: Gauge,
    live_sessions_counted: Mutex<Option<Instant>>,
    store_errors: Family<StoreLabels, Counter>,
    back_channel_logouts: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route pattern, method and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head, by route pattern and method",
            http_duration.clone(),
        );
        let logins_started = Counter::default();
        registry.register(
            "logins_started",
            "Logins started (/login redirected to the IdP)",
            logins_started.clone(),
        );
        let logins_completed = Counter::default();
        registry.register(
            "logins_completed",
            "Logins completed (/callback created a session)",
            logins_completed.clone(),
        );
        let logins_failed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "logins_failed",
            "Failed logins by login_error code",
            logins_failed.clone(),
        );
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Access-token refresh attempts by outcome",
            refreshes.clone(),
        );
        let idp_duration: HistogramFamily<EndpointLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "idp_request_duration_seconds",
            "Duration of calls to the IdP by endpoint",
            idp_duration.clone(),
        );
        let live_sessions = Gauge::default();
        registry.register(
            "live_sessions",
            "Live sessions in PostgreSQL (recounted at most every 30 s per replica)",
            live_sessions.clone(),
        );
        let store_errors = Family::<StoreLabels, Counter>::default();
        // Both series exist from the start, so `rate()` and alerts see a 0 before the first error.
        for store in ["redis", "postgres"] {
            drop(store_errors.get_or_create(&StoreLabels { store }));
        }
        registry.register(
            "store_errors",
            "Redis and PostgreSQL errors, served as 503 or worked around",
            store_errors.clone(),
        );
        let back_channel_logouts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "back_channel_logouts",
            "Back-channel logout requests by outcome",
            back_channel_logouts.clone(),
        );
        Self {
            registry,
            http_requests,
            http_duration,
            logins_started,
            logins_completed,
            logins_failed,
            refreshes,
            idp_duration,
            live_sessions,
            live_sessions_counted: Mutex::new(None),
            store_errors,
            back_channel_logouts,
        }
    }

    /// One answered request. `route` is the matched pattern or `unmatched`, never a path.
    /// The one `route` string serves both label sets (a family clones a label set only when it
    /// creates a series).
    pub fn http_request(
        &self,
        route: impl Into<String>,
        method: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        let labels = HttpLabels {
            route: route.into(),
            method,
            status,
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                route: labels.route,
                method,
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn login_started(&self) {
        self.logins_started.inc();
    }

    pub fn login_completed(&self) {
        self.logins_completed.inc();
    }

    pub fn login_failed(&self, code: LoginErrorCode) {
        self.logins_failed
            .get_or_create(&ReasonLabels {
                reason: code.as_str(),
            })
            .inc();
    }

    pub fn refresh(&self, outcome: RefreshOutcome) {
        self.refreshes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn idp_request(&self, endpoint: IdpEndpoint, elapsed: Duration) {
        self.idp_duration
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a Redis or PostgreSQL failure. Unreadable or unopenable data is not a store
    /// outage and is not counted here (it is logged where it happens).
    pub fn store_error(&self, error: &StoreError) {
        if let Some(store) = store_label(error) {
            self.store_error_in(store);
        }
    }

    /// Counts a failure of `store`, a [`store_label`].
    pub fn store_error_in(&self, store: &'static str) {
        self.store_errors
            .get_or_create(&StoreLabels { store })
            .inc();
    }

    /// `outcome`: `ended` (a valid token; its sessions ended), `invalid_token` (a failed check),
    /// `replayed` (a `jti` seen before), `unavailable` (the IdP's keys or a store).
    pub fn back_channel_logout(&self, outcome: &'static str) {
        self.back_channel_logouts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// True when the `live_sessions` gauge is due for a recount, claiming it: the caller must
    /// recount (or give up) and call [`Metrics::set_live_sessions`]. Concurrent scrapes see
    /// `false` and serve the previous value.
    pub fn claim_live_sessions_recount(&self) -> bool {
        let Ok(mut counted) = self.live_sessions_counted.try_lock() else {
            return false;
        };
        let due = counted.is_none_or(|at| at.elapsed() >= LIVE_SESSIONS_MAX_AGE);
        if due {
            // Claimed now: a failing count is retried after the same interval, not per scrape.
            *counted = Some(Instant::now());
        }
        due
    }

    pub fn set_live_sessions(&self, count: u64) {
        self.live_sessions
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_appear_with_their_labels_once_used() {
        let metrics = Metrics::new();
        metrics.http_request("/session", "GET", 401, Duration::from_millis(3));
        metrics.http_request("unmatched", "BREW", 404, Duration::from_millis(1));
        metrics.login_failed(LoginErrorCode::AccessDenied);
        metrics.refresh(RefreshOutcome::InvalidGrant);
        metrics.idp_request(IdpEndpoint::Token, Duration::from_millis(40));
        metrics.set_live_sessions(7);

        let text = metrics.encode().unwrap();

        assert!(
            text.contains(r#"http_requests_total{route="/session",method="GET",status="401"} 1"#)
        );
        assert!(text.contains(r#"http_requests_total{route="unmatched",method="other""#));
        assert!(text.contains(r#"logins_failed_total{reason="access_denied"} 1"#));
        assert!(text.contains(r#"refreshes_total{outcome="invalid_grant"} 1"#));
        assert!(text.contains(r#"idp_request_duration_seconds_count{endpoint="token"} 1"#));
        assert!(text.contains("live_sessions 7"));
        assert!(text.contains("logins_started_total 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_live_sessions_recount_is_claimed_once_per_interval() {
        let metrics = Metrics::new();
        assert!(metrics.claim_live_sessions_recount());
        assert!(!metrics.claim_live_sessions_recount());
    }
}
