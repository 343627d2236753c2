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

mod config;
mod discovery;
mod exchange;
mod login;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;

use crate::revocation::Revocations;
use crate::session::{self, SessionKeys, LOGIN_PATH, LOGOUT_PATH, MIN_SECRET_LEN};
use crate::{BuildEnv, Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader, Verdict};

pub use config::OidcConfig;
use config::*;
use discovery::*;
use exchange::*;
use state::*;

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

impl Oidc {
    pub fn new(config: OidcConfig, env: &BuildEnv) -> Result<Self, String> {
        let to = crate::outbound::check_url("issuer", &config.issuer)?;
        if config.client_id.trim().is_empty() {
            return Err("`client_id` must not be empty".into());
        }
        if config.client_secret.expose().is_empty() {
            return Err("`client_secret` must not be empty".into());
        }
        if config.secret.expose().len() < MIN_SECRET_LEN {
            return Err(format!("`secret` must be at least {MIN_SECRET_LEN} bytes"));
        }
        if let Some(hs) = config
            .algorithms
            .as_slice()
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
        crate::jwt::check_leeway(config.leeway)?;
        if config.jwks_refresh.get() < Duration::from_secs(1) {
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
        let sessions = SessionKeys::new(
            config.secret.expose(),
            &config.previous_secrets,
            config.session_ttl.get(),
            &config.cookie_name,
            config.secure_cookie,
        )?
        .with_revocations(Revocations::new(
            env.redis.clone(),
            config.on_revocation_error,
        ));
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let state_name = format!("{}_oidc", config.cookie_name);
        Ok(Oidc {
            discovery: Arc::new(Discovery {
                issuer: config.issuer.clone(),
                url: discovery_url,
                agent: crate::outbound::agent(to, FETCH_TIMEOUT, 3),
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
            token_agent: crate::outbound::agent(to, FETCH_TIMEOUT, 0),
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
                    crate::forms::encode_query(&self.client_id)
                );
                if let Some(back) = back {
                    location.push_str("&post_logout_redirect_uri=");
                    location.push_str(&crate::forms::encode_query(&back));
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

impl crate::PluginType for Oidc {
    const TYPE: &'static str = "oidc";
    type Config = OidcConfig;

    fn build(config: OidcConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        Oidc::new(config, env)
    }
}

impl Plugin for Oidc {
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

    fn has_login_page(&self) -> bool {
        true
    }

    fn start(&self) -> Result<(), String> {
        self.ensure_started();
        Ok(())
    }

    fn login_sessions(&self) -> Option<&SessionKeys> {
        Some(&self.sessions)
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
            let https = ctx.https;
            return RequestFlow::Wait(Box::pin(async move {
                self.sessions.revoke_presented(req, https).await;
                Verdict::Reply(self.logout(req, https))
            }));
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
        crate::cookies::strip_cookie(req, self.state_cookie_name(ctx.https));
        self.sessions.recognise(req, ctx)
    }
}

#[cfg(test)]
mod tests;
