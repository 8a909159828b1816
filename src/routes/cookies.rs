//! The two cookies: the session cookie and the login-binding cookie.
//!
//! Over https they carry the `__Host-` prefix (Secure, Path=/, no Domain: no sibling subdomain can
//! set or shadow them); over plain http (local development) they are unprefixed and not Secure.
//! The session cookie is `SameSite` as configured; the binding cookie is always `Lax`, because
//! it must come back on the IdP's cross-site redirect to `/callback`.

use actix_web::cookie::{time, Cookie, SameSite as CookieSameSite};
use actix_web::HttpRequest;

use crate::config::{Config, SameSite};
use crate::domain::{LoginBinding, SessionId};

/// At most this many bytes of `Cookie` header are looked at.
const MAX_COOKIE_HEADER: usize = 8 * 1024;

pub fn session_cookie_name(config: &Config) -> &'static str {
    if config.is_https() {
        "__Host-session"
    } else {
        "session"
    }
}

pub fn binding_cookie_name(config: &Config) -> &'static str {
    if config.is_https() {
        "__Host-login-binding"
    } else {
        "login-binding"
    }
}

/// The value of the first cookie called `name`. Parsed leniently by hand: one malformed cookie
/// from another app on the same site must not hide ours (actix rejects the whole header then).
pub fn read_cookie<'a>(request: &'a HttpRequest, name: &str) -> Option<&'a str> {
    find_cookie(
        request
            .headers()
            .get_all(actix_web::http::header::COOKIE)
            .filter_map(|value| value.to_str().ok()),
        name,
    )
}

/// [`read_cookie`] on the `Cookie` header values as strings (also the fuzz target's entry point).
pub(crate) fn find_cookie<'a>(
    header_values: impl IntoIterator<Item = &'a str>,
    name: &str,
) -> Option<&'a str> {
    header_values
        .into_iter()
        .filter(|value| value.len() <= MAX_COOKIE_HEADER)
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

pub fn read_session(request: &HttpRequest, config: &Config) -> Option<SessionId> {
    read_cookie(request, session_cookie_name(config)).and_then(SessionId::parse)
}

pub fn read_binding(request: &HttpRequest, config: &Config) -> Option<LoginBinding> {
    read_cookie(request, binding_cookie_name(config)).and_then(LoginBinding::parse)
}

fn seconds(duration: std::time::Duration) -> time::Duration {
    time::Duration::seconds(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX))
}

fn base<'c>(config: &Config, name: &'static str, value: String) -> Cookie<'c> {
    let mut cookie = Cookie::new(name, value);
    cookie.set_path("/");
    cookie.set_http_only(true);
    cookie.set_secure(config.is_https());
    cookie
}

pub fn session_cookie<'c>(config: &Config, id: &SessionId) -> Cookie<'c> {
    let mut cookie = base(config, session_cookie_name(config), id.secret().to_string());
    cookie.set_same_site(match config.cookie_same_site {
        SameSite::Strict => CookieSameSite::Strict,
        SameSite::Lax => CookieSameSite::Lax,
    });
    cookie.set_max_age(seconds(config.session_max_lifetime));
    cookie
}

pub fn expired_session_cookie<'c>(config: &Config) -> Cookie<'c> {
    let mut cookie = session_cookie(config, &SessionId::generate());
    cookie.set_value("");
    cookie.set_max_age(time::Duration::ZERO);
    cookie
}

pub fn binding_cookie<'c>(config: &Config, binding: &LoginBinding) -> Cookie<'c> {
    let mut cookie = base(
        config,
        binding_cookie_name(config),
        binding.secret().to_string(),
    );
    cookie.set_same_site(CookieSameSite::Lax);
    cookie.set_max_age(seconds(config.login_ttl));
    cookie
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn a_malformed_neighbour_does_not_hide_our_cookie() {
        let request = TestRequest::default()
            .insert_header(("cookie", "broken; theme=\"dark; session=abc; x=1"))
            .to_http_request();
        assert_eq!(read_cookie(&request, "session"), Some("abc"));
        assert_eq!(read_cookie(&request, "missing"), None);
        let huge = format!("session={}", "a".repeat(20_000));
        let request = TestRequest::default()
            .insert_header(("cookie", huge))
            .to_http_request();
        assert_eq!(read_cookie(&request, "session"), None);
    }
}
