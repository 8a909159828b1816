//! Client authentication at the token and revocation endpoints (RFC 6749 §2.3).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::oauth::{secrets_equal, ErrorCode, OAuthError, Params};
use super::Client;

/// Authenticates the client by one of its configured methods: `client_secret_basic`,
/// `client_secret_post` or `none`. Any failure is `invalid_client` (401).
pub(super) fn authenticate(
    client: &Client,
    authorization: Option<&str>,
    params: &Params,
) -> Result<(), OAuthError> {
    let refuse = |why: &str| Err(OAuthError::new(ErrorCode::InvalidClient, why));
    let allows = |method: &str| client.auth_methods.iter().any(|m| m == method);

    let (method, id, secret) = match authorization {
        Some(header) => {
            let Some((id, secret)) = decode_basic(header) else {
                return refuse("the Authorization header is not valid HTTP Basic");
            };
            // RFC 6749 §2.3: a client must not use more than one authentication method.
            if params.get("client_secret").is_some() {
                return refuse("client credentials in both the header and the body");
            }
            if params.get("client_id").is_some_and(|body_id| body_id != id) {
                return refuse("client_id in the body differs from the authenticated client");
            }
            ("client_secret_basic", id, Some(secret))
        }
        None => {
            let Some(id) = params.get("client_id") else {
                return refuse("no client authentication");
            };
            match params.get("client_secret") {
                Some(secret) => ("client_secret_post", id.to_owned(), Some(secret.to_owned())),
                None => ("none", id.to_owned(), None),
            }
        }
    };

    if !allows(method) {
        return refuse(&format!("the client may not authenticate with {method}"));
    }
    if id != client.id {
        return refuse("unknown client");
    }
    let authenticated = match (&client.secret, secret) {
        (Some(expected), Some(presented)) => secrets_equal(&presented, expected),
        (None, None) => true,
        _ => false,
    };
    if authenticated {
        Ok(())
    } else {
        refuse("wrong client credentials")
    }
}

/// Decodes `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn decode_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_urldecode(id)?, form_urldecode(secret)?))
}

/// The `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a byte.
fn form_urldecode(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut input = value.bytes();
    while let Some(byte) = input.next() {
        bytes.push(match byte {
            b'+' => b' ',
            b'%' => {
                let high = (input.next()? as char).to_digit(16)?;
                let low = (input.next()? as char).to_digit(16)?;
                u8::try_from(high * 16 + low).ok()?
            }
            other => other,
        });
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(secret: Option<&str>, methods: &[&str]) -> Client {
        Client {
            id: "my client".into(),
            secret: secret.map(str::to_owned),
            auth_methods: methods.iter().map(|m| m.to_string()).collect(),
            redirect_uris: vec![],
            post_logout_redirect_uris: vec![],
        }
    }

    fn basic(credentials: &str) -> String {
        format!("Basic {}", STANDARD.encode(credentials))
    }

    fn params(body: &str) -> Params {
        Params::parse(body.as_bytes()).expect("params")
    }

    const SECRET: &str = "p@ss:w+rd %/é";

    #[test]
    fn basic_credentials_are_form_urldecoded() {
        let confidential = client(Some(SECRET), &["client_secret_basic"]);
        // What RFC 6749 §2.3.1 requires a client to send for these credentials.
        let header = basic("my+client:p%40ss%3Aw%2Brd+%25%2F%C3%A9");
        assert_eq!(
            authenticate(&confidential, Some(&header), &params("")),
            Ok(())
        );
        // Clients that skip the encoding still work when the value has no special characters.
        let plain = client(Some("abc"), &["client_secret_basic"]);
        assert_eq!(
            authenticate(&plain, Some(&basic("my+client:abc")), &params("")),
            Ok(())
        );
    }

    #[test]
    fn wrong_or_misused_credentials_are_invalid_client() {
        let confidential = client(Some(SECRET), &["client_secret_basic"]);
        let refused = |header: Option<&str>, body: &str| {
            authenticate(&confidential, header, &params(body)).map_err(|e| e.code)
        };
        let good = basic("my+client:p%40ss%3Aw%2Brd+%25%2F%C3%A9");
        assert_eq!(
            refused(Some(&basic("my+client:nope")), ""),
            Err(ErrorCode::InvalidClient)
        );
        assert_eq!(
            refused(Some(&basic("other:p%40ss%3Aw%2Brd+%25%2F%C3%A9")), ""),
            Err(ErrorCode::InvalidClient)
        );
        assert_eq!(
            refused(Some("Bearer abc"), ""),
            Err(ErrorCode::InvalidClient)
        );
        assert_eq!(
            refused(Some("Basic %%%"), ""),
            Err(ErrorCode::InvalidClient)
        );
        assert_eq!(
            refused(Some(&good), "client_secret=x"),
            Err(ErrorCode::InvalidClient)
        );
        assert_eq!(
            refused(None, "client_id=my+client"),
            Err(ErrorCode::InvalidClient),
            "no secret"
        );
        let post = "client_id=my+client&client_secret=p%40ss%3Aw%2Brd+%25%2F%C3%A9";
        assert_eq!(
            refused(None, post),
            Err(ErrorCode::InvalidClient),
            "post is not enabled"
        );
        assert_eq!(refused(None, ""), Err(ErrorCode::InvalidClient));
    }

    #[test]
    fn client_secret_post_and_public_clients() {
        let confidential = client(Some(SECRET), &["client_secret_basic", "client_secret_post"]);
        let post = "client_id=my+client&client_secret=p%40ss%3Aw%2Brd+%25%2F%C3%A9";
        assert_eq!(authenticate(&confidential, None, &params(post)), Ok(()));

        let public = client(None, &["none"]);
        assert_eq!(
            authenticate(&public, None, &params("client_id=my+client")),
            Ok(())
        );
        let with_secret = authenticate(
            &public,
            None,
            &params("client_id=my+client&client_secret=x"),
        );
        assert_eq!(
            with_secret.map_err(|e| e.code),
            Err(ErrorCode::InvalidClient)
        );
    }

    #[test]
    fn form_urldecoding_rejects_broken_escapes() {
        assert_eq!(form_urldecode("a+b%20c%2b").as_deref(), Some("a b c+"));
        assert_eq!(form_urldecode("%4"), None);
        assert_eq!(form_urldecode("%zz"), None);
        assert_eq!(form_urldecode("%FF"), None, "not UTF-8");
    }
}
