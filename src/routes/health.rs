//! `/healthz` (the process is up), `/readyz` (it can serve: Redis, PostgreSQL and IdP discovery
//! answer, and it is not draining), and `/openapi.json`.

use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::PROBLEM_JSON;
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

#[derive(Serialize, ToSchema)]
pub struct ReadinessChecks {
    pub redis: bool,
    pub postgres: bool,
    pub idp: bool,
    pub draining: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ReadinessReport {
    pub status: &'static str,
    pub checks: ReadinessChecks,
}

/// Readiness: Redis, PostgreSQL and the IdP's discovery document are reachable, and the process
/// is not shutting down.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadinessReport),
        (status = 503, description = "Not ready (problem+json with the same `checks`)", body = ReadinessReport, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(broker: web::Data<Broker>, readiness: web::Data<Readiness>) -> HttpResponse {
    let (redis, postgres, idp) = tokio::join!(
        broker.cache.ping(),
        broker.sessions.ping(),
        broker.provider.metadata()
    );
    let checks = ReadinessChecks {
        redis: redis
            .map_err(|e| tracing::warn!(error = %e, "readiness: Redis"))
            .is_ok(),
        postgres: postgres
            .map_err(|e| tracing::warn!(error = %e, "readiness: PostgreSQL"))
            .is_ok(),
        idp: idp
            .map_err(|e| tracing::warn!(error = %e, "readiness: IdP discovery"))
            .is_ok(),
        draining: readiness.is_draining(),
    };
    if checks.redis && checks.postgres && checks.idp && !checks.draining {
        return HttpResponse::Ok().json(ReadinessReport {
            status: "ready",
            checks,
        });
    }
    let body = serde_json::json!({
        "type": "urn:token-broker:problem:not-ready",
        "title": "Not ready",
        "status": 503,
        "checks": checks,
    });
    HttpResponse::ServiceUnavailable()
        .content_type(PROBLEM_JSON)
        .body(body.to_string())
}

/// The OpenAPI document of this API (the same as `openapi/openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(crate::openapi::document_json())
}
