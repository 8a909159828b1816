//! The broker's own opaque random values: session IDs, login `state`, and login-binding tokens.
//!
//! Each is 256 bits from the OS CSPRNG in base64url (43 characters). Parsing accepts exactly that
//! shape, so an oversized or malformed cookie or query value is rejected before it reaches a store.
//! Only hashes of session IDs and binding tokens are ever stored (SPEC "Data").

use crate::crypto::{random_token, sha256};

const TOKEN_LEN: usize = 43;

fn is_token_shaped(value: &str) -> bool {
    value.len() == TOKEN_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The session cookie's value. `Debug` is redacted; the value leaves only through `secret()`.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionId(String);

impl SessionId {
    pub fn generate() -> Self {
        Self(random_token())
    }

    pub fn parse(value: &str) -> Option<Self> {
        is_token_shaped(value).then(|| Self(value.to_string()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the ID: what Redis keys and PostgreSQL rows are keyed by.
    pub fn hash(&self) -> SessionIdHash {
        SessionIdHash(sha256(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId([redacted])")
    }
}

/// SHA-256 of a session ID. Not a secret: it cannot be turned back into a cookie.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionIdHash(pub [u8; 32]);

impl SessionIdHash {
    /// Lowercase hex. Built by hand: it names the Redis keys of every request.
    pub fn to_hex(&self) -> String {
        let mut hex = String::with_capacity(64);
        self.push_hex(&mut hex);
        hex
    }

    /// Appends [`SessionIdHash::to_hex`] to `out`.
    pub fn push_hex(&self, out: &mut String) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        // Into a buffer, then one copy: a `push` per digit was 1k instructions a key, and every
        // `/auth` names two keys.
        let mut hex = [0u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SessionIdHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A prefix is enough to correlate log lines.
        write!(f, "SessionIdHash({}…)", &self.to_hex()[..12])
    }
}

/// The OAuth `state` of a pending login: the key under which it waits in Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct State(String);

impl State {
    pub fn generate() -> Self {
        Self(random_token())
    }

    /// Only states of the shape the broker issues are looked up.
    pub fn parse(value: &str) -> Option<Self> {
        is_token_shaped(value).then(|| Self(value.to_string()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The Redis key part: a hash, so a Redis dump does not list usable states.
    pub fn storage_key(&self) -> String {
        sha256(self.0.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State([redacted])")
    }
}

/// The login-binding cookie's value: ties a pending login to the browser that started it.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginBinding(String);

impl LoginBinding {
    pub fn generate() -> Self {
        Self(random_token())
    }

    pub fn parse(value: &str) -> Option<Self> {
        is_token_shaped(value).then(|| Self(value.to_string()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }

    /// What the pending login records: the hash, never the cookie value.
    pub fn hash(&self) -> [u8; 32] {
        sha256(self.0.as_bytes())
    }
}

impl std::fmt::Debug for LoginBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginBinding([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_values_parse_back() {
        let id = SessionId::generate();
        assert_eq!(SessionId::parse(id.secret()), Some(id.clone()));
        assert!(State::parse(State::generate().secret()).is_some());
        assert!(LoginBinding::parse(LoginBinding::generate().secret()).is_some());
    }

    #[test]
    fn malformed_values_are_rejected() {
        let too_long = "a".repeat(44);
        let bad = [
            "",
            "short",
            too_long.as_str(),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaé",
            "aaaaaaaaaaaaaaaaaaaaa aaaaaaaaaaaaaaaaaaaaa",
        ];
        for value in bad {
            assert!(SessionId::parse(value).is_none(), "{value:?}");
            assert!(State::parse(value).is_none(), "{value:?}");
        }
    }

    #[test]
    fn hashes_are_stable_and_debug_is_redacted() {
        let id = SessionId::generate();
        assert_eq!(id.hash(), id.hash());
        assert_eq!(id.hash().to_hex().len(), 64);
        let mut bytes = [0u8; 32];
        bytes[0] = 0x0f;
        bytes[31] = 0xa9;
        let hex = SessionIdHash(bytes).to_hex();
        assert!(hex.starts_with("0f00") && hex.ends_with("00a9"));
        let every_byte: [u8; 32] = std::array::from_fn(|i| (i * 8 + 3) as u8);
        let expected: String = every_byte.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(SessionIdHash(every_byte).to_hex(), expected);
        let mut appended = String::from("session:{");
        SessionIdHash(every_byte).push_hex(&mut appended);
        assert_eq!(appended, format!("session:{{{expected}"));
        assert!(!format!("{id:?}").contains(id.secret()));
        let state = State::generate();
        assert!(!state.storage_key().contains(state.secret()));
        assert!(!format!("{state:?}").contains(state.secret()));
    }
}
