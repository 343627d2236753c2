//! Discovery: the provider's endpoints and keys, fetched in the background and
//! retried until they are known.

use std::sync::{Arc, Weak};

use arc_swap::ArcSwapOption;
use serde::Deserialize;

use crate::jwt::{Algorithms, Jwt, JwtConfig};
use crate::units::Span;
use crate::BuildEnv;

use super::*;

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientAuth {
    Basic,
    Post,
}

/// What discovery found.
pub(super) struct Provider {
    pub(super) authorization_endpoint: String,
    pub(super) token_endpoint: String,
    pub(super) end_session_endpoint: Option<String>,
    pub(super) client_auth: ClientAuth,
    /// Verifies ID tokens: the `jwt` plugin's checks and key handling.
    pub(super) id_tokens: Jwt,
}

/// The settings the ID token verifier is built from once the JWKS URL is known.
pub(super) struct VerifierSettings {
    pub(super) client_id: String,
    pub(super) algorithms: Algorithms,
    pub(super) subject_claim: String,
    pub(super) role_claim: Option<String>,
    pub(super) admin_values: Vec<String>,
    pub(super) leeway: Span,
    pub(super) jwks_refresh: Span,
}

#[derive(Deserialize)]
pub(super) struct DiscoveryDocument {
    pub(super) issuer: String,
    pub(super) authorization_endpoint: String,
    pub(super) token_endpoint: String,
    pub(super) jwks_uri: String,
    pub(super) end_session_endpoint: Option<String>,
    pub(super) token_endpoint_auth_methods_supported: Option<Vec<String>>,
    pub(super) code_challenge_methods_supported: Option<Vec<String>>,
}

/// Discovery state, shared with the background thread that fetches it.
pub(super) struct Discovery {
    pub(super) issuer: String,
    pub(super) url: String,
    pub(super) agent: ureq::Agent,
    pub(super) settings: VerifierSettings,
    pub(super) provider: ArcSwapOption<Provider>,
    /// Counts finished discovery attempts, so a login can wait for one.
    pub(super) attempts: tokio::sync::watch::Sender<u64>,
}

impl Discovery {
    /// Fetches and checks the discovery document; builds the ID token verifier.
    /// Blocking, bounded by [`FETCH_TIMEOUT`] (and the JWKS fetch's own bound).
    pub(super) fn discover(&self) -> Result<Provider, String> {
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

    pub(super) fn provider_from(&self, doc: DiscoveryDocument) -> Result<Provider, String> {
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
                crate::outbound::check_url(name, url)?;
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
                leeway: s.leeway,
                strip: false,
                jwks_refresh: s.jwks_refresh,
                jwks_cooldown: Span::from_secs(30),
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
pub(super) fn spawn_discovery(discovery: Weak<Discovery>) {
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
