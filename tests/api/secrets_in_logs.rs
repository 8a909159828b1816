//! Secrets never reach the logs: the real binary runs a whole login, a refused login and a logout
//! at the most verbose log level, and its captured output is searched for every secret it handled.

use std::net::TcpListener;

use token_broker::crypto::{Cipher, EncryptionKey};
use token_broker::dev_idp::{DevIdp, DevIdpOptions};
use token_broker::domain::SessionId;
use token_broker::store::postgres::{PgSessionRepository, Pools};
use token_broker::store::SessionRepository;
use url::Url;

use crate::helpers::*;

/// Every level of every crate: a few hundred lines for this flow (mostly actix's timer chatter),
/// and a dependency that logged a URL, header or body would be caught too.
const RUST_LOG: &str = "trace";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A browser talking to the broker process and the in-process IdP.
struct Session<'a> {
    http: &'a reqwest::Client,
    broker: &'a str,
    idp: &'a str,
    browser: Browser,
}

impl Session<'_> {
    async fn get(&mut self, url: &str) -> reqwest::Response {
        let response = self
            .http
            .get(url)
            .header("cookie", self.browser.cookie_header())
            .send()
            .await
            .unwrap();
        self.browser.absorb(&response);
        response
    }

    /// `/login`, then the IdP's form (signed in or cancelled): returns the authorization request's
    /// parameters and the callback URL.
    async fn authorize(&mut self, form: &[(&str, &str)]) -> (Vec<(String, String)>, String) {
        let login = self
            .get(&format!("{}/login?return_to=%2Fhome", self.broker))
            .await;
        assert_eq!(login.status(), 302);
        let mut params: Vec<(String, String)> = Url::parse(&location(&login))
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        params.extend(form.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let idp = self
            .http
            .post(format!("{}/authorize", self.idp))
            .form(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(idp.status(), 302);
        (params, location(&idp))
    }
}

fn param(params: &[(String, String)], name: &str) -> String {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap()
}

#[tokio::test]
async fn the_log_of_a_whole_session_contains_no_secret() {
    // Arrange: the test IdP in-process, the broker as a child process.
    let (broker_port, idp_listener) = (free_port(), TcpListener::bind("127.0.0.1:0").unwrap());
    let broker = format!("http://127.0.0.1:{broker_port}");
    let idp_url = format!(
        "http://127.0.0.1:{}",
        idp_listener.local_addr().unwrap().port()
    );
    let idp = DevIdp::new(
        Url::parse(&idp_url).unwrap(),
        DevIdpOptions {
            client_id: CLIENT_ID.into(),
            client_secret: Some(CLIENT_SECRET.into()),
            token_endpoint_auth_methods: vec!["client_secret_basic".into()],
            redirect_uris: vec![format!("{broker}/callback")],
            post_logout_redirect_uris: vec![format!("{FRONTEND}/")],
            ..DevIdpOptions::default()
        },
    );
    tokio::spawn(idp.serve(idp_listener).unwrap());
    let database = TestDatabase::create().await;
    let redis = TestRedis::new();
    let key = EncryptionKey::generate();
    let mut database_url = Url::parse(&database.url).unwrap();
    let database_password = match database_url.password() {
        Some(password) => password.to_string(),
        None => {
            // DATABASE_URL has no password, so PostgreSQL does not ask for one here (trust): a
            // made-up password in the URL is never sent, yet the broker holds it like a real one.
            let canary = format!("db-password-{}", uuid::Uuid::new_v4().simple());
            database_url.set_password(Some(&canary)).unwrap();
            canary
        }
    };
    // The Redis password is not checked: a Redis without `requirepass` refuses AUTH, so no
    // made-up password can be given to it.
    let listen = format!("127.0.0.1:{broker_port}");
    let (key_base64, database_url) = (key.secret_base64(), database_url.to_string());
    let mut process = BrokerProcess::spawn(
        &["serve"],
        &[
            ("BROKER_LISTEN_ADDR", &listen),
            ("BROKER_PUBLIC_URL", &broker),
            ("BROKER_OIDC_ISSUER", &idp_url),
            ("BROKER_CLIENT_ID", CLIENT_ID),
            ("BROKER_CLIENT_SECRET", CLIENT_SECRET),
            ("BROKER_ALLOWED_ORIGINS", FRONTEND),
            ("BROKER_ENCRYPTION_KEYS", &key_base64),
            ("DATABASE_URL", &database_url),
            ("REDIS_URL", &redis.url),
            ("BROKER_REDIS_KEY_PREFIX", &redis.prefix),
            ("BROKER_IDP_TIMEOUT", "5s"),
            ("RUST_LOG", RUST_LOG),
            ("BROKER_LOG_FORMAT", "json"),
        ],
    );
    process.wait_for_line("token-broker listening").await;
    let http = test_client();
    assert_eq!(
        http.get(format!("{broker}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let cipher = Cipher::new(std::slice::from_ref(&key));

    // Act: a login, with the pending login's sealed PKCE verifier read from Redis on the way.
    let mut user = Session {
        http: &http,
        broker: &broker,
        idp: &idp_url,
        browser: Browser::default(),
    };
    let (params, callback) = user.authorize(&[("username", "alice")]).await;
    let (pending_key, sealed_pending) = redis.values().await.pop().expect("a pending login");
    let pending: serde_json::Value = serde_json::from_slice(
        &cipher
            .open_string(&sealed_pending, pending_key.as_bytes())
            .unwrap(),
    )
    .unwrap();
    let verifier = pending["code_verifier"]
        .as_str()
        .expect("the PKCE verifier")
        .to_string();
    let landed = user.get(&callback).await;
    assert_eq!(location(&landed), format!("{FRONTEND}/home"));
    assert_eq!(user.get(&format!("{broker}/session")).await.status(), 200);

    // The tokens, from where the broker keeps them.
    let cookie = user.browser.session().unwrap().clone();
    let binding = user.browser.cookies["login-binding"].clone();
    let hash = SessionId::parse(&cookie).unwrap().hash();
    let time_out = std::time::Duration::from_secs(5);
    let repository = PgSessionRepository::new(
        Pools::shared(&database.url, time_out).unwrap(),
        cipher.clone(),
        time_out,
    );
    let record = repository
        .find(&hash)
        .await
        .unwrap()
        .expect("the session row");
    let at_key = format!("{}at:{{{}}}", redis.prefix, hash.to_hex());
    let (_, sealed_access_token) = redis
        .values()
        .await
        .into_iter()
        .find(|(k, _)| *k == at_key)
        .unwrap();
    let access_token = open_cached_access_token(&cipher, &at_key, &sealed_access_token);

    // A refused login, then a logout.
    let mut refused = Session {
        http: &http,
        broker: &broker,
        idp: &idp_url,
        browser: Browser::default(),
    };
    let (refused_params, refused_callback) = refused.authorize(&[("cancel", "1")]).await;
    let refused_landing = refused.get(&refused_callback).await;
    assert_eq!(
        query_param(&location(&refused_landing), "login_error").as_deref(),
        Some("access_denied")
    );
    let logout = http
        .post(format!("{broker}/logout"))
        .header("cookie", user.browser.cookie_header())
        .header("origin", FRONTEND)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 200);
    assert_eq!(
        idp.stats().revocations,
        2,
        "the refresh and the access token"
    );
    let (status, log) = process.terminate().await;

    // Assert: the log is real — request lines with their route and ID — and it stopped cleanly.
    assert!(status.success(), "exit status {status}");
    assert!(
        log.contains(r#""route":"/callback""#),
        "no /callback request line in:\n{log}"
    );
    assert!(
        log.contains(r#""request_id":"#),
        "no request IDs in:\n{log}"
    );
    assert!(
        log.contains("login failed") || log.contains("access_denied"),
        "the refused login is not logged"
    );

    let refresh_token = record.refresh_token.as_ref().unwrap().secret().to_string();
    let id_token = record.id_token.secret().to_string();
    let mut secrets = vec![
        ("session cookie", cookie),
        ("login-binding cookie", binding),
        (
            "refused login's binding cookie",
            refused.browser.cookies["login-binding"].clone(),
        ),
        ("state", param(&params, "state")),
        ("nonce", param(&params, "nonce")),
        ("refused login's state", param(&refused_params, "state")),
        ("refused login's nonce", param(&refused_params, "nonce")),
        ("PKCE verifier", verifier),
        (
            "authorization code",
            query_param(&callback, "code").unwrap(),
        ),
        ("client secret", CLIENT_SECRET.to_string()),
        ("encryption key", key_base64),
        ("database password", database_password),
        ("refresh token", refresh_token.clone()),
    ];
    // Whole JWTs, and their payload and signature on their own (a log could cut a token up).
    for (name, jwt) in [("access token", &access_token), ("ID token", &id_token)] {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{name} is a JWT");
        secrets.push((name, jwt.clone()));
        secrets.push((name, parts[1].to_string()));
        secrets.push((name, parts[2].to_string()));
    }
    for (name, secret) in &secrets {
        assert!(secret.len() >= 16, "{name} is too short to search for");
        assert!(
            !log.contains(secret.as_str()),
            "the log contains the {name}"
        );
    }
}
