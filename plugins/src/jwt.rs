//! `jwt`: recognise callers by bearer JWTs from an identity provider or a service.
//!
//! ```yaml
//! plugins:
//!   sso:
//!     type: jwt
//!     issuer: https://auth.example.com/application/o/gateway/
//!     audiences: [gateway]
//!     jwks_url: https://auth.example.com/application/o/gateway/jwks/
//!     # or: public_key_file: /etc/gatewarden/jwt.pub.pem   (RSA, EC P-256/P-384 or Ed25519)
//!     # or: hs_secret: ${env:GATEWARDEN_JWT_SECRET}         (at least 32 bytes)
//!     algorithms: [RS256]
//!     subject_claim: sub
//!     role_claim: groups               # a string or a list of strings; `a.b` reaches nested claims
//!     admin_values: [gateway-admins]
//!     leeway: 30s
//!     strip: false                     # remove Authorization before proxying
//!     jwks_refresh: 5m
//!     jwks_cooldown: 30s
//! ```
//!
//! Tokens come from `Authorization: Bearer <jwt>`. Bearer values that are not shaped like
//! a JWT (three dot-separated parts) are left for other identity plugins, so chains like
//! `[keys, sso]` work. A JWT that is present but fails any check is refused with 401 at
//! once; it never falls through to another method or to anonymous.
//!
//! What is checked, in order: the header's `alg` is in `algorithms` (`none` never is);
//! no `crit` header; a key whose type and curve fit that algorithm signed it (an HS256
//! token "signed" with an RSA public key is refused: HMAC is only ever keyed by
//! `hs_secret`, and `hs_secret` only ever verifies HS*); then `exp` (required), `nbf`
//! with `leeway`; `iss` equal to `issuer`; `aud` naming one of `audiences`; and a string
//! subject. Keys embedded in the token (`jwk`, `jku`, `x5u`, `x5c`) are ignored.
//!
//! JWKS are fetched when the plugin is built (a failure is logged and is not fatal:
//! tokens are refused with "no signing keys yet" until a fetch succeeds), then
//! refreshed in the background every `jwks_refresh` (sooner, with backoff, after a
//! failure). A token whose `kid` is not in the set asks for one refresh, at most once
//! per `jwks_cooldown`; that request waits for the fetch (up to 4 s) and is then
//! verified against the new set, so the first token signed with a rotated-in key is
//! accepted. Requests in the cooldown get 401 without a fetch, so a flood of made-up
//! `kid`s cannot make the gateway hammer the provider. `public_key_file` is re-read when
//! it changes.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, Validation};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::units::parse_duration;
use crate::{
    credentials, BuildEnv, Ctx, Hooks, Identity, Plugin, Reply, RequestFlow, RequestHeader, Role,
    Verdict,
};

/// Minimum length of `hs_secret`.
pub const MIN_SECRET_LEN: usize = 32;
/// Longer bearer values are refused without decoding.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// A JWKS fetch (DNS, connect, TLS, body) never takes longer; `check` stays quick.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request with an unknown `kid` waits for the refresh it asked for.
const REFRESH_WAIT: Duration = Duration::from_secs(4);
/// Larger JWKS documents are refused.
const MAX_JWKS_BYTES: u64 = 512 * 1024;
/// Keys beyond this many in one JWKS are ignored.
const MAX_JWKS_KEYS: usize = 64;
/// First retry after a failed fetch; doubles up to `jwks_refresh`.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// How often `public_key_file` is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(2);
/// Larger `leeway`s would quietly accept long-expired tokens.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Settings of a `jwt` plugin.
#[derive(Deserialize)]
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
    pub algorithms: Vec<String>,
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
    pub leeway: String,
    /// Remove the `Authorization` header before proxying (default false: upstreams
    /// that verify the token themselves still get it).
    #[serde(default)]
    pub strip: bool,
    /// How often the JWKS is fetched again in the background (default 5m).
    #[serde(default = "default_refresh")]
    pub jwks_refresh: String,
    /// The shortest time between two fetches caused by tokens with an unknown `kid`
    /// (default 30s).
    #[serde(default = "default_cooldown")]
    pub jwks_cooldown: String,
}

fn default_subject_claim() -> String {
    "sub".into()
}
fn default_leeway() -> String {
    "30s".into()
}
fn default_refresh() -> String {
    "5m".into()
}
fn default_cooldown() -> String {
    "30s".into()
}

/// A secret setting. Accepts any scalar (a numeric secret is still a secret) and never
/// shows its value, in errors or in `Debug`.
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_yaml_ng::Value::deserialize(d)? {
            serde_yaml_ng::Value::String(s) => Ok(Secret(s)),
            serde_yaml_ng::Value::Number(n) => Ok(Secret(n.to_string())),
            _ => Err(serde::de::Error::custom("a secret must be a string")),
        }
    }
}

impl Secret {
    /// The secret itself, for the code that uses it; never for logs or errors.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(********)")
    }
}

/// A claim name, or a dotted path into nested objects.
struct ClaimPath {
    name: String,
    parts: Vec<String>,
}

impl ClaimPath {
    fn new(name: &str) -> Self {
        ClaimPath {
            name: name.to_string(),
            parts: name.split('.').map(str::to_string).collect(),
        }
    }

    /// The literal claim first: URL-style claim names contain dots.
    fn lookup<'c>(&self, claims: &'c Map<String, Value>) -> Option<&'c Value> {
        if let Some(v) = claims.get(&self.name) {
            return Some(v);
        }
        let (first, rest) = self.parts.split_first()?;
        if rest.is_empty() {
            return None;
        }
        let mut at = claims.get(first)?;
        for part in rest {
            at = at.as_object()?.get(part)?;
        }
        Some(at)
    }
}

/// A verification key and the configured algorithms it can check.
#[derive(Clone)]
struct VerifyKey {
    /// The JWKS `kid`; `None` for a configured key, which serves any `kid`.
    kid: Option<String>,
    key: DecodingKey,
    /// Holds this key's algorithms: all of one family, as jsonwebtoken requires.
    validation: Validation,
}

impl VerifyKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }
}

#[derive(Clone, Default)]
struct KeySet {
    keys: Vec<VerifyKey>,
}

impl KeySet {
    fn kids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect()
    }
}

/// Why a token was refused; the text is the `error` of the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Malformed,
    AlgorithmNotAllowed,
    CriticalHeader,
    UnknownKey,
    NoKeys,
    KeyMismatch,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    MissingClaim,
    Subject,
    Invalid,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed token or unsupported algorithm",
            Refusal::AlgorithmNotAllowed => "token algorithm not allowed",
            Refusal::CriticalHeader => "token has critical header extensions",
            Refusal::UnknownKey => "token signed by an unknown key",
            Refusal::NoKeys => "no signing keys yet",
            Refusal::KeyMismatch => "token algorithm does not fit its key",
            Refusal::Signature => "invalid token signature",
            Refusal::Expired => "token expired",
            Refusal::NotYetValid => "token not yet valid",
            Refusal::Issuer => "token issuer not accepted",
            Refusal::Audience => "token audience not accepted",
            Refusal::MissingClaim => "token lacks exp, iss or aud",
            Refusal::Subject => "token has no usable subject",
            Refusal::Invalid => "invalid token",
        }
    }

    /// The label of `gatewarden_auth_failures_total{reason}`.
    fn metric(self) -> &'static str {
        match self {
            Refusal::NoKeys => "jwt_keys_unavailable",
            _ => "invalid_jwt",
        }
    }

    /// Refusals that a fresher key set might turn into an acceptance.
    fn wants_refresh(self) -> bool {
        matches!(self, Refusal::UnknownKey | Refusal::NoKeys)
    }

    fn from_jwt_error(e: &jsonwebtoken::errors::Error) -> Refusal {
        match e.kind() {
            ErrorKind::InvalidSignature => Refusal::Signature,
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidIssuer => Refusal::Issuer,
            ErrorKind::InvalidAudience => Refusal::Audience,
            ErrorKind::MissingRequiredClaim(_) => Refusal::MissingClaim,
            ErrorKind::InvalidAlgorithm => Refusal::KeyMismatch,
            _ => Refusal::Invalid,
        }
    }
}

/// Where keys come from after the plugin is built.
enum Origin {
    Jwks { url: String, agent: ureq::Agent },
    File { path: PathBuf },
}

/// Keys that change at run time (JWKS, key file), shared with the refresher thread.
struct Store {
    origin: Origin,
    /// The configured algorithms.
    algorithms: Vec<Algorithm>,
    /// Claims checks; each key gets a copy with its own algorithms.
    base: Validation,
    keys: ArcSwap<KeySet>,
    /// Counts finished fetches, so requests can wait for the one they asked for.
    fetched: tokio::sync::watch::Sender<u64>,
    in_flight: AtomicBool,
    /// When a request last asked for a refresh.
    last_asked: Mutex<Option<Instant>>,
    refresh_every: Duration,
    cooldown: Duration,
    /// The key file's modification time and size when last read.
    file_stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl Store {
    /// Fetches or re-reads the keys; on success they replace the current set. Returns
    /// whether it worked. Blocking, bounded by [`FETCH_TIMEOUT`].
    fn refresh(&self) -> bool {
        self.in_flight.store(true, Ordering::Release);
        let loaded = match &self.origin {
            Origin::Jwks { url, agent } => fetch_jwks(agent, url, &self.algorithms, &self.base),
            Origin::File { path } => load_key_file(path, &self.algorithms, &self.base),
        };
        let ok = match loaded {
            Ok(set) => {
                let file = matches!(self.origin, Origin::File { .. });
                if file || self.keys.load().kids() != set.kids() {
                    log::info!(
                        "jwt: {} signing keys loaded from {} (kid: {})",
                        set.keys.len(),
                        self.origin_name(),
                        set.kids().join(", ")
                    );
                }
                self.keys.store(Arc::new(set));
                true
            }
            Err(e) => {
                let held = self.keys.load().keys.len();
                log::warn!(
                    "jwt: cannot load signing keys from {}: {e}; {}",
                    self.origin_name(),
                    if held == 0 {
                        "tokens are refused until a retry succeeds".to_string()
                    } else {
                        format!("keeping the {held} keys held")
                    }
                );
                false
            }
        };
        self.in_flight.store(false, Ordering::Release);
        self.fetched.send_modify(|n| *n = n.wrapping_add(1));
        ok
    }

    fn origin_name(&self) -> String {
        match &self.origin {
            Origin::Jwks { url, .. } => url.clone(),
            Origin::File { path } => path.display().to_string(),
        }
    }

    /// How long the refresher sleeps before its next load, given failures in a row.
    fn next_wait(&self, failures: u32) -> Duration {
        match &self.origin {
            Origin::File { .. } => FILE_POLL,
            Origin::Jwks { .. } if failures > 0 => FIRST_RETRY
                .saturating_mul(1 << (failures - 1).min(16))
                .min(self.refresh_every),
            Origin::Jwks { .. } if self.keys.load().keys.is_empty() => Duration::ZERO,
            Origin::Jwks { .. } => self.refresh_every,
        }
    }

    /// Re-reads the key file when its stamp changed.
    fn reread_if_changed(&self) {
        let Origin::File { path } = &self.origin else {
            return;
        };
        let now = file_stamp(path);
        let mut stamp = self.file_stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now != *stamp {
            *stamp = now;
            drop(stamp);
            self.refresh();
        }
    }

    /// Claims the right to ask for a refresh now; false in the cooldown.
    fn may_ask(&self) -> bool {
        let mut last = self.last_asked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.cooldown) {
            return false;
        }
        *last = Some(now);
        true
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The background thread of a [`Store`], started on first use so that it runs in the
/// process that serves (not in one that forks into a daemon afterwards).
struct Refresher {
    store: Arc<Store>,
    wake: SyncSender<()>,
    woken: Mutex<Option<Receiver<()>>>,
    started: Once,
    /// The first load of a key set that has none yet.
    loaded: Once,
}

impl Refresher {
    fn new(store: Arc<Store>) -> Self {
        let (wake, woken) = mpsc::sync_channel(1);
        Refresher {
            store,
            wake,
            woken: Mutex::new(Some(woken)),
            started: Once::new(),
            loaded: Once::new(),
        }
    }

    /// Loads the keys once, if there are none yet (a JWKS not fetched), then starts the
    /// background refresh. A provider that is down must not stop the gateway: a failed
    /// fetch is logged, and the refresher retries.
    fn start(&self) {
        self.loaded.call_once(|| {
            if self.store.keys.load().keys.is_empty() {
                self.store.refresh();
            }
        });
        self.ensure_started();
    }

    fn ensure_started(&self) {
        self.started.call_once(|| {
            let woken = self.woken.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(woken) = woken {
                spawn_refresher(Arc::downgrade(&self.store), woken);
            }
        });
    }

    /// Asks for a refresh if the cooldown allows, and returns a receiver that sees the
    /// fetch finish; `None` when no fetch is coming.
    fn ask(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let rx = self.store.fetched.subscribe();
        if self.store.in_flight.load(Ordering::Acquire) {
            return Some(rx);
        }
        if !self.store.may_ask() {
            return None;
        }
        match self.wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => Some(rx),
            Err(TrySendError::Disconnected(())) => None,
        }
    }
}

/// Loads keys on schedule and on request, until the plugin is dropped (its sender with
/// it, which ends the wait with `Disconnected`).
fn spawn_refresher(store: Weak<Store>, woken: Receiver<()>) {
    let spawned = std::thread::Builder::new()
        .name("gw-jwt-keys".into())
        .spawn(move || {
            let mut failures = 0u32;
            loop {
                let wait = match store.upgrade() {
                    Some(s) => s.next_wait(failures),
                    None => return,
                };
                if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(wait) {
                    return;
                }
                let Some(s) = store.upgrade() else { return };
                match s.origin {
                    Origin::File { .. } => s.reread_if_changed(),
                    Origin::Jwks { .. } => {
                        failures = if s.refresh() {
                            0
                        } else {
                            failures.saturating_add(1)
                        };
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("jwt: cannot start the key refresher; keys stay as loaded at start: {e}");
    }
}

enum Keys {
    /// `hs_secret`: never changes.
    Fixed(KeySet),
    /// JWKS or key file.
    Live(Refresher),
}

/// The runtime form of a `jwt` plugin.
pub struct Jwt {
    algorithms: Vec<Algorithm>,
    keys: Keys,
    issuer: String,
    subject_claim: ClaimPath,
    role_claim: Option<ClaimPath>,
    admin_values: Vec<String>,
    strip: bool,
}

fn algorithm_names(algs: &[Algorithm]) -> String {
    algs.iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
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
fn strict_fit(
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

fn validation_for(base: &Validation, algorithms: Vec<Algorithm>) -> Validation {
    let mut v = base.clone();
    v.algorithms = algorithms;
    v
}

/// Whether the key can be used at all (a bad EC point fails here, not per request).
fn usable(key: &DecodingKey, alg: Algorithm) -> bool {
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
fn load_key_file(
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
fn key_from_jwk(entry: Value, algorithms: &[Algorithm], base: &Validation) -> Option<VerifyKey> {
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
struct RawJwks {
    keys: Vec<Value>,
}

fn fetch_jwks(
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

/// Checks a JWKS URL: http(s) with a host; plain http only to loopback. Returns
/// whether it is https, and whether the host is loopback.
fn check_jwks_url(url: &str) -> Result<(bool, bool), String> {
    check_fetch_url("jwks_url", url)
}

/// Checks a URL the gateway fetches trusted documents from (keys, OIDC discovery):
/// http(s) with a host; plain http only to loopback. Returns whether it is https, and
/// whether the host is loopback.
pub(crate) fn check_fetch_url(setting: &str, url: &str) -> Result<(bool, bool), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{setting}: {url:?} is not a URL"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{setting}: {url:?} has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok((true, loopback)),
        Some("http") => {
            if loopback {
                Ok((false, true))
            } else {
                Err(format!("{setting}: use https; what is fetched over plain http could be replaced by anyone on the network"))
            }
        }
        _ => Err(format!("{setting}: {url:?} must start with https://")),
    }
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

/// Parses `leeway`, at most [`MAX_LEEWAY`].
pub(crate) fn parse_leeway(text: &str) -> Result<Duration, String> {
    let leeway = parse_duration(text).map_err(|e| format!("leeway: {e}"))?;
    if leeway > MAX_LEEWAY {
        return Err("leeway: at most 5m; more would accept long-expired tokens".into());
    }
    Ok(leeway)
}

impl Jwt {
    pub fn new(config: JwtConfig, env: &BuildEnv) -> Result<Self, String> {
        let algorithms = parse_algorithms(&config.algorithms)?;
        if config.issuer.trim().is_empty() {
            return Err("`issuer` must name the token issuer (the `iss` claim)".into());
        }
        if config.audiences.is_empty() || config.audiences.iter().any(|a| a.is_empty()) {
            return Err(
                "`audiences` must list the `aud` values accepted (at least one, none empty)".into(),
            );
        }
        check_claim_settings(
            &config.subject_claim,
            config.role_claim.as_deref(),
            &config.admin_values,
        )?;
        let leeway = parse_leeway(&config.leeway)?;
        let refresh_every =
            parse_duration(&config.jwks_refresh).map_err(|e| format!("jwks_refresh: {e}"))?;
        let cooldown =
            parse_duration(&config.jwks_cooldown).map_err(|e| format!("jwks_cooldown: {e}"))?;
        if refresh_every < Duration::from_secs(1) || cooldown < Duration::from_secs(1) {
            return Err("jwks_refresh and jwks_cooldown must be at least 1s".into());
        }

        let mut base = Validation::new(algorithms[0]);
        base.leeway = leeway.as_secs();
        base.validate_exp = true;
        base.validate_nbf = true;
        base.validate_aud = true;
        base.set_issuer(&[&config.issuer]);
        base.set_audience(&config.audiences);
        base.set_required_spec_claims(&["exp", "iss", "aud"]);

        let sources = [
            config.jwks_url.is_some(),
            config.public_key_file.is_some(),
            config.hs_secret.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err("set exactly one of `jwks_url`, `public_key_file`, `hs_secret`".into());
        }
        let live = |origin: Origin, keys: KeySet, stamp| {
            Arc::new(Store {
                origin,
                algorithms: algorithms.clone(),
                base: base.clone(),
                keys: ArcSwap::from_pointee(keys),
                fetched: tokio::sync::watch::Sender::new(0),
                in_flight: AtomicBool::new(false),
                last_asked: Mutex::new(None),
                refresh_every,
                cooldown,
                file_stamp: Mutex::new(stamp),
            })
        };
        let keys = if let Some(secret) = &config.hs_secret {
            let hmac = AlgorithmFamily::Hmac.algorithms();
            let algs = strict_fit("`hs_secret` (an HMAC secret)", hmac, &algorithms)?;
            if secret.0.len() < MIN_SECRET_LEN {
                return Err(format!(
                    "`hs_secret` must be at least {MIN_SECRET_LEN} bytes"
                ));
            }
            Keys::Fixed(KeySet {
                keys: vec![VerifyKey {
                    kid: None,
                    key: DecodingKey::from_secret(secret.0.as_bytes()),
                    validation: validation_for(&base, algs),
                }],
            })
        } else if let Some(file) = &config.public_key_file {
            let path = env.base_dir.join(file);
            let stamp = file_stamp(&path);
            let set = load_key_file(&path, &algorithms, &base)
                .map_err(|e| format!("public_key_file: {e}"))?;
            Keys::Live(Refresher::new(live(Origin::File { path }, set, stamp)))
        } else if let Some(url) = &config.jwks_url {
            if let Some(hs) = algorithms
                .iter()
                .find(|a| a.family() == AlgorithmFamily::Hmac)
            {
                return Err(format!(
                    "algorithm {hs:?} does not fit `jwks_url`: a JWKS publishes public keys; HS* needs `hs_secret`"
                ));
            }
            let (https, loopback) = check_jwks_url(url)?;
            let mut agent = ureq::Agent::config_builder()
                .timeout_global(Some(FETCH_TIMEOUT))
                // No redirect may downgrade an https fetch.
                .https_only(https)
                .max_redirects(3)
                .user_agent(concat!("gatewarden/", env!("CARGO_PKG_VERSION")));
            // `HTTPS_PROXY`/`NO_PROXY` from the environment apply, except to loopback,
            // which no proxy can reach for us.
            if loopback {
                agent = agent.proxy(None);
            }
            let agent: ureq::Agent = agent.build().into();
            let store = live(
                Origin::Jwks {
                    url: url.clone(),
                    agent,
                },
                KeySet::default(),
                None,
            );
            // The first fetch is `start`'s: building a config (`check`, a reload's
            // parse) touches no network.
            Keys::Live(Refresher::new(store))
        } else {
            return Err("set one of `jwks_url`, `public_key_file`, `hs_secret`".into());
        };
        Ok(Jwt {
            algorithms,
            keys,
            issuer: config.issuer,
            subject_claim: ClaimPath::new(&config.subject_claim),
            role_claim: config.role_claim.as_deref().map(ClaimPath::new),
            admin_values: config.admin_values,
            strip: config.strip,
        })
    }

    /// The bearer token, when it is shaped like a JWT. `Authorization` sent twice is
    /// refused: which copy an upstream reads is up to it.
    fn presented(req: &RequestHeader) -> Result<Option<&str>, (&'static str, Reply)> {
        let Some(auth) =
            credentials::only_value(req, &http::header::AUTHORIZATION).map_err(|_| {
                (
                    "repeated_credentials",
                    credentials::repeated("Authorization"),
                )
            })?
        else {
            return Ok(None);
        };
        let Some(token) = credentials::bearer(auth.as_bytes()) else {
            return Ok(None);
        };
        // Not one token (`<jwt>, Bearer <jwt>`): nobody could say which one was meant.
        if !credentials::is_token68(token) {
            return Err((
                "invalid_jwt",
                credentials::refused("malformed bearer token"),
            ));
        }
        Ok(Some(token)
            .filter(|token| credentials::looks_like_jwt(token))
            .and_then(|token| std::str::from_utf8(token).ok()))
    }

    /// Verifies `token` against `keys`.
    fn verify(&self, token: &str, keys: &KeySet) -> Result<Identity, Refusal> {
        self.verify_claims(token, keys)
            .map(|(identity, _)| identity)
    }

    /// Verifies a token this gateway fetched itself (an OIDC ID token) with the keys
    /// held, asking for one rate-limited refresh when its `kid` is unknown. Returns the
    /// identity and every claim; the error is the refusal's reason.
    pub(crate) async fn verify_fetched(
        &self,
        token: &str,
    ) -> Result<(Identity, Map<String, Value>), &'static str> {
        let check = || match &self.keys {
            Keys::Fixed(set) => self.verify_claims(token, set),
            Keys::Live(r) => self.verify_claims(token, &r.store.keys.load()),
        };
        let refusal = match check() {
            Ok(verified) => return Ok(verified),
            Err(r) => r,
        };
        let waiting = match &self.keys {
            Keys::Live(refresher) if refusal.wants_refresh() => {
                refresher.ensure_started();
                refresher.ask()
            }
            _ => None,
        };
        let Some(mut fetched) = waiting else {
            return Err(refusal.reason());
        };
        let _ = tokio::time::timeout(REFRESH_WAIT, fetched.changed()).await;
        check().map_err(Refusal::reason)
    }

    /// Loads the keys (bounded by [`FETCH_TIMEOUT`]) and starts the background refresh,
    /// if this plugin follows a key set.
    pub(crate) fn start_keys(&self) {
        if let Keys::Live(refresher) = &self.keys {
            refresher.start();
        }
    }

    fn verify_claims(
        &self,
        token: &str,
        keys: &KeySet,
    ) -> Result<(Identity, Map<String, Value>), Refusal> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Refusal::Malformed);
        }
        // `alg: none` (any spelling) and unknown algorithms fail to parse here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(Refusal::AlgorithmNotAllowed);
        }
        if header.crit.is_some() {
            return Err(Refusal::CriticalHeader);
        }
        if keys.keys.is_empty() {
            return Err(Refusal::NoKeys);
        }
        let kid = header.kid.as_deref();
        let mut named = keys
            .keys
            .iter()
            .filter(|k| match (kid, k.kid.as_deref()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if named.peek().is_none() {
            return Err(Refusal::UnknownKey);
        }
        let mut outcome = Err(Refusal::KeyMismatch);
        for key in named.filter(|k| k.fits(header.alg)) {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation) {
                Ok(data) => {
                    outcome = Ok(data.claims);
                    break;
                }
                // Without a `kid` several keys may fit: try the next one.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    outcome = Err(Refusal::Signature)
                }
                // The claims are only checked once the signature is good.
                Err(e) => return Err(Refusal::from_jwt_error(&e)),
            }
        }
        let claims = outcome?;
        // jsonwebtoken accepts an `iss` list naming the issuer among others; one issuer
        // means one string.
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(Refusal::Issuer);
        }
        let subject = self
            .subject_claim
            .lookup(&claims)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 512 && !s.chars().any(char::is_control))
            .ok_or(Refusal::Subject)?;
        let identity = Identity {
            subject: Arc::from(subject),
            role: self.role_of(&claims),
            method: "jwt",
        };
        Ok((identity, claims))
    }

    fn role_of(&self, claims: &Map<String, Value>) -> Role {
        let Some(path) = &self.role_claim else {
            return Role::User;
        };
        let admin = |v: &Value| {
            v.as_str()
                .is_some_and(|s| self.admin_values.iter().any(|a| a == s))
        };
        let is_admin = match path.lookup(claims) {
            Some(Value::Array(items)) => items.iter().any(admin),
            Some(v) => admin(v),
            None => false,
        };
        if is_admin {
            Role::Admin
        } else {
            Role::User
        }
    }

    fn check(&self, token: &str) -> Result<Identity, Refusal> {
        match &self.keys {
            Keys::Fixed(set) => self.verify(token, set),
            Keys::Live(r) => self.verify(token, &r.store.keys.load()),
        }
    }

    fn accept(&self, identity: Identity, req: &mut RequestHeader, ctx: &mut Ctx) -> Verdict {
        if ctx.identify(identity).is_err() {
            return Verdict::Reply(credentials::conflicting());
        }
        if self.strip {
            req.remove_header(&http::header::AUTHORIZATION);
        }
        Verdict::Continue
    }
}

fn refuse(refusal: Refusal, ctx: &mut Ctx) -> Verdict {
    ctx.auth_failure = Some(refusal.metric());
    Verdict::Reply(credentials::refused(refusal.reason()))
}

impl Plugin for Jwt {
    fn type_name(&self) -> &'static str {
        "jwt"
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            ..Hooks::default()
        }
    }

    fn is_identity(&self) -> bool {
        true
    }

    fn start(&self) -> Result<(), String> {
        self.start_keys();
        Ok(())
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        if let Keys::Live(refresher) = &self.keys {
            refresher.ensure_started();
        }
        let token = match Self::presented(req) {
            Ok(Some(token)) => token,
            Ok(None) => return RequestFlow::CONTINUE,
            Err((reason, reply)) => {
                ctx.auth_failure = Some(reason);
                return RequestFlow::reply(reply);
            }
        };
        let refusal = match self.check(token) {
            Ok(identity) => return RequestFlow::Done(self.accept(identity, req, ctx)),
            Err(r) => r,
        };
        let waiting = match &self.keys {
            Keys::Live(refresher) if refusal.wants_refresh() => refresher.ask(),
            _ => None,
        };
        let Some(mut fetched) = waiting else {
            return RequestFlow::Done(refuse(refusal, ctx));
        };
        // A key we do not hold yet: wait (bounded) for the fetch this request asked
        // for, then verify once more against the new set.
        let token = token.to_string();
        RequestFlow::Wait(Box::pin(async move {
            let _ = tokio::time::timeout(REFRESH_WAIT, fetched.changed()).await;
            match self.check(&token) {
                Ok(identity) => self.accept(identity, req, ctx),
                Err(r) => refuse(r, ctx),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestId;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    /// The algorithms of each key held, by `kid`.
    fn describe(p: &Jwt) -> HashMap<String, Vec<Algorithm>> {
        let Keys::Live(r) = &p.keys else {
            panic!("not a live key set")
        };
        r.store
            .keys
            .load()
            .keys
            .iter()
            .map(|k| {
                (
                    k.kid.clone().unwrap_or_default(),
                    k.validation.algorithms.clone(),
                )
            })
            .collect()
    }

    const ISS: &str = "https://idp.test/";
    const AUD: &str = "gateway";
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    fn read(name: &str) -> Vec<u8> {
        std::fs::read(data(name)).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> Value {
        json!({ "iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300, "iat": now() })
    }

    fn with(mut base: Value, changes: Value) -> Value {
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, key).unwrap()
    }

    fn rsa1() -> EncodingKey {
        EncodingKey::from_rsa_pem(&read("rsa1.key.pem")).unwrap()
    }

    fn rsa2() -> EncodingKey {
        EncodingKey::from_rsa_pem(&read("rsa2.key.pem")).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A hand-made token: any header, any payload, any signature bytes.
    fn forge(header: Value, payload: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes()),
            b64(signature)
        )
    }

    fn hmac(alg: Algorithm, secret: &[u8], header: Value, payload: &Value) -> String {
        let unsigned = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let sig =
            jsonwebtoken::crypto::sign(unsigned.as_bytes(), &EncodingKey::from_secret(secret), alg)
                .unwrap();
        format!("{unsigned}.{sig}")
    }

    fn config(yaml: &str) -> JwtConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn build(yaml: &str) -> Result<Jwt, String> {
        let env = BuildEnv {
            base_dir: data(""),
            ..BuildEnv::default()
        };
        Jwt::new(config(yaml), &env)
    }

    fn rsa_plugin(extra: &str) -> Jwt {
        build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: rsa1.pub.pem, algorithms: [RS256, PS256] {extra} }}"
        ))
        .unwrap()
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "127.0.0.1".parse().unwrap(),
            RequestId::from_random(1),
            false,
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// Runs the request hook with `Authorization: <auth>`; Ok(identity) or Err((status, error)).
    fn run_auth(
        p: &Jwt,
        auth: &str,
    ) -> (Result<Option<Identity>, (u16, String)>, Ctx, RequestHeader) {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Authorization", auth).unwrap();
        let mut c = ctx();
        let verdict = runtime().block_on(p.on_request(&mut req, &mut c).resolve());
        let out = match verdict {
            Verdict::Continue => Ok(c.identity.clone()),
            Verdict::Reply(r) => {
                assert_eq!(
                    r.headers
                        .iter()
                        .find(|(n, _)| n == http::header::WWW_AUTHENTICATE)
                        .map(|(_, v)| v.to_str().unwrap()),
                    Some("Bearer error=\"invalid_token\"")
                );
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                Err((r.status, body["error"].as_str().unwrap().to_string()))
            }
        };
        (out, c, req)
    }

    fn run(p: &Jwt, token: &str) -> Result<Option<Identity>, (u16, String)> {
        run_auth(p, &format!("Bearer {token}")).0
    }

    fn refused(p: &Jwt, token: &str) -> String {
        let (out, c, _) = run_auth(p, &format!("Bearer {token}"));
        let (status, reason) = out.expect_err("token must be refused");
        assert_eq!(status, 401);
        assert!(c.identity.is_none());
        assert!(c.auth_failure.is_some());
        reason
    }

    #[test]
    fn good_tokens_identify_the_subject() {
        let p = rsa_plugin("");
        let id = run(&p, &sign(Algorithm::RS256, None, &rsa1(), &claims()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (&*id.subject, id.role, id.method),
            ("alice", Role::User, "jwt")
        );
        // PS256 with the same RSA key, a `kid` the configured key ignores, `aud` as a list.
        let listed = with(claims(), json!({ "aud": ["other", AUD] }));
        let id = run(&p, &sign(Algorithm::PS256, Some("x"), &rsa1(), &listed))
            .unwrap()
            .unwrap();
        assert_eq!(&*id.subject, "alice");
    }

    #[test]
    fn other_bearers_and_schemes_are_left_alone() {
        let p = rsa_plugin("");
        for auth in [
            "Bearer gw_abc.def.ghi",
            "Bearer opaque-token",
            "Basic dXNlcjpwYXNz",
        ] {
            let (out, c, _) = run_auth(&p, auth);
            assert_eq!(out.unwrap(), None, "{auth}");
            assert!(c.auth_failure.is_none());
        }
    }

    #[test]
    fn alg_none_is_refused_in_every_spelling() {
        let p = rsa_plugin("");
        for alg in ["none", "None", "NONE", "nOnE"] {
            let t = forge(json!({ "alg": alg, "typ": "JWT" }), &claims(), b"");
            assert_eq!(refused(&p, &t), Refusal::Malformed.reason(), "{alg}");
            // A none token with a signature borrowed from a real one.
            let real = sign(Algorithm::RS256, None, &rsa1(), &claims());
            let sig = real.rsplit('.').next().unwrap();
            refused(&p, &format!("{}{sig}", t));
        }
        // A none token never even reaches an HS plugin's key.
        let hs = build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{SECRET}', algorithms: [HS256] }}"
        ))
        .unwrap();
        refused(&hs, &forge(json!({ "alg": "none" }), &claims(), b""));
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        // The classic confusion: the attacker knows the public key and uses its PEM
        // bytes as an HMAC secret.
        let pem = read("rsa1.pub.pem");
        let token = hmac(
            Algorithm::HS256,
            &pem,
            json!({ "alg": "HS256", "typ": "JWT" }),
            &claims(),
        );
        assert_eq!(
            refused(&rsa_plugin(""), &token),
            Refusal::AlgorithmNotAllowed.reason()
        );
        // Even a config that lists HS256 next to a public key cannot be built.
        let err = build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: rsa1.pub.pem, algorithms: [RS256, HS256] }}"
        ))
        .err()
        .unwrap();
        assert!(err.contains("HS256") && err.contains("RSA"), "{err}");
        // The key itself never verifies HMAC, whatever the Validation says.
        let key = DecodingKey::from_rsa_pem(&pem).unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[AUD]);
        assert!(jsonwebtoken::decode::<Value>(&token, &key, &v).is_err());
    }

    #[test]
    fn algorithms_outside_the_list_or_the_key_type_are_refused() {
        let p = rsa_plugin("");
        // RS512 is an RSA algorithm but not listed.
        assert_eq!(
            refused(&p, &sign(Algorithm::RS512, None, &rsa1(), &claims())),
            Refusal::AlgorithmNotAllowed.reason()
        );
        // Listed but signed by another RSA key.
        assert_eq!(
            refused(&p, &sign(Algorithm::RS256, None, &rsa2(), &claims())),
            Refusal::Signature.reason()
        );
        // An EC token against the RSA key.
        let ec = EncodingKey::from_ec_pem(&read("ec256.key.pem")).unwrap();
        assert_eq!(
            refused(&p, &sign(Algorithm::ES256, None, &ec, &claims())),
            Refusal::AlgorithmNotAllowed.reason()
        );
        // A critical header we do not understand.
        let mut h = Header::new(Algorithm::RS256);
        h.crit = Some(vec!["exp".into()]);
        let t = encode(&h, &claims(), &rsa1()).unwrap();
        assert_eq!(refused(&p, &t), Refusal::CriticalHeader.reason());
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let p = rsa_plugin("");
        let t = sign(Algorithm::RS256, None, &rsa1(), &claims());
        let parts: Vec<&str> = t.split('.').collect();
        let admin = b64(with(claims(), json!({ "sub": "root" }))
            .to_string()
            .as_bytes());
        assert_eq!(
            refused(&p, &format!("{}.{admin}.{}", parts[0], parts[2])),
            Refusal::Signature.reason()
        );
        refused(&p, &format!("{}.{}.", parts[0], parts[1]));
        refused(&p, "a.b.c");
        refused(
            &p,
            &format!("{}.{}.{}", parts[0], parts[1], "A".repeat(MAX_TOKEN_LEN)),
        );
    }

    #[test]
    fn embedded_keys_in_the_header_are_ignored() {
        // The attacker signs with their own key and ships its public half in `jwk`.
        let attacker = rsa2();
        let jwk = Jwk::from_encoding_key(&attacker, Algorithm::RS256).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.jwk = Some(jwk);
        h.jku = Some("https://evil.example/jwks".into());
        let t = encode(&h, &claims(), &attacker).unwrap();
        assert_eq!(refused(&rsa_plugin(""), &t), Refusal::Signature.reason());
    }

    #[test]
    fn issuer_audience_and_time_are_checked() {
        let p = rsa_plugin("");
        let t = |c: Value| sign(Algorithm::RS256, None, &rsa1(), &c);
        let cases = [
            (json!({ "iss": "https://evil.test/" }), Refusal::Issuer),
            (
                json!({ "iss": [ISS, "https://evil.test/"] }),
                Refusal::Issuer,
            ),
            (json!({ "iss": null }), Refusal::MissingClaim),
            (json!({ "aud": "other" }), Refusal::Audience),
            (json!({ "aud": ["a", "b"] }), Refusal::Audience),
            (json!({ "aud": null }), Refusal::MissingClaim),
            (json!({ "exp": null }), Refusal::MissingClaim),
            (json!({ "exp": now() - 60 }), Refusal::Expired),
            (json!({ "exp": "9999999999" }), Refusal::MissingClaim),
            (json!({ "nbf": now() + 60 }), Refusal::NotYetValid),
            (json!({ "sub": null }), Refusal::Subject),
            (json!({ "sub": 42 }), Refusal::Subject),
            (json!({ "sub": "" }), Refusal::Subject),
            (json!({ "sub": "a\r\nX-Injected: 1" }), Refusal::Subject),
        ];
        for (change, want) in cases {
            assert_eq!(
                refused(&p, &t(with(claims(), change.clone()))),
                want.reason(),
                "{change}"
            );
        }
        // Within the leeway both ways.
        let skewed = with(claims(), json!({ "exp": now() - 20, "nbf": now() + 20 }));
        assert!(run(&p, &t(skewed)).is_ok());
        // A zero leeway is exact.
        let strict = rsa_plugin(", leeway: 0s");
        refused(&strict, &t(with(claims(), json!({ "exp": now() - 2 }))));
    }

    #[test]
    fn subject_and_admin_come_from_configured_claims() {
        let p = rsa_plugin(", subject_claim: email, role_claim: realm_access.roles, admin_values: [gw-admin, root]");
        let t = |c: Value| sign(Algorithm::RS256, None, &rsa1(), &with(claims(), c));
        let id = run(
            &p,
            &t(json!({ "email": "a@b.c", "realm_access": { "roles": ["x", "gw-admin"] } })),
        )
        .unwrap()
        .unwrap();
        assert_eq!((&*id.subject, id.role), ("a@b.c", Role::Admin));
        let id = run(
            &p,
            &t(json!({ "email": "u@b.c", "realm_access": { "roles": ["x"] } })),
        )
        .unwrap()
        .unwrap();
        assert_eq!(id.role, Role::User);
        // Without the subject claim: refused, even though `sub` is there.
        refused(&p, &t(json!({})));
        // A string role claim, and a literal claim name with dots.
        let p = rsa_plugin(", role_claim: 'https://x.test/role', admin_values: [admin]");
        let id = run(&p, &t(json!({ "https://x.test/role": "admin" })))
            .unwrap()
            .unwrap();
        assert_eq!(id.role, Role::Admin);
        let id = run(&p, &t(json!({ "https://x.test/role": ["user"] })))
            .unwrap()
            .unwrap();
        assert_eq!(id.role, Role::User);
    }

    #[test]
    fn identity_is_kept_and_the_header_stripped_on_request() {
        let p = rsa_plugin(", strip: true");
        let token = sign(Algorithm::RS256, None, &rsa1(), &claims());
        let (out, _, req) = run_auth(&p, &format!("Bearer {token}"));
        assert!(out.unwrap().is_some());
        assert!(req.headers.get("authorization").is_none());
        let (_, _, req) = run_auth(&rsa_plugin(""), &format!("Bearer {token}"));
        assert!(req.headers.get("authorization").is_some());
    }

    #[test]
    fn every_key_type_verifies_its_own_algorithms() {
        let cases: [(&str, &str, &str, Algorithm); 4] = [
            ("ec256.pub.pem", "ec256.key.pem", "ES256", Algorithm::ES256),
            ("ec384.pub.pem", "ec384.key.pem", "ES384", Algorithm::ES384),
            (
                "ed25519.pub.pem",
                "ed25519.key.pem",
                "EdDSA",
                Algorithm::EdDSA,
            ),
            (
                "rsa1.pkcs1.pub.pem",
                "rsa1.key.pem",
                "RS384",
                Algorithm::RS384,
            ),
        ];
        for (public, private, name, alg) in cases {
            let p = build(&format!(
                "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: {public}, algorithms: [{name}] }}"
            ))
            .unwrap();
            let pem = read(private);
            let key = match alg.family() {
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
                AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
                _ => EncodingKey::from_rsa_pem(&pem),
            }
            .unwrap();
            assert!(
                run(&p, &sign(alg, None, &key, &claims()))
                    .unwrap()
                    .is_some(),
                "{name}"
            );
        }
        let hs = build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{SECRET}', algorithms: [HS256, HS512] }}"
        ))
        .unwrap();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        assert!(run(&hs, &sign(Algorithm::HS512, None, &key, &claims())).is_ok());
        let wrong = EncodingKey::from_secret(b"another-secret-that-is-long-enough!!");
        refused(&hs, &sign(Algorithm::HS256, None, &wrong, &claims()));
        // HS384 is not listed.
        refused(&hs, &sign(Algorithm::HS384, None, &key, &claims()));
    }

    #[test]
    fn settings_that_do_not_fit_are_config_errors() {
        let base = format!("issuer: '{ISS}', audiences: [{AUD}]");
        let err = |rest: &str| {
            build(&format!("{{ {base}, {rest} }}"))
                .err()
                .unwrap_or_else(|| panic!("{rest} must not build"))
        };
        assert!(err(&format!("hs_secret: '{SECRET}', algorithms: [RS256]")).contains("RS256"));
        assert!(err("hs_secret: short, algorithms: [HS256]").contains("32"));
        assert!(err("public_key_file: ec256.pub.pem, algorithms: [ES384]").contains("P-256"));
        assert!(err("public_key_file: ec256.pub.pem, algorithms: [RS256]").contains("ES256"));
        assert!(err("public_key_file: ed25519.pub.pem, algorithms: [ES256]").contains("Ed25519"));
        assert!(err("public_key_file: rsa1.key.pem, algorithms: [RS256]").contains("private key"));
        assert!(err("public_key_file: nope.pem, algorithms: [RS256]").contains("nope.pem"));
        assert!(err("public_key_file: README.md, algorithms: [RS256]").contains("PEM"));
        assert!(
            err("jwks_url: 'https://idp.test/jwks', algorithms: [HS256]").contains("hs_secret")
        );
        assert!(err("jwks_url: 'http://idp.test/jwks', algorithms: [RS256]").contains("https"));
        assert!(err("jwks_url: 'ftp://idp.test/jwks', algorithms: [RS256]").contains("https"));
        assert!(err(&format!(
            "hs_secret: '{SECRET}', public_key_file: rsa1.pub.pem, algorithms: [RS256]"
        ))
        .contains("exactly one"));
        assert!(err("algorithms: [RS256]").contains("exactly one"));
        assert!(err("public_key_file: rsa1.pub.pem, algorithms: []").contains("at least one"));
        assert!(err("public_key_file: rsa1.pub.pem, algorithms: [none]").contains("none"));
        assert!(err("public_key_file: rsa1.pub.pem, algorithms: [RS1024]").contains("RS1024"));
        assert!(
            err("public_key_file: rsa1.pub.pem, algorithms: [RS256], leeway: 1h")
                .contains("leeway")
        );
        assert!(
            err("public_key_file: rsa1.pub.pem, algorithms: [RS256], role_claim: groups")
                .contains("admin_values")
        );
        assert!(
            err("public_key_file: rsa1.pub.pem, algorithms: [RS256], admin_values: [a]")
                .contains("role_claim")
        );
        let no_aud = build(&format!(
            "{{ issuer: '{ISS}', audiences: [], hs_secret: '{SECRET}', algorithms: [HS256] }}"
        ));
        assert!(no_aud.err().unwrap().contains("audiences"));
        // Unknown fields and a missing issuer are caught by serde.
        assert!(serde_yaml_ng::from_str::<JwtConfig>(&format!(
            "{{ {base}, hs_secret: '{SECRET}', algorithms: [HS256], isuer: x }}"
        ))
        .is_err());
        assert!(serde_yaml_ng::from_str::<JwtConfig>(&format!(
            "{{ audiences: [a], hs_secret: '{SECRET}', algorithms: [HS256] }}"
        ))
        .is_err());
    }

    #[test]
    fn the_secret_never_appears_in_errors() {
        let secret = "a-secret-of-unusual-shape-1234567890";
        let errors = [
            build(&format!(
                "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{secret}', algorithms: [RS256] }}"
            ))
            .err()
            .unwrap(),
            build(&format!(
                "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{}', algorithms: [HS256] }}",
                &secret[..10]
            ))
            .err()
            .unwrap(),
            serde_yaml_ng::from_str::<JwtConfig>(&format!(
                "{{ issuer: x, audiences: [a], hs_secret: [{secret}], algorithms: [HS256] }}"
            ))
            .err()
            .unwrap()
            .to_string(),
        ];
        for e in errors {
            assert!(!e.contains(&secret[..10]), "{e}");
        }
        let cfg = config(&format!(
            "{{ issuer: x, audiences: [a], hs_secret: {secret}, algorithms: [HS256] }}"
        ));
        assert!(!format!("{:?}", cfg.hs_secret).contains(&secret[..10]));
    }

    /// A JWKS server on loopback whose document can be swapped, counting fetches.
    struct JwksServer {
        url: String,
        body: Arc<Mutex<String>>,
        fetches: Arc<AtomicUsize>,
    }

    impl JwksServer {
        fn start(body: Value) -> JwksServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/jwks", listener.local_addr().unwrap());
            let body = Arc::new(Mutex::new(body.to_string()));
            let fetches = Arc::new(AtomicUsize::new(0));
            let (b, f) = (body.clone(), fetches.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let mut line = String::new();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    while reader.read_line(&mut line).unwrap_or(0) > 2 {
                        line.clear();
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().unwrap().clone();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
            JwksServer { url, body, fetches }
        }

        fn set(&self, body: Value) {
            *self.body.lock().unwrap() = body.to_string();
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        serde_json::to_value(jwk).unwrap()
    }

    /// A JWKS plugin, started as a config about to serve starts it.
    fn jwks_plugin(url: &str, extra: &str) -> Jwt {
        let p = built_jwks_plugin(url, extra);
        p.start().unwrap();
        p
    }

    fn built_jwks_plugin(url: &str, extra: &str) -> Jwt {
        build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], jwks_url: '{url}', algorithms: [RS256, ES256, EdDSA], jwks_cooldown: 1s {extra} }}"
        ))
        .unwrap()
    }

    #[test]
    fn building_fetches_nothing_starting_fetches_once() {
        let server = JwksServer::start(json!({ "keys": [jwk(&rsa1(), Algorithm::RS256, "k1")] }));
        let p = built_jwks_plugin(&server.url, ", jwks_refresh: 1h");
        assert_eq!(server.fetches(), 0, "a build touched the network");
        p.start().unwrap();
        p.start().unwrap();
        assert_eq!(server.fetches(), 1);
        let token = sign(Algorithm::RS256, Some("k1"), &rsa1(), &claims());
        assert!(run(&p, &token).is_ok());
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_and_type() {
        let ec = EncodingKey::from_ec_pem(&read("ec256.key.pem")).unwrap();
        let ed_public = DecodingKey::from_ed_pem(&read("ed25519.pub.pem")).unwrap();
        let ed = EncodingKey::from_ed_pem(&read("ed25519.key.pem")).unwrap();
        let server = JwksServer::start(json!({ "keys": [
            jwk(&rsa1(), Algorithm::RS256, "r1"),
            jwk(&ec, Algorithm::ES256, "e1"),
            { "kty": "OKP", "crv": "Ed25519", "x": b64(ed_public.as_bytes()), "kid": "d1" },
            // Never used: a symmetric key, an encryption key, an unknown type.
            { "kty": "oct", "k": b64(SECRET.as_bytes()), "kid": "s1" },
            with(jwk(&rsa2(), Algorithm::RS256, "enc"), json!({ "use": "enc" })),
            { "kty": "XYZ", "kid": "odd" },
        ]}));
        let p = jwks_plugin(&server.url, "");
        let kinds = describe(&p);
        assert_eq!(kinds.len(), 3, "{:?}", kinds.keys());
        assert_eq!(kinds["r1"], vec![Algorithm::RS256]);
        assert_eq!(kinds["e1"], vec![Algorithm::ES256]);
        assert_eq!(kinds["d1"], vec![Algorithm::EdDSA]);

        assert!(run(&p, &sign(Algorithm::RS256, Some("r1"), &rsa1(), &claims())).is_ok());
        assert!(run(&p, &sign(Algorithm::ES256, Some("e1"), &ec, &claims())).is_ok());
        assert!(run(&p, &sign(Algorithm::EdDSA, Some("d1"), &ed, &claims())).is_ok());
        // Without a kid, every fitting key is tried.
        assert!(run(&p, &sign(Algorithm::ES256, None, &ec, &claims())).is_ok());
        // An ES256 token naming the RSA key's kid.
        assert_eq!(
            refused(&p, &sign(Algorithm::ES256, Some("r1"), &ec, &claims())),
            Refusal::KeyMismatch.reason()
        );
        // HMAC with the published symmetric key, or with the RSA JWK: not allowed.
        let hs = hmac(
            Algorithm::HS256,
            SECRET.as_bytes(),
            json!({ "alg": "HS256", "kid": "s1" }),
            &claims(),
        );
        assert_eq!(refused(&p, &hs), Refusal::AlgorithmNotAllowed.reason());
        // The encryption key is not a signing key.
        let enc = sign(Algorithm::RS256, Some("enc"), &rsa2(), &claims());
        assert_eq!(refused(&p, &enc), Refusal::UnknownKey.reason());
    }

    #[test]
    fn an_unknown_kid_refreshes_once_per_cooldown() {
        let server = JwksServer::start(json!({ "keys": [jwk(&rsa1(), Algorithm::RS256, "k1")] }));
        let p = jwks_plugin(&server.url, ", jwks_refresh: 1h");
        assert_eq!(server.fetches(), 1, "fetched when started");
        let old = sign(Algorithm::RS256, Some("k1"), &rsa1(), &claims());
        let new = sign(Algorithm::RS256, Some("k2"), &rsa2(), &claims());
        assert!(run(&p, &old).is_ok());

        // A made-up kid costs one fetch, then the cooldown holds.
        assert_eq!(refused(&p, &new), Refusal::UnknownKey.reason());
        assert_eq!(server.fetches(), 2);
        // The provider rotates in k2, but within the cooldown nothing is fetched.
        server.set(json!({ "keys": [jwk(&rsa2(), Algorithm::RS256, "k2")] }));
        for _ in 0..5 {
            refused(&p, &new);
        }
        assert_eq!(server.fetches(), 2);
        // After the cooldown, the first k2 token waits for the refresh and passes.
        std::thread::sleep(Duration::from_millis(1100));
        let id = run(&p, &new).unwrap().unwrap();
        assert_eq!(&*id.subject, "alice");
        assert_eq!(server.fetches(), 3);
        // k1 was rotated out.
        assert_eq!(refused(&p, &old), Refusal::UnknownKey.reason());
    }

    #[test]
    fn a_provider_down_at_start_is_not_fatal_and_retried() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/jwks");
        let p = jwks_plugin(&url, "");
        let token = sign(Algorithm::RS256, Some("k1"), &rsa1(), &claims());
        let (out, c, _) = run_auth(&p, &format!("Bearer {token}"));
        assert_eq!(out.unwrap_err().1, Refusal::NoKeys.reason());
        assert_eq!(c.auth_failure, Some("jwt_keys_unavailable"));

        // The provider comes up on that port; the refresher's retry finds it.
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let body = json!({ "keys": [jwk(&rsa1(), Algorithm::RS256, "k1")] }).to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let start = Instant::now();
        while run(&p, &token).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "keys never arrived"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_changed_key_file_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, read("rsa1.pub.pem")).unwrap();
        let p = build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: '{}', algorithms: [RS256] }}",
            path.display()
        ))
        .unwrap();
        let t1 = sign(Algorithm::RS256, None, &rsa1(), &claims());
        let t2 = sign(Algorithm::RS256, None, &rsa2(), &claims());
        assert!(run(&p, &t1).is_ok());
        std::fs::write(&path, read("rsa2.pub.pem")).unwrap();
        let start = Instant::now();
        while run(&p, &t2).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "key file not reread"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        refused(&p, &t1);
        // A broken file keeps the key in force.
        std::fs::write(&path, "garbage").unwrap();
        std::thread::sleep(FILE_POLL * 2);
        assert!(run(&p, &t2).is_ok());
    }
}
