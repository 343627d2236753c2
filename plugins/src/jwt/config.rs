//! The settings of a `jwt` plugin and the checks on them.

use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use crate::units::Span;

use super::*;

/// Settings of a `jwt` plugin.
#[derive(Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` every token must carry, exactly (for OIDC providers: the issuer URL
    /// from their discovery document, trailing slash and all).
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one. At least one entry.
    pub audiences: Vec<String>,
    /// Where the provider publishes its signing keys (JWKS). Fetched at start and in
    /// the background; `https` unless the host is loopback.
    pub jwks_url: Option<String>,
    /// A PEM public key (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`): RSA, EC P-256,
    /// EC P-384 or Ed25519. Relative paths are resolved against the working directory.
    /// Re-read when it changes.
    pub public_key_file: Option<String>,
    /// A shared HMAC secret of at least 32 bytes, for HS256/384/512 tokens minted by a
    /// service you run. Never logged.
    pub hs_secret: Option<Secret>,
    /// The algorithms accepted, explicitly: HS256, HS384, HS512, RS256, RS384, RS512,
    /// PS256, PS384, PS512, ES256, ES384, EdDSA. Each must fit the key: HS* only with
    /// `hs_secret`, the others only with a public key of their type.
    pub algorithms: Algorithms,
    /// The claim that names the caller (default `sub`); it must be a string.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// The claim that carries roles or groups: a string or a list of strings. `a.b`
    /// reaches a nested claim (Keycloak: `realm_access.roles`) when no claim is
    /// literally named `a.b`.
    pub role_claim: Option<String>,
    /// Values of `role_claim` that make the caller an admin; anyone else is a user.
    #[serde(default)]
    pub admin_values: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 30s, at most 5m).
    #[serde(default = "default_leeway")]
    pub leeway: Span,
    /// Remove the `Authorization` header before proxying (default false: upstreams
    /// that verify the token themselves still get it).
    #[serde(default)]
    pub strip: bool,
    /// How often the JWKS is fetched again in the background (default 5m).
    #[serde(default = "default_refresh")]
    pub jwks_refresh: Span,
    /// The shortest time between two fetches caused by tokens with an unknown `kid`
    /// (default 30s).
    #[serde(default = "default_cooldown")]
    pub jwks_cooldown: Span,
}

pub(super) fn default_subject_claim() -> String {
    "sub".into()
}
pub(super) fn default_leeway() -> Span {
    Span::from_secs(30)
}
pub(super) fn default_refresh() -> Span {
    Span::from_secs(300)
}
pub(super) fn default_cooldown() -> Span {
    Span::from_secs(30)
}

pub(super) fn algorithm_names(algs: &[Algorithm]) -> String {
    algs.iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The signature algorithms a verifier accepts, read from their names when the config
/// is read: at least one, never `none`, each once.
#[derive(Debug, Clone, PartialEq)]
pub struct Algorithms(Vec<Algorithm>);

impl Algorithms {
    pub fn new(algorithms: Vec<Algorithm>) -> Self {
        Algorithms(algorithms)
    }

    pub fn as_slice(&self) -> &[Algorithm] {
        &self.0
    }
}

impl schemars::JsonSchema for Algorithms {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "JwtAlgorithms".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "array",
            "minItems": 1,
            "items": {
                "enum": ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"],
            },
        })
    }
}

impl<'de> Deserialize<'de> for Algorithms {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(deserializer)?;
        parse_algorithms(&names)
            .map(Algorithms)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Algorithms {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|a| format!("{a:?}")))
    }
}

fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    if names.is_empty() {
        return Err("`algorithms` must list at least one algorithm, e.g. [RS256]".into());
    }
    let mut out = Vec::new();
    for name in names {
        if name.eq_ignore_ascii_case("none") {
            return Err("algorithms: `none` is never accepted".into());
        }
        let alg = Algorithm::from_str(name).map_err(|_| {
            format!(
                "algorithms: unknown algorithm {name:?}; use HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
            )
        })?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    Ok(out)
}

/// A key for `family`, checked against every configured algorithm: each must fit.
pub(super) fn strict_fit(
    what: &str,
    fits: &[Algorithm],
    algorithms: &[Algorithm],
) -> Result<Vec<Algorithm>, String> {
    if let Some(bad) = algorithms.iter().find(|a| !fits.contains(a)) {
        return Err(format!(
            "algorithm {bad:?} does not fit {what}; it fits {}",
            algorithm_names(fits)
        ));
    }
    Ok(algorithms.to_vec())
}

/// Checks `subject_claim`, `role_claim` and `admin_values` (shared with `oidc`).
pub(crate) fn check_claim_settings(
    subject_claim: &str,
    role_claim: Option<&str>,
    admin_values: &[String],
) -> Result<(), String> {
    if subject_claim.is_empty() {
        return Err("`subject_claim` must not be empty".into());
    }
    match (role_claim, admin_values.is_empty()) {
        (Some(""), _) => Err("`role_claim` must not be empty".into()),
        (Some(_), true) => {
            Err("`role_claim` needs `admin_values`: the values that mean admin".into())
        }
        (None, false) => {
            Err("`admin_values` needs `role_claim`: the claim to look them up in".into())
        }
        _ => Ok(()),
    }
}

/// Checks `leeway`: at most [`MAX_LEEWAY`].
pub(crate) fn check_leeway(leeway: Span) -> Result<Duration, String> {
    let leeway = leeway.get();
    if leeway > MAX_LEEWAY {
        return Err("leeway: at most 5m; more would accept long-expired tokens".into());
    }
    Ok(leeway)
}
