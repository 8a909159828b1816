//! `return_to`: where a finished login sends the browser. The open-redirect guard lives here.
//!
//! A `return_to` is accepted when it is a relative path (resolved against the first allowed origin)
//! or an absolute `http(s)` URL whose origin is exactly one of `BROKER_ALLOWED_ORIGINS`. The check
//! runs on the URL as the WHATWG parser (the one browsers use) understands it, after rejecting the
//! characters browsers silently strip or reinterpret (`\`, tabs, newlines, other controls, spaces),
//! so `//evil`, `/\evil`, `https:evil` and their encoded or mixed-case variants cannot slip through.

use url::Url;

const MAX_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReturnToError {
    #[error("return_to is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("return_to contains a character that browsers reinterpret")]
    ForbiddenCharacter,
    #[error("return_to is not a path or an absolute URL")]
    Unparseable,
    #[error("return_to is not on an allowed origin")]
    ForeignOrigin,
}

/// The frontend origins of `BROKER_ALLOWED_ORIGINS`, normalised (`https://app.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigins {
    origins: Vec<Url>,
}

impl AllowedOrigins {
    /// Parses the comma-separated configuration value; the error names the offending entry.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut origins = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let url = Url::parse(entry).map_err(|_| format!("`{entry}` is not a URL"))?;
            let is_bare_origin = matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.username().is_empty()
                && url.password().is_none()
                && url.path() == "/"
                && url.query().is_none()
                && url.fragment().is_none();
            if !is_bare_origin {
                return Err(format!(
                    "`{entry}` is not an origin (scheme://host[:port], no path)"
                ));
            }
            origins.push(url);
        }
        if origins.is_empty() {
            return Err("must name at least one origin".into());
        }
        Ok(Self { origins })
    }

    /// Whether an `Origin` header value is exactly one of the allowed origins, serialized as
    /// browsers send it (`scheme://host[:port]`); anything that merely parses to one is refused.
    pub fn contains_origin(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|allowed| allowed.origin().ascii_serialization() == origin)
    }

    fn contains_url_origin(&self, url: &Url) -> bool {
        self.origins
            .iter()
            .any(|allowed| allowed.origin() == url.origin())
    }

    /// The first origin: the base for relative `return_to` paths and the default landing place.
    pub fn first(&self) -> &Url {
        &self.origins[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = String> + '_ {
        self.origins
            .iter()
            .map(|url| url.origin().ascii_serialization())
    }
}

/// A validated, absolute landing URL on an allowed origin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ReturnTo(Url);

impl ReturnTo {
    pub fn parse(raw: &str, allowed: &AllowedOrigins) -> Result<Self, ReturnToError> {
        if raw.len() > MAX_LEN {
            return Err(ReturnToError::TooLong);
        }
        // Browsers drop tabs and newlines inside URLs and treat `\` as `/` in special schemes:
        // `/\evil` and `/<TAB>/evil` both become `//evil`. Refuse them rather than guess.
        if raw
            .chars()
            .any(|c| c == '\\' || c.is_control() || c.is_whitespace())
        {
            return Err(ReturnToError::ForbiddenCharacter);
        }
        let url = if raw.starts_with('/') {
            if raw.starts_with("//") {
                return Err(ReturnToError::ForeignOrigin);
            }
            allowed
                .first()
                .join(raw)
                .map_err(|_| ReturnToError::Unparseable)?
        } else {
            Url::parse(raw).map_err(|_| ReturnToError::Unparseable)?
        };
        if !matches!(url.scheme(), "http" | "https")
            || !url.username().is_empty()
            || url.password().is_some()
            || !allowed.contains_url_origin(&url)
        {
            return Err(ReturnToError::ForeignOrigin);
        }
        Ok(Self(url))
    }

    /// The landing page of a login without `return_to`.
    pub fn from_trusted(url: Url) -> Self {
        Self(url)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The same URL with `login_error=<code>` set, for a failed login.
    pub fn with_login_error(&self, code: &str) -> String {
        let mut url = self.0.clone();
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(key, _)| key != "login_error")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(kept)
            .append_pair("login_error", code);
        url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> AllowedOrigins {
        AllowedOrigins::parse("https://app.example.com, http://localhost:3000").unwrap()
    }

    #[test]
    fn relative_paths_resolve_against_the_first_origin() {
        let to = ReturnTo::parse("/dashboard?tab=1#top", &allowed()).unwrap();
        assert_eq!(to.as_str(), "https://app.example.com/dashboard?tab=1#top");
        let encoded = ReturnTo::parse("/%2F%2Fevil.com", &allowed()).unwrap();
        assert_eq!(encoded.as_str(), "https://app.example.com/%2F%2Fevil.com");
    }

    #[test]
    fn absolute_urls_on_allowed_origins_pass() {
        for ok in [
            "https://app.example.com/",
            "https://APP.Example.com/x",
            "https://app.example.com:443/x",
            "http://localhost:3000/cb",
        ] {
            assert!(ReturnTo::parse(ok, &allowed()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn open_redirect_strings_are_refused() {
        let attacks = [
            "//evil.com",
            "///evil.com",
            "////evil.com/x",
            "/\\evil.com",
            "\\\\evil.com",
            "/\t/evil.com",
            "/\n/evil.com",
            "https:evil.com",
            "https:/evil.com",
            "HTTPS://EVIL.COM",
            "hTtPs://evil.com",
            "https://evil.com",
            "https://app.example.com@evil.com",
            "https://app.example.com.evil.com/",
            "https://evil.com#@app.example.com",
            "https://evil.com\\@app.example.com",
            "https://user:pass@app.example.com/",
            "http://app.example.com/",
            "https://app.example.com:8443/",
            "javascript:alert(1)",
            "JaVaScRiPt:alert(document.cookie)",
            "data:text/html,<script>alert(1)</script>",
            "%2F%2Fevil.com",
            "%252F%252Fevil.com",
            " https://evil.com",
            "https://аpp.example.com/",
            "evil.com",
            "ftp://app.example.com/",
            "http://localhost:3001/",
            "http://127.0.0.1:3000/",
        ];
        for attack in attacks {
            assert!(
                ReturnTo::parse(attack, &allowed()).is_err(),
                "accepted {attack:?}"
            );
        }
        assert_eq!(
            ReturnTo::parse(&format!("/{}", "a".repeat(3000)), &allowed()),
            Err(ReturnToError::TooLong)
        );
    }

    #[test]
    fn login_error_replaces_an_earlier_one() {
        let to = ReturnTo::parse("/app?x=1&login_error=old", &allowed()).unwrap();
        assert_eq!(
            to.with_login_error("access_denied"),
            "https://app.example.com/app?x=1&login_error=access_denied"
        );
    }

    #[test]
    fn allowed_origins_reject_paths_and_garbage() {
        assert!(AllowedOrigins::parse("").is_err());
        assert!(AllowedOrigins::parse("https://a.example/path").is_err());
        assert!(AllowedOrigins::parse("not a url").is_err());
        assert!(AllowedOrigins::parse("ftp://a.example").is_err());
        let origins = AllowedOrigins::parse("https://a.example/").unwrap();
        assert!(origins.contains_origin("https://a.example"));
        assert!(!origins.contains_origin("https://a.example.evil"));
        assert!(!origins.contains_origin("null"));
        for forged in [
            "https://a.example/",
            "https://x@a.example",
            "https://a.example/p?q",
            "HTTPS://A.EXAMPLE",
        ] {
            assert!(!origins.contains_origin(forged), "{forged}");
        }
    }
}
