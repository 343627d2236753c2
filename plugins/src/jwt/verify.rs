//! Checking a token: its header, signature and claims, and why it was refused.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

use crate::{credentials, Ctx, Identity, Role, Verdict};

use super::*;

/// A claim name, or a dotted path into nested objects.
pub(super) struct ClaimPath {
    pub(super) name: String,
    pub(super) parts: Vec<String>,
}

impl ClaimPath {
    pub(super) fn new(name: &str) -> Self {
        ClaimPath {
            name: name.to_string(),
            parts: name.split('.').map(str::to_string).collect(),
        }
    }

    /// The literal claim first: URL-style claim names contain dots.
    pub(super) fn lookup<'c>(&self, claims: &'c Map<String, Value>) -> Option<&'c Value> {
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

/// Why a token was refused; the text is the `error` of the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
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
    pub(super) fn reason(self) -> &'static str {
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
    pub(super) fn metric(self) -> &'static str {
        match self {
            Refusal::NoKeys => "jwt_keys_unavailable",
            _ => "invalid_jwt",
        }
    }

    /// Refusals that a fresher key set might turn into an acceptance.
    pub(super) fn wants_refresh(self) -> bool {
        matches!(self, Refusal::UnknownKey | Refusal::NoKeys)
    }

    pub(super) fn from_jwt_error(e: &jsonwebtoken::errors::Error) -> Refusal {
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

impl Jwt {
    /// Verifies `token` against `keys`.
    pub(super) fn verify(&self, token: &str, keys: &KeySet) -> Result<Identity, Refusal> {
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

    pub(super) fn verify_claims(
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

    pub(super) fn role_of(&self, claims: &Map<String, Value>) -> Role {
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

    pub(super) fn check(&self, token: &str) -> Result<Identity, Refusal> {
        match &self.keys {
            Keys::Fixed(set) => self.verify(token, set),
            Keys::Live(r) => self.verify(token, &r.store.keys.load()),
        }
    }
}

pub(super) fn refuse(refusal: Refusal, ctx: &mut Ctx) -> Verdict {
    ctx.auth_failure = Some(refusal.metric());
    Verdict::Reply(credentials::refused(refusal.reason()))
}
