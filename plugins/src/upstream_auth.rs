//! `upstream_auth`: send the upstream a credential the gateway holds, never the client's.
//!
//! ```yaml
//! plugins:
//!   llm_key:
//!     type: upstream_auth
//!     header: Authorization                          # the default
//!     value: "Bearer ${env:LITELLM_MASTER_KEY}"
//! ```
//!
//! Whatever the client sent under `header` (any case, any number of copies, and with
//! `_` for `-` in any mix, which CGI, WSGI, PHP and Rack merge with it) never
//! reaches the upstream: the request that goes upstream carries exactly the configured
//! `value`. This is what lets a browser app call an LLM API on its own origin with only
//! its session cookie, while the API key stays on the server.
//!
//! The value is set on the upstream request only, which the core builds after the route's
//! access check passed: a request refused for lack of identity never gets the key, and
//! the key never reaches the client. Put the plugin on routes with `access: user` or
//! `admin`; on a `public` route anyone who reaches the listener uses the key.
//!
//! The value is never logged, never shown by `GET /admin/config` (it is masked there),
//! never echoed in an error, and marked sensitive so HTTP/2 upstreams keep it out of
//! their header compression tables.

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::{Ctx, Hooks, Plugin, RequestParts};

/// Settings of an `upstream_auth` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamAuthConfig {
    /// The request header that carries the credential (default `Authorization`). The
    /// client's own copies of it are always removed.
    #[serde(default = "default_header")]
    pub header: String,
    /// The credential sent upstream, usually from the environment or a secret file:
    /// `"Bearer ${env:LITELLM_MASTER_KEY}"`.
    pub value: crate::secret::Secret,
}

fn default_header() -> String {
    "Authorization".into()
}

/// The runtime form of an `upstream_auth` plugin.
pub struct UpstreamAuth {
    header: HeaderName,
    /// Built once and marked sensitive; cloning it per request only bumps a count.
    value: HeaderValue,
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("header", &self.header)
            .field("value", &"********")
            .finish()
    }
}

impl UpstreamAuth {
    pub fn new(config: UpstreamAuthConfig) -> Result<Self, String> {
        let header = HeaderName::from_bytes(config.header.as_bytes())
            .map_err(|_| format!("`header`: {:?} is not a valid header name", config.header))?;
        // Error messages describe the value, never quote it: it is a secret.
        if config.value.expose().trim().is_empty() {
            return Err("`value` is empty".into());
        }
        let mut value = HeaderValue::from_str(config.value.expose()).map_err(|_| {
            "`value` contains characters a header cannot carry (control characters or line breaks)"
                .to_string()
        })?;
        value.set_sensitive(true);
        Ok(UpstreamAuth { header, value })
    }
}

impl crate::PluginType for UpstreamAuth {
    const TYPE: &'static str = "upstream_auth";
    type Config = UpstreamAuthConfig;

    fn build(config: UpstreamAuthConfig, _env: &crate::BuildEnv) -> Result<Self, String> {
        UpstreamAuth::new(config)
    }
}

impl Plugin for UpstreamAuth {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            upstream_request: true,
            ..Hooks::default()
        }
    }

    // The client's copies go here rather than in a request hook, so the plugin works
    // wherever it sits in the chain: an identity plugin listed after it still sees the
    // caller's own key in `Authorization`, and the upstream still never does. Every
    // copy goes, in every spelling CGI-style servers merge with the header's own.
    fn on_upstream_request(&self, req: &mut RequestParts, _ctx: &Ctx) {
        crate::spelling::remove_every_spelling(
            &mut req.headers,
            std::slice::from_ref(&self.header),
        );
        req.headers.insert(self.header.clone(), self.value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RequestHeader, RequestId};

    fn ctx() -> Ctx {
        Ctx::new(
            "127.0.0.1".parse().unwrap(),
            RequestId::from_random(3),
            false,
        )
    }

    fn plugin(yaml: &str) -> Result<UpstreamAuth, String> {
        UpstreamAuth::new(serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?)
    }

    fn values(req: &RequestParts, name: &str) -> Vec<String> {
        req.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn every_client_copy_is_replaced_by_the_server_value() {
        let p = plugin("{ value: 'Bearer sk-server' }").unwrap();
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        req.append_header("authorization", "Bearer from-browser")
            .unwrap();
        req.append_header("AUTHORIZATION", "Basic eDp5").unwrap();
        req.append_header("Authorization", "Bearer third").unwrap();
        let mut req = RequestParts::from(req);
        p.on_upstream_request(&mut req, &ctx());
        assert_eq!(values(&req, "authorization"), ["Bearer sk-server"]);
        assert!(req.headers.get("authorization").unwrap().is_sensitive());
    }

    #[test]
    fn the_value_is_set_even_when_the_client_sent_none() {
        let p = plugin("{ header: X-Api-Key, value: sk-server }").unwrap();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Authorization", "Bearer untouched")
            .unwrap();
        let mut req = RequestParts::from(req);
        p.on_upstream_request(&mut req, &ctx());
        assert_eq!(values(&req, "x-api-key"), ["sk-server"]);
        // Only the configured header is this plugin's business.
        assert_eq!(values(&req, "authorization"), ["Bearer untouched"]);
    }

    #[test]
    fn only_the_upstream_request_hook_is_used() {
        let p = plugin("{ value: x }").unwrap();
        assert_eq!(
            p.hooks(),
            Hooks {
                upstream_request: true,
                ..Hooks::default()
            }
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_output_or_errors() {
        let secret = "sk-very-secret-123";
        let config: UpstreamAuthConfig =
            serde_yaml_ng::from_str(&format!("{{ value: 'Bearer {secret}' }}")).unwrap();
        assert!(!format!("{config:?}").contains(secret));
        let p = UpstreamAuth::new(config).unwrap();
        assert!(!format!("{p:?}").contains(secret));

        let err = UpstreamAuth::new(UpstreamAuthConfig {
            header: default_header(),
            value: crate::secret::Secret::new(format!("Bearer {secret}\n")),
        })
        .err()
        .unwrap();
        assert!(!err.contains(secret), "{err}");
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(plugin("{ value: '' }").unwrap_err().contains("empty"));
        assert!(plugin("{ header: 'Bad Name', value: x }")
            .unwrap_err()
            .contains("header"));
        assert!(plugin("{ header: Authorization }")
            .unwrap_err()
            .contains("value"));
        assert!(plugin("{ value: x, heder: Authorization }")
            .unwrap_err()
            .contains("heder"));
    }
}
