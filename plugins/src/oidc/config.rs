//! The settings of an `oidc` plugin and the checks on them.

use serde::{Deserialize, Serialize};

use crate::revocation::OnRevocationError;

use crate::jwt::{Algorithms, Secret};
use crate::session::SecureCookie;
use crate::units::Span;

/// Settings of an `oidc` plugin.
#[derive(Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    pub previous_secrets: Vec<Secret>,
    /// How long a session lasts once logged in (default 12h).
    #[serde(default = "default_ttl")]
    pub session_ttl: Span,
    /// Session cookie name (default `gatewarden`; `__Host-gatewarden` over HTTPS). The
    /// login-state cookie is this name with `_oidc` appended.
    #[serde(default = "default_cookie")]
    pub cookie_name: String,
    /// `auto` (Secure over HTTPS), `always` or `never`.
    #[serde(default)]
    pub secure_cookie: SecureCookie,
    /// With `redis:`, what a session check does while Redis cannot say whether the
    /// session was revoked: `deny` (default, 503) or `allow` (its signature suffices).
    #[serde(default)]
    pub on_revocation_error: OnRevocationError,
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
    pub algorithms: Algorithms,
    /// Clock skew allowed on the ID token's `exp` and `nbf` (default 30s, at most 5m).
    #[serde(default = "default_leeway")]
    pub leeway: Span,
    /// How often the provider's JWKS is fetched again (default 5m).
    #[serde(default = "default_refresh")]
    pub jwks_refresh: Span,
}

pub(super) fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}
pub(super) fn default_subject_claim() -> String {
    "sub".into()
}
pub(super) fn default_ttl() -> Span {
    Span::from_secs(12 * 3600)
}
pub(super) fn default_cookie() -> String {
    "gatewarden".into()
}
pub(super) fn default_algorithms() -> Algorithms {
    Algorithms::new(vec![jsonwebtoken::Algorithm::RS256])
}
pub(super) fn default_leeway() -> Span {
    Span::from_secs(30)
}
pub(super) fn default_refresh() -> Span {
    Span::from_secs(300)
}

pub(super) fn check_redirect_setting(
    setting: &str,
    url: &str,
    path: Option<&str>,
) -> Result<(), String> {
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
