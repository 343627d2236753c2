//! `cors`: let pages on other origins call this route from a browser.
//!
//! ```yaml
//! plugins:
//!   chat_cors:
//!     type: cors
//!     allowed_origins: [https://chat.example.com, http://localhost:3000]   # or ["*"]
//!     allowed_methods: [GET, POST]                 # default GET, HEAD, POST
//!     allowed_headers: [Authorization, Content-Type]   # the default
//!     expose_headers: [X-Request-Id]               # default none
//!     allow_credentials: true                      # default false
//!     max_age: 10m                                 # default 10m
//! ```
//!
//! Preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) are answered
//! by the gateway and never proxied. They run before every other plugin of the chain,
//! identity and access check included, because browsers never send credentials with a
//! preflight: a route with `access: user` still answers them. An allowed origin gets 204
//! with `Access-Control-Allow-Origin` (its own origin echoed), `-Allow-Methods`,
//! `-Allow-Headers`, `-Max-Age`, `-Allow-Credentials: true` when set, and `Vary: Origin`.
//! Any other origin gets 403 and no `Access-Control-Allow-Origin`. Which methods and
//! headers the actual request may use is enforced by the browser from those lists.
//!
//! On every other response (proxied, or a gateway rejection such as 401, so the page can
//! read why) an allowed origin gets `Access-Control-Allow-Origin`, `-Allow-Credentials`
//! and `-Expose-Headers`; every response gets `Vary: Origin` so no cache hands one
//! origin's answer to another. The gateway owns these headers: copies sent by the
//! upstream are removed, so an upstream's own `Access-Control-Allow-Origin: *` cannot
//! widen the list.
//!
//! `["*"]` allows any origin and answers `Access-Control-Allow-Origin: *`. It cannot be
//! combined with `allow_credentials: true` (a config error): any site could then read
//! answers made with the user's cookies. List the origins instead.
//!
//! CORS only decides which pages may *read* answers; a cross-site form can still *send*
//! a POST. Put an `origin` plugin on the route too, listing the same origins in its
//! `allowed_origins`, to refuse cross-site writes.

use bytes::Bytes;

use crate::units::Span;
use http::header::{self, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::origin::OriginSpec;
use crate::{Ctx, Hooks, Plugin, Reply, RequestHeader, ResponseParts};

/// The request's `Origin` once a `cors` plugin allowed it, echoed on the response.
struct AllowedOrigin(http::HeaderValue);

/// Settings of a `cors` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins whose pages may read responses (`https://chat.example.com`,
    /// `http://localhost:3000`), or `["*"]` for any origin. `null` is refused.
    pub allowed_origins: Vec<String>,
    /// Methods a cross-origin request may use (default `GET, HEAD, POST`); `*` for any,
    /// not with `allow_credentials`.
    #[serde(default = "default_methods")]
    pub allowed_methods: Vec<String>,
    /// Request headers a cross-origin request may send (default `Authorization,
    /// Content-Type`); `*` for any, not with `allow_credentials`.
    #[serde(default = "default_headers")]
    pub allowed_headers: Vec<String>,
    /// Response headers the page may read beyond the CORS-safelisted ones (default
    /// none); `*` for all, not with `allow_credentials`.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Let the page send cookies and read the answers to them (default false). Never
    /// with `allowed_origins: ["*"]`.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may reuse a preflight answer (default `10m`; browsers cap it,
    /// Chromium at 2h).
    #[serde(default = "default_max_age")]
    pub max_age: Span,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}

fn default_headers() -> Vec<String> {
    vec!["Authorization".into(), "Content-Type".into()]
}

fn default_max_age() -> Span {
    Span::from_secs(600)
}

enum Origins {
    Any,
    Listed(Vec<OriginSpec>),
}

/// The runtime form of a `cors` plugin.
pub struct Cors {
    origins: Origins,
    credentials: bool,
    /// `-Allow-Methods`, `-Allow-Headers`, `-Max-Age`: the same for every preflight.
    preflight_headers: Vec<(HeaderName, HeaderValue)>,
    expose: Option<HeaderValue>,
    refused: Reply,
}

static STAR: HeaderValue = HeaderValue::from_static("*");
static TRUE: HeaderValue = HeaderValue::from_static("true");
static ORIGIN: HeaderValue = HeaderValue::from_static("Origin");

/// Joins a list into one header value, each entry checked with `valid`.
fn header_list(
    key: &str,
    list: &[String],
    credentials: bool,
    valid: impl Fn(&str) -> bool,
) -> Result<Option<HeaderValue>, String> {
    if list.iter().any(|e| e == "*") {
        if credentials {
            return Err(format!(
                "{key}: `*` cannot be combined with `allow_credentials: true`; list the names"
            ));
        }
        if list.len() > 1 {
            return Err(format!("{key}: `*` must be the only entry"));
        }
    } else if let Some(bad) = list.iter().find(|e| !valid(e)) {
        return Err(format!("{key}: {bad:?} is not a valid name"));
    }
    if list.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&list.join(", "))
        .map(Some)
        .map_err(|_| format!("{key}: not a valid header value"))
}

impl Cors {
    pub fn new(config: CorsConfig) -> Result<Self, String> {
        let credentials = config.allow_credentials;
        let origins = match config.allowed_origins.as_slice() {
            [] => return Err("`allowed_origins` must list at least one origin (or \"*\")".into()),
            [star] if star == "*" => {
                if credentials {
                    return Err("`allow_credentials: true` cannot be combined with `allowed_origins: [\"*\"]`: any site could read answers made with the user's cookies; list the origins instead".into());
                }
                Origins::Any
            }
            list => Origins::Listed(
                list.iter()
                    .map(|o| {
                        if o == "*" {
                            Err("`*` must be the only entry".to_string())
                        } else {
                            OriginSpec::parse(o)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("allowed_origins: {e}"))?,
            ),
        };
        let methods: Vec<String> = config
            .allowed_methods
            .iter()
            .map(|m| m.trim().to_ascii_uppercase())
            .collect();
        let methods = header_list("allowed_methods", &methods, credentials, |m| {
            http::Method::from_bytes(m.as_bytes()).is_ok()
        })?;
        let is_name = |h: &str| HeaderName::from_bytes(h.trim().as_bytes()).is_ok();
        let headers = header_list(
            "allowed_headers",
            &config.allowed_headers,
            credentials,
            is_name,
        )?;
        let expose = header_list(
            "expose_headers",
            &config.expose_headers,
            credentials,
            is_name,
        )?;
        let max_age = config.max_age.get().as_secs();

        let mut preflight_headers = Vec::with_capacity(3);
        if let Some(m) = methods {
            preflight_headers.push((header::ACCESS_CONTROL_ALLOW_METHODS, m));
        }
        if let Some(h) = headers {
            preflight_headers.push((header::ACCESS_CONTROL_ALLOW_HEADERS, h));
        }
        preflight_headers.push((header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(max_age)));
        let mut refused = Reply::error(403, "origin not allowed by CORS");
        refused.headers.push((header::VARY, ORIGIN.clone()));
        Ok(Cors {
            origins,
            credentials,
            preflight_headers,
            expose,
            refused,
        })
    }

    fn allows(&self, origin: &[u8]) -> bool {
        match &self.origins {
            Origins::Any => true,
            Origins::Listed(list) => list.iter().any(|o| o.matches(origin)),
        }
    }

    /// What `Access-Control-Allow-Origin` says to an allowed `origin`.
    fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        match self.origins {
            Origins::Any => STAR.clone(),
            Origins::Listed(_) => origin.clone(),
        }
    }

    fn preflight(&self, origin: &HeaderValue) -> Reply {
        let mut headers = Vec::with_capacity(self.preflight_headers.len() + 3);
        headers.push((
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(origin),
        ));
        if self.credentials {
            headers.push((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone()));
        }
        headers.extend(self.preflight_headers.iter().cloned());
        if matches!(self.origins, Origins::Listed(_)) {
            headers.push((header::VARY, ORIGIN.clone()));
        }
        Reply {
            status: 204,
            content_type: "",
            headers,
            body: Bytes::new(),
        }
    }
}

fn is_preflight(req: &RequestHeader) -> bool {
    req.method == http::Method::OPTIONS
        && req
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Adds `Vary: Origin` unless a `Vary` already covers it.
fn vary_on_origin(resp: &mut ResponseParts) {
    let covered = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|token| {
            let token = token.trim_ascii();
            token == b"*" || token.eq_ignore_ascii_case(b"origin")
        })
    });
    if !covered {
        resp.headers.append(header::VARY, ORIGIN.clone());
    }
}

impl crate::PluginType for Cors {
    const TYPE: &'static str = "cors";
    type Config = CorsConfig;

    fn build(config: CorsConfig, _env: &crate::BuildEnv) -> Result<Self, String> {
        Cors::new(config)
    }
}

impl Plugin for Cors {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            early: true,
            response: true,
            gateway_replies: true,
            ..Hooks::default()
        }
    }

    fn on_early_request(&self, req: &RequestHeader, ctx: &mut Ctx) -> Option<Reply> {
        let origin = req.headers.get(header::ORIGIN)?;
        let allowed = self.allows(origin.as_bytes());
        if allowed {
            ctx.ext.insert(AllowedOrigin(origin.clone()));
        }
        if !is_preflight(req) {
            return None;
        }
        Some(if allowed {
            self.preflight(origin)
        } else {
            self.refused.clone()
        })
    }

    fn on_response(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
        ] {
            resp.headers.remove(name);
        }
        if matches!(self.origins, Origins::Listed(_)) {
            vary_on_origin(resp);
        }
        // Checked again here: another `cors` plugin of the chain may have allowed it.
        let Some(AllowedOrigin(origin)) = ctx
            .ext
            .get::<AllowedOrigin>()
            .filter(|o| self.allows(o.0.as_bytes()))
        else {
            return;
        };
        let h = &mut resp.headers;
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(origin),
        );
        if self.credentials {
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
        }
        if let Some(expose) = &self.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestId;

    fn cors(yaml: &str) -> Cors {
        Cors::new(serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "127.0.0.1".parse().unwrap(),
            RequestId::from_random(7),
            false,
        )
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/api/chat", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    fn header<'a>(reply: &'a Reply, name: &HeaderName) -> Option<&'a str> {
        reply
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    fn response_header(resp: &ResponseParts, name: &HeaderName) -> Vec<String> {
        resp.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    const PREFLIGHT: (&str, &str) = ("Access-Control-Request-Method", "POST");

    #[test]
    fn preflights_from_allowed_origins_are_answered_with_the_lists() {
        let c = cors("{ allowed_origins: ['https://app.example'], allow_credentials: true, allowed_methods: [get, POST], max_age: 2h }");
        let mut ctx = ctx();
        let req = request("OPTIONS", &[("Origin", "https://app.example"), PREFLIGHT]);
        let reply = c.on_early_request(&req, &mut ctx).unwrap();
        assert_eq!(reply.status, 204);
        assert!(reply.body.is_empty());
        let h = |name| header(&reply, name);
        assert_eq!(
            h(&header::ACCESS_CONTROL_ALLOW_ORIGIN),
            Some("https://app.example")
        );
        assert_eq!(h(&header::ACCESS_CONTROL_ALLOW_METHODS), Some("GET, POST"));
        assert_eq!(
            h(&header::ACCESS_CONTROL_ALLOW_HEADERS),
            Some("Authorization, Content-Type")
        );
        assert_eq!(h(&header::ACCESS_CONTROL_MAX_AGE), Some("7200"));
        assert_eq!(h(&header::ACCESS_CONTROL_ALLOW_CREDENTIALS), Some("true"));
        assert_eq!(h(&header::VARY), Some("Origin"));
    }

    #[test]
    fn preflights_from_other_origins_get_403_without_allow_origin() {
        let c = cors("{ allowed_origins: ['https://app.example'] }");
        for origin in ["https://evil.example", "null", "https://app.example.evil"] {
            let mut ctx = ctx();
            let req = request("OPTIONS", &[("Origin", origin), PREFLIGHT]);
            let reply = c.on_early_request(&req, &mut ctx).unwrap();
            assert_eq!(reply.status, 403, "{origin}");
            assert_eq!(header(&reply, &header::ACCESS_CONTROL_ALLOW_ORIGIN), None);
            assert!(ctx.ext.get::<AllowedOrigin>().is_none());
        }
    }

    #[test]
    fn only_real_preflights_are_answered() {
        let c = cors("{ allowed_origins: ['https://app.example'] }");
        let mut ctx = ctx();
        assert!(c
            .on_early_request(&request("OPTIONS", &[PREFLIGHT]), &mut ctx)
            .is_none());
        let plain_options = request("OPTIONS", &[("Origin", "https://app.example")]);
        assert!(c.on_early_request(&plain_options, &mut ctx).is_none());
        let post = request("POST", &[("Origin", "https://app.example"), PREFLIGHT]);
        assert!(c.on_early_request(&post, &mut ctx).is_none());
        assert_eq!(
            ctx.ext.get::<AllowedOrigin>().unwrap().0.as_bytes(),
            b"https://app.example"
        );
    }

    #[test]
    fn responses_echo_allowed_origins_and_replace_the_upstreams_headers() {
        let c = cors("{ allowed_origins: ['https://app.example'], allow_credentials: true, expose_headers: [X-Request-Id] }");
        let mut ctx = ctx();
        c.on_early_request(
            &request("POST", &[("Origin", "https://app.example")]),
            &mut ctx,
        );
        let mut resp = crate::ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Origin", "*")
            .unwrap();
        resp.append_header("Vary", "Accept-Encoding").unwrap();
        let mut resp = ResponseParts::from(resp);
        c.on_response(&mut resp, &mut ctx);
        c.on_response(&mut resp, &mut ctx);
        assert_eq!(
            response_header(&resp, &header::ACCESS_CONTROL_ALLOW_ORIGIN),
            ["https://app.example"]
        );
        assert_eq!(
            response_header(&resp, &header::ACCESS_CONTROL_ALLOW_CREDENTIALS),
            ["true"]
        );
        assert_eq!(
            response_header(&resp, &header::ACCESS_CONTROL_EXPOSE_HEADERS),
            ["X-Request-Id"]
        );
        assert_eq!(
            response_header(&resp, &header::VARY),
            ["Accept-Encoding", "Origin"]
        );
    }

    #[test]
    fn responses_to_other_origins_carry_no_allow_origin_even_if_the_upstream_sent_one() {
        let c = cors("{ allowed_origins: ['https://app.example'], allow_credentials: true }");
        let mut ctx = ctx();
        c.on_early_request(
            &request("GET", &[("Origin", "https://evil.example")]),
            &mut ctx,
        );
        let mut resp = crate::ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Origin", "https://evil.example")
            .unwrap();
        resp.append_header("Access-Control-Allow-Credentials", "true")
            .unwrap();
        let mut resp = ResponseParts::from(resp);
        c.on_response(&mut resp, &mut ctx);
        assert!(resp
            .headers
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none());
        assert!(resp
            .headers
            .get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS)
            .is_none());
        assert_eq!(response_header(&resp, &header::VARY), ["Origin"]);
    }

    #[test]
    fn another_plugins_origin_is_not_echoed() {
        let wide = cors("{ allowed_origins: ['https://a.example', 'https://b.example'] }");
        let narrow = cors("{ allowed_origins: ['https://a.example'] }");
        let mut ctx = ctx();
        wide.on_early_request(
            &request("GET", &[("Origin", "https://b.example")]),
            &mut ctx,
        );
        narrow.on_early_request(
            &request("GET", &[("Origin", "https://b.example")]),
            &mut ctx,
        );
        let mut resp = ResponseParts::from(crate::ResponseHeader::build(200, None).unwrap());
        narrow.on_response(&mut resp, &mut ctx);
        assert!(resp
            .headers
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none());
    }

    #[test]
    fn any_origin_answers_star_and_never_credentials() {
        let c = cors("{ allowed_origins: ['*'] }");
        let mut ctx = ctx();
        let req = request("OPTIONS", &[("Origin", "https://x.example"), PREFLIGHT]);
        let reply = c.on_early_request(&req, &mut ctx).unwrap();
        assert_eq!(
            header(&reply, &header::ACCESS_CONTROL_ALLOW_ORIGIN),
            Some("*")
        );
        assert_eq!(
            header(&reply, &header::ACCESS_CONTROL_ALLOW_CREDENTIALS),
            None
        );
        let mut resp = ResponseParts::from(crate::ResponseHeader::build(200, None).unwrap());
        c.on_response(&mut resp, &mut ctx);
        assert_eq!(
            response_header(&resp, &header::ACCESS_CONTROL_ALLOW_ORIGIN),
            ["*"]
        );
    }

    #[test]
    fn unsafe_or_broken_settings_are_refused() {
        for yaml in [
            "{ allowed_origins: ['*'], allow_credentials: true }",
            "{ allowed_origins: ['https://a.example'], allowed_headers: ['*'], allow_credentials: true }",
            "{ allowed_origins: ['https://a.example'], allowed_methods: ['*'], allow_credentials: true }",
            "{ allowed_origins: ['*', 'https://a.example'] }",
            "{ allowed_origins: [] }",
            "{ allowed_origins: ['null'] }",
            "{ allowed_origins: ['a.example'] }",
            "{ allowed_origins: ['https://a.example'], allowed_methods: ['GE T'] }",
            "{ allowed_origins: ['https://a.example'], allowed_headers: ['Bad Name'] }",
            "{ allowed_origins: ['https://a.example'], max_age: 10x }",
        ] {
            // Refused when the settings are read (a bad duration) or when built.
            let built = serde_yaml_ng::from_str::<CorsConfig>(yaml)
                .map_err(|e| e.to_string())
                .and_then(Cors::new);
            assert!(built.is_err(), "{yaml}");
        }
        assert!(serde_yaml_ng::from_str::<CorsConfig>("{ allowed_origin: ['*'] }").is_err());
    }
}
