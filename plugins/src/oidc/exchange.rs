//! Trading the authorization code for tokens, and checking the ID token that comes
//! back.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;

use crate::jwt::Jwt;

use super::*;

/// Why a code exchange failed.
pub(super) enum ExchangeError {
    /// The provider answered with an OAuth error (`invalid_grant`, ...).
    Refused(String),
    /// The provider could not be reached or answered nonsense.
    Unreachable(String),
}

/// One code exchange; owns what it needs so it can run on a blocking thread.
pub(super) struct Exchange {
    pub(super) agent: ureq::Agent,
    pub(super) endpoint: String,
    pub(super) client_auth: ClientAuth,
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) code: String,
    pub(super) redirect_uri: String,
    pub(super) verifier: String,
}

impl Exchange {
    /// Returns the ID token.
    pub(super) fn run(self) -> Result<String, ExchangeError> {
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
pub(super) fn form_encode(text: &str) -> String {
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
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

/// Verifies the ID token of one login: everything the `jwt` plugin checks (algorithm
/// list, signature by the provider's keys, `iss`, `aud` = client ID, `exp`, subject),
/// then that its `nonce` is this login's and `azp`, when present, is this client.
pub(super) async fn accept_id_token(
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
