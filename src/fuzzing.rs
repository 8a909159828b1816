//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API: hidden from the docs).
//!
//! Each takes arbitrary input, runs one parser the broker applies to untrusted (or operator-given)
//! text, and checks the invariants that must hold on whatever it accepts. A panic is a finding: the
//! parser itself must never panic, and neither may these checks.

use actix_web::web;

use crate::domain::{AllowedOrigins, LoginBinding, ReturnTo, SessionId};
use crate::routes::login::CallbackQuery;
use crate::store::redis::topology::RedisTopology;

/// `Cookie` header values (split on `\n`, as if the request carried several headers) → the session
/// and login-binding cookies, as `routes::cookies` reads them.
pub fn cookies(input: &str) {
    for name in [
        "session",
        "__Host-session",
        "login-binding",
        "__Host-login-binding",
    ] {
        let Some(value) = crate::routes::cookies::find_cookie(input.split('\n'), name) else {
            continue;
        };
        if let Some(id) = SessionId::parse(value) {
            assert_eq!(id.secret(), value);
            let _ = id.hash();
        }
        if let Some(binding) = LoginBinding::parse(value) {
            assert_eq!(binding.secret(), value);
            let _ = binding.hash();
        }
    }
}

/// `return_to` against a fixed allow-list: whatever is accepted is an http(s) URL on an allowed
/// origin, without credentials, and stays on it once `login_error` is added.
pub fn return_to(input: &str) {
    #[allow(clippy::expect_used)] // a constant list
    let allowed = AllowedOrigins::parse("https://app.example.com,http://127.0.0.1:5173")
        .expect("a valid constant");
    let Ok(return_to) = ReturnTo::parse(input, &allowed) else {
        return;
    };
    let url = url::Url::parse(return_to.as_str());
    assert!(url.is_ok(), "an accepted return_to re-parses");
    let Ok(url) = url else { return };
    assert!(matches!(url.scheme(), "http" | "https"));
    assert!(url.username().is_empty() && url.password().is_none());
    assert!(allowed.contains_origin(&url.origin().ascii_serialization()));
    let with_error = url::Url::parse(&return_to.with_login_error("access_denied"));
    assert!(with_error.is_ok_and(|u| u.origin() == url.origin()));
}

/// The `/callback` query string: deserialised as actix does (`serde_urlencoded`), then checked.
pub fn callback_query(input: &str) {
    if let Ok(query) = web::Query::<CallbackQuery>::from_query(input) {
        let _ = query.into_inner().parse();
    }
}

/// A compact JWS's header (`alg`, `kid`), read before any key is looked up.
pub fn jwt_header(input: &str) {
    let _ = crate::oidc::jws::read_header(input);
}

/// `REDIS_URL`: never panics; an error never repeats the URL's password (checked by planting one
/// in the input's first `://`).
pub fn redis_url(input: &str) {
    let _ = RedisTopology::parse(input);
    const PASSWORD: &str = "fuzz-Pa55word";
    let planted = input.replacen("://", &format!("://user:{PASSWORD}@"), 1);
    if let Err(message) = RedisTopology::parse(&planted) {
        assert!(
            !message.contains(PASSWORD),
            "the error repeats the password"
        );
    }
}

#[cfg(test)]
mod tests {
    /// Every committed seed (fuzz/corpus/<target>/*) runs through its entry point in the ordinary
    /// test run too, without cargo-fuzz.
    #[test]
    fn the_committed_fuzz_seeds_pass_their_targets() {
        type Entry = fn(&str);
        let targets: [(&str, Entry); 5] = [
            ("cookies", super::cookies),
            ("return_to", super::return_to),
            ("callback_query", super::callback_query),
            ("jwt_header", super::jwt_header),
            ("redis_url", super::redis_url),
        ];
        for (name, entry) in targets {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(name);
            let mut seeds = 0;
            for file in std::fs::read_dir(&dir).unwrap() {
                let bytes = std::fs::read(file.unwrap().path()).unwrap();
                if let Ok(input) = std::str::from_utf8(&bytes) {
                    entry(input);
                    seeds += 1;
                }
            }
            assert!(seeds > 0, "no seeds in {}", dir.display());
        }
    }

    /// Found by the `redis_url` target: the error for a bare scheme names the schemes, which the
    /// first version of the check took for the URL being repeated (a false alarm in the check).
    #[test]
    fn a_bare_scheme_is_an_error_that_names_the_schemes_but_no_password() {
        super::redis_url("redis+cluster");
        super::redis_url("redis+cluster://");
        super::redis_url("redis+sentinel://a:1");
    }
}
