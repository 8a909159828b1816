//! Configuration: SPEC.md's variables, each an environment variable and a `--kebab-case` flag.
//!
//! [`Settings`] is what clap reads (every field optional, so that *we* report what is missing);
//! [`Config::from_settings`] validates all of it and returns every problem as one line naming the
//! variable. Secrets become redacted types on the way in.

use std::net::SocketAddr;
use std::time::Duration;

use url::Url;

use crate::crypto::EncryptionKey;
use crate::domain::{AllowedOrigins, ClientSecret, ConnectionUrl, ReturnTo};

/// Raw settings as given on the command line or in the environment.
#[derive(clap::Args, Default, Clone)]
pub struct Settings {
    /// Address to listen on [default: 0.0.0.0:8080]
    #[arg(long, global = true, env = "BROKER_LISTEN_ADDR")]
    pub listen_addr: Option<String>,
    /// The broker's external base URL; the redirect URI is {public-url}/callback
    #[arg(long, global = true, env = "BROKER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// OpenID issuer URL (discovery at {issuer}/.well-known/openid-configuration)
    #[arg(long, global = true, env = "BROKER_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    #[arg(long, global = true, env = "BROKER_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Without it the broker is a public client protected by PKCE alone
    #[arg(
        long,
        global = true,
        env = "BROKER_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<String>,
    /// [default: openid profile email offline_access]
    #[arg(long, global = true, env = "BROKER_SCOPES")]
    pub scopes: Option<String>,
    /// Comma-separated frontend origins
    #[arg(long, global = true, env = "BROKER_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Where a login without return_to lands [default: first allowed origin + /]
    #[arg(long, global = true, env = "BROKER_DEFAULT_RETURN_TO")]
    pub default_return_to: Option<String>,
    /// Where the IdP sends the browser after logout [default: the default return_to]
    #[arg(long, global = true, env = "BROKER_POST_LOGOUT_REDIRECT_URL")]
    pub post_logout_redirect_url: Option<String>,
    /// Comma-separated base64 32-byte keys; the first encrypts, all decrypt
    #[arg(
        long,
        global = true,
        env = "BROKER_ENCRYPTION_KEYS",
        hide_env_values = true
    )]
    pub encryption_keys: Option<String>,
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, global = true, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// [default: 12h]
    #[arg(long, global = true, env = "BROKER_SESSION_IDLE_TIMEOUT")]
    pub session_idle_timeout: Option<String>,
    /// [default: 7d]
    #[arg(long, global = true, env = "BROKER_SESSION_MAX_LIFETIME")]
    pub session_max_lifetime: Option<String>,
    /// [default: 10m]
    #[arg(long, global = true, env = "BROKER_LOGIN_TTL")]
    pub login_ttl: Option<String>,
    /// strict or lax [default: strict]
    #[arg(long, global = true, env = "BROKER_COOKIE_SAMESITE")]
    pub cookie_samesite: Option<String>,
    /// Upstream APIs for the token relay, name=URL comma-separated
    #[arg(long, global = true, env = "BROKER_API_ROUTES")]
    pub api_routes: Option<String>,
    /// Time-out of connecting to a relay upstream [default: 5s]
    #[arg(long, global = true, env = "BROKER_API_CONNECT_TIMEOUT")]
    pub api_connect_timeout: Option<String>,
    /// Time a relay upstream may take to answer with its response headers [default: 30s]
    #[arg(long, global = true, env = "BROKER_API_TIMEOUT")]
    pub api_timeout: Option<String>,
    /// json or pretty [default: json]
    #[arg(long, global = true, env = "BROKER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Prefix of every Redis key, to share one Redis between deployments [default: tb:]
    #[arg(long, global = true, env = "BROKER_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// Apply migrations at start-up: true or false [default: true]
    #[arg(long, global = true, env = "BROKER_RUN_MIGRATIONS")]
    pub run_migrations: Option<String>,
    /// Time-out of every call to the IdP [default: 10s]
    #[arg(long, global = true, env = "BROKER_IDP_TIMEOUT")]
    pub idp_timeout: Option<String>,
    /// Time-out of every PostgreSQL operation [default: 5s]
    #[arg(long, global = true, env = "BROKER_DATABASE_TIMEOUT")]
    pub database_timeout: Option<String>,
    /// After SIGTERM, how long to keep serving with /readyz at 503 before closing the listener
    /// [default: 0s]
    #[arg(long, global = true, env = "BROKER_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// One upstream of the token relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRoute {
    pub name: String,
    pub base_url: Url,
}

/// Validated configuration. `Debug` is safe: every secret is a redacted type.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub public_url: Url,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<ClientSecret>,
    pub scopes: String,
    pub allowed_origins: AllowedOrigins,
    pub default_return_to: ReturnTo,
    pub post_logout_redirect_url: Url,
    pub encryption_keys: Vec<EncryptionKey>,
    pub database_url: ConnectionUrl,
    pub redis_url: ConnectionUrl,
    pub session_idle_timeout: Duration,
    pub session_max_lifetime: Duration,
    pub login_ttl: Duration,
    pub cookie_same_site: SameSite,
    pub api_routes: Vec<ApiRoute>,
    pub api_connect_timeout: Duration,
    /// Until the upstream's response headers; the body then streams without a time limit.
    pub api_timeout: Duration,
    pub log_format: LogFormat,
    pub redis_key_prefix: String,
    pub run_migrations: bool,
    pub idp_timeout: Duration,
    /// The most one PostgreSQL operation may take (its statements, its transaction); past it,
    /// a 503. PostgreSQL cancels each statement at this time itself (`statement_timeout`).
    pub database_timeout: Duration,
    /// After SIGTERM: serving on, with `/readyz` at 503, this long before the listener closes
    /// and in-flight requests drain (load balancers that route by readiness stop first).
    pub shutdown_delay: Duration,
    /// The least time between two JWKS fetches caused by an unknown `kid` (not a variable: tests
    /// shorten it). A flood of tokens with made-up `kid`s costs the IdP one fetch per interval.
    pub jwks_refetch_interval: Duration,
    /// The mean time between two sweeps of expired sessions; zero turns the background sweep off
    /// (not a variable: tests drive the sweep directly).
    pub sweep_interval: Duration,
    /// Rows the sweep deletes per transaction, so that no lock is held for long.
    pub sweep_batch: i64,
}

/// Every configuration problem, one per line, each naming its variable.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses `30s`, `10m`, `12h`, `7d` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 10m, 12h or 7d"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        "d" => number.saturating_mul(86_400),
        _ => return Err(format!("`{text}` has an unknown unit (use s, m, h or d)")),
    };
    if seconds == 0 {
        return Err("must be longer than zero".into());
    }
    Ok(Duration::from_secs(seconds))
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Collects problems so that one start-up attempt reports all of them.
struct Checker {
    problems: Vec<String>,
}

impl Checker {
    fn problem(&mut self, variable: &str, message: impl std::fmt::Display) {
        self.problems.push(format!("{variable}: {message}"));
    }

    fn required<'a>(
        &mut self,
        variable: &str,
        flag: &str,
        value: &'a Option<String>,
    ) -> Option<&'a str> {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.problem(
                    variable,
                    format_args!("is required (set it or pass --{flag})"),
                );
                None
            }
        }
    }

    fn duration(&mut self, variable: &str, value: &Option<String>, default: &str) -> Duration {
        let text = value.as_deref().unwrap_or(default);
        parse_duration(text).unwrap_or_else(|problem| {
            self.problem(variable, problem);
            Duration::from_secs(1)
        })
    }
}

impl Config {
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigErrors> {
        let mut check = Checker {
            problems: Vec::new(),
        };

        let listen_addr = settings
            .listen_addr
            .as_deref()
            .unwrap_or("0.0.0.0:8080")
            .parse()
            .unwrap_or_else(|_| {
                check.problem("BROKER_LISTEN_ADDR", "is not an address like 0.0.0.0:8080");
                SocketAddr::from(([127, 0, 0, 1], 0))
            });

        let public_url = check
            .required("BROKER_PUBLIC_URL", "public-url", &settings.public_url)
            .and_then(|raw| match Url::parse(raw.trim_end_matches('/')) {
                Ok(url)
                    if matches!(url.scheme(), "http" | "https")
                        && url.host().is_some()
                        && url.query().is_none()
                        && url.fragment().is_none() =>
                {
                    Some(url)
                }
                _ => {
                    check.problem(
                        "BROKER_PUBLIC_URL",
                        "must be an absolute http(s) URL without query or fragment",
                    );
                    None
                }
            });

        let issuer = check
            .required("BROKER_OIDC_ISSUER", "oidc-issuer", &settings.oidc_issuer)
            .and_then(|raw| match Url::parse(raw) {
                Ok(url)
                    if url.scheme() == "https" || (url.scheme() == "http" && is_loopback(&url)) =>
                {
                    Some(raw.to_string())
                }
                Ok(_) => {
                    check.problem(
                        "BROKER_OIDC_ISSUER",
                        "must be an https URL (plain http only on loopback, for development)",
                    );
                    None
                }
                Err(_) => {
                    check.problem("BROKER_OIDC_ISSUER", "is not a URL");
                    None
                }
            });

        let client_id = check
            .required("BROKER_CLIENT_ID", "client-id", &settings.client_id)
            .map(str::to_string);
        let client_secret = settings
            .client_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(ClientSecret::new);
        let scopes = settings
            .scopes
            .clone()
            .unwrap_or_else(|| "openid profile email offline_access".into());
        if !scopes.split_whitespace().any(|s| s == "openid") {
            check.problem("BROKER_SCOPES", "must include openid");
        }

        let allowed_origins = check
            .required(
                "BROKER_ALLOWED_ORIGINS",
                "allowed-origins",
                &settings.allowed_origins,
            )
            .and_then(|raw| {
                AllowedOrigins::parse(raw)
                    .map_err(|problem| check.problem("BROKER_ALLOWED_ORIGINS", problem))
                    .ok()
            });

        let default_return_to = allowed_origins.as_ref().and_then(|origins| {
            match settings.default_return_to.as_deref() {
                None => Some(ReturnTo::from_trusted(origins.first().clone())),
                Some(raw) => ReturnTo::parse(raw, origins)
                    .map_err(|e| {
                        check.problem(
                            "BROKER_DEFAULT_RETURN_TO",
                            format_args!("{e} (BROKER_ALLOWED_ORIGINS)"),
                        )
                    })
                    .ok(),
            }
        });

        let post_logout_redirect_url = match settings.post_logout_redirect_url.as_deref() {
            Some(raw) => Url::parse(raw)
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https"))
                .or_else(|| {
                    check.problem(
                        "BROKER_POST_LOGOUT_REDIRECT_URL",
                        "must be an absolute http(s) URL",
                    );
                    None
                }),
            None => default_return_to
                .as_ref()
                .and_then(|to| Url::parse(to.as_str()).ok()),
        };

        let encryption_keys = check
            .required(
                "BROKER_ENCRYPTION_KEYS",
                "encryption-keys",
                &settings.encryption_keys,
            )
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .enumerate()
                    .filter_map(|(index, key)| {
                        EncryptionKey::from_base64(key)
                            .map_err(|p| {
                                check.problem(
                                    "BROKER_ENCRYPTION_KEYS",
                                    format_args!("key {} {p}", index + 1),
                                )
                            })
                            .ok()
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();

        let database_url = check
            .required("DATABASE_URL", "database-url", &settings.database_url)
            .map(ConnectionUrl::new);
        if let Some(url) = &database_url {
            if !(url.secret().starts_with("postgres://")
                || url.secret().starts_with("postgresql://"))
            {
                check.problem("DATABASE_URL", "must be a postgres:// URL");
            }
        }
        let redis_url = check
            .required("REDIS_URL", "redis-url", &settings.redis_url)
            .map(ConnectionUrl::new);
        if let Some(url) = &redis_url {
            // One server, a cluster or a Sentinel master (store::redis::topology has the forms).
            if let Err(problem) = crate::store::redis::topology::RedisTopology::parse(url.secret())
            {
                check.problem("REDIS_URL", problem);
            }
        }

        let session_idle_timeout = check.duration(
            "BROKER_SESSION_IDLE_TIMEOUT",
            &settings.session_idle_timeout,
            "12h",
        );
        let session_max_lifetime = check.duration(
            "BROKER_SESSION_MAX_LIFETIME",
            &settings.session_max_lifetime,
            "7d",
        );
        let login_ttl = check.duration("BROKER_LOGIN_TTL", &settings.login_ttl, "10m");
        let idp_timeout = check.duration("BROKER_IDP_TIMEOUT", &settings.idp_timeout, "10s");
        let database_timeout =
            check.duration("BROKER_DATABASE_TIMEOUT", &settings.database_timeout, "5s");
        let shutdown_delay = match settings.shutdown_delay.as_deref().map(str::trim) {
            None | Some("0" | "0s") => Duration::ZERO,
            Some(_) => check.duration("BROKER_SHUTDOWN_DELAY", &settings.shutdown_delay, "0s"),
        };
        let api_connect_timeout = check.duration(
            "BROKER_API_CONNECT_TIMEOUT",
            &settings.api_connect_timeout,
            "5s",
        );
        let api_timeout = check.duration("BROKER_API_TIMEOUT", &settings.api_timeout, "30s");

        let cookie_same_site = match settings
            .cookie_samesite
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("strict") => SameSite::Strict,
            Some("lax") => SameSite::Lax,
            Some(_) => {
                check.problem("BROKER_COOKIE_SAMESITE", "must be strict or lax");
                SameSite::Strict
            }
        };

        let api_routes = parse_api_routes(settings.api_routes.as_deref().unwrap_or(""))
            .unwrap_or_else(|problem| {
                check.problem("BROKER_API_ROUTES", problem);
                Vec::new()
            });

        let log_format = match settings.log_format.as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(_) => {
                check.problem("BROKER_LOG_FORMAT", "must be json or pretty");
                LogFormat::Json
            }
        };

        let redis_key_prefix = settings
            .redis_key_prefix
            .clone()
            .unwrap_or_else(|| "tb:".into());
        if redis_key_prefix.contains(['{', '}']) || redis_key_prefix.len() > 64 {
            check.problem(
                "BROKER_REDIS_KEY_PREFIX",
                "must be at most 64 characters without { or }",
            );
        }
        let run_migrations = match settings.run_migrations.as_deref() {
            None | Some("true") | Some("1") => true,
            Some("false") | Some("0") => false,
            Some(_) => {
                check.problem("BROKER_RUN_MIGRATIONS", "must be true or false");
                true
            }
        };

        match (
            public_url,
            issuer,
            client_id,
            allowed_origins,
            default_return_to,
            post_logout_redirect_url,
            database_url,
            redis_url,
        ) {
            (
                Some(public_url),
                Some(issuer),
                Some(client_id),
                Some(allowed_origins),
                Some(default_return_to),
                Some(post_logout_redirect_url),
                Some(database_url),
                Some(redis_url),
            ) if check.problems.is_empty() && !encryption_keys.is_empty() => Ok(Config {
                listen_addr,
                public_url,
                issuer,
                client_id,
                client_secret,
                scopes,
                allowed_origins,
                default_return_to,
                post_logout_redirect_url,
                encryption_keys,
                database_url,
                redis_url,
                session_idle_timeout,
                session_max_lifetime,
                login_ttl,
                cookie_same_site,
                api_routes,
                api_connect_timeout,
                api_timeout,
                log_format,
                redis_key_prefix,
                run_migrations,
                idp_timeout,
                database_timeout,
                shutdown_delay,
                jwks_refetch_interval: Duration::from_secs(10),
                sweep_interval: Duration::from_secs(60),
                sweep_batch: 500,
            }),
            _ => {
                if check.problems.is_empty() {
                    check.problem("BROKER_ENCRYPTION_KEYS", "must name at least one key");
                }
                Err(ConfigErrors(check.problems))
            }
        }
    }

    /// `{BROKER_PUBLIC_URL}/callback`, the registered redirect URI.
    pub fn redirect_uri(&self) -> String {
        format!(
            "{}/callback",
            self.public_url.as_str().trim_end_matches('/')
        )
    }

    /// Whether cookies can be `Secure` (and `__Host-` prefixed): the public URL is https.
    pub fn is_https(&self) -> bool {
        self.public_url.scheme() == "https"
    }

    /// The broker's own origin, accepted on POST besides the allowed frontend origins.
    pub fn public_origin(&self) -> String {
        self.public_url.origin().ascii_serialization()
    }
}

fn parse_api_routes(list: &str) -> Result<Vec<ApiRoute>, String> {
    let mut routes: Vec<ApiRoute> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, url) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not name=URL"))?;
        let name = name.trim();
        // The name is one raw path segment of `/api/{name}/…`: nothing to decode or normalise.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!("route name `{name}` may use only a-z, 0-9 and -"));
        }
        let base_url = Url::parse(url.trim())
            .ok()
            .filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && u.username().is_empty()
                    && u.password().is_none()
            })
            .ok_or_else(|| {
                format!("route `{name}` needs an absolute http(s) URL without query, fragment or user info")
            })?;
        if routes.iter().any(|r| r.name == name) {
            return Err(format!("route `{name}` is named twice"));
        }
        routes.push(ApiRoute {
            name: name.to_string(),
            base_url,
        });
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Settings {
        Settings {
            public_url: Some("https://app.example.com/auth/".into()),
            oidc_issuer: Some("https://idp.example.com/realms/x".into()),
            client_id: Some("broker".into()),
            client_secret: Some("s3cr3t-value".into()),
            allowed_origins: Some("https://app.example.com".into()),
            encryption_keys: Some(EncryptionKey::generate().secret_base64()),
            database_url: Some("postgres://u:dbpass@db/broker".into()),
            redis_url: Some("redis://:redispass@redis:6379".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let config = Config::from_settings(&valid()).unwrap();
        assert_eq!(config.listen_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(config.scopes, "openid profile email offline_access");
        assert_eq!(
            config.redirect_uri(),
            "https://app.example.com/auth/callback"
        );
        assert_eq!(
            config.default_return_to.as_str(),
            "https://app.example.com/"
        );
        assert_eq!(
            config.post_logout_redirect_url.as_str(),
            "https://app.example.com/"
        );
        assert_eq!(config.session_idle_timeout, Duration::from_secs(12 * 3600));
        assert_eq!(config.session_max_lifetime, Duration::from_secs(7 * 86_400));
        assert_eq!(config.login_ttl, Duration::from_secs(600));
        assert_eq!(config.cookie_same_site, SameSite::Strict);
        assert_eq!(config.api_connect_timeout, Duration::from_secs(5));
        assert_eq!(config.api_timeout, Duration::from_secs(30));
        assert_eq!(config.database_timeout, Duration::from_secs(5));
        assert!(config.is_https());
    }

    #[test]
    fn every_missing_variable_is_one_line_naming_it() {
        let errors = Config::from_settings(&Settings::default()).unwrap_err();
        let text = errors.to_string();
        for variable in [
            "BROKER_PUBLIC_URL",
            "BROKER_OIDC_ISSUER",
            "BROKER_CLIENT_ID",
            "BROKER_ALLOWED_ORIGINS",
            "BROKER_ENCRYPTION_KEYS",
            "DATABASE_URL",
            "REDIS_URL",
        ] {
            assert_eq!(
                text.lines()
                    .filter(|l| l.starts_with(&format!("{variable}:")))
                    .count(),
                1,
                "{variable} in:\n{text}"
            );
        }
    }

    #[test]
    fn invalid_values_are_named_and_secrets_never_shown() {
        let mut settings = valid();
        settings.encryption_keys = Some("c2hvcnQ=,!!".into());
        settings.oidc_issuer = Some("http://idp.example.com".into());
        settings.session_idle_timeout = Some("12 parsecs".into());
        settings.cookie_samesite = Some("none".into());
        settings.database_url = Some("mysql://u:dbpass@db".into());
        settings.api_routes = Some("orders=https://user:apipass@orders.internal?x=1".into());
        settings.api_timeout = Some("soon".into());
        settings.database_timeout = Some("0s".into());
        let text = Config::from_settings(&settings).unwrap_err().to_string();
        assert!(
            text.contains("BROKER_API_ROUTES: route `orders` needs an absolute http(s) URL"),
            "{text}"
        );
        assert!(text.contains("BROKER_API_TIMEOUT:"), "{text}");
        assert!(
            text.contains("BROKER_DATABASE_TIMEOUT: must be longer than zero"),
            "{text}"
        );
        assert!(!text.contains("apipass"));
        assert!(
            text.contains("BROKER_ENCRYPTION_KEYS: key 1 decodes to 5 bytes"),
            "{text}"
        );
        assert!(
            text.contains("BROKER_ENCRYPTION_KEYS: key 2 is not valid base64"),
            "{text}"
        );
        assert!(
            text.contains("BROKER_OIDC_ISSUER: must be an https URL"),
            "{text}"
        );
        assert!(text.contains("BROKER_SESSION_IDLE_TIMEOUT:"), "{text}");
        assert!(text.contains("BROKER_COOKIE_SAMESITE:"), "{text}");
        assert!(
            text.contains("DATABASE_URL: must be a postgres:// URL"),
            "{text}"
        );
        assert!(!text.contains("dbpass"));
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let config = Config::from_settings(&valid()).unwrap();
        let printed = format!("{config:?}");
        for secret in [
            "s3cr3t-value",
            "dbpass",
            "redispass",
            &config.encryption_keys[0].secret_base64(),
        ] {
            assert!(!printed.contains(secret), "{secret} leaked");
        }
    }

    #[test]
    fn the_shutdown_delay_defaults_to_zero_and_takes_a_duration() {
        let mut settings = valid();
        assert_eq!(
            Config::from_settings(&settings).unwrap().shutdown_delay,
            Duration::ZERO
        );
        settings.shutdown_delay = Some("0s".into());
        assert_eq!(
            Config::from_settings(&settings).unwrap().shutdown_delay,
            Duration::ZERO
        );
        settings.shutdown_delay = Some("5s".into());
        assert_eq!(
            Config::from_settings(&settings).unwrap().shutdown_delay,
            Duration::from_secs(5)
        );
        settings.shutdown_delay = Some("soon".into());
        let text = Config::from_settings(&settings).unwrap_err().to_string();
        assert!(text.contains("BROKER_SHUTDOWN_DELAY"), "{text}");
    }

    #[test]
    fn durations_and_routes_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("").is_err());
        let routes =
            parse_api_routes("orders=https://orders.internal/v1, users=http://users:8080").unwrap();
        assert_eq!(routes[1].name, "users");
        assert!(parse_api_routes("a=https://x,a=https://y").is_err());
        assert!(parse_api_routes("../x=https://x").is_err());
        assert!(parse_api_routes("Orders=https://x").is_err());
        assert!(parse_api_routes("a_b=https://x").is_err());
        for url in [
            "https://x/v1?debug=1",
            "https://x/v1#top",
            "https://user:pw@x/v1",
            "ftp://x/v1",
            "/v1",
        ] {
            assert!(parse_api_routes(&format!("a={url}")).is_err(), "{url}");
        }
        assert!(!format!("{:?}", parse_api_routes("a=https://user:pw@x")).contains("pw"));
    }

    #[test]
    fn plain_http_issuer_is_allowed_on_loopback_only() {
        let mut settings = valid();
        settings.oidc_issuer = Some("http://127.0.0.1:9000".into());
        assert!(Config::from_settings(&settings).is_ok());
        settings.oidc_issuer = Some("http://localhost:9000/realm".into());
        assert!(Config::from_settings(&settings).is_ok());
    }

    #[test]
    fn redis_url_may_name_a_server_a_cluster_or_a_sentinel_master() {
        let mut settings = valid();
        for url in [
            "redis://:redispass@redis:6380/1",
            "redis+cluster://:redispass@a:7000,b:7001",
            "redis://:redispass@a:7000,redis://:redispass@b:7001",
            "redis+sentinel://:redispass@s1:26379,s2:26379/mymaster/2",
        ] {
            settings.redis_url = Some(url.into());
            assert!(Config::from_settings(&settings).is_ok(), "{url}");
        }
        for url in [
            "memcached://:redispass@x",
            "redis+sentinel://:redispass@s1:26379",
        ] {
            settings.redis_url = Some(url.into());
            let text = Config::from_settings(&settings).unwrap_err().to_string();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(text.starts_with("REDIS_URL: "), "{text}");
            assert!(!text.contains("redispass"), "{text}");
        }
    }
}
