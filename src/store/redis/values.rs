//! The byte layout of the session cache's values: a session's view (`session:{…}`) and its
//! access token (`at:{…}`), sealed under the Redis key as associated data.
//!
//! Written as `0x02` followed by [`Cipher::seal_binary_into`] of a fixed binary layout: no JSON
//! to parse or write, no base64, on the path of every cached `/session` and `/auth` (opening the
//! values was a sixth and a quarter of those requests' instructions, mostly base64 and JSON). Read in that form and in the one
//! earlier versions wrote (`<key id>.<base64url>` of sealed JSON, whose first byte is a hex
//! digit), so replicas of both versions share one Redis during a rolling upgrade. A replica of
//! the earlier version takes a value of this form for an unreadable entry, a miss: it reads the
//! session's row (the access token under the refresh lease) and caches the earlier form again.
//!
//! Layouts (integers little-endian; a time is `i64` seconds since the epoch, then `u32`
//! nanoseconds):
//! - view: session id (16 bytes), created, last seen, absolute expiry (12 bytes each), the
//!   length of `sub` (`u32`), `sub`, then the user's claims as the JSON object `/session` returns.
//! - access token: expiry, refresh-from (12 bytes each), then the token.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::crypto::Cipher;
use crate::domain::{AccessToken, UserClaims};
use crate::store::{CachedAccessToken, CachedSession};

/// The first byte of a value in the binary form; the earlier form starts with a hex digit.
const BINARY_FORM: u8 = 0x02;

/// Seals a session's view for `key`.
pub(super) fn seal_session(cipher: &Cipher, key: &str, session: &CachedSession) -> Vec<u8> {
    let sub = session.user.sub().as_bytes();
    let json = session.user.json().as_bytes();
    let mut plain = Vec::with_capacity(16 + 3 * 12 + 4 + sub.len() + json.len());
    plain.extend_from_slice(session.id.as_bytes());
    for time in [session.created_at, session.last_seen_at, session.expires_at] {
        push_time(&mut plain, time);
    }
    plain.extend_from_slice(&u32::try_from(sub.len()).unwrap_or(u32::MAX).to_le_bytes());
    plain.extend_from_slice(sub);
    plain.extend_from_slice(json);
    seal(cipher, key, &plain)
}

/// Opens a session's view read from `key`, in either form.
pub(super) fn open_session(
    cipher: &Cipher,
    key: &str,
    value: &[u8],
) -> Result<CachedSession, String> {
    open(cipher, key, value, |mut reader| {
        let id = Uuid::from_slice(reader.take(16)?).map_err(|e| e.to_string())?;
        let (created_at, last_seen_at, expires_at) =
            (reader.time()?, reader.time()?, reader.time()?);
        let sub_len = u32::from_le_bytes(reader.array()?);
        let sub = reader.text(usize::try_from(sub_len).map_err(|e| e.to_string())?)?;
        let json = reader.text(reader.0.len())?;
        Ok(CachedSession {
            id,
            user: UserClaims::from_stored_parts(sub, json)?,
            created_at,
            last_seen_at,
            expires_at,
        })
    })
}

/// Seals an access token and its times for `key`.
pub(super) fn seal_access_token(cipher: &Cipher, key: &str, token: &CachedAccessToken) -> Vec<u8> {
    let secret = token.token.secret().as_bytes();
    let mut plain = Vec::with_capacity(2 * 12 + secret.len());
    push_time(&mut plain, token.expires_at);
    push_time(&mut plain, token.refresh_at);
    plain.extend_from_slice(secret);
    seal(cipher, key, &plain)
}

/// Opens an access token read from `key`, in either form.
pub(super) fn open_access_token(
    cipher: &Cipher,
    key: &str,
    value: &[u8],
) -> Result<CachedAccessToken, String> {
    open(cipher, key, value, |mut reader| {
        let (expires_at, refresh_at) = (reader.time()?, reader.time()?);
        let token = reader.text(reader.0.len())?;
        Ok(CachedAccessToken {
            token: AccessToken::new(token),
            expires_at,
            refresh_at,
        })
    })
}

/// Opens `value` read from `key`: the binary form through `decode`, the earlier form as JSON.
fn open<T: DeserializeOwned>(
    cipher: &Cipher,
    key: &str,
    value: &[u8],
    decode: impl FnOnce(Reader<'_>) -> Result<T, String>,
) -> Result<T, String> {
    let Some(sealed) = binary(value) else {
        let json = cipher
            .open_string(value, key.as_bytes())
            .map_err(|e| e.to_string())?;
        return serde_json::from_slice(&json).map_err(|e| e.to_string());
    };
    let plain = cipher
        .open_binary(sealed, key.as_bytes())
        .map_err(|e| e.to_string())?;
    decode(Reader(&plain))
}

fn seal(cipher: &Cipher, key: &str, plain: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(plain.len() + 64);
    value.push(BINARY_FORM);
    cipher.seal_binary_into(&mut value, plain, key.as_bytes());
    value
}

/// The sealed bytes of a value in the binary form; `None` for the earlier form.
fn binary(value: &[u8]) -> Option<&[u8]> {
    value
        .split_first()
        .filter(|(form, _)| **form == BINARY_FORM)
        .map(|(_, sealed)| sealed)
}

fn push_time(plain: &mut Vec<u8>, time: DateTime<Utc>) {
    plain.extend_from_slice(&time.timestamp().to_le_bytes());
    plain.extend_from_slice(&time.timestamp_subsec_nanos().to_le_bytes());
}

/// Reads a plaintext front to back; running past its end is an error, never a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        if self.0.len() < len {
            return Err("the cached value is truncated".into());
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self.take(N)?;
        bytes
            .try_into()
            .map_err(|_| "the cached value is truncated".into())
    }

    fn time(&mut self) -> Result<DateTime<Utc>, String> {
        let seconds = i64::from_le_bytes(self.array()?);
        let nanos = u32::from_le_bytes(self.array()?);
        DateTime::from_timestamp(seconds, nanos)
            .ok_or_else(|| "a cached time is out of range".into())
    }

    fn text(&mut self, len: usize) -> Result<String, String> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::EncryptionKey;

    fn cipher() -> Cipher {
        Cipher::new(&[EncryptionKey::generate()])
    }

    fn session() -> CachedSession {
        let at = |s| DateTime::from_timestamp(s, 123_456_789).unwrap();
        CachedSession {
            id: Uuid::new_v4(),
            user: UserClaims::select(
                "al\"ice".into(),
                serde_json::json!({"name": "Ålice", "email_verified": true})
                    .as_object()
                    .unwrap(),
            ),
            created_at: at(1_700_000_000),
            last_seen_at: at(1_700_000_060),
            expires_at: at(1_700_600_000),
        }
    }

    fn token() -> CachedAccessToken {
        CachedAccessToken {
            token: AccessToken::new("eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
            expires_at: DateTime::from_timestamp(1_700_003_600, 5).unwrap(),
            refresh_at: DateTime::from_timestamp(1_700_003_570, 0).unwrap(),
        }
    }

    fn assert_same_token(a: &CachedAccessToken, b: &CachedAccessToken) {
        assert_eq!(a.token.secret(), b.token.secret());
        assert_eq!((a.expires_at, a.refresh_at), (b.expires_at, b.refresh_at));
    }

    #[test]
    fn values_round_trip_to_the_nanosecond_and_hold_nothing_in_clear() {
        let cipher = cipher();
        let sealed = seal_session(&cipher, "s:{1}", &session());
        assert_eq!(sealed[0], BINARY_FORM);
        assert!(!sealed.windows(6).any(|w| w == "Ålice".as_bytes()));
        let opened = open_session(&cipher, "s:{1}", &sealed).unwrap();
        let expected = session();
        assert_eq!(opened.user, expected.user);
        assert_eq!(opened.user.sub(), "al\"ice");
        assert_eq!(
            (opened.created_at, opened.last_seen_at, opened.expires_at),
            (
                expected.created_at,
                expected.last_seen_at,
                expected.expires_at
            )
        );

        let sealed = seal_access_token(&cipher, "at:{1}", &token());
        assert!(!sealed.windows(10).any(|w| w == b"eyJhbGciOi"));
        assert_same_token(
            &open_access_token(&cipher, "at:{1}", &sealed).unwrap(),
            &token(),
        );
    }

    #[test]
    fn values_of_the_earlier_form_are_read() {
        // What earlier versions wrote: sealed JSON as `<key id>.<base64url>`.
        let cipher = cipher();
        let session = session();
        let json = serde_json::to_vec(&session).unwrap();
        let earlier = cipher.seal_to_string(&json, b"s:{1}");
        let opened = open_session(&cipher, "s:{1}", earlier.as_bytes()).unwrap();
        assert_eq!((opened.id, &opened.user), (session.id, &session.user));
        assert_eq!(opened.last_seen_at, session.last_seen_at);

        let json = serde_json::to_vec(&token()).unwrap();
        let earlier = cipher.seal_to_string(&json, b"at:{1}");
        assert_same_token(
            &open_access_token(&cipher, "at:{1}", earlier.as_bytes()).unwrap(),
            &token(),
        );
    }

    #[test]
    fn a_value_moved_to_another_key_or_tampered_with_does_not_open() {
        let cipher = cipher();
        let sealed = seal_session(&cipher, "s:{1}", &session());
        assert!(open_session(&cipher, "s:{2}", &sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(open_session(&cipher, "s:{1}", &tampered).is_err());
        let token = seal_access_token(&cipher, "at:{1}", &token());
        assert!(open_access_token(&cipher, "at:{2}", &token).is_err());
        // A session view is not an access token, nor the other way round, even under one key.
        assert!(open_access_token(&cipher, "s:{1}", &sealed).is_err());
        assert!(open_session(&cipher, "at:{1}", &token).is_err());
    }

    /// Every plaintext a key holder could seal that is not a whole value is refused: each
    /// truncation, bad UTF-8, a `sub` length past the end, claims that are not an object, a
    /// time out of range. An error, never a panic.
    #[test]
    fn malformed_plaintexts_are_refused_without_a_panic() {
        let cipher = cipher();
        let whole = {
            let sealed = seal_session(&cipher, "k", &session());
            cipher.open_binary(&sealed[1..], b"k").unwrap()
        };
        let sealed = |plain: &[u8]| seal(&cipher, "k", plain);
        for len in 0..whole.len() {
            // Cut inside the claims' JSON, the rest is not a JSON object.
            assert!(
                open_session(&cipher, "k", &sealed(&whole[..len])).is_err(),
                "{len} of {} bytes",
                whole.len()
            );
        }
        let sub_len_at = 16 + 3 * 12;
        let mut long_sub = whole.clone();
        long_sub[sub_len_at..sub_len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(open_session(&cipher, "k", &sealed(&long_sub)).is_err());
        let mut bad_utf8 = whole.clone();
        bad_utf8[sub_len_at + 4] = 0xff;
        assert!(open_session(&cipher, "k", &sealed(&bad_utf8)).is_err());
        let mut not_an_object = whole[..sub_len_at + 4 + "al\"ice".len()].to_vec();
        not_an_object.extend_from_slice(b"[\"alice\"]");
        assert!(open_session(&cipher, "k", &sealed(&not_an_object)).is_err());
        let mut far_future = whole.clone();
        far_future[16..24].copy_from_slice(&i64::MAX.to_le_bytes());
        assert!(open_session(&cipher, "k", &sealed(&far_future)).is_err());
        let mut bad_nanos = whole;
        bad_nanos[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(open_session(&cipher, "k", &sealed(&bad_nanos)).is_err());

        let token = {
            let sealed = seal_access_token(&cipher, "k", &token());
            cipher.open_binary(&sealed[1..], b"k").unwrap()
        };
        for len in 0..24 {
            assert!(open_access_token(&cipher, "k", &sealed(&token[..len])).is_err());
        }
        let mut bad_utf8 = token;
        bad_utf8[24] = 0xc3;
        assert!(open_access_token(&cipher, "k", &sealed(&bad_utf8)).is_err());
        // Not sealed at all, in either form.
        for junk in [
            &b""[..],
            b"\x02",
            b"\x02\x08abcdefgh",
            b"ended",
            b"\xff\xff",
        ] {
            assert!(open_session(&cipher, "k", junk).is_err());
            assert!(open_access_token(&cipher, "k", junk).is_err());
        }
    }
}
