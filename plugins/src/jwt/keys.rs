//! Verification keys: from a PEM file, a JWKS document or a shared secret, each with
//! the configured algorithms it may check, and the policy for fetching them.

use std::path::Path;
use std::str::FromStr;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::*;

/// A verification key and the configured algorithms it can check.
#[derive(Clone)]
pub(super) struct VerifyKey {
    /// The JWKS `kid`; `None` for a configured key, which serves any `kid`.
    pub(super) kid: Option<String>,
    pub(super) key: DecodingKey,
    /// Holds this key's algorithms: all of one family, as jsonwebtoken requires.
    pub(super) validation: Validation,
}

impl VerifyKey {
    pub(super) fn fits(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }
}

#[derive(Clone, Default)]
pub(super) struct KeySet {
    pub(super) keys: Vec<VerifyKey>,
}

impl KeySet {
    pub(super) fn kids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect()
    }
}

pub(super) fn validation_for(base: &Validation, algorithms: Vec<Algorithm>) -> Validation {
    let mut v = base.clone();
    v.algorithms = algorithms;
    v
}

/// Whether the key can be used at all (a bad EC point fails here, not per request).
pub(super) fn usable(key: &DecodingKey, alg: Algorithm) -> bool {
    // jsonwebtoken slices an Ed25519 key to 32 bytes without looking: a short one would
    // panic there.
    if alg.family() == AlgorithmFamily::Ed
        && !matches!(key.kind(), DecodingKeyKind::SecretOrDer(b) if b.len() == 32)
    {
        return false;
    }
    jsonwebtoken::crypto::verify("", b"", key, alg).is_ok()
}

/// Reads a PEM public key; every configured algorithm must fit it.
pub(super) fn load_key_file(
    path: &Path,
    algorithms: &[Algorithm],
    base: &Validation,
) -> Result<KeySet, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("PRIVATE KEY-----") {
        return Err(format!(
            "{} holds a private key; give the public key (`openssl pkey -in KEY -pubout`)",
            path.display()
        ));
    }
    if !text.contains("-----BEGIN PUBLIC KEY-----")
        && !text.contains("-----BEGIN RSA PUBLIC KEY-----")
    {
        return Err(format!(
            "{} is not a PEM public key (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY)",
            path.display()
        ));
    }
    let (key, what, fits): (DecodingKey, &str, &[Algorithm]) =
        if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
            (k, "an RSA public key", AlgorithmFamily::Rsa.algorithms())
        } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
            // The uncompressed or compressed point size tells the curve.
            match k.as_bytes().len() {
                65 | 33 => (k, "an EC P-256 public key", &[Algorithm::ES256]),
                97 | 49 => (k, "an EC P-384 public key", &[Algorithm::ES384]),
                _ => return Err("EC keys must be on P-256 or P-384".into()),
            }
        } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
            (k, "an Ed25519 public key", &[Algorithm::EdDSA])
        } else {
            return Err(format!(
                "{} is not an RSA, EC or Ed25519 public key",
                path.display()
            ));
        };
    let algs = strict_fit(&format!("{what} (public_key_file)"), fits, algorithms)?;
    if !algs.iter().all(|a| usable(&key, *a)) {
        return Err(format!("{} holds an unusable key", path.display()));
    }
    Ok(KeySet {
        keys: vec![VerifyKey {
            kid: None,
            key,
            validation: validation_for(base, algs),
        }],
    })
}

/// Turns one JWKS entry into a key, or `None` when it is not for us: an encryption
/// key, a symmetric key (a published HMAC key would let anyone sign), a curve or
/// algorithm we do not accept.
pub(super) fn key_from_jwk(
    entry: Value,
    algorithms: &[Algorithm],
    base: &Validation,
) -> Option<VerifyKey> {
    let jwk: Jwk = serde_json::from_value(entry).ok()?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let fits: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => &[],
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => &[],
        },
        AlgorithmParameters::OctetKey(_) => &[],
    };
    let declared = match jwk.common.key_algorithm {
        Some(ka) => Some(Algorithm::from_str(&ka.to_string()).ok()?),
        None => None,
    };
    let algs: Vec<Algorithm> = algorithms
        .iter()
        .copied()
        .filter(|a| fits.contains(a) && declared.is_none_or(|d| d == *a))
        .collect();
    let first = *algs.first()?;
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    if !usable(&key, first) {
        return None;
    }
    Some(VerifyKey {
        kid: jwk.common.key_id,
        key,
        validation: validation_for(base, algs),
    })
}

#[derive(Deserialize)]
pub(super) struct RawJwks {
    pub(super) keys: Vec<Value>,
}

pub(super) fn fetch_jwks(
    agent: &ureq::Agent,
    url: &str,
    algorithms: &[Algorithm],
    base: &Validation,
) -> Result<KeySet, String> {
    let mut resp = agent
        .get(url)
        .header("accept", "application/json, application/jwk-set+json")
        .call()
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    let raw: RawJwks =
        serde_json::from_str(&text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let offered = raw.keys.len();
    let keys: Vec<VerifyKey> = raw
        .keys
        .into_iter()
        .take(MAX_JWKS_KEYS)
        .filter_map(|entry| key_from_jwk(entry, algorithms, base))
        .collect();
    if keys.is_empty() {
        return Err(format!(
            "none of its {offered} keys is a signing key for {}",
            algorithm_names(algorithms)
        ));
    }
    Ok(KeySet { keys })
}
