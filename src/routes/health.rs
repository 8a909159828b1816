//! `/healthz` (the process is up), `/readyz` (it can serve: Redis, PostgreSQL and IdP discovery
//! answer, and it is not draining; `?exclude=` leaves checks out), and `/openapi.json`.

use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::{ApiError, PROBLEM_JSON};
use crate::flows::Broker;

/// Process-wide readiness: set to draining on SIGTERM so the load balancer stops sending work.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// A dependency that `/readyz` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dependency {
    Redis,
    Postgres,
    Idp,
}

impl Dependency {
    fn named(name: &str) -> Option<Self> {
        match name {
            "redis" => Some(Self::Redis),
            "postgres" => Some(Self::Postgres),
            "idp" => Some(Self::Idp),
            _ => None,
        }
    }
}

/// The dependencies named by the query's `exclude` parameters (repeated, or comma-separated);
/// other parameters are ignored.
fn excluded_dependencies(query: &str) -> Result<Vec<Dependency>, ApiError> {
    let mut excluded = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key != "exclude" {
            continue;
        }
        for name in value.split(',') {
            excluded.push(Dependency::named(name.trim()).ok_or_else(|| {
                ApiError::InvalidRequest("exclude takes redis, postgres or idp".into())
            })?);
        }
    }
    Ok(excluded)
}

/// Whether `dependency` answers (`ping`), or `None` when it is excluded (and not asked).
async fn check<T, E: std::fmt::Display>(
    excluded: &[Dependency],
    dependency: Dependency,
    ping: impl std::future::Future<Output = Result<T, E>>,
) -> Option<bool> {
    if excluded.contains(&dependency) {
        return None;
    }
    Some(
        ping.await
            .map_err(|error| tracing::warn!(%error, ?dependency, "readiness check failed"))
            .is_ok(),
    )
}

/// Each check's outcome; a check left out with `?exclude=` is absent.
#[derive(Serialize, ToSchema)]
pub struct ReadinessChecks {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub redis: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub postgres: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub idp: Option<bool>,
    pub draining: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ReadinessReport {
    pub status: &'static str,
    pub checks: ReadinessChecks,
}

/// Readiness: Redis, PostgreSQL and the IdP's discovery document are reachable, and the process
/// is not shutting down.
///
/// `?exclude=redis&exclude=postgres&exclude=idp` (the form Kubernetes' own API server takes)
/// leaves those checks out: they are not run, and not reported. The Kubernetes manifests probe
/// readiness that way, because the stores and the IdP are shared by every replica: when one is
/// down, every pod would fail the check at once and leave the Service with no endpoint, while
/// each pod still serves what the outage allows (cached sessions with PostgreSQL down, every
/// session with Redis down), and answers the rest with a 503 that says when to retry.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    params(
        ("exclude" = Option<Vec<Dependency>>, Query, style = Form, explode,
         description = "Checks to leave out (repeated, or comma-separated)"),
    ),
    responses(
        (status = 200, description = "Ready", body = ReadinessReport),
        (status = 400, description = "`exclude` names an unknown check", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not ready (problem+json with the same `checks`)", body = ReadinessReport, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(
    request: HttpRequest,
    broker: web::Data<Broker>,
    readiness: web::Data<Readiness>,
) -> Result<HttpResponse, ApiError> {
    let excluded = excluded_dependencies(request.query_string())?;
    let (redis, postgres, idp) = tokio::join!(
        check(&excluded, Dependency::Redis, broker.cache.ping()),
        check(&excluded, Dependency::Postgres, broker.sessions.ping()),
        check(&excluded, Dependency::Idp, broker.provider.metadata()),
    );
    let checks = ReadinessChecks {
        redis,
        postgres,
        idp,
        draining: readiness.is_draining(),
    };
    let dependencies_answer = [redis, postgres, idp]
        .iter()
        .all(|outcome| *outcome != Some(false));
    if dependencies_answer && !checks.draining {
        return Ok(HttpResponse::Ok().json(ReadinessReport {
            status: "ready",
            checks,
        }));
    }
    let body = serde_json::json!({
        "type": "urn:token-broker:problem:not-ready",
        "title": "Not ready",
        "status": 503,
        "checks": checks,
    });
    Ok(HttpResponse::ServiceUnavailable()
        .content_type(PROBLEM_JSON)
        .body(body.to_string()))
}

/// The OpenAPI document of this API (the same as `openapi/openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(crate::openapi::document_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_takes_known_checks_repeated_or_comma_separated() {
        assert_eq!(
            excluded_dependencies("exclude=redis&exclude=postgres,idp").unwrap(),
            [Dependency::Redis, Dependency::Postgres, Dependency::Idp]
        );
        assert_eq!(excluded_dependencies("verbose=1").unwrap(), []);
        assert_eq!(excluded_dependencies("").unwrap(), []);
        for bad in [
            "exclude=etcd",
            "exclude=",
            "exclude=redis,",
            "exclude=REDIS",
        ] {
            assert!(excluded_dependencies(bad).is_err(), "{bad}");
        }
    }
}
