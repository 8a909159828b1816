//! Response-header helpers shared by the load-generating examples (`soak`, `bench_support`).

use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};

/// The value of the cookie `name` that the response sets, if it sets a non-empty one.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| value.split(';').next())
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value.to_string())
}

/// The `Location` header, or "".
pub fn location(headers: &HeaderMap) -> String {
    headers
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
