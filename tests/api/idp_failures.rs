//! The IdP misbehaving: a failing, slow or refusing token endpoint, discovery that fails or names
//! another issuer, a failing JWKS endpoint, and the client-authentication methods an IdP may
//! insist on. Each failure must end in the right `login_error` (or a 503 problem at `/login`),
//! never in a session, a 500 or a hang.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use token_broker::dev_idp::{DevIdp, DevIdpOptions};
use url::Url;

use crate::helpers::*;

const IDP_UNAVAILABLE: &str = "urn:token-broker:problem:idp-unavailable";

/// A login as alice against whatever the IdP is set up to do.
async fn attempt_login(app: &TestApp) -> (Browser, reqwest::Response) {
    let mut browser = Browser::default();
    let response = app.login_as(&mut browser, "alice").await;
    (browser, response)
}

/// `/login` refused because the IdP is unavailable: 503 problem+json with `Retry-After`.
async fn assert_login_unavailable(app: &TestApp) {
    let mut browser = Browser::default();
    let response = app.get_login(&mut browser, None).await;
    assert!(
        response.headers().get("retry-after").is_some(),
        "a 503 says when to retry"
    );
    assert!(!response.headers().contains_key("location"));
    let body = assert_problem(response, 503).await;
    assert_eq!(body["type"], IDP_UNAVAILABLE);
    assert_eq!(app.session_rows().await, 0);
}

/// An IdP of its own, serving on its own port, whose discovery fails from the very first request.
fn spawn_idp_whose_discovery_fails(status: u16) -> DevIdp {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let idp = DevIdp::new(Url::parse(&url).unwrap(), DevIdpOptions::default());
    idp.controls().set_discovery_status(Some(status));
    tokio::spawn(idp.serve(listener).unwrap());
    idp
}

#[tokio::test]
async fn a_token_endpoint_answering_500_is_idp_unavailable() {
    // Arrange
    let app = spawn_app().await;
    app.idp.controls().set_token_status(Some(500));

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "idp_unavailable").await;
    assert_eq!(app.idp.stats().code_grants, 1);
}

#[tokio::test]
async fn a_token_endpoint_slower_than_the_timeout_is_idp_unavailable_without_hanging() {
    // Arrange: the broker's IdP time-out is 2 s (set by the harness).
    let app = spawn_app().await;
    app.idp
        .controls()
        .set_token_delay(Some(Duration::from_secs(5)));
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;
    let callback = app.approve(&request, "alice").await;

    // Act
    let started = Instant::now();
    let response = app.callback(&mut browser, &callback).await;
    let took = started.elapsed();

    // Assert
    assert!(
        took < Duration::from_millis(4500),
        "the callback waited {took:?} for a 5 s token endpoint"
    );
    assert_login_refused(&app, &browser, &response, "/", "idp_unavailable").await;
}

#[tokio::test]
async fn a_token_endpoint_refusing_the_grant_is_token_exchange_failed() {
    // Arrange
    let app = spawn_app().await;
    app.idp.controls().set_token_error(Some("invalid_grant"));

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "token_exchange_failed").await;
    assert_eq!(app.idp.stats().code_grants_rejected, 1);
}

#[tokio::test]
async fn a_token_endpoint_refusing_the_client_is_token_exchange_failed() {
    // Arrange: the broker holds a secret the IdP does not accept (401 invalid_client).
    let app = spawn_app_with(|s| s.settings.client_secret = Some("wrong".into())).await;

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "token_exchange_failed").await;
}

#[tokio::test]
async fn login_is_a_503_problem_while_discovery_fails_and_works_once_it_recovers() {
    // Arrange: an IdP whose discovery answers 500 from the start, so nothing is ever cached.
    let failing = spawn_idp_whose_discovery_fails(500);
    let issuer = failing.issuer();
    let app = spawn_app_with(|s| s.settings.oidc_issuer = Some(issuer)).await;

    // Act + Assert
    assert_login_unavailable(&app).await;
    assert!(
        failing.stats().discovery_requests >= 1,
        "the broker did ask the IdP"
    );

    // Act: the IdP recovers; a failure is not cached.
    failing.controls().set_discovery_status(None);
    let response = app.get_login(&mut Browser::default(), None).await;

    // Assert
    assert_eq!(response.status(), 302);
    assert!(location(&response).starts_with(&format!("{}/authorize?", failing.issuer())));
}

#[tokio::test]
async fn login_is_a_503_problem_when_the_idp_cannot_be_reached() {
    // Arrange: an issuer on a port where nothing listens.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(|s| {
        s.settings.oidc_issuer = Some(format!("http://127.0.0.1:{closed_port}"))
    })
    .await;

    // Act + Assert
    assert_login_unavailable(&app).await;
}

#[tokio::test]
async fn a_discovery_outage_after_a_successful_discovery_does_not_break_logins() {
    // Arrange: discovery succeeded once, then fails.
    let app = spawn_app().await;
    app.logged_in_browser("alice").await;
    app.idp.controls().set_discovery_status(Some(500));

    // Act
    let browser = app.logged_in_browser("bob").await;

    // Assert
    assert_eq!(app.get_session(&browser).await.status(), 200);
    assert_eq!(app.session_rows().await, 2);
}

#[tokio::test]
async fn discovery_naming_the_issuer_without_the_configured_trailing_slash_is_refused() {
    // Arrange: OIDC Discovery §4.3: the document's issuer must be exactly the configured one.
    let app = spawn_app_with(|s| {
        s.settings.oidc_issuer = s.settings.oidc_issuer.take().map(|i| format!("{i}/"))
    })
    .await;

    // Act + Assert
    assert_login_unavailable(&app).await;
    assert!(
        app.idp.stats().discovery_requests >= 1,
        "the IdP answered; its answer was refused"
    );
}

#[tokio::test]
async fn discovery_naming_another_host_for_the_same_idp_is_refused() {
    // Arrange: configured as localhost, the IdP calls itself 127.0.0.1.
    let app = spawn_app_with(|s| {
        s.settings.oidc_issuer = s
            .settings
            .oidc_issuer
            .take()
            .map(|i| i.replace("127.0.0.1", "localhost"))
    })
    .await;

    // Act + Assert
    assert_login_unavailable(&app).await;
    assert!(
        app.idp.stats().discovery_requests >= 1,
        "the IdP answered; its answer was refused"
    );
}

#[tokio::test]
async fn an_idp_that_accepts_only_client_secret_post_gets_it() {
    // Arrange: the IdP refuses client_secret_basic, the broker's default.
    let app = spawn_app_with(|s| {
        s.idp_options.token_endpoint_auth_methods = vec!["client_secret_post".into()]
    })
    .await;

    // Act
    let browser = app.logged_in_browser("alice").await;

    // Assert
    assert_eq!(app.get_session(&browser).await.status(), 200);
    let stats = app.idp.stats();
    assert_eq!((stats.code_grants, stats.code_grants_rejected), (1, 0));
}

#[tokio::test]
async fn a_public_client_logs_in_with_pkce_alone() {
    // Arrange: no client secret on either side; the IdP allows only `none`.
    let app = spawn_app_with(|s| {
        s.idp_options.client_secret = None;
        s.idp_options.token_endpoint_auth_methods = vec!["none".into()];
        s.settings.client_secret = None;
    })
    .await;

    // Act
    let browser = app.logged_in_browser("alice").await;

    // Assert
    assert_eq!(app.get_session(&browser).await.status(), 200);
    assert_eq!(app.idp.stats().code_grants, 1);
}

#[tokio::test]
async fn a_failing_jwks_endpoint_is_idp_unavailable_not_invalid_token() {
    // Arrange: a fresh broker has no keys cached yet.
    let app = spawn_app().await;
    app.idp.controls().set_jwks_status(Some(500));

    // Act
    let (browser, response) = attempt_login(&app).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "idp_unavailable").await;
    let stats = app.idp.stats();
    assert!(stats.jwks_requests >= 1);
    assert_eq!(stats.code_grants, 1);
}
