//! `oidc`: browser login with an OpenID Connect provider (Authentik, Keycloak, Entra,
//! Google, ...), then the same session cookie as `pin_gate`.
//!
//! ```yaml
//! plugins:
//!   sso:
//!     type: oidc
//!     issuer: https://auth.example.com/application/o/gateway/   # exactly as in discovery
//!     client_id: gateway
//!     client_secret: ${env:GATEWARDEN_OIDC_CLIENT_SECRET}
//!     scopes: [openid, email, profile]
//!     subject_claim: sub               # or preferred_username, email
//!     role_claim: groups               # a string or a list; `a.b` reaches nested claims
//!     admin_values: [gateway-admins]
//!     secret: ${env:GATEWARDEN_SESSION_SECRET}   # signs sessions and login state, 32+ bytes
//!     previous_secrets: []
//!     session_ttl: 12h
//!     cookie_name: gatewarden
//!     secure_cookie: auto              # auto | always | never
//!     redirect_url: https://gw.example.com/.gatewarden/oidc/callback   # optional
//!     post_logout_redirect_url: https://gw.example.com/                # optional
//!     algorithms: [RS256]
//!     leeway: 30s
//!     jwks_refresh: 5m
//! ```
//!
//! The provider is found through `{issuer}/.well-known/openid-configuration`, fetched
//! on a background thread from the first request on and retried with backoff until it
//! answers; routes that need no login serve meanwhile, and a login asked for before
//! discovery succeeded gets 503 (after waiting up to 3 s for a first attempt).
//!
//! A browser navigation without a session is sent (by the core) to
//! `/.gatewarden/login?next=...`, which this plugin answers with a 302 to the provider's
//! authorization endpoint: authorization code flow with PKCE (S256), a random `state`
//! and `nonce`. Those, the PKCE verifier, the redirect URI and `next` travel in a
//! short-lived (10 min) cookie signed with `secret` (HMAC-SHA256), HttpOnly and
//! SameSite=Lax, so any replica can finish the login. `/.gatewarden/oidc/callback`
//! checks that the `state` matches that cookie, clears it, refuses a state already
//! used, exchanges the code (with `client_secret_basic`, or `client_secret_post` when
//! the provider offers only that) off the proxy's threads, and verifies the ID token as
//! the `jwt` plugin verifies a bearer token (explicit `algorithms`, keys from the
//! provider's JWKS with the same background refresh and one rate-limited refresh on
//! an unknown `kid`, `iss`, `aud` = `client_id`, `exp`), plus its `nonce` and `azp`.
//! The session cookie it then sets is the one `pin_gate` uses; the user lands on a safe
//! same-origin `next`.
//!
//! `POST /.gatewarden/logout` (same origin only) clears the session and, when the
//! provider has an `end_session_endpoint`, sends the browser there (RP-initiated
//! logout with `client_id` and `post_logout_redirect_uri`, by default the site's
//! root), so the provider's own session ends too.
//!
//! `client_secret` and `secret` are never logged or shown in an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::jwt::{Jwt, JwtConfig, Secret};
use crate::session::{self, SecureCookie, SessionKeys, LOGIN_PATH, LOGOUT_PATH, MIN_SECRET_LEN};
use crate::units::parse_duration;
use crate::{BuildEnv, Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader, Verdict};

/// Where the provider sends the browser back with the authorization code.
pub const CALLBACK_PATH: &str = "/.gatewarden/oidc/callback";
/// How long a login may take between leaving for the provider and coming back.
const STATE_TTL: Duration = Duration::from_secs(600);
/// How long a login asked for while discovery is pending waits for it.
const DISCOVERY_WAIT: Duration = Duration::from_secs(3);
/// Discovery and token requests never take longer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry after a failed discovery; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(15);
/// Larger discovery documents or token responses are refused.
const MAX_DOCUMENT_BYTES: u64 = 256 * 1024;
/// States remembered as used; past this the oldest are forgotten (the provider's
/// single-use codes still stop a replay then).
const MAX_USED_STATES: usize = 100_000;

/// Settings of an `oidc` plugin.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL, exactly as its discovery document says (trailing
    /// slash and all). `https` unless the host is loopback.
    pub issuer: String,
    /// The client ID registered at the provider; ID tokens must be addressed to it.
    pub client_id: String,
    /// The client secret registered at the provider. Never logged.
    pub client_secret: Secret,
    /// Scopes asked for (default `[openid, email, profile]`); `openid` is always added.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The ID token claim that names the user (default `sub`); it must be a string.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// The ID token claim that carries roles or groups: a string or a list of strings.
    /// `a.b` reaches a nested claim (Keycloak: `realm_access.roles`).
    pub role_claim: Option<String>,
    /// Values of `role_claim` that make the user an admin; anyone else is a user.
    #[serde(default)]
    pub admin_values: Vec<String>,
    /// Signs session cookies (the same sessions as `pin_gate`) and the login-state
    /// cookie; at least 32 bytes. Never logged.
    pub secret: Secret,
    /// Older secrets whose sessions are still accepted (for rotation); never used to sign.
    #[serde(default)]
    pub previous_secrets: Vec<String>,
    /// How long a session lasts once logged in (default 12h).
    #[serde(default = "default_ttl")]
    pub session_ttl: String,
    /// Session cookie name (default `gatewarden`; `__Host-gatewarden` over HTTPS). The
    /// login-state cookie is this name with `_oidc` appended.
    #[serde(default = "default_cookie")]
    pub cookie_name: String,
    /// `auto` (Secure over HTTPS), `always` or `never`.
    #[serde(default)]
    pub secure_cookie: SecureCookie,
    /// The redirect URI registered at the provider, when the gateway cannot derive it
    /// from the request (`{scheme}://{host}/.gatewarden/oidc/callback`), e.g. behind a
    /// proxy that rewrites Host. Its path must be `/.gatewarden/oidc/callback`.
    pub redirect_url: Option<String>,
    /// Where the provider sends the browser after logout (default: the site's root,
    /// `{scheme}://{host}/`); must be registered at the provider.
    pub post_logout_redirect_url: Option<String>,
    /// ID token signature algorithms accepted (default `[RS256]`): RS256/384/512,
    /// PS256/384/512, ES256, ES384, EdDSA. HS* (keyed by the client secret) is not
    /// supported.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on the ID token's `exp` and `nbf` (default 30s, at most 5m).
    #[serde(default = "default_leeway")]
    pub leeway: String,
    /// How often the provider's JWKS is fetched again (default 5m).
    #[serde(default = "default_refresh")]
    pub jwks_refresh: String,
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}
fn default_subject_claim() -> String {
    "sub".into()
}
fn default_ttl() -> String {
    "12h".into()
}
fn default_cookie() -> String {
    "gatewarden".into()
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}
fn default_leeway() -> String {
    "30s".into()
}
fn default_refresh() -> String {
    "5m".into()
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    Basic,
    Post,
}

/// What discovery found.
struct Provider {
    authorization_endpoint: String,
    token_endpoint: String,
    end_session_endpoint: Option<String>,
    client_auth: ClientAuth,
    /// Verifies ID tokens: the `jwt` plugin's checks and key handling.
    id_tokens: Jwt,
}

/// The settings the ID token verifier is built from once the JWKS URL is known.
struct VerifierSettings {
    client_id: String,
    algorithms: Vec<String>,
    subject_claim: String,
    role_claim: Option<String>,
    admin_values: Vec<String>,
    leeway: String,
    jwks_refresh: String,
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    end_session_endpoint: Option<String>,
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
    code_challenge_methods_supported: Option<Vec<String>>,
}

/// Discovery state, shared with the background thread that fetches it.
struct Discovery {
    issuer: String,
    url: String,
    agent: ureq::Agent,
    settings: VerifierSettings,
    provider: ArcSwapOption<Provider>,
    /// Counts finished discovery attempts, so a login can wait for one.
    attempts: tokio::sync::watch::Sender<u64>,
}

impl Discovery {
    /// Fetches and checks the discovery document; builds the ID token verifier.
    /// Blocking, bounded by [`FETCH_TIMEOUT`] (and the JWKS fetch's own bound).
    fn discover(&self) -> Result<Provider, String> {
        let mut resp = self
            .agent
            .get(&self.url)
            .header("accept", "application/json")
            .call()
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_DOCUMENT_BYTES)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let doc: DiscoveryDocument = serde_json::from_str(&text)
            .map_err(|e| format!("not an OpenID discovery document: {e}"))?;
        self.provider_from(doc)
    }

    fn provider_from(&self, doc: DiscoveryDocument) -> Result<Provider, String> {
        if doc.issuer != self.issuer {
            return Err(format!(
                "the document names issuer {:?}, not the configured {:?}; set `issuer` to exactly the provider's",
                doc.issuer, self.issuer
            ));
        }
        for (name, url) in [
            ("authorization_endpoint", Some(&doc.authorization_endpoint)),
            ("token_endpoint", Some(&doc.token_endpoint)),
            ("jwks_uri", Some(&doc.jwks_uri)),
            ("end_session_endpoint", doc.end_session_endpoint.as_ref()),
        ] {
            if let Some(url) = url {
                crate::jwt::check_fetch_url(name, url)?;
            }
        }
        if let Some(methods) = &doc.code_challenge_methods_supported {
            if !methods.is_empty() && !methods.iter().any(|m| m == "S256") {
                return Err("the provider does not support PKCE with S256".into());
            }
        }
        let client_auth =
            match &doc.token_endpoint_auth_methods_supported {
                // The default of the discovery spec.
                None => ClientAuth::Basic,
                Some(m) if m.iter().any(|m| m == "client_secret_basic") => ClientAuth::Basic,
                Some(m) if m.iter().any(|m| m == "client_secret_post") => ClientAuth::Post,
                Some(_) => return Err(
                    "the token endpoint offers neither client_secret_basic nor client_secret_post"
                        .into(),
                ),
            };
        let s = &self.settings;
        let id_tokens = Jwt::new(
            JwtConfig {
                issuer: doc.issuer.clone(),
                audiences: vec![s.client_id.clone()],
                jwks_url: Some(doc.jwks_uri.clone()),
                public_key_file: None,
                hs_secret: None,
                algorithms: s.algorithms.clone(),
                subject_claim: s.subject_claim.clone(),
                role_claim: s.role_claim.clone(),
                admin_values: s.admin_values.clone(),
                leeway: s.leeway.clone(),
                strip: false,
                jwks_refresh: s.jwks_refresh.clone(),
                jwks_cooldown: "30s".into(),
            },
            &BuildEnv::default(),
        )?;
        Ok(Provider {
            authorization_endpoint: doc.authorization_endpoint,
            token_endpoint: doc.token_endpoint,
            end_session_endpoint: doc.end_session_endpoint,
            client_auth,
            id_tokens,
        })
    }
}

/// Retries discovery with backoff until it succeeds or the plugin is dropped.
fn spawn_discovery(discovery: Weak<Discovery>) {
    let spawned = std::thread::Builder::new()
        .name("gw-oidc-discovery".into())
        .spawn(move || {
            let mut wait = FIRST_RETRY;
            loop {
                let Some(d) = discovery.upgrade() else { return };
                let outcome = d.discover();
                match outcome {
                    Ok(provider) => {
                        log::info!("oidc: discovered {}", d.issuer);
                        provider.id_tokens.start_keys();
                        d.provider.store(Some(Arc::new(provider)));
                        d.attempts.send_modify(|n| *n = n.wrapping_add(1));
                        return;
                    }
                    Err(e) => {
                        log::warn!(
                            "oidc: discovery at {} failed: {e}; logins get 503 until it works; retrying in {:.1}s",
                            d.url,
                            wait.as_secs_f32()
                        );
                        d.attempts.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                drop(d);
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_RETRY);
            }
        });
    if let Err(e) = spawned {
        log::error!("oidc: cannot start discovery; logins will fail: {e}");
    }
}

/// What travels through the provider in the login-state cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LoginState {
    /// `state`
    s: String,
    /// `nonce`
    n: String,
    /// PKCE code verifier
    v: String,
    /// where to go afterwards (already made safe)
    r: String,
    /// the redirect URI sent, which the code exchange must repeat
    u: String,
    /// expiry, Unix seconds
    e: u64,
}

type HmacSha256 = Hmac<Sha256>;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// 256 random bits, base64url: states, nonces and PKCE verifiers (43 characters).
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    b64(&bytes)
}

/// The PKCE S256 challenge of a verifier (RFC 7636 section 4.2).
fn pkce_challenge(verifier: &str) -> String {
    b64(&Sha256::digest(verifier.as_bytes()))
}

/// The MAC that signs login-state cookies, keyed by a key derived from `secret` so
/// that it never signs anything a session key would accept. Built once.
fn state_mac(secret: &str) -> Result<HmacSha256, String> {
    let bad = |_| "cannot key HMAC-SHA256".to_string();
    let mut derive = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).map_err(bad)?;
    derive.update(b"gatewarden oidc login state v1");
    <HmacSha256 as Mac>::new_from_slice(&derive.finalize().into_bytes()).map_err(bad)
}

/// `base64url(json).base64url(hmac)`.
fn seal(mac: &HmacSha256, state: &LoginState) -> String {
    let payload = b64(&serde_json::to_vec(state).unwrap_or_default());
    let mut mac = mac.clone();
    mac.update(payload.as_bytes());
    format!("{payload}.{}", b64(&mac.finalize().into_bytes()))
}

/// Checks the signature (in constant time) and the expiry.
fn open(mac: &HmacSha256, value: &str, now: u64) -> Result<LoginState, &'static str> {
    let (payload, tag) = value.split_once('.').ok_or("malformed")?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| "malformed")?;
    let mut mac = mac.clone();
    mac.update(payload.as_bytes());
    mac.verify_slice(&tag).map_err(|_| "bad signature")?;
    let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| "malformed")?;
    let state: LoginState = serde_json::from_slice(&json).map_err(|_| "malformed")?;
    if state.e <= now {
        return Err("expired");
    }
    Ok(state)
}

/// The provider's authorization URL for one login.
fn authorization_url(
    endpoint: &str,
    client_id: &str,
    redirect_uri: &str,
    scope: &str,
    state: &LoginState,
) -> String {
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    let q = session::encode_query;
    format!(
        "{endpoint}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={}&nonce={}&code_challenge={}&code_challenge_method=S256",
        q(client_id),
        q(redirect_uri),
        q(scope),
        q(&state.s),
        q(&state.n),
        pkce_challenge(&state.v),
    )
}

/// `{scheme}://{host}{path}` from the request's Host, or `None` when Host is not a
/// plain authority.
fn origin_url(req: &RequestHeader, https: bool, path: &str) -> Option<String> {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))?;
    let authority: http::uri::Authority = host.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let scheme = if https { "https" } else { "http" };
    Some(format!("{scheme}://{}{path}", authority.as_str()))
}

/// Why a code exchange failed.
enum ExchangeError {
    /// The provider answered with an OAuth error (`invalid_grant`, ...).
    Refused(String),
    /// The provider could not be reached or answered nonsense.
    Unreachable(String),
}

/// One code exchange; owns what it needs so it can run on a blocking thread.
struct Exchange {
    agent: ureq::Agent,
    endpoint: String,
    client_auth: ClientAuth,
    client_id: String,
    client_secret: String,
    code: String,
    redirect_uri: String,
    verifier: String,
}

impl Exchange {
    /// Returns the ID token.
    fn run(self) -> Result<String, ExchangeError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", self.code.as_str()),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", self.verifier.as_str()),
        ];
        let mut request = self
            .agent
            .post(&self.endpoint)
            .header("accept", "application/json");
        match self.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 2.3.1: both parts form-encoded before base64.
                let pair = format!(
                    "{}:{}",
                    form_encode(&self.client_id),
                    form_encode(&self.client_secret)
                );
                request = request.header(
                    "authorization",
                    format!("Basic {}", STANDARD.encode(pair.as_bytes())),
                );
            }
            ClientAuth::Post => {
                form.push(("client_id", self.client_id.as_str()));
                form.push(("client_secret", self.client_secret.as_str()));
            }
        }
        let mut resp = request
            .send_form(form)
            .map_err(|e| ExchangeError::Unreachable(e.to_string()))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_DOCUMENT_BYTES)
            .read_to_string()
            .map_err(|e| ExchangeError::Unreachable(e.to_string()))?;
        let body: Value = serde_json::from_str(&text).map_err(|_| {
            ExchangeError::Unreachable(format!(
                "token endpoint answered HTTP {} without JSON",
                status.as_u16()
            ))
        })?;
        if !status.is_success() {
            let error = body
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| format!("HTTP {}", status.as_u16()), printable);
            return Err(ExchangeError::Refused(error));
        }
        body.get("id_token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ExchangeError::Unreachable("token response without an id_token".into()))
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*') {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Text from the provider or the URL, cut short and stripped to printable ASCII so it
/// can be shown and logged safely.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

/// Verifies the ID token of one login: everything the `jwt` plugin checks (algorithm
/// list, signature by the provider's keys, `iss`, `aud` = client ID, `exp`, subject),
/// then that its `nonce` is this login's and `azp`, when present, is this client.
async fn accept_id_token(
    id_tokens: &Jwt,
    client_id: &str,
    token: &str,
    nonce: &str,
) -> Result<crate::Identity, String> {
    let (identity, claims) = id_tokens
        .verify_fetched(token)
        .await
        .map_err(|reason| format!("ID token refused: {reason}"))?;
    if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
        return Err("ID token refused: its nonce does not belong to this login".into());
    }
    if claims
        .get("azp")
        .is_some_and(|azp| azp.as_str() != Some(client_id))
    {
        return Err("ID token refused: issued to another client (azp)".into());
    }
    Ok(identity)
}

/// The runtime form of an `oidc` plugin.
pub struct Oidc {
    discovery: Arc<Discovery>,
    started: Once,
    sessions: SessionKeys,
    state_mac: HmacSha256,
    /// The login-state cookie's name on plain and on HTTPS connections.
    state_cookie: [String; 2],
    issuer: String,
    client_id: String,
    client_secret: String,
    scope: String,
    redirect_url: Option<String>,
    post_logout_redirect_url: Option<String>,
    token_agent: ureq::Agent,
    /// States whose callback already came, with their expiry.
    used_states: Mutex<HashMap<String, u64>>,
}

/// An agent for requests to the provider: bounded, no redirects that leave https, no
/// proxy for loopback.
fn agent(https: bool, loopback: bool, redirects: u32) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .https_only(https)
        .max_redirects(redirects)
        .http_status_as_error(false)
        .user_agent(concat!("gatewarden/", env!("CARGO_PKG_VERSION")));
    if loopback {
        config = config.proxy(None);
    }
    config.build().into()
}

fn check_redirect_setting(setting: &str, url: &str, path: Option<&str>) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{setting}: {url:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("https") | Some("http")) || uri.host().is_none() {
        return Err(format!(
            "{setting}: {url:?} must be an http(s) URL with a host"
        ));
    }
    if let Some(path) = path {
        if uri.path() != path || uri.query().is_some() {
            return Err(format!("{setting}: the path must be exactly {path}"));
        }
    }
    Ok(())
}

impl Oidc {
    pub fn new(config: OidcConfig, _env: &BuildEnv) -> Result<Self, String> {
        let (https, loopback) = crate::jwt::check_fetch_url("issuer", &config.issuer)?;
        if config.client_id.trim().is_empty() {
            return Err("`client_id` must not be empty".into());
        }
        if config.client_secret.expose().is_empty() {
            return Err("`client_secret` must not be empty".into());
        }
        if config.secret.expose().len() < MIN_SECRET_LEN {
            return Err(format!("`secret` must be at least {MIN_SECRET_LEN} bytes"));
        }
        let algorithms = crate::jwt::parse_algorithms(&config.algorithms)?;
        if let Some(hs) = algorithms
            .iter()
            .find(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac)
        {
            return Err(format!(
                "algorithm {hs:?} is not supported for ID tokens; use the provider's asymmetric signing (RS256, ES256, ...)"
            ));
        }
        crate::jwt::check_claim_settings(
            &config.subject_claim,
            config.role_claim.as_deref(),
            &config.admin_values,
        )?;
        crate::jwt::parse_leeway(&config.leeway)?;
        let refresh =
            parse_duration(&config.jwks_refresh).map_err(|e| format!("jwks_refresh: {e}"))?;
        if refresh < Duration::from_secs(1) {
            return Err("jwks_refresh must be at least 1s".into());
        }
        if let Some(bad) = config.scopes.iter().find(|s| {
            s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        }) {
            return Err(format!("scopes: {bad:?} is not a scope name"));
        }
        let mut scopes = vec!["openid".to_string()];
        scopes.extend(config.scopes.iter().filter(|s| *s != "openid").cloned());
        if let Some(url) = &config.redirect_url {
            check_redirect_setting("redirect_url", url, Some(CALLBACK_PATH))?;
        }
        if let Some(url) = &config.post_logout_redirect_url {
            check_redirect_setting("post_logout_redirect_url", url, None)?;
        }
        let ttl = parse_duration(&config.session_ttl).map_err(|e| format!("session_ttl: {e}"))?;
        let sessions = SessionKeys::new(
            config.secret.expose(),
            &config.previous_secrets,
            ttl,
            &config.cookie_name,
            config.secure_cookie,
        )?;
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let state_name = format!("{}_oidc", config.cookie_name);
        Ok(Oidc {
            discovery: Arc::new(Discovery {
                issuer: config.issuer.clone(),
                url: discovery_url,
                agent: agent(https, loopback, 3),
                settings: VerifierSettings {
                    client_id: config.client_id.clone(),
                    algorithms: config.algorithms,
                    subject_claim: config.subject_claim,
                    role_claim: config.role_claim,
                    admin_values: config.admin_values,
                    leeway: config.leeway,
                    jwks_refresh: config.jwks_refresh,
                },
                provider: ArcSwapOption::empty(),
                attempts: tokio::sync::watch::Sender::new(0),
            }),
            started: Once::new(),
            sessions,
            state_mac: state_mac(config.secret.expose())?,
            state_cookie: [state_name.clone(), format!("__Host-{state_name}")],
            issuer: config.issuer,
            client_id: config.client_id,
            client_secret: config.client_secret.expose().to_string(),
            scope: scopes.join(" "),
            redirect_url: config.redirect_url,
            post_logout_redirect_url: config.post_logout_redirect_url,
            // A token endpoint must answer itself: no redirects for the code.
            token_agent: agent(https, loopback, 0),
            used_states: Mutex::new(HashMap::new()),
        })
    }

    /// Starts discovery on first use, in the process that serves (not in one that
    /// forks into a daemon afterwards, nor in `check`).
    fn ensure_started(&self) {
        self.started
            .call_once(|| spawn_discovery(Arc::downgrade(&self.discovery)));
    }

    fn state_cookie_name(&self, https: bool) -> &str {
        &self.state_cookie[usize::from(self.sessions.secure_for(https))]
    }

    fn state_cookie(&self, value: &str, https: bool, max_age: Duration) -> String {
        cookie::Cookie::build((self.state_cookie_name(https).to_string(), value.to_string()))
            .http_only(true)
            .same_site(cookie::SameSite::Lax)
            .path("/")
            .secure(self.sessions.secure_for(https))
            .max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64))
            .build()
            .to_string()
    }

    fn redirect_uri(&self, req: &RequestHeader, https: bool) -> Option<String> {
        match &self.redirect_url {
            Some(url) => Some(url.clone()),
            None => origin_url(req, https, CALLBACK_PATH),
        }
    }

    /// The provider, waiting (bounded) for a first discovery attempt if none is known.
    async fn provider(&self) -> Option<Arc<Provider>> {
        if let Some(p) = self.discovery.provider.load_full() {
            return Some(p);
        }
        let mut attempts = self.discovery.attempts.subscribe();
        let _ = tokio::time::timeout(DISCOVERY_WAIT, attempts.changed()).await;
        self.discovery.provider.load_full()
    }

    fn not_discovered() -> Reply {
        Reply::error(
            503,
            "the identity provider has not been reached yet (OIDC discovery is retrying); try again shortly",
        )
        .with_header(http::header::RETRY_AFTER, "5")
    }

    /// Sends the browser to the provider.
    fn login(&self, req: &RequestHeader, https: bool, provider: &Provider) -> Reply {
        let next = session::query_param(req, "next").unwrap_or_default();
        let Some(redirect_uri) = self.redirect_uri(req, https) else {
            return Reply::error(400, "the Host header is not a valid host");
        };
        let state = LoginState {
            s: random_token(),
            n: random_token(),
            v: random_token(),
            r: session::safe_next(&next).to_string(),
            u: redirect_uri,
            e: session::now_secs() + STATE_TTL.as_secs(),
        };
        let location = authorization_url(
            &provider.authorization_endpoint,
            &self.client_id,
            &state.u,
            &self.scope,
            &state,
        );
        let cookie = self.state_cookie(&seal(&self.state_mac, &state), https, STATE_TTL);
        Reply::error(302, "login at the identity provider")
            .with_header(http::header::LOCATION, &location)
            .with_header(http::header::SET_COOKIE, &cookie)
    }

    /// Records a state as used; false when it already was.
    fn first_use(&self, state: &str, expires: u64) -> bool {
        let now = session::now_secs();
        let mut used = self.used_states.lock().unwrap_or_else(|p| p.into_inner());
        if used.get(state).is_some_and(|e| *e > now) {
            return false;
        }
        if used.len() >= MAX_USED_STATES {
            used.retain(|_, e| *e > now);
            if used.len() >= MAX_USED_STATES {
                used.clear();
            }
        }
        used.insert(state.to_string(), expires);
        true
    }

    /// A failed login: JSON, or a short page with a way to start again for browsers.
    /// Always clears the login-state cookie: a state serves one callback.
    fn failure(&self, req: &RequestHeader, https: bool, status: u16, message: &str) -> Reply {
        let clear = self.state_cookie("", https, Duration::ZERO);
        let reply = if session::is_browser_navigation(req) {
            let body = format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"robots\" content=\"noindex\"><title>Sign-in failed</title></head>\n<body><h1>Sign-in failed</h1><p>{}</p><p><a href=\"{LOGIN_PATH}\">Sign in again</a></p></body></html>\n",
                crate::pin_gate::escape_html(message)
            );
            Reply {
                status,
                content_type: "text/html; charset=utf-8",
                headers: Vec::new(),
                body: Bytes::from(body),
            }
            .with_header(
                http::header::HeaderName::from_static("content-security-policy"),
                "default-src 'none'; frame-ancestors 'none'",
            )
        } else {
            Reply::error(status, message)
        };
        reply.with_header(http::header::SET_COOKIE, &clear)
    }

    /// Checks a callback up to the code exchange; the login it belongs to, or the reply.
    fn check_callback(
        &self,
        req: &RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<(LoginState, String), Reply> {
        let https = ctx.https;
        let params = session::parse_form(req.uri.query().unwrap_or("").as_bytes());
        let param = |name: &str| {
            params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let mut refuse = |status: u16, message: &str| {
            ctx.auth_failure = Some("oidc_login_failed");
            self.failure(req, https, status, message)
        };
        if let Some(error) = param("error") {
            let error = printable(error);
            let detail = param("error_description").map(printable);
            let message = match detail {
                Some(d) if !d.is_empty() => {
                    format!("the identity provider refused the login: {error} ({d})")
                }
                _ => format!("the identity provider refused the login: {error}"),
            };
            let status = if error == "access_denied" { 403 } else { 400 };
            return Err(refuse(status, &message));
        }
        let (Some(code), Some(state)) = (param("code"), param("state")) else {
            return Err(refuse(400, "the callback lacks `code` or `state`"));
        };
        let Some(cookie) = session::cookie(req, self.state_cookie_name(https)) else {
            return Err(refuse(
                400,
                "no login is in progress in this browser (its login-state cookie is missing or expired); start again",
            ));
        };
        let login = open(&self.state_mac, cookie, session::now_secs()).map_err(|why| {
            refuse(
                400,
                &format!("the login-state cookie is not valid ({why}); start again"),
            )
        })?;
        // Both are public to the browser; equality is all that is asked.
        if login.s != state {
            return Err(refuse(
                400,
                "the `state` does not belong to this browser's login; start again",
            ));
        }
        // RFC 9207: a provider that names itself must be the configured one.
        if param("iss").is_some_and(|iss| iss != self.issuer) {
            return Err(refuse(400, "the callback comes from another issuer"));
        }
        if !self.first_use(&login.s, login.e) {
            return Err(refuse(400, "this login was already completed; start again"));
        }
        Ok((login, code.to_string()))
    }

    async fn callback(&self, req: &RequestHeader, ctx: &mut Ctx) -> Reply {
        let https = ctx.https;
        // Before the state is used up: a login that cannot finish yet can be retried.
        let Some(provider) = self.provider().await else {
            return Self::not_discovered();
        };
        let (login, code) = match self.check_callback(req, ctx) {
            Ok(checked) => checked,
            Err(reply) => return reply,
        };
        let exchange = Exchange {
            agent: self.token_agent.clone(),
            endpoint: provider.token_endpoint.clone(),
            client_auth: provider.client_auth,
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            code,
            redirect_uri: login.u.clone(),
            verifier: login.v.clone(),
        };
        // Blocking I/O: never on the proxy's threads.
        let exchanged = tokio::task::spawn_blocking(move || exchange.run()).await;
        let mut fail = |status: u16, message: &str| {
            ctx.auth_failure = Some("oidc_login_failed");
            self.failure(req, https, status, message)
        };
        let id_token = match exchanged {
            Ok(Ok(token)) => token,
            Ok(Err(ExchangeError::Refused(error))) => {
                // `invalid_client` means the client ID or secret is wrong: worth a log.
                log::warn!("oidc: the provider refused the code exchange: {error}");
                return fail(
                    400,
                    &format!("the identity provider refused the code ({error}); start again"),
                );
            }
            Ok(Err(ExchangeError::Unreachable(why))) => {
                log::warn!(
                    "oidc: code exchange at {} failed: {why}",
                    provider.token_endpoint
                );
                return fail(502, "the identity provider's token endpoint did not answer");
            }
            Err(e) => {
                log::error!("oidc: code exchange task failed: {e}");
                return fail(502, "the code exchange failed");
            }
        };
        let identity = match accept_id_token(
            &provider.id_tokens,
            &self.client_id,
            &id_token,
            &login.n,
        )
        .await
        {
            Ok(identity) => identity,
            Err(reason) => {
                log::warn!("oidc: {reason}");
                return fail(401, &reason);
            }
        };
        let token = match self
            .sessions
            .issue(&identity.subject, identity.role, "oidc")
        {
            Ok(token) => token,
            Err(e) => {
                log::error!("oidc: cannot sign a session: {e}");
                return Reply::error(500, "cannot create a session");
            }
        };
        Reply::error(303, "logged in")
            .with_header(http::header::LOCATION, session::safe_next(&login.r))
            .with_header(
                http::header::SET_COOKIE,
                &self.sessions.set_cookie(&token, https),
            )
            .with_header(
                http::header::SET_COOKIE,
                &self.state_cookie("", https, Duration::ZERO),
            )
    }

    fn logout(&self, req: &RequestHeader, https: bool) -> Reply {
        let clear = self.sessions.clear_cookie(https);
        let provider = self.discovery.provider.load_full();
        let end_session = provider
            .as_ref()
            .and_then(|p| p.end_session_endpoint.as_deref());
        let back = self
            .post_logout_redirect_url
            .clone()
            .or_else(|| origin_url(req, https, "/"));
        let reply = match (end_session, back) {
            (Some(endpoint), back) => {
                let sep = if endpoint.contains('?') { '&' } else { '?' };
                let mut location = format!(
                    "{endpoint}{sep}client_id={}",
                    session::encode_query(&self.client_id)
                );
                if let Some(back) = back {
                    location.push_str("&post_logout_redirect_uri=");
                    location.push_str(&session::encode_query(&back));
                }
                Reply::error(303, "logged out").with_header(http::header::LOCATION, &location)
            }
            (None, _) => Reply {
                status: 200,
                content_type: "text/html; charset=utf-8",
                headers: Vec::new(),
                body: Bytes::from(format!(
                    "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signed out</title></head>\n<body><h1>Signed out</h1><p><a href=\"{LOGIN_PATH}\">Sign in again</a></p></body></html>\n"
                )),
            },
        };
        reply.with_header(http::header::SET_COOKIE, &clear)
    }
}

impl Plugin for Oidc {
    fn type_name(&self) -> &'static str {
        "oidc"
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

    fn has_login_page(&self) -> bool {
        true
    }

    fn start(&self) -> Result<(), String> {
        self.ensure_started();
        Ok(())
    }

    fn gateway_cookies(&self) -> Vec<String> {
        self.sessions
            .cookie_names()
            .into_iter()
            .chain(self.state_cookie.iter().map(String::as_str))
            .map(String::from)
            .collect()
    }

    fn serves(&self, path: &str) -> bool {
        path == LOGIN_PATH || path == CALLBACK_PATH || path == LOGOUT_PATH
    }

    fn serve<'a>(
        &'a self,
        req: &'a RequestHeader,
        _body: Bytes,
        ctx: &'a mut Ctx,
    ) -> RequestFlow<'a> {
        self.ensure_started();
        let path = req.uri.path();
        let method = &req.method;
        if path == LOGOUT_PATH {
            if *method != http::Method::POST {
                return RequestFlow::reply(
                    Reply::error(405, "use POST to log out")
                        .with_header(http::header::ALLOW, "POST"),
                );
            }
            if session::cross_origin(req) {
                return RequestFlow::reply(Reply::error(403, "cross-origin logout refused"));
            }
            return RequestFlow::reply(self.logout(req, ctx.https));
        }
        if !matches!(*method, http::Method::GET | http::Method::HEAD) {
            return RequestFlow::reply(
                Reply::error(405, "method not allowed").with_header(http::header::ALLOW, "GET"),
            );
        }
        if path == CALLBACK_PATH {
            return RequestFlow::Wait(Box::pin(async move {
                Verdict::Reply(self.callback(req, ctx).await)
            }));
        }
        let https = ctx.https;
        if let Some(provider) = self.discovery.provider.load_full() {
            return RequestFlow::reply(self.login(req, https, &provider));
        }
        RequestFlow::Wait(Box::pin(async move {
            Verdict::Reply(match self.provider().await {
                Some(provider) => self.login(req, https, &provider),
                None => Self::not_discovered(),
            })
        }))
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        self.ensure_started();
        // A login left unfinished must not hand its verifier and nonce to the upstream.
        session::strip_cookie(req, self.state_cookie_name(ctx.https));
        match self.sessions.recognise(req, ctx) {
            Some(reply) => RequestFlow::reply(reply),
            None => RequestFlow::CONTINUE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn state(expires: u64) -> LoginState {
        LoginState {
            s: "st".into(),
            n: "no".into(),
            v: "ve".into(),
            r: "/chat".into(),
            u: "https://gw.test/.gatewarden/oidc/callback".into(),
            e: expires,
        }
    }

    #[test]
    fn pkce_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let v = random_token();
        assert_eq!(v.len(), 43);
        assert!(v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(v, random_token());
    }

    #[test]
    fn login_state_round_trips_and_resists_tampering() {
        let key = state_mac(SECRET).unwrap();
        let now = 1_000;
        let sealed = seal(&key, &state(now + 600));
        assert_eq!(open(&key, &sealed, now).unwrap(), state(now + 600));
        // Expired.
        assert_eq!(open(&key, &sealed, now + 600), Err("expired"));
        // Another secret.
        let other = state_mac("another-secret-that-is-long-enough!!").unwrap();
        assert_eq!(open(&other, &sealed, now), Err("bad signature"));
        // A changed payload under the old signature: a state of the attacker's choosing.
        let (_, tag) = sealed.split_once('.').unwrap();
        let mut forged = state(now + 600);
        forged.v = "attacker".into();
        let payload = b64(&serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            open(&key, &format!("{payload}.{tag}"), now),
            Err("bad signature")
        );
        // Truncated, empty, no signature.
        assert!(open(&key, &sealed[..sealed.len() - 2], now).is_err());
        assert!(open(&key, "", now).is_err());
        assert!(open(&key, sealed.split('.').next().unwrap(), now).is_err());
        // Signed with the secret itself (as a session is): refused, the keys differ.
        let raw = <HmacSha256 as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
        assert_eq!(
            open(&key, &seal(&raw, &state(now + 600)), now),
            Err("bad signature")
        );
    }

    #[test]
    fn the_authorization_url_carries_every_parameter() {
        let s = state(1);
        let url = authorization_url(
            "https://idp.test/authorize",
            "gate way",
            &s.u,
            "openid email",
            &s,
        );
        assert!(
            url.starts_with("https://idp.test/authorize?response_type=code&"),
            "{url}"
        );
        for part in [
            "client_id=gate%20way",
            "redirect_uri=https%3A//gw.test/.gatewarden/oidc/callback",
            "scope=openid%20email",
            "state=st",
            "nonce=no",
            &format!("code_challenge={}", pkce_challenge("ve")),
            "code_challenge_method=S256",
        ] {
            assert!(url.contains(part), "{part} missing in {url}");
        }
        // An endpoint that already has a query keeps it.
        let url = authorization_url("https://idp.test/auth?tenant=1", "c", &s.u, "openid", &s);
        assert!(url.starts_with("https://idp.test/auth?tenant=1&response_type=code"));
    }

    #[test]
    fn redirect_uris_come_from_the_request_or_the_setting() {
        let mut req = RequestHeader::build("GET", b"/.gatewarden/login", None).unwrap();
        req.insert_header("Host", "gw.test:8443").unwrap();
        assert_eq!(
            origin_url(&req, true, CALLBACK_PATH).unwrap(),
            "https://gw.test:8443/.gatewarden/oidc/callback"
        );
        assert_eq!(
            origin_url(&req, false, "/").unwrap(),
            "http://gw.test:8443/"
        );
        for bad in ["evil.test/x", "user@evil.test", "a b"] {
            req.insert_header("Host", bad).unwrap();
            assert!(origin_url(&req, true, CALLBACK_PATH).is_none(), "{bad}");
        }
        let p = plugin(", redirect_url: 'https://public.test/.gatewarden/oidc/callback'");
        assert_eq!(
            p.redirect_uri(&req, false).unwrap(),
            "https://public.test/.gatewarden/oidc/callback"
        );
    }

    fn config(extra: &str) -> Result<Oidc, String> {
        let yaml = format!(
            "{{ issuer: 'https://idp.test/', client_id: gw, client_secret: s3cr3t, secret: '{SECRET}' {extra} }}"
        );
        let config: OidcConfig = serde_yaml_ng::from_str(&yaml).map_err(|e| e.to_string())?;
        Oidc::new(config, &BuildEnv::default())
    }

    fn plugin(extra: &str) -> Oidc {
        config(extra).unwrap()
    }

    #[test]
    fn settings_are_validated() {
        assert!(config("").is_ok());
        let err = |yaml: &str| {
            let config: OidcConfig = serde_yaml_ng::from_str(yaml).unwrap();
            Oidc::new(config, &BuildEnv::default()).err().unwrap()
        };
        let base = "client_id: gw, client_secret: s, secret: '0123456789abcdef0123456789abcdef'";
        assert!(err(&format!("{{ issuer: 'http://idp.test/', {base} }}")).contains("https"));
        assert!(Oidc::new(
            serde_yaml_ng::from_str(&format!("{{ issuer: 'http://127.0.0.1:9/', {base} }}"))
                .unwrap(),
            &BuildEnv::default()
        )
        .is_ok());
        let short =
            err("{ issuer: 'https://idp.test/', client_id: gw, client_secret: s, secret: short }");
        assert!(short.contains("32"), "{short}");
        for (extra, want) in [
            (", algorithms: [HS256]", "HS256"),
            (", algorithms: [none]", "none"),
            (", role_claim: groups", "admin_values"),
            (", redirect_url: 'https://gw.test/callback'", "redirect_url"),
            (", scopes: ['a b']", "scopes"),
            (", leeway: 1h", "leeway"),
        ] {
            let e = config(extra).err().unwrap();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // A secret never shows up in an error.
        let e = config(", client_secret: s3cr3t, algorithms: [XX]");
        assert!(e.is_err_and(|e| !e.contains("s3cr3t") && !e.contains(SECRET)));
    }

    #[test]
    fn states_are_single_use() {
        let p = plugin("");
        let exp = session::now_secs() + 60;
        assert!(p.first_use("a", exp));
        assert!(!p.first_use("a", exp));
        assert!(p.first_use("b", exp));
    }

    #[test]
    fn discovery_documents_are_checked() {
        let p = plugin("");
        let doc = |issuer: &str, token: &str, methods: Option<Vec<&str>>| DiscoveryDocument {
            issuer: issuer.into(),
            authorization_endpoint: "https://idp.test/authorize".into(),
            token_endpoint: token.into(),
            // Loopback, so the verifier's first JWKS fetch fails at once, off the network.
            jwks_uri: "https://127.0.0.1:9/jwks".into(),
            end_session_endpoint: None,
            token_endpoint_auth_methods_supported: methods
                .map(|m| m.into_iter().map(str::to_string).collect()),
            code_challenge_methods_supported: None,
        };
        let wrong =
            p.discovery
                .provider_from(doc("https://evil.test/", "https://idp.test/token", None));
        assert!(wrong.err().unwrap().contains("issuer"));
        let plain =
            p.discovery
                .provider_from(doc("https://idp.test/", "http://idp.test/token", None));
        assert!(plain.err().unwrap().contains("token_endpoint"));
        let post = p.discovery.provider_from(doc(
            "https://idp.test/",
            "https://idp.test/token",
            Some(vec!["private_key_jwt", "client_secret_post"]),
        ));
        assert_eq!(post.ok().unwrap().client_auth, ClientAuth::Post);
        let none = p.discovery.provider_from(doc(
            "https://idp.test/",
            "https://idp.test/token",
            Some(vec!["private_key_jwt"]),
        ));
        assert!(none.is_err());
    }

    #[test]
    fn provider_errors_are_4xx_and_clear_the_state() {
        let p = plugin("");
        let mut ctx = Ctx::new(
            "127.0.0.1".parse().unwrap(),
            crate::RequestId::from_random(1),
            false,
        );
        let req = RequestHeader::build(
            "GET",
            b"/.gatewarden/oidc/callback?error=access_denied&error_description=User%20said%20no%3Cscript%3E&state=x",
            None,
        )
        .unwrap();
        let reply = p.check_callback(&req, &mut ctx).err().unwrap();
        assert_eq!(reply.status, 403);
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("access_denied"));
        assert!(reply
            .headers
            .iter()
            .any(|(n, v)| n == http::header::SET_COOKIE
                && v.to_str().unwrap().starts_with("gatewarden_oidc=;")));
        // Without the state cookie.
        let req = RequestHeader::build("GET", b"/.gatewarden/oidc/callback?code=c&state=s", None)
            .unwrap();
        assert_eq!(p.check_callback(&req, &mut ctx).err().unwrap().status, 400);
    }

    #[test]
    fn callbacks_need_the_matching_state_cookie() {
        let p = plugin("");
        let mut ctx = Ctx::new(
            "127.0.0.1".parse().unwrap(),
            crate::RequestId::from_random(1),
            false,
        );
        let mut st = state(session::now_secs() + 60);
        st.s = "good".into();
        let sealed = seal(&p.state_mac, &st);
        let callback = |query: &str, cookie: &str| {
            let mut req = RequestHeader::build(
                "GET",
                format!("/.gatewarden/oidc/callback?{query}").as_bytes(),
                None,
            )
            .unwrap();
            req.insert_header("Cookie", format!("gatewarden_oidc={cookie}"))
                .unwrap();
            req
        };
        let mut ctx2 = Ctx::new(
            "127.0.0.1".parse().unwrap(),
            crate::RequestId::from_random(2),
            false,
        );
        // Another state than the cookie's.
        assert_eq!(
            p.check_callback(&callback("code=c&state=other", &sealed), &mut ctx)
                .err()
                .unwrap()
                .status,
            400
        );
        // A forged cookie.
        assert_eq!(
            p.check_callback(&callback("code=c&state=good", "e30.AAAA"), &mut ctx)
                .err()
                .unwrap()
                .status,
            400
        );
        // A mix-up: another issuer.
        assert_eq!(
            p.check_callback(
                &callback("code=c&state=good&iss=https%3A%2F%2Fevil.test%2F", &sealed),
                &mut ctx
            )
            .err()
            .unwrap()
            .status,
            400
        );
        // The right one, once.
        let (login, code) = p
            .check_callback(
                &callback("code=c&state=good&iss=https%3A%2F%2Fidp.test%2F", &sealed),
                &mut ctx2,
            )
            .ok()
            .unwrap();
        assert_eq!((login.v.as_str(), code.as_str()), ("ve", "c"));
        assert_eq!(
            p.check_callback(&callback("code=c&state=good", &sealed), &mut ctx2)
                .err()
                .unwrap()
                .status,
            400
        );
    }

    /// An ID token verifier as discovery builds it, with the RSA test key instead of
    /// a JWKS.
    fn id_tokens() -> Jwt {
        let yaml = "{ issuer: 'https://idp.test/', audiences: [gw], public_key_file: rsa1.pub.pem, algorithms: [RS256], role_claim: groups, admin_values: [admins] }";
        let env = BuildEnv {
            base_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data"),
            ..BuildEnv::default()
        };
        Jwt::new(serde_yaml_ng::from_str(yaml).unwrap(), &env).unwrap()
    }

    fn test_key(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(name),
        )
        .unwrap()
    }

    fn id_claims(changes: Value) -> Value {
        let now = session::now_secs();
        let mut claims = serde_json::json!({
            "iss": "https://idp.test/", "aud": "gw", "sub": "alice", "nonce": "n-1",
            "groups": ["admins"], "iat": now, "exp": now + 300,
        });
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    fn rs256(claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&test_key("rsa1.key.pem")).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &key,
        )
        .unwrap()
    }

    fn accepted(token: &str) -> Result<crate::Identity, String> {
        let jwt = id_tokens();
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(accept_id_token(&jwt, "gw", token, "n-1"))
    }

    #[test]
    fn id_tokens_are_verified_with_nonce_and_azp() {
        let id = accepted(&rs256(&id_claims(serde_json::json!({})))).unwrap();
        assert_eq!((&*id.subject, id.role), ("alice", crate::Role::Admin));
        use serde_json::json;
        for (change, want) in [
            (json!({ "nonce": "n-2" }), "nonce"),
            (json!({ "nonce": null }), "nonce"),
            (json!({ "azp": "other-client" }), "azp"),
            (json!({ "iss": "https://evil.test/" }), "issuer"),
            (json!({ "aud": "other-client" }), "audience"),
            (json!({ "exp": session::now_secs() - 120 }), "expired"),
        ] {
            let err = accepted(&rs256(&id_claims(change.clone()))).err().unwrap();
            assert!(err.contains(want), "{change}: {err}");
        }
        // `alg: none`, and HS256 keyed with the provider's public key.
        let claims = id_claims(json!({}));
        let part = |v: &Value| b64(v.to_string().as_bytes());
        let none = format!("{}.{}.", part(&json!({ "alg": "none" })), part(&claims));
        assert!(accepted(&none).is_err());
        let unsigned = format!("{}.{}", part(&json!({ "alg": "HS256" })), part(&claims));
        let sig = jsonwebtoken::crypto::sign(
            unsigned.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(&test_key("rsa1.pub.pem")),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        let err = accepted(&format!("{unsigned}.{sig}")).err().unwrap();
        assert!(err.contains("algorithm"), "{err}");
    }

    #[test]
    fn client_secrets_are_form_encoded_for_basic_auth() {
        assert_eq!(form_encode("a b:c/d%é"), "a+b%3Ac%2Fd%25%C3%A9");
        assert_eq!(printable("bad\r\nheader\u{1}<x>"), "badheader<x>");
    }
}
