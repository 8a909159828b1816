//! Randomness, hashing and encryption at rest.
//!
//! Everything secret that the broker stores (refresh and ID tokens in PostgreSQL, access tokens and
//! pending logins in Redis) is sealed with AES-256-GCM under the first key of
//! `BROKER_ENCRYPTION_KEYS`; every configured key can open. A sealed value carries the id of the key
//! that sealed it, and the caller passes associated data (the row or key it belongs to) so that a
//! ciphertext copied to another row does not open there.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;
/// AES-GCM's authentication tag.
const TAG_LEN: usize = 16;

/// base64url without padding, with SIMD where the CPU has it (detected once): every cached
/// `/session` and `/auth` decodes one or two sealed values of up to a few KiB.
fn sealed_engine() -> &'static base64::engine::Simd {
    static ENGINE: std::sync::OnceLock<base64::engine::Simd> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| base64::engine::Simd::url_safe(base64::engine::general_purpose::NO_PAD))
}

/// 256 bits from the operating system's CSPRNG, base64url without padding (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `BASE64URL(SHA256(value))`, as PKCE S256 and the login binding use.
pub fn sha256_base64url(value: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha256(value.as_bytes()))
}

/// One 32-byte AES-256 key. Its `Debug` shows only the key id.
#[derive(Clone)]
pub struct EncryptionKey {
    id: String,
    bytes: [u8; 32],
}

impl EncryptionKey {
    /// Parses standard base64 (padding optional) of exactly 32 bytes.
    pub fn from_base64(encoded: &str) -> Result<Self, String> {
        let decoded = STANDARD
            .decode(encoded.trim())
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded.trim()))
            .map_err(|_| "is not valid base64".to_string())?;
        let bytes: [u8; 32] = decoded
            .try_into()
            .map_err(|v: Vec<u8>| format!("decodes to {} bytes, 32 are needed", v.len()))?;
        Ok(Self::from_bytes(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        // The id names the key without revealing it: a hash under a fixed label, 8 hex digits.
        let mut hasher = Sha256::new();
        hasher.update(b"token-broker key id v1\0");
        hasher.update(bytes);
        let digest = hasher.finalize();
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Self { id, bytes }
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as standard base64, the form `BROKER_ENCRYPTION_KEYS` takes.
    pub fn secret_base64(&self) -> String {
        STANDARD.encode(self.bytes)
    }
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptionKey(id={}, [redacted])", self.id)
    }
}

/// A ciphertext and the id of the key that sealed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    /// nonce (12 bytes) followed by the AES-GCM ciphertext and tag.
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("sealed under key {0}, which is not configured")]
    UnknownKey(String),
    #[error("the ciphertext is malformed or was tampered with")]
    Corrupt,
}

/// A fresh 96-bit GCM nonce from the OS CSPRNG. Random nonces under one key stay safe for
/// about 2^32 seals (NIST SP 800-38D §8.3); rotate keys long before that.
fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

/// Encrypts `in_out` in place and returns the tag.
fn seal_in_place(
    cipher: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    associated_data: &[u8],
    in_out: &mut [u8],
) -> Tag {
    // ring refuses only inputs longer than AES-GCM allows (~64 GiB), which no caller has.
    #[allow(clippy::expect_used)]
    cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data),
            in_out,
        )
        .expect("AES-GCM seals anything under 64 GiB")
}

/// The key ring: seals with the first key, opens with any.
///
/// AES-256-GCM is ring's (already built for TLS): its assembly uses the CPU's AES and
/// carry-less multiply instructions, vectorised where the CPU has VAES, and every cached
/// `/session` and `/auth` opens one or two values with it.
#[derive(Clone)]
pub struct Cipher {
    keys: Vec<(String, LessSafeKey)>,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Cipher").field("key_ids", &ids).finish()
    }
}

impl Cipher {
    /// `keys` must not be empty; configuration guarantees it.
    pub fn new(keys: &[EncryptionKey]) -> Self {
        let keys = keys
            .iter()
            .filter_map(|key| {
                // Fails only for a key of the wrong length; `EncryptionKey` holds 32 bytes.
                let unbound = UnboundKey::new(&AES_256_GCM, &key.bytes).ok()?;
                Some((key.id.clone(), LessSafeKey::new(unbound)))
            })
            .collect();
        Self { keys }
    }

    pub fn current_key_id(&self) -> &str {
        self.keys.first().map(|(id, _)| id.as_str()).unwrap_or("")
    }

    /// Whether `key_id` names a configured key (what was sealed under it can be opened).
    pub fn has_key(&self, key_id: &str) -> bool {
        self.keys.iter().any(|(id, _)| id == key_id)
    }

    pub fn seal(&self, plaintext: &[u8], associated_data: &[u8]) -> Sealed {
        let Some((key_id, cipher)) = self.keys.first() else {
            return Sealed {
                key_id: String::new(),
                bytes: Vec::new(),
            };
        };
        let nonce = random_nonce();
        let mut bytes = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(plaintext);
        let tag = seal_in_place(cipher, nonce, associated_data, &mut bytes[NONCE_LEN..]);
        bytes.extend_from_slice(tag.as_ref());
        Sealed {
            key_id: key_id.clone(),
            bytes,
        }
    }

    pub fn open(&self, sealed: &Sealed, associated_data: &[u8]) -> Result<Vec<u8>, OpenError> {
        self.open_in_place(&sealed.key_id, sealed.bytes.clone(), associated_data)
    }

    /// Opens `bytes` (nonce, then ciphertext and tag) in their own buffer: no copy.
    fn open_in_place(
        &self,
        key_id: &str,
        mut bytes: Vec<u8>,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_string()))?;
        let nonce: [u8; NONCE_LEN] = bytes
            .get(..NONCE_LEN)
            .and_then(|nonce| nonce.try_into().ok())
            .ok_or(OpenError::Corrupt)?;
        // Decrypted in place and moved to the front of the same buffer.
        let plaintext_len = cipher
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data),
                &mut bytes,
                NONCE_LEN..,
            )
            .map_err(|_| OpenError::Corrupt)?
            .len();
        bytes.truncate(plaintext_len);
        Ok(bytes)
    }

    /// Appends `plaintext` sealed in binary form to `out`: the key id's length (one byte), the
    /// key id, the nonce, then the ciphertext and tag. Encrypted in place in `out`: no copy of
    /// the plaintext beyond the one into `out`.
    pub fn seal_binary_into(&self, out: &mut Vec<u8>, plaintext: &[u8], associated_data: &[u8]) {
        let Some((key_id, cipher)) = self.keys.first() else {
            return;
        };
        let nonce = random_nonce();
        // Key ids are 8 hex digits (`EncryptionKey::from_bytes`).
        out.reserve(1 + key_id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(u8::try_from(key_id.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(key_id.as_bytes());
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = seal_in_place(cipher, nonce, associated_data, &mut out[start..]);
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens what [`Cipher::seal_binary_into`] appended (exactly those bytes).
    pub fn open_binary(&self, sealed: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (&key_id_len, rest) = sealed.split_first().ok_or(OpenError::Corrupt)?;
        let key_id_len = usize::from(key_id_len);
        if rest.len() < key_id_len + NONCE_LEN + TAG_LEN {
            return Err(OpenError::Corrupt);
        }
        let (key_id, rest) = rest.split_at(key_id_len);
        let key_id = std::str::from_utf8(key_id).map_err(|_| OpenError::Corrupt)?;
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = ciphertext.split_at(ciphertext.len() - TAG_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError::Corrupt)?;
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::Corrupt)?;
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_string()))?;
        let mut plaintext = ciphertext.to_vec();
        cipher
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data),
                Tag::from(tag),
                &mut plaintext,
                0..,
            )
            .map_err(|_| OpenError::Corrupt)?;
        Ok(plaintext)
    }

    /// Seals into one printable string, `<key id>.<base64url>`, for Redis values.
    pub fn seal_to_string(&self, plaintext: &[u8], associated_data: &[u8]) -> String {
        let sealed = self.seal(plaintext, associated_data);
        format!("{}.{}", sealed.key_id, sealed_engine().encode(sealed.bytes))
    }

    /// Opens what [`Cipher::seal_to_string`] made, as text or as the bytes Redis returns.
    pub fn open_string(
        &self,
        text: impl AsRef<[u8]>,
        associated_data: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        let text = text.as_ref();
        let dot = text
            .iter()
            .position(|&byte| byte == b'.')
            .ok_or(OpenError::Corrupt)?;
        let key_id = std::str::from_utf8(&text[..dot]).map_err(|_| OpenError::Corrupt)?;
        let bytes = sealed_engine()
            .decode(&text[dot + 1..])
            .map_err(|_| OpenError::Corrupt)?;
        self.open_in_place(key_id, bytes, associated_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_256_bits_and_distinct() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            sha256_base64url("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    /// Values sealed before the switch to ring (the `aes-gcm` crate) must still open: both are
    /// standard AES-256-GCM with the nonce in front and the tag behind. Test case 16 of the GCM
    /// specification (McGrew and Viega): 256-bit key, 96-bit IV, associated data.
    #[test]
    fn opens_the_gcm_specification_test_vector() {
        let hex = |text: &str| -> Vec<u8> {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
                .collect()
        };
        let key = EncryptionKey::from_bytes(
            hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
                .try_into()
                .unwrap(),
        );
        let plaintext = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let associated_data = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let nonce_ciphertext_tag = hex("cafebabefacedbaddecaf888\
             522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
             76fc6ece0f4e1768cddf8853bb2d551b");
        let cipher = Cipher::new(std::slice::from_ref(&key));
        let sealed = Sealed {
            key_id: key.id().to_string(),
            bytes: nonce_ciphertext_tag.clone(),
        };
        assert_eq!(cipher.open(&sealed, &associated_data).unwrap(), plaintext);
        let mut binary = vec![8];
        binary.extend_from_slice(key.id().as_bytes());
        binary.extend_from_slice(&nonce_ciphertext_tag);
        assert_eq!(
            cipher.open_binary(&binary, &associated_data).unwrap(),
            plaintext
        );
        assert_eq!(
            cipher.open(&sealed, b"other associated data"),
            Err(OpenError::Corrupt)
        );
    }

    #[test]
    fn seals_with_first_key_and_opens_with_any() {
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let before = Cipher::new(std::slice::from_ref(&old));
        let sealed = before.seal(b"refresh-token", b"row-1");
        assert_eq!(sealed.key_id, old.id());
        assert!(!sealed.bytes.windows(13).any(|w| w == b"refresh-token"));

        let rotated = Cipher::new(&[new.clone(), old.clone()]);
        assert_eq!(rotated.open(&sealed, b"row-1").unwrap(), b"refresh-token");
        assert_eq!(rotated.seal(b"x", b"").key_id, new.id());

        let without_old = Cipher::new(&[new]);
        assert_eq!(
            without_old.open(&sealed, b"row-1"),
            Err(OpenError::UnknownKey(old.id().to_string()))
        );
    }

    #[test]
    fn associated_data_and_tampering_are_detected() {
        let cipher = Cipher::new(&[EncryptionKey::generate()]);
        let mut sealed = cipher.seal(b"secret", b"row-1");
        assert_eq!(cipher.open(&sealed, b"row-2"), Err(OpenError::Corrupt));
        let last = sealed.bytes.len() - 1;
        sealed.bytes[last] ^= 1;
        assert_eq!(cipher.open(&sealed, b"row-1"), Err(OpenError::Corrupt));
        assert_eq!(cipher.open_string("nokey", b""), Err(OpenError::Corrupt));
        assert_eq!(cipher.open_string("abc.!!!", b""), Err(OpenError::Corrupt));
        // As Redis returns them: bytes, which need not be text, nor long enough for a nonce.
        let key_id = cipher.current_key_id().to_string();
        assert_eq!(
            cipher.open_string(b"\xff\xfe.AAAA", b""),
            Err(OpenError::Corrupt)
        );
        assert_eq!(
            cipher.open_string(format!("{key_id}.AAAAAAA"), b""),
            Err(OpenError::Corrupt)
        );
        assert_eq!(
            cipher.open_string(format!("{key_id}."), b""),
            Err(OpenError::Corrupt)
        );
        assert!(cipher.open_string(b".", b"").is_err());
    }

    #[test]
    fn binary_form_round_trips_and_refuses_what_it_did_not_make() {
        let (old, new) = (EncryptionKey::generate(), EncryptionKey::generate());
        let cipher = Cipher::new(std::slice::from_ref(&old));
        let mut sealed = b"header".to_vec();
        cipher.seal_binary_into(&mut sealed, b"access-token", b"k");
        assert!(sealed.starts_with(b"header"));
        let sealed = &sealed[6..];
        assert!(!sealed.windows(12).any(|w| w == b"access-token"));
        assert_eq!(cipher.open_binary(sealed, b"k").unwrap(), b"access-token");
        let rotated = Cipher::new(&[new.clone(), old.clone()]);
        assert_eq!(rotated.open_binary(sealed, b"k").unwrap(), b"access-token");
        assert_eq!(
            Cipher::new(&[new]).open_binary(sealed, b"k"),
            Err(OpenError::UnknownKey(old.id().to_string()))
        );
        assert_eq!(
            cipher.open_binary(sealed, b"other"),
            Err(OpenError::Corrupt)
        );
        for flipped in 0..sealed.len() {
            let mut tampered = sealed.to_vec();
            tampered[flipped] ^= 0x20;
            assert!(
                cipher.open_binary(&tampered, b"k").is_err(),
                "byte {flipped}"
            );
        }
        // Every truncation, and lengths that point past the end, are refused without a panic.
        for len in 0..sealed.len() {
            assert!(
                cipher.open_binary(&sealed[..len], b"k").is_err(),
                "{len} bytes"
            );
        }
        assert!(cipher.open_binary(&[255, b'a'], b"k").is_err());
        // An empty plaintext seals and opens too.
        let mut empty = Vec::new();
        cipher.seal_binary_into(&mut empty, b"", b"k");
        assert_eq!(cipher.open_binary(&empty, b"k").unwrap(), b"");
    }

    #[test]
    fn string_form_round_trips() {
        let cipher = Cipher::new(&[EncryptionKey::generate()]);
        let text = cipher.seal_to_string(b"access", b"k");
        assert_eq!(cipher.open_string(&text, b"k").unwrap(), b"access");
    }

    /// The SIMD engine (new unsafe code in base64 0.23) must agree with the scalar one on every
    /// input, valid or not: what it accepts, what it refuses, what it decodes to.
    #[test]
    fn sealed_base64_agrees_with_the_scalar_engine() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for case in 0..20_000 {
            let length = rng.gen_range(0..300);
            let mut text: Vec<u8> = (0..length)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
                .collect();
            // One case in four gets a byte that is not base64url somewhere (padding, the standard
            // alphabet's `+/`, a control or non-ASCII byte).
            if case % 4 == 0 && !text.is_empty() {
                let at = rng.gen_range(0..text.len());
                text[at] = [b'=', b'+', b'/', b'\n', 0, 0x80, 0xff, b'.'][rng.gen_range(0..8)];
            }
            assert_eq!(
                sealed_engine().decode(&text).ok(),
                URL_SAFE_NO_PAD.decode(&text).ok(),
                "{:?}",
                String::from_utf8_lossy(&text)
            );
            let bytes: Vec<u8> = (0..length).map(|_| rng.gen()).collect();
            assert_eq!(
                sealed_engine().encode(&bytes),
                URL_SAFE_NO_PAD.encode(&bytes)
            );
        }
    }

    #[test]
    fn key_parsing_names_the_problem() {
        assert!(EncryptionKey::from_base64("not base64!")
            .unwrap_err()
            .contains("base64"));
        assert!(EncryptionKey::from_base64("AAAA")
            .unwrap_err()
            .contains("3 bytes"));
        let key = EncryptionKey::generate();
        let parsed = EncryptionKey::from_base64(&key.secret_base64()).unwrap();
        assert_eq!(parsed.id(), key.id());
        assert!(!format!("{key:?}").contains(&key.secret_base64()));
    }
}
