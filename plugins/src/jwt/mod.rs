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

mod config;
mod keys;
mod refresh;
mod verify;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use crate::{
    credentials, BuildEnv, Ctx, Hooks, Identity, Plugin, Reply, RequestFlow, RequestHeader, Verdict,
};

pub use crate::secret::Secret;
pub use config::Algorithms;
pub use config::JwtConfig;
use config::*;
pub(crate) use config::{check_claim_settings, check_leeway};
use keys::*;
use refresh::*;
use verify::*;

/// Minimum length of `hs_secret`.
pub const MIN_SECRET_LEN: usize = 32;
/// Longer bearer values are refused without decoding.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// A JWKS fetch (DNS, connect, TLS, body) never takes longer: a start or reload that
/// waits on one ends in bounded time.
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

impl Jwt {
    pub fn new(config: JwtConfig, env: &BuildEnv) -> Result<Self, String> {
        let algorithms = config.algorithms.as_slice().to_vec();
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
        let leeway = check_leeway(config.leeway)?;
        let refresh_every = config.jwks_refresh.get();
        let cooldown = config.jwks_cooldown.get();
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
            if secret.expose().len() < MIN_SECRET_LEN {
                return Err(format!(
                    "`hs_secret` must be at least {MIN_SECRET_LEN} bytes"
                ));
            }
            Keys::Fixed(KeySet {
                keys: vec![VerifyKey {
                    kid: None,
                    key: DecodingKey::from_secret(secret.expose().as_bytes()),
                    validation: validation_for(&base, algs),
                }],
            })
        } else if let Some(file) = &config.public_key_file {
            let path = env.base_dir.join(file);
            let stamp = crate::watch::stamp(&path);
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
            let to = crate::outbound::check_url("jwks_url", url)?;
            let agent = crate::outbound::agent(to, FETCH_TIMEOUT, 3);
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

    /// Loads the keys (bounded by [`FETCH_TIMEOUT`]) and starts the background refresh,
    /// if this plugin follows a key set.
    pub(crate) fn start_keys(&self) {
        if let Keys::Live(refresher) = &self.keys {
            refresher.start();
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

impl crate::PluginType for Jwt {
    const TYPE: &'static str = "jwt";
    type Config = JwtConfig;

    fn build(config: JwtConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        Jwt::new(config, env)
    }
}

impl Plugin for Jwt {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
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
mod tests;
