//! `token-broker dev`: the whole flow on one loopback port with nothing installed.
//!
//! In-memory stores instead of Redis and PostgreSQL, and the built-in development IdP mounted at
//! `/dev-idp` — but the broker's own code path is the production one: it discovers the IdP over
//! HTTP, exchanges codes, verifies signed ID tokens. A demo page at `/` shows the flow.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{web, HttpResponse};

use crate::clock::SystemClock;
use crate::config::{Config, Settings};
use crate::crypto::{random_token, EncryptionKey};
use crate::dev_idp::{DevIdp, DevIdpOptions};
use crate::startup::{Application, ExtraRoutes, StartupError, Stores};

pub const DEV_CLIENT_ID: &str = "token-broker-dev";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("BROKER_LISTEN_ADDR: dev mode binds to loopback only, not {0}")]
    NotLoopback(IpAddr),
    #[error("BROKER_LISTEN_ADDR: {0}")]
    Listen(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Startup(#[from] StartupError),
}

/// Builds the development broker. `listen` defaults to 127.0.0.1:8080; port 0 picks a free one.
pub fn build(
    listen: Option<&str>,
    extra_origins: Option<&str>,
) -> Result<(Application, String), DevError> {
    let address: SocketAddr = listen.unwrap_or("127.0.0.1:8080").parse().map_err(|_| {
        DevError::Config("BROKER_LISTEN_ADDR: is not an address like 127.0.0.1:8080".into())
    })?;
    if !address.ip().is_loopback() {
        return Err(DevError::NotLoopback(address.ip()));
    }
    let listener = TcpListener::bind(address)?;
    let port = listener.local_addr()?.port();
    let public_url = format!("http://127.0.0.1:{port}");
    let issuer = format!("{public_url}/dev-idp");
    let client_secret = random_token();

    let idp = DevIdp::new(
        url::Url::parse(&issuer).map_err(|e| DevError::Config(e.to_string()))?,
        DevIdpOptions {
            client_id: DEV_CLIENT_ID.into(),
            client_secret: Some(client_secret.clone()),
            token_endpoint_auth_methods: vec!["client_secret_basic".into()],
            redirect_uris: vec![format!("{public_url}/callback")],
            post_logout_redirect_uris: vec![format!("{public_url}/")],
            ..DevIdpOptions::default()
        },
    );
    let origins = match extra_origins {
        Some(extra) if !extra.trim().is_empty() => format!("{public_url},{extra}"),
        _ => public_url.clone(),
    };
    let settings = Settings {
        public_url: Some(public_url.clone()),
        oidc_issuer: Some(issuer),
        client_id: Some(DEV_CLIENT_ID.into()),
        client_secret: Some(client_secret),
        allowed_origins: Some(origins),
        default_return_to: Some(format!("{public_url}/")),
        encryption_keys: Some(EncryptionKey::generate().secret_base64()),
        // Required by `Config`, never opened: dev mode runs on in-memory stores.
        database_url: Some("postgres://unused-in-dev-mode/".into()),
        redis_url: Some("redis://unused-in-dev-mode/".into()),
        log_format: Some("pretty".into()),
        ..Settings::default()
    };
    let config = Config::from_settings(&settings).map_err(|e| DevError::Config(e.to_string()))?;
    let clock = Arc::new(SystemClock);
    let stores = Stores::in_memory(clock.clone());
    let routes: ExtraRoutes = Arc::new(move |config: &mut web::ServiceConfig| {
        idp.configure("/dev-idp")(config);
        config.route("/", web::get().to(demo_page));
    });
    let application = Application::assemble(listener, config, clock, stores, Some(routes))?;
    Ok((application, public_url))
}

/// The banner `dev` prints: what it is, where to go, and that it is not for production.
pub fn banner(public_url: &str) -> String {
    format!(
        "\n  token-broker dev — DEVELOPMENT MODE, NOT FOR PRODUCTION\n  \
         in-memory stores, a built-in IdP at {public_url}/dev-idp, a random encryption key\n\n  \
         Open {public_url}/ and log in with any user name.\n"
    )
}

async fn demo_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "content-security-policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
        ))
        .body(DEMO_PAGE)
}

const DEMO_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>token-broker dev</title>
<style>
 body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;color:#1d232b}
 .warn{background:#fff4d6;border:1px solid #e3b341;padding:.5rem .8rem;border-radius:6px}
 button{font:inherit;padding:.4rem 1rem;margin-right:.5rem;border-radius:6px;border:1px solid #888;background:#f6f8fa;cursor:pointer}
 pre{background:#f6f8fa;padding:1rem;border-radius:6px;overflow:auto}
</style></head>
<body>
<h1>token-broker <small>dev</small></h1>
<p class="warn">Development mode: in-memory stores and a built-in identity provider. Not for production.</p>
<p id="who">Checking the session…</p>
<p><button id="login">Log in</button><button id="logout">Log out</button></p>
<h2><code>GET /session</code></h2>
<pre id="session">…</pre>
<script>
const show = async () => {
  const response = await fetch('/session', {credentials: 'include'});
  const body = await response.json();
  document.getElementById('session').textContent = response.status + '\n' + JSON.stringify(body, null, 2);
  document.getElementById('who').textContent = response.ok
    ? 'Logged in as ' + (body.user.name || body.user.sub) + '.'
    : 'Not logged in.';
  const error = new URLSearchParams(location.search).get('login_error');
  if (error) document.getElementById('who').textContent += ' (last login failed: ' + error + ')';
};
document.getElementById('login').onclick = () => { location = '/login?return_to=/'; };
document.getElementById('logout').onclick = async () => {
  const response = await fetch('/logout', {method: 'POST', credentials: 'include', headers: {Accept: 'application/json'}});
  location = (await response.json()).logout_url;
};
show();
</script>
</body></html>
"#;
