//! The IdP's HTML pages: the login form, error pages and the signed-out page. Every value is escaped.

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#x27;"),
            c => escaped.push(c),
        }
    }
    escaped
}

const TITLE: &str = "token-broker development IdP — not for production";

const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f4f4f5;color:#18181b;margin:0}\
main{max-width:26rem;margin:4rem auto;background:#fff;border-radius:.5rem;padding:2rem;\
box-shadow:0 1px 3px rgba(0,0,0,.15)}\
h1{font-size:1.1rem;margin:0 0 .25rem}\
.warning{background:#fef3c7;color:#92400e;padding:.5rem .75rem;border-radius:.25rem;font-size:.85rem}\
.error{background:#fee2e2;color:#991b1b;padding:.5rem .75rem;border-radius:.25rem}\
label{display:block;margin:1rem 0 .25rem;font-weight:600}\
input[type=text]{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}\
.buttons{display:flex;gap:.5rem;margin-top:1rem}\
button{padding:.5rem 1rem;font-size:1rem;border-radius:.25rem;border:1px solid #a1a1aa;background:#fff}\
button[name=signin]{background:#2563eb;border-color:#2563eb;color:#fff}\
ul{font-size:.9rem;color:#52525b;padding-left:1.25rem}code{font-size:.85rem}";

/// A whole page: the common title and warning, then `body` (already HTML).
fn page(heading: &str, body: &str, head_extra: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\">{head_extra}\
         <title>{title}</title><style>{STYLE}</style></head>\n<body><main>\
         <h1>{heading}</h1><p class=\"warning\">{title}</p>\n{body}\n</main></body></html>\n",
        title = escape(TITLE),
        heading = escape(heading),
    )
}

/// An HTML response that is never cached and cannot be framed (the login form would be clickjackable).
pub(super) fn respond(status: StatusCode, html: String) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((CONTENT_TYPE, "text/html; charset=utf-8"))
        .insert_header((CACHE_CONTROL, "no-store"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(html)
}

/// A 400 page for requests that must not be answered with a redirect.
pub(super) fn error_page(message: &str) -> HttpResponse {
    let body = format!("<p class=\"error\">{}</p>", escape(message));
    respond(
        StatusCode::BAD_REQUEST,
        page("This request cannot be served", &body, ""),
    )
}

/// What the login form shows and carries.
pub(super) struct LoginForm<'a> {
    /// Absolute URL of the authorization endpoint the form posts to.
    pub action: &'a str,
    pub client_id: &'a str,
    /// Every authorization parameter, carried in hidden fields.
    pub hidden: Vec<(&'a str, &'a str)>,
    /// The claims the ID token will carry, with what they will say.
    pub claims: Vec<(&'static str, &'static str)>,
    pub username: &'a str,
    pub error: Option<&'a str>,
}

pub(super) fn login_page(form: &LoginForm<'_>) -> String {
    let error = form
        .error
        .map(|message| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(message)))
        .unwrap_or_default();
    let hidden: String = form
        .hidden
        .iter()
        .map(|(name, value)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                escape(name),
                escape(value)
            )
        })
        .collect();
    let claims: String = form
        .claims
        .iter()
        .map(|(claim, meaning)| format!("<li><code>{claim}</code>: {}</li>", escape(meaning)))
        .collect();
    let body = format!(
        "<p>Sign in to <strong>{client}</strong> as any user: there is no password.</p>{error}\
         <form method=\"post\" action=\"{action}\">{hidden}\
         <label for=\"username\">User name</label>\
         <input type=\"text\" id=\"username\" name=\"username\" value=\"{username}\" required \
         maxlength=\"64\" pattern=\"[A-Za-z0-9._@\\-]{{1,64}}\" autocomplete=\"username\" autofocus>\
         <div class=\"buttons\"><button type=\"submit\" name=\"signin\" value=\"1\">Sign in</button>\
         <button type=\"submit\" name=\"cancel\" value=\"1\" formnovalidate>Cancel</button></div></form>\
         <p>The ID token will carry:</p><ul>{claims}</ul>",
        client = escape(form.client_id),
        action = escape(form.action),
        username = escape(form.username),
    );
    page("Sign in", &body, "")
}

/// The end of RP-Initiated Logout: a notice, then back to the client when it named a place.
pub(super) fn signed_out_page(redirect: Option<&str>) -> String {
    match redirect {
        Some(url) => {
            let url = escape(url);
            let refresh = format!("<meta http-equiv=\"refresh\" content=\"1;url={url}\">");
            let body = format!("<p>You are signed out.</p><p><a href=\"{url}\">Continue</a></p>");
            page("You are signed out", &body, &refresh)
        }
        None => page(
            "You are signed out",
            "<p>You are signed out. You may close this window.</p>",
            "",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_elements_and_both_quote_styles() {
        assert_eq!(
            escape(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#x27;y&#x27;)&lt;/script&gt;"
        );
        assert_eq!(escape("plain élan"), "plain élan");
    }

    #[test]
    fn the_login_page_escapes_every_value_it_shows_or_carries() {
        let evil = "\"><script>alert(1)</script>";
        let form = LoginForm {
            action: "http://idp.test/authorize",
            client_id: evil,
            hidden: vec![("state", evil), (evil, "x")],
            claims: vec![("sub", "the user name")],
            username: evil,
            error: Some(evil),
        };
        let html = login_page(&form);
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("value=\"&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""),
            "{html}"
        );
        assert!(html.contains("method=\"post\" action=\"http://idp.test/authorize\""));
        assert!(html.contains(">Sign in</button>") && html.contains(">Cancel</button>"));
        assert!(html.contains("not for production"));
    }

    #[test]
    fn the_signed_out_page_escapes_its_link() {
        let html = signed_out_page(Some("http://app.test/?a=1&state=\"x"));
        assert!(
            html.contains("href=\"http://app.test/?a=1&amp;state=&quot;x\""),
            "{html}"
        );
        assert!(
            html.contains("url=http://app.test/?a=1&amp;state=&quot;x\""),
            "{html}"
        );
    }
}
