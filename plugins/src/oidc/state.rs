//! The state of one login while the browser is at the provider: the signed cookie that
//! carries it, PKCE, and the URLs that start and end it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::RequestHeader;

/// What travels through the provider in the login-state cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LoginState {
    /// `state`
    pub(super) s: String,
    /// `nonce`
    pub(super) n: String,
    /// PKCE code verifier
    pub(super) v: String,
    /// where to go afterwards (already made safe)
    pub(super) r: String,
    /// the redirect URI sent, which the code exchange must repeat
    pub(super) u: String,
    /// expiry, Unix seconds
    pub(super) e: u64,
}

pub(super) type HmacSha256 = Hmac<Sha256>;

pub(super) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// 256 random bits, base64url: states, nonces and PKCE verifiers (43 characters).
pub(super) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    b64(&bytes)
}

/// The PKCE S256 challenge of a verifier (RFC 7636 section 4.2).
pub(super) fn pkce_challenge(verifier: &str) -> String {
    b64(&Sha256::digest(verifier.as_bytes()))
}

/// The MAC that signs login-state cookies, keyed by a key derived from `secret` so
/// that it never signs anything a session key would accept. Built once.
pub(super) fn state_mac(secret: &str) -> Result<HmacSha256, String> {
    let bad = |_| "cannot key HMAC-SHA256".to_string();
    let mut derive = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).map_err(bad)?;
    derive.update(b"gatewarden oidc login state v1");
    <HmacSha256 as Mac>::new_from_slice(&derive.finalize().into_bytes()).map_err(bad)
}

/// `base64url(json).base64url(hmac)`.
pub(super) fn seal(mac: &HmacSha256, state: &LoginState) -> String {
    let payload = b64(&serde_json::to_vec(state).unwrap_or_default());
    let mut mac = mac.clone();
    mac.update(payload.as_bytes());
    format!("{payload}.{}", b64(&mac.finalize().into_bytes()))
}

/// Checks the signature (in constant time) and the expiry.
pub(super) fn open(mac: &HmacSha256, value: &str, now: u64) -> Result<LoginState, &'static str> {
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
pub(super) fn authorization_url(
    endpoint: &str,
    client_id: &str,
    redirect_uri: &str,
    scope: &str,
    state: &LoginState,
) -> String {
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    let q = crate::forms::encode_query;
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
pub(super) fn origin_url(req: &RequestHeader, https: bool, path: &str) -> Option<String> {
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
