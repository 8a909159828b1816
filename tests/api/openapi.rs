//! The OpenAPI document: committed, served, and complete.

use crate::helpers::*;

fn committed_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json")
}

#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = token_broker::openapi::document_json();
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    if committed != generated {
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(committed_path(), &generated).unwrap();
        }
        panic!(
            "openapi/openapi.json differs from the document the code generates.\n\
             Regenerate it: UPDATE_OPENAPI=1 cargo test the_committed_document (or `cargo run -- openapi > openapi/openapi.json`)"
        );
    }
}

#[test]
fn every_route_is_in_the_document() {
    let document: serde_json::Value =
        serde_json::from_str(&token_broker::openapi::document_json()).unwrap();
    let mut missing = Vec::new();
    for (method, path) in token_broker::routes::ROUTES {
        let documented = document["paths"][path][method.to_ascii_lowercase()].is_object();
        if !documented {
            missing.push(format!("{method} {path}"));
        }
    }
    assert!(
        missing.is_empty(),
        "routes missing from the OpenAPI document: {missing:?}"
    );
    // And the other way round: the document describes nothing the app does not serve.
    let paths = document["paths"].as_object().unwrap();
    for (path, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            assert!(
                token_broker::routes::ROUTES
                    .iter()
                    .any(|(m, p)| p == path && m.eq_ignore_ascii_case(method)),
                "documented but not served: {method} {path}"
            );
        }
    }
}

#[tokio::test]
async fn the_document_is_served() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json", &Browser::default()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        token_broker::openapi::document_json()
    );
}

#[test]
fn every_operation_has_a_unique_operation_id() {
    let document: serde_json::Value =
        serde_json::from_str(&token_broker::openapi::document_json()).unwrap();
    let mut ids = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if let Some(id) = operation.get("operationId").and_then(|id| id.as_str()) {
                ids.entry(id.to_string())
                    .or_default()
                    .push(format!("{method} {path}"));
            }
        }
    }
    let shared: Vec<_> = ids.iter().filter(|(_, users)| users.len() > 1).collect();
    assert!(shared.is_empty(), "operationIds used twice: {shared:?}");
    assert!(ids.len() >= 20, "{ids:?}");
}
