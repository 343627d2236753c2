//! `headers`: set and remove request and response headers.
//!
//! ```yaml
//! plugins:
//!   identity_headers:
//!     type: headers
//!     request:
//!       set: { X-Webauth-User: "{identity.subject}", X-Client-IP: "{client_ip}" }
//!       remove: [X-Debug]
//!     response:
//!       set: { X-Frame-Options: DENY }
//!       remove: [Server]
//! ```
//!
//! Every header this plugin sets or removes on the request is first removed from the
//! client's request, in every duplicate and every spelling (any case, `_` for `-` in any
//! mix, as CGI, WSGI, PHP and Rack read them), so a client can never smuggle in a
//! value an upstream trusts (`X-Webauth-User`, `Remote-User`, `X-Trusted-User-Email`).
//! A value whose placeholder has nothing to show (no identity yet) is left out.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

use crate::template::Template;
use crate::{Ctx, Hooks, Plugin, RequestFlow, RequestHeader, RequestParts, ResponseParts};

/// Settings of a `headers` plugin.
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Changes to the request sent upstream.
    #[serde(default)]
    pub request: HeaderOps,
    /// Changes to the response sent to the client.
    #[serde(default)]
    pub response: HeaderOps,
}

/// One direction's changes.
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Headers to set, replacing any existing value. Values may use `{client_ip}`,
    /// `{request_id}`, `{identity.subject}` and `{identity.role}`.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Headers to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header the plugin sets (the name prebuilt, so inserting it copies nothing).
struct SetHeader {
    name: HeaderName,
    template: Template,
}

struct CompiledOps {
    set: Vec<SetHeader>,
    remove: Vec<HeaderName>,
    /// Every name in `set` and `remove`: the client's copies of these go in every
    /// spelling (see [`crate::spelling`]), since CGI, WSGI, PHP and Rack read
    /// `X_Webauth-User` as `X-Webauth-User`.
    client_copies: Vec<HeaderName>,
}

impl CompiledOps {
    fn compile(ops: HeaderOps, side: &str) -> Result<Self, String> {
        let set = ops
            .set
            .into_iter()
            .map(|(name, value)| {
                let header = header_name(&name, side)?;
                let template =
                    Template::parse(&value).map_err(|e| format!("{side}.set.{name}: {e}"))?;
                Ok(SetHeader {
                    name: header,
                    template,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let remove = ops
            .remove
            .iter()
            .map(|name| header_name(name, side))
            .collect::<Result<Vec<_>, String>>()?;
        let client_copies = set
            .iter()
            .map(|h| h.name.clone())
            .chain(remove.iter().cloned())
            .collect();
        Ok(CompiledOps {
            set,
            remove,
            client_copies,
        })
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Sets every header of `set` (replacing every copy already there) or, when its
    /// value has nothing to show (no identity yet), removes it.
    fn apply_set(&self, headers: &mut HeaderMap, ctx: &Ctx) {
        for h in &self.set {
            match h.template.render(ctx) {
                Some(value) => {
                    headers.insert(h.name.clone(), value);
                }
                None => {
                    headers.remove(&h.name);
                }
            }
        }
    }
}

fn header_name(name: &str, side: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{side}: {name:?} is not a valid header name"))
}

/// The runtime form of a `headers` plugin.
pub struct Headers {
    request: CompiledOps,
    response: CompiledOps,
}

impl Headers {
    pub fn new(config: HeadersConfig) -> Result<Self, String> {
        Ok(Headers {
            request: CompiledOps::compile(config.request, "request")?,
            response: CompiledOps::compile(config.response, "response")?,
        })
    }
}

impl crate::PluginType for Headers {
    const TYPE: &'static str = "headers";
    type Config = HeadersConfig;

    fn build(config: HeadersConfig, _env: &crate::BuildEnv) -> Result<Self, String> {
        Headers::new(config)
    }
}

impl Plugin for Headers {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: !self.request.is_empty(),
            upstream_request: !self.request.set.is_empty(),
            response: !self.response.is_empty(),
            ..Hooks::default()
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, _ctx: &'a mut Ctx) -> RequestFlow<'a> {
        // Removed here, before any other plugin or the upstream can see them: the client's
        // copies of headers we set are never trusted, whatever their spelling or count.
        crate::spelling::remove_every_spelling_from(req, &self.request.client_copies);
        RequestFlow::CONTINUE
    }

    fn on_upstream_request(&self, req: &mut RequestParts, ctx: &Ctx) {
        self.request.apply_set(&mut req.headers, ctx);
    }

    fn on_response(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        for name in &self.response.remove {
            resp.headers.remove(name);
        }
        self.response.apply_set(&mut resp.headers, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, RequestId, ResponseHeader, Role};
    use std::sync::Arc;

    fn plugin(yaml: &str) -> Headers {
        Headers::new(serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    fn ctx() -> Ctx {
        let mut c = Ctx::new(
            "192.0.2.7".parse().unwrap(),
            RequestId::from_random(7),
            false,
        );
        c.identity = Some(Identity {
            subject: Arc::from("ann"),
            role: Role::User,
            method: "test",
        });
        c
    }

    #[test]
    fn client_copies_of_set_headers_are_removed_in_every_spelling() {
        let p = plugin("request: { set: { X-Webauth-User: '{identity.subject}' } }");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-webauth-user", "mallory").unwrap();
        req.append_header("X-WEBAUTH-USER", "eve").unwrap();
        req.append_header("X-Webauth-User", "trudy").unwrap();
        req.append_header("X_Webauth_User", "oscar").unwrap();
        let mut c = ctx();
        let _ = p.on_request(&mut req, &mut c);
        assert!(req.headers.get("x-webauth-user").is_none());
        assert!(req.headers.get("x_webauth_user").is_none());
        let mut req = RequestParts::from(req);
        p.on_upstream_request(&mut req, &c);
        let values: Vec<_> = req.headers.get_all("x-webauth-user").iter().collect();
        assert_eq!(values, ["ann"]);
    }

    #[test]
    fn a_header_needing_an_identity_is_left_out_without_one() {
        let p = plugin("request: { set: { Remote-User: '{identity.subject}' } }");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Remote-User", "admin").unwrap();
        let mut c = ctx();
        c.identity = None;
        let _ = p.on_request(&mut req, &mut c);
        let mut req = RequestParts::from(req);
        p.on_upstream_request(&mut req, &c);
        assert!(req.headers.get("remote-user").is_none());
    }

    #[test]
    fn response_headers_are_set_and_removed() {
        let p = plugin("response: { set: { X-Frame-Options: DENY }, remove: [Server] }");
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Server", "upstream/1.0").unwrap();
        resp.append_header("x-frame-options", "ALLOW").unwrap();
        let mut resp = ResponseParts::from(resp);
        p.on_response(&mut resp, &mut ctx());
        assert!(resp.headers.get("server").is_none());
        let values: Vec<_> = resp.headers.get_all("x-frame-options").iter().collect();
        assert_eq!(values, ["DENY"]);
    }

    #[test]
    fn hooks_follow_the_settings() {
        let p = plugin("response: { remove: [Server] }");
        assert_eq!(
            p.hooks(),
            Hooks {
                response: true,
                ..Hooks::default()
            }
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad: HeadersConfig =
            serde_yaml_ng::from_str("request: { set: { 'Bad Name': x } }").unwrap();
        assert!(Headers::new(bad).is_err());
        assert!(serde_yaml_ng::from_str::<HeadersConfig>("requets: {}").is_err());
    }
}
