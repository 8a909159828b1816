//! Attacks on `/callback` itself: replayed states and codes, a login finished by another browser,
//! malformed and expired states, authorization responses from the wrong issuer (RFC 9207), and
//! the IdP's error responses, which must reach the frontend only as a safe `login_error`.

use std::time::Duration;

use token_broker::dev_idp::IssMode;
use url::Url;

use crate::helpers::*;

/// The authorization response for `request` with these parameters, as an IdP would send it back.
fn callback_url(request: &AuthorizationRequest, params: &[(&str, &str)]) -> String {
    let mut url = Url::parse(&request.params["redirect_uri"]).unwrap();
    url.query_pairs_mut().extend_pairs(params);
    url.to_string()
}

/// An error response from the IdP to `request` (RFC 6749 §4.1.2.1), with the RFC 9207 `iss`.
fn error_callback(app: &TestApp, request: &AuthorizationRequest, error: &str) -> String {
    let issuer = app.idp.issuer();
    callback_url(
        request,
        &[
            ("error", error),
            (
                "error_description",
                "Detailed IdP text that must not reach the browser",
            ),
            ("state", &request.params["state"]),
            ("iss", &issuer),
        ],
    )
}

/// The `code` an IdP's authorization response carries.
fn code_of(callback: &str) -> String {
    query_param(callback, "code").expect("the callback carries a code")
}

#[tokio::test]
async fn a_replayed_callback_is_refused_as_expired_and_redeems_nothing() {
    // Arrange: a completed login.
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;
    let callback = app.approve(&request, "alice").await;
    let first = app.callback(&mut browser, &callback).await;
    assert!(query_param(&location(&first), "login_error").is_none());

    // Act: the same callback URL again, from the same browser.
    let replay = app.callback(&mut browser, &callback).await;

    // Assert: the state was used up; the first session is untouched, no second one exists.
    assert_login_error_redirect(&replay, "/", "login_expired");
    assert_eq!(app.session_rows().await, 1);
    assert_eq!(
        app.idp.stats().code_grants,
        1,
        "the replay never reached the token endpoint"
    );
    assert_eq!(app.get_session(&browser).await.status(), 200);
}

#[tokio::test]
async fn an_already_redeemed_code_is_refused_by_the_idp() {
    // Arrange: a completed first login, then a second login in the same browser.
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let first = app.start_login(&mut browser, None).await;
    let first_callback = app.approve(&first, "alice").await;
    app.callback(&mut browser, &first_callback).await;
    let first_session = browser.session().cloned().expect("first login succeeded");
    let second = app.start_login(&mut browser, None).await;

    // Act: the first login's (redeemed) code with the second login's state.
    let issuer = app.idp.issuer();
    let code = code_of(&first_callback);
    let replayed = callback_url(
        &second,
        &[
            ("code", &code),
            ("state", &second.params["state"]),
            ("iss", &issuer),
        ],
    );
    let response = app.callback(&mut browser, &replayed).await;

    // Assert
    assert_login_error_redirect(&response, "/", "token_exchange_failed");
    let stats = app.idp.stats();
    assert_eq!((stats.code_grants, stats.code_grants_rejected), (2, 1));
    assert_eq!(
        app.session_rows().await,
        1,
        "only the first login's session"
    );
    assert_eq!(
        browser.session(),
        Some(&first_session),
        "the session cookie is unchanged"
    );
}

#[tokio::test]
async fn a_code_issued_to_another_login_fails_pkce_at_the_idp() {
    // Arrange: two pending logins in one browser; the first one's code is injected into the second.
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let first = app.start_login(&mut browser, None).await;
    let first_callback = app.approve(&first, "mallory").await;
    let second = app.start_login(&mut browser, None).await;

    // Act
    let issuer = app.idp.issuer();
    let code = code_of(&first_callback);
    let injected = callback_url(
        &second,
        &[
            ("code", &code),
            ("state", &second.params["state"]),
            ("iss", &issuer),
        ],
    );
    let response = app.callback(&mut browser, &injected).await;

    // Assert: the second login's PKCE verifier does not match the code's challenge.
    assert_login_refused(&app, &browser, &response, "/", "token_exchange_failed").await;
    let stats = app.idp.stats();
    assert_eq!((stats.code_grants, stats.code_grants_rejected), (1, 1));
}

#[tokio::test]
async fn a_callback_without_the_binding_cookie_is_refused_before_the_code_is_exchanged() {
    // Arrange: a victim's login; the callback URL ends up in a browser that did not start it.
    let app = spawn_app().await;
    let mut victim = Browser::default();
    let request = app.start_login(&mut victim, None).await;
    let callback = app.approve(&request, "alice").await;

    // Act
    let mut stranger = Browser::default();
    let response = app.callback(&mut stranger, &callback).await;

    // Assert
    assert_login_refused(&app, &stranger, &response, "/", "login_expired").await;
    assert_eq!(
        app.idp.stats().code_grants,
        0,
        "nothing reached the IdP before the binding check"
    );
}

#[tokio::test]
async fn a_login_cannot_be_finished_by_another_browser_and_is_burnt_by_the_attempt() {
    // Arrange: browser A's login; browser B has a binding cookie of its own from its own login.
    let app = spawn_app().await;
    let mut a = Browser::default();
    let request = app.start_login(&mut a, None).await;
    let callback = app.approve(&request, "alice").await;
    let mut b = Browser::default();
    app.start_login(&mut b, None).await;
    assert_ne!(a.cookies["login-binding"], b.cookies["login-binding"]);

    // Act
    let by_b = app.callback(&mut b, &callback).await;
    let by_a = app.callback(&mut a, &callback).await;

    // Assert: B is refused; the state is single use, so A cannot finish it afterwards either.
    assert_login_refused(&app, &b, &by_b, "/", "login_expired").await;
    assert_login_refused(&app, &a, &by_a, "/", "login_expired").await;
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn a_callback_with_a_malformed_or_missing_state_is_a_400_problem() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;
    let callback = app.approve(&request, "alice").await;
    let (code, issuer) = (code_of(&callback), app.idp.issuer());

    for params in [
        vec![("code", code.as_str()), ("state", "abc"), ("iss", &issuer)],
        vec![("code", code.as_str()), ("state", ""), ("iss", &issuer)],
        vec![("code", code.as_str()), ("iss", &issuer)],
    ] {
        // Act
        let response = app
            .callback(&mut browser, &callback_url(&request, &params))
            .await;

        // Assert
        let body = assert_problem(response, 400).await;
        assert_eq!(
            body["type"], "urn:token-broker:problem:invalid-request",
            "{params:?}"
        );
    }
    assert_eq!(app.idp.stats().code_grants, 0);
    assert_eq!(app.session_rows().await, 0);
    assert_problem(app.get_session(&browser).await, 401).await;
}

#[tokio::test]
async fn an_authorization_response_naming_another_issuer_is_refused_before_the_code_is_exchanged() {
    // Arrange: RFC 9207 mix-up: the response claims to come from another IdP.
    let app = spawn_app().await;
    app.idp
        .controls()
        .set_response_iss(IssMode::Value("https://evil.example.com".into()));

    // Act
    let mut browser = Browser::default();
    let response = app.login_as(&mut browser, "alice").await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn an_issuer_that_differs_only_by_a_trailing_slash_is_another_issuer() {
    // Arrange: RFC 9207 §2.4 compares the iss parameter by simple string comparison.
    let app = spawn_app().await;
    app.idp
        .controls()
        .set_response_iss(IssMode::Value(format!("{}/", app.idp.issuer())));

    // Act
    let mut browser = Browser::default();
    let response = app.login_as(&mut browser, "alice").await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn an_authorization_response_without_iss_is_refused_when_the_idp_advertises_it() {
    // Arrange: discovery says `authorization_response_iss_parameter_supported: true`.
    let app = spawn_app().await;
    app.idp.controls().set_response_iss(IssMode::Omit);

    // Act
    let mut browser = Browser::default();
    let response = app.login_as(&mut browser, "alice").await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn an_error_response_naming_another_issuer_is_a_mix_up_not_a_cancellation() {
    // Arrange: RFC 9207 applies to error responses too.
    let app = spawn_app().await;
    app.idp
        .controls()
        .set_response_iss(IssMode::Value("https://evil.example.com".into()));
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;

    // Act
    let callback = app.deny(&request).await;
    let response = app.callback(&mut browser, &callback).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "invalid_token").await;
}

#[tokio::test]
async fn a_cancelled_login_is_access_denied_without_the_idps_description() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;
    let callback = app.deny(&request).await;
    let description = query_param(&callback, "error_description").expect("the IdP explains");

    // Act
    let response = app.callback(&mut browser, &callback).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "access_denied").await;
    assert!(!location(&response).contains(&urlencode(&description)));
    assert!(
        !location(&response).contains("cancelled"),
        "{}",
        location(&response)
    );
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn idp_errors_on_the_callback_are_idp_error() {
    let app = spawn_app().await;
    for error in [
        "invalid_scope",
        "server_error",
        "invalid_request",
        "unauthorized_client",
        "made_up_error",
    ] {
        // Arrange
        let mut browser = Browser::default();
        let request = app.start_login(&mut browser, None).await;

        // Act
        let response = app
            .callback(&mut browser, &error_callback(&app, &request, error))
            .await;

        // Assert
        assert_login_refused(&app, &browser, &response, "/", "idp_error").await;
        assert!(
            !location(&response).contains("Detailed"),
            "{error}: {}",
            location(&response)
        );
    }
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn consent_and_login_refusals_on_the_callback_are_access_denied() {
    let app = spawn_app().await;
    for error in ["consent_required", "login_required"] {
        // Arrange
        let mut browser = Browser::default();
        let request = app.start_login(&mut browser, None).await;

        // Act
        let response = app
            .callback(&mut browser, &error_callback(&app, &request, error))
            .await;

        // Assert
        assert_login_refused(&app, &browser, &response, "/", "access_denied").await;
        assert!(
            !location(&response).contains("Detailed"),
            "{error}: {}",
            location(&response)
        );
    }
}

#[tokio::test]
async fn a_callback_with_neither_code_nor_error_is_idp_error() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;
    let issuer = app.idp.issuer();
    let callback = callback_url(
        &request,
        &[("state", &request.params["state"]), ("iss", &issuer)],
    );

    // Act
    let response = app.callback(&mut browser, &callback).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "idp_error").await;
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn a_callback_after_the_login_ttl_is_login_expired() {
    // Arrange
    let app = spawn_app_with(|s| s.settings.login_ttl = Some("1s".into())).await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, None).await;
    let callback = app.approve(&request, "alice").await;

    // Act: the subject is the pending login's expiry in Redis, so wait it out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = app.callback(&mut browser, &callback).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/", "login_expired").await;
    assert_eq!(app.idp.stats().code_grants, 0);
}

#[tokio::test]
async fn a_failed_login_returns_to_its_return_path_with_the_login_error() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app.start_login(&mut browser, Some("/orders?id=7")).await;

    // Act
    let callback = app.deny(&request).await;
    let response = app.callback(&mut browser, &callback).await;

    // Assert
    assert_login_refused(&app, &browser, &response, "/orders?id=7", "access_denied").await;
}

#[tokio::test]
async fn a_failed_login_replaces_a_login_error_already_in_the_return_path() {
    // Arrange: a return path that already carries a (stale or planted) login_error.
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app
        .start_login(&mut browser, Some("/orders?login_error=idp_error&id=7"))
        .await;

    // Act
    let callback = app.deny(&request).await;
    let response = app.callback(&mut browser, &callback).await;

    // Assert: exactly one login_error, the real one.
    assert_login_refused(&app, &browser, &response, "/orders?id=7", "access_denied").await;
}

#[tokio::test]
async fn a_failed_login_to_another_allowed_origin_returns_there() {
    // Arrange
    let app = spawn_app().await;
    let mut browser = Browser::default();
    let request = app
        .start_login(&mut browser, Some("https://app.example.com/settings"))
        .await;

    // Act
    let callback = app.deny(&request).await;
    let response = app.callback(&mut browser, &callback).await;

    // Assert
    assert_eq!(response.status(), 302);
    assert_eq!(
        location(&response),
        "https://app.example.com/settings?login_error=access_denied"
    );
    assert_eq!(app.session_rows().await, 0);
    assert_problem(app.get_session(&browser).await, 401).await;
}
