//! `GET /metrics`: the process's metrics in the OpenMetrics text format, for Prometheus.
//!
//! Not secret by construction (no label can carry a subject, session, token or URL), but meant
//! for the cluster's Prometheus only: keep it off the public ingress.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use crate::flows::Broker;
use crate::metrics::CONTENT_TYPE;

/// Prometheus metrics: requests, logins, refreshes, IdP latency, live sessions, store errors.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics in the OpenMetrics text format (Prometheus scrapes it)", body = String, content_type = "application/openmetrics-text"))
)]
pub async fn metrics(broker: web::Data<Broker>) -> HttpResponse {
    broker.recount_live_sessions().await;
    match broker.metrics.encode() {
        Ok(text) => HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, CONTENT_TYPE))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(text),
        Err(error) => {
            tracing::error!(%error, "metrics could not be encoded");
            HttpResponse::InternalServerError().finish()
        }
    }
}
