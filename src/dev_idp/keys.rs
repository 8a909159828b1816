//! The IdP's signing keys: generation, the JWKS, signing, and verifying its own tokens.
//!
//! There is always one RSA-2048 key (RS256) and one P-256 key (ES256) in the JWKS; the signing
//! algorithm only chooses which of the two signs. Key ids are RFC 7638 thumbprints.

use std::sync::Arc;

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};

use super::SigningAlg;

/// One signing key with everything derived from it at generation time.
#[derive(Clone)]
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl SigningKey {
    fn new(encoding: EncodingKey, alg: Algorithm) -> Result<Self, jsonwebtoken::errors::Error> {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg)?;
        let kid = jwk.thumbprint(ThumbprintHash::SHA256);
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(Self { kid, encoding, jwk })
    }
}

/// One RSA-2048 and one P-256 key, each with a kid.
///
/// Generating the RSA key takes a noticeable fraction of a second: tests generate one set and clone it.
#[derive(Clone)]
pub struct KeyMaterial {
    rsa: SigningKey,
    rsa_public_pem: String,
    ec: SigningKey,
}

impl KeyMaterial {
    pub fn generate() -> KeyMaterial {
        let (rsa, rsa_public_pem) = generate_rsa();
        KeyMaterial {
            rsa,
            rsa_public_pem,
            ec: generate_ec(),
        }
    }

    fn key(&self, alg: SigningAlg) -> &SigningKey {
        match alg {
            SigningAlg::Rs256 => &self.rsa,
            SigningAlg::Es256 => &self.ec,
        }
    }

    /// The current key id for `alg`.
    pub fn kid(&self, alg: SigningAlg) -> &str {
        &self.key(alg).kid
    }

    /// The RSA public key as an SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn rsa_public_key_pem(&self) -> &str {
        &self.rsa_public_pem
    }

    /// The public keys, RSA first.
    pub fn jwks(&self) -> Vec<Jwk> {
        vec![self.rsa.jwk.clone(), self.ec.jwk.clone()]
    }

    /// A copy of these keys in which the key for `alg` is replaced by a freshly generated one.
    pub fn with_new_key(&self, alg: SigningAlg) -> KeyMaterial {
        let mut next = self.clone();
        match alg {
            SigningAlg::Rs256 => (next.rsa, next.rsa_public_pem) = generate_rsa(),
            SigningAlg::Es256 => next.ec = generate_ec(),
        }
        next
    }

    /// Signs `claims` with the key for `alg`; the header carries `alg`, `kid` and `typ`.
    pub fn sign(
        &self,
        alg: SigningAlg,
        typ: &str,
        claims: &serde_json::Value,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let key = self.key(alg);
        let mut header = Header::new(alg.algorithm());
        header.kid = Some(key.kid.clone());
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, &key.encoding)
    }
}

// Key generation cannot fail for these fixed, supported parameters; a failure is a broken build of
// the crypto crates, not something a caller could handle.
#[allow(clippy::expect_used)]
fn generate_rsa() -> (SigningKey, String) {
    let private =
        rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("RSA-2048 key generation");
    let der = private
        .to_pkcs1_der()
        .expect("PKCS#1 encoding of an RSA key");
    let rsa_public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("PEM encoding of an RSA public key");
    let rsa = SigningKey::new(EncodingKey::from_rsa_der(der.as_bytes()), Algorithm::RS256)
        .expect("a JWK for a fresh RSA key");
    (rsa, rsa_public_pem)
}

#[allow(clippy::expect_used)]
fn generate_ec() -> SigningKey {
    use p256::pkcs8::EncodePrivateKey;
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let der = secret
        .to_pkcs8_der()
        .expect("PKCS#8 encoding of a P-256 key");
    SigningKey::new(EncodingKey::from_ec_der(der.as_bytes()), Algorithm::ES256)
        .expect("a JWK for a fresh P-256 key")
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("rsa_kid", &self.rsa.kid)
            .field("ec_kid", &self.ec.kid)
            .field("private_keys", &"[redacted]")
            .finish()
    }
}

impl SigningAlg {
    pub(super) fn algorithm(self) -> Algorithm {
        match self {
            SigningAlg::Rs256 => Algorithm::RS256,
            SigningAlg::Es256 => Algorithm::ES256,
        }
    }
}

/// The current keys plus the public halves of retired ones still published.
pub(super) struct KeyRing {
    pub current: Arc<KeyMaterial>,
    pub retired: Vec<Jwk>,
}

impl KeyRing {
    pub fn jwks(&self) -> JwkSet {
        let mut keys = self.current.jwks();
        keys.extend(self.retired.iter().cloned());
        JwkSet { keys }
    }

    /// Makes `next` current; the replaced key stays in the JWKS only when `keep_old` is set.
    pub fn rotate(&mut self, next: KeyMaterial, alg: SigningAlg, keep_old: bool) {
        let old = std::mem::replace(&mut self.current, Arc::new(next));
        if keep_old {
            self.retired.push(old.key(alg).jwk.clone());
        }
    }
}

/// Verifies a token this IdP issued (signature by a published key, `iss`, `aud`) and returns its
/// claims. Expiry is ignored: an expired ID token is still a fine `id_token_hint` (RP-Initiated Logout §2).
pub(super) fn verify_own_token(
    jwks: &JwkSet,
    token: &str,
    issuer: &str,
    audience: &str,
) -> Option<serde_json::Value> {
    let header = jsonwebtoken::decode_header(token).ok()?;
    let jwk = jwks.find(header.kid.as_deref()?)?;
    // The algorithm comes from the key, never from the token header.
    let alg = match jwk.common.key_algorithm?.to_string().as_str() {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .ok()
        .map(|data| data.claims)
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;

    /// One key set for the whole test binary: RSA key generation is slow.
    pub(crate) fn test_keys() -> KeyMaterial {
        static KEYS: OnceLock<KeyMaterial> = OnceLock::new();
        KEYS.get_or_init(KeyMaterial::generate).clone()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": "http://idp.test", "aud": "client", "sub": "alice", "exp": 4_000_000_000u64})
    }

    #[test]
    fn each_jwk_verifies_a_token_signed_by_its_key() {
        let keys = test_keys();
        for alg in [SigningAlg::Rs256, SigningAlg::Es256] {
            let token = keys.sign(alg, "JWT", &claims()).expect("sign");
            let header = jsonwebtoken::decode_header(&token).expect("header");
            assert_eq!(header.alg, alg.algorithm());
            assert_eq!(header.kid.as_deref(), Some(keys.kid(alg)));

            let set = JwkSet { keys: keys.jwks() };
            let jwk = set.find(keys.kid(alg)).expect("the kid is published");
            let key = DecodingKey::from_jwk(jwk).expect("decoding key");
            let mut validation = Validation::new(alg.algorithm());
            validation.set_audience(&["client"]);
            let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
                .expect("verifies");
            assert_eq!(data.claims["sub"], "alice");
        }
    }

    #[test]
    fn jwks_has_the_public_parameters_of_both_key_types() {
        let set = serde_json::to_value(JwkSet {
            keys: test_keys().jwks(),
        })
        .expect("json");
        let rsa = &set["keys"][0];
        assert_eq!(
            (
                rsa["kty"].as_str(),
                rsa["alg"].as_str(),
                rsa["use"].as_str()
            ),
            (Some("RSA"), Some("RS256"), Some("sig"))
        );
        assert_eq!(rsa["e"], "AQAB");
        assert!(rsa["n"].as_str().is_some_and(|n| n.len() > 300), "{rsa}");
        assert!(
            rsa.get("d").is_none(),
            "no private parameter may be published"
        );
        let ec = &set["keys"][1];
        assert_eq!(
            (ec["kty"].as_str(), ec["crv"].as_str(), ec["alg"].as_str()),
            (Some("EC"), Some("P-256"), Some("ES256"))
        );
        assert_eq!(ec["x"].as_str().map(str::len), Some(43));
        assert_eq!(ec["y"].as_str().map(str::len), Some(43));
        assert_ne!(rsa["kid"], ec["kid"]);
    }

    #[test]
    fn a_token_from_a_dropped_key_no_longer_verifies() {
        let keys = test_keys();
        let old = keys
            .sign(SigningAlg::Es256, "JWT", &claims())
            .expect("sign");
        let mut ring = KeyRing {
            current: Arc::new(keys.clone()),
            retired: vec![],
        };
        ring.rotate(
            keys.with_new_key(SigningAlg::Es256),
            SigningAlg::Es256,
            true,
        );
        assert_eq!(ring.jwks().keys.len(), 3);
        assert!(verify_own_token(&ring.jwks(), &old, "http://idp.test", "client").is_some());

        ring.rotate(
            ring.current.with_new_key(SigningAlg::Es256),
            SigningAlg::Es256,
            false,
        );
        let mut without_old = ring.jwks();
        without_old
            .keys
            .retain(|jwk| jwk.common.key_id.as_deref() != Some(keys.kid(SigningAlg::Es256)));
        assert!(verify_own_token(&without_old, &old, "http://idp.test", "client").is_none());
        assert_eq!(
            ring.current.kid(SigningAlg::Rs256),
            keys.kid(SigningAlg::Rs256),
            "the RSA key is untouched"
        );
    }

    #[test]
    fn own_tokens_are_checked_for_issuer_audience_and_signature() {
        let keys = test_keys();
        let set = JwkSet { keys: keys.jwks() };
        let token = keys
            .sign(SigningAlg::Rs256, "JWT", &claims())
            .expect("sign");
        assert!(verify_own_token(&set, &token, "http://idp.test", "client").is_some());
        assert!(verify_own_token(&set, &token, "http://other", "client").is_none());
        assert!(verify_own_token(&set, &token, "http://idp.test", "other").is_none());
        let tampered = tamper(&token);
        assert!(verify_own_token(&set, &tampered, "http://idp.test", "client").is_none());
    }

    /// Changes one character in the middle of the signature.
    pub(crate) fn tamper(token: &str) -> String {
        let at = token.len() - 20;
        let replacement = if &token[at..=at] == "A" { "B" } else { "A" };
        format!("{}{replacement}{}", &token[..at], &token[at + 1..])
    }

    #[test]
    fn debug_redacts_the_private_keys() {
        let printed = format!("{:?}", test_keys());
        assert!(printed.contains("[redacted]"), "{printed}");
        assert!(!printed.contains("PRIVATE"), "{printed}");
    }
}
