//! `origin`: refuse cross-site writes (CSRF) and foreign host names (DNS rebinding).
//!
//! ```yaml
//! plugins:
//!   same_origin:
//!     type: origin
//!     allowed_hosts: [chat.example.com, "*.chat.example.com"]  # optional; others get 421
//!     allowed_origins: [https://chat.example.com]              # default: the request's own origin
//!     check: unsafe                                            # or `all`
//! ```
//!
//! A browser says where a request comes from in `Origin` and `Sec-Fetch-Site`. For
//! POST, PUT, PATCH, DELETE (every method but GET, HEAD, OPTIONS and TRACE) and for
//! WebSocket upgrades, this plugin refuses with 403 a request whose `Origin` is not
//! allowed or is `null` (sandboxed frames, `data:` pages, some redirects), or whose
//! `Sec-Fetch-Site` is `cross-site` (unless its `Origin` is listed in `allowed_origins`).
//! With `check: all` every method is checked. A request without `Origin` and without
//! `Sec-Fetch-Site: cross-site` passes: it comes from curl, an SDK or another server,
//! which cannot carry a browser's cookies.
//!
//! Without `allowed_origins`, the allowed origin is the request's own: `https://` when
//! the client reached the gateway over HTTPS (a TLS listener, or `X-Forwarded-Proto`
//! from a trusted proxy), otherwise `http://`, followed by its `Host` (`:authority` on
//! HTTP/2). Behind another proxy, that proxy must pass the client's `Host` on. With
//! `allowed_origins`, exactly the listed origins are allowed: list your own origin too.
//!
//! `allowed_hosts` guards against DNS rebinding, where a hostile page gets its own host
//! name to resolve to this gateway (say on 127.0.0.1) and so looks same-origin: a request
//! whose `Host` (without port, any case) is not listed gets 421 Misdirected Request,
//! whatever its method. `*.example.com` allows any subdomain of example.com (not
//! example.com itself). Without `allowed_hosts`, every host name is accepted.
//!
//! Origins and hosts compare case-insensitively, and a default port (`:443` for https,
//! `:80` for http) is the same as none. Nothing is allocated for a request that passes.

use http::{header, HeaderName};
use serde::{Deserialize, Serialize};

use crate::{Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader};

static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Which requests have their origin checked.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// Every method but GET, HEAD, OPTIONS and TRACE, and WebSocket upgrades.
    #[default]
    Unsafe,
    /// Every request.
    All,
}

/// Settings of an `origin` plugin.
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// Origins (`https://chat.example.com`, `http://127.0.0.1:8080`) whose requests are
    /// allowed. Default: only the request's own origin. `null` and `*` are refused.
    pub allowed_origins: Option<Vec<String>>,
    /// Host names the gateway answers for (`chat.example.com`, `*.example.com`,
    /// `127.0.0.1`, `::1`), without port. Requests for any other host get 421.
    /// Default: any host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// `unsafe` (default): check POST, PUT, PATCH, DELETE and other non-safe methods and
    /// WebSocket upgrades; `all`: check every request.
    #[serde(default)]
    pub check: Check,
}

/// A configured origin, lowercase and without its scheme's default port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginSpec {
    scheme: String,
    authority: String,
}

impl OriginSpec {
    /// Parses `scheme://host[:port]` as written in a config file.
    pub(crate) fn parse(text: &str) -> Result<OriginSpec, String> {
        let trimmed = text.trim();
        if trimmed == "null" || trimmed == "*" {
            return Err(format!("{trimmed:?} cannot be an allowed origin"));
        }
        // A trailing slash is a common slip when copying a URL; an origin has no path.
        let lower = trimmed
            .strip_suffix('/')
            .unwrap_or(trimmed)
            .to_ascii_lowercase();
        let bad = || {
            format!("{text:?} is not an origin; write it like https://chat.example.com or http://127.0.0.1:8080")
        };
        let (scheme, authority) = lower.split_once("://").ok_or_else(bad)?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        let authority_ok = !authority.is_empty()
            && !authority
                .chars()
                .any(|c| matches!(c, '/' | '?' | '#' | '@' | '\\') || !c.is_ascii_graphic());
        if !scheme_ok || !authority_ok {
            return Err(bad());
        }
        let authority = strip_default_port(scheme.as_bytes(), authority.as_bytes());
        Ok(OriginSpec {
            scheme: scheme.to_string(),
            authority: String::from_utf8_lossy(authority).into_owned(),
        })
    }

    /// True when the `Origin` header value names this origin.
    pub(crate) fn matches(&self, origin: &[u8]) -> bool {
        split_origin(origin).is_some_and(|(scheme, authority)| {
            scheme.eq_ignore_ascii_case(self.scheme.as_bytes())
                && authority.eq_ignore_ascii_case(self.authority.as_bytes())
        })
    }
}

/// Splits an `Origin` value into scheme and authority, the scheme's default port
/// dropped from the authority.
pub(crate) fn split_origin(origin: &[u8]) -> Option<(&[u8], &[u8])> {
    let sep = memchr::memmem::find(origin, b"://")?;
    let (scheme, authority) = (&origin[..sep], &origin[sep + 3..]);
    if scheme.is_empty() || authority.is_empty() {
        return None;
    }
    Some((scheme, strip_default_port(scheme, authority)))
}

fn strip_default_port<'a>(scheme: &[u8], authority: &'a [u8]) -> &'a [u8] {
    let default: &[u8] = if scheme.eq_ignore_ascii_case(b"https") {
        b":443"
    } else if scheme.eq_ignore_ascii_case(b"http") {
        b":80"
    } else {
        return authority;
    };
    authority.strip_suffix(default).unwrap_or(authority)
}

/// The authority the client asked for: `:authority` on HTTP/2 (and absolute-form
/// targets), otherwise `Host`. The same precedence the router uses.
fn requested_authority(req: &RequestHeader) -> Option<&[u8]> {
    req.uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| req.headers.get(header::HOST).map(|h| h.as_bytes()))
}

/// The host name of an authority: without port, brackets or a final dot.
fn host_of(authority: &[u8]) -> &[u8] {
    let host = if let Some(rest) = authority.strip_prefix(b"[") {
        rest.split(|b| *b == b']').next().unwrap_or(b"")
    } else {
        match authority.iter().rposition(|b| *b == b':') {
            Some(i) if authority[i + 1..].iter().all(u8::is_ascii_digit) => &authority[..i],
            _ => authority,
        }
    };
    host.strip_suffix(b".").unwrap_or(host)
}

/// An `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    AnySubdomain(String),
}

impl HostRule {
    fn parse(text: &str) -> Result<HostRule, String> {
        let lower = text.trim().to_ascii_lowercase();
        let host = lower
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&lower);
        let host = host.strip_suffix('.').unwrap_or(host);
        let ipv6 = host.matches(':').count() > 1;
        let valid = !host.is_empty()
            && (ipv6 || !host.contains(':'))
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '*'));
        if !valid {
            return Err(format!(
                "{text:?} is not a host name; write it like chat.example.com or *.example.com, without port"
            ));
        }
        match host.strip_prefix("*.") {
            Some(rest) if !rest.is_empty() && !rest.contains('*') => {
                Ok(HostRule::AnySubdomain(format!(".{rest}")))
            }
            _ if host.contains('*') => Err(format!(
                "{text:?}: a wildcard is only allowed as the first label, like *.example.com"
            )),
            _ => Ok(HostRule::Exact(host.to_string())),
        }
    }

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostRule::Exact(h) => host.eq_ignore_ascii_case(h.as_bytes()),
            HostRule::AnySubdomain(suffix) => {
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// The runtime form of an `origin` plugin.
pub struct Origin {
    /// `None`: the request's own origin.
    allowed_origins: Option<Vec<OriginSpec>>,
    allowed_hosts: Vec<HostRule>,
    check: Check,
    wrong_host: Reply,
    foreign_origin: Reply,
    cross_site: Reply,
}

impl Origin {
    pub fn new(config: OriginConfig) -> Result<Self, String> {
        let allowed_origins =
            match config.allowed_origins {
                Some(list) if list.is_empty() => return Err(
                    "`allowed_origins` is empty; leave it out to allow the request's own origin"
                        .into(),
                ),
                Some(list) => Some(
                    list.iter()
                        .map(|o| OriginSpec::parse(o))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| format!("allowed_origins: {e}"))?,
                ),
                None => None,
            };
        let allowed_hosts = config
            .allowed_hosts
            .iter()
            .map(|h| HostRule::parse(h))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("allowed_hosts: {e}"))?;
        Ok(Origin {
            allowed_origins,
            allowed_hosts,
            check: config.check,
            wrong_host: Reply::error(421, "host not allowed"),
            foreign_origin: Reply::error(403, "cross-origin request refused"),
            cross_site: Reply::error(403, "cross-site request refused"),
        })
    }

    fn host_allowed(&self, authority: Option<&[u8]>) -> bool {
        let Some(authority) = authority else {
            return false;
        };
        let host = host_of(authority);
        self.allowed_hosts.iter().any(|rule| rule.matches(host))
    }

    fn needs_check(&self, req: &RequestHeader) -> bool {
        use http::Method;
        if self.check == Check::All {
            return true;
        }
        let safe = matches!(
            req.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        !safe || is_websocket_upgrade(req)
    }

    /// True when `origin` is listed, or is the request's own when nothing is listed.
    fn origin_allowed(&self, origin: &[u8], req: &RequestHeader, https: bool) -> bool {
        if let Some(list) = &self.allowed_origins {
            return list.iter().any(|o| o.matches(origin));
        }
        let Some((scheme, authority)) = split_origin(origin) else {
            return false;
        };
        let own_scheme: &[u8] = if https { b"https" } else { b"http" };
        let Some(own_authority) = requested_authority(req) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(own_scheme)
            && authority.eq_ignore_ascii_case(strip_default_port(own_scheme, own_authority))
    }

    /// The refusal for this request, if any.
    fn verdict(&self, req: &RequestHeader, https: bool) -> Option<&Reply> {
        if !self.allowed_hosts.is_empty() && !self.host_allowed(requested_authority(req)) {
            return Some(&self.wrong_host);
        }
        if !self.needs_check(req) {
            return None;
        }
        let origin = req.headers.get(header::ORIGIN).map(|o| o.as_bytes());
        let cross_site = req
            .headers
            .get(&SEC_FETCH_SITE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        match origin {
            // `null` never matches a configured origin (they cannot be `null`) nor the
            // own origin (it has no `://`).
            Some(origin) if !self.origin_allowed(origin, req, https) => Some(&self.foreign_origin),
            // A cross-site page is refused unless its origin was listed explicitly: the
            // own origin is never cross-site, so only a listed one can get here.
            Some(_) if cross_site && self.allowed_origins.is_none() => Some(&self.cross_site),
            None if cross_site => Some(&self.cross_site),
            _ => None,
        }
    }
}

/// True for a WebSocket handshake (`Upgrade: websocket`, any case).
fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.headers.get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    })
}

impl crate::PluginType for Origin {
    const TYPE: &'static str = "origin";
    type Config = OriginConfig;

    fn build(config: OriginConfig, _env: &crate::BuildEnv) -> Result<Self, String> {
        Origin::new(config)
    }
}

impl Plugin for Origin {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            ..Hooks::default()
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        match self.verdict(req, ctx.https) {
            None => RequestFlow::CONTINUE,
            Some(reply) => RequestFlow::reply(reply.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(yaml: &str) -> Origin {
        Origin::new(serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    /// The status the plugin answers for `method` with `headers`, or 0 when it passes.
    fn status(p: &Origin, method: &str, https: bool, headers: &[(&str, &str)]) -> u16 {
        let mut req = RequestHeader::build(method, b"/api", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        p.verdict(&req, https).map_or(0, |r| r.status)
    }

    #[test]
    fn own_origin_passes_and_foreign_or_null_origins_are_refused() {
        let p = plugin("{}");
        let host = ("Host", "chat.example.com");
        assert_eq!(
            status(
                &p,
                "POST",
                true,
                &[host, ("Origin", "https://chat.example.com")]
            ),
            0
        );
        assert_eq!(
            status(
                &p,
                "POST",
                true,
                &[host, ("Origin", "HTTPS://Chat.Example.COM:443")]
            ),
            0,
            "case and the default port do not matter"
        );
        for origin in [
            "https://evil.example",
            "null",
            "http://chat.example.com",
            "https://chat.example.com:8443",
            "https://chat.example.com.evil.example",
            "garbage",
        ] {
            assert_eq!(
                status(&p, "DELETE", true, &[host, ("Origin", origin)]),
                403,
                "{origin}"
            );
        }
    }

    #[test]
    fn the_own_origin_follows_the_connection_scheme_and_port() {
        let p = plugin("{}");
        let headers = [
            ("Host", "127.0.0.1:8080"),
            ("Origin", "http://127.0.0.1:8080"),
        ];
        assert_eq!(status(&p, "PUT", false, &headers), 0);
        assert_eq!(status(&p, "PUT", true, &headers), 403);
        assert_eq!(
            status(
                &p,
                "PUT",
                false,
                &[("Host", "127.0.0.1:80"), ("Origin", "http://127.0.0.1")]
            ),
            0
        );
    }

    #[test]
    fn safe_methods_and_clients_without_origin_pass() {
        let p = plugin("{}");
        let foreign = [("Host", "a.example"), ("Origin", "https://evil.example")];
        assert_eq!(status(&p, "GET", false, &foreign), 0);
        assert_eq!(status(&p, "OPTIONS", false, &foreign), 0);
        assert_eq!(status(&p, "PATCH", false, &[("Host", "a.example")]), 0);
        assert_eq!(status(&p, "PROPPATCH", false, &foreign), 403);
        assert_eq!(
            status(&plugin("{ check: all }"), "GET", false, &foreign),
            403
        );
    }

    #[test]
    fn websocket_upgrades_are_checked_like_writes() {
        let p = plugin("{}");
        let upgrade = |origin| {
            status(
                &p,
                "GET",
                false,
                &[
                    ("Host", "a.example"),
                    ("Connection", "Upgrade"),
                    ("Upgrade", "WebSocket"),
                    ("Origin", origin),
                ],
            )
        };
        assert_eq!(upgrade("http://evil.example"), 403);
        assert_eq!(upgrade("http://a.example"), 0);
    }

    #[test]
    fn sec_fetch_site_cross_site_is_refused_unless_the_origin_is_listed() {
        let p = plugin("{}");
        let cross = ("Sec-Fetch-Site", "cross-site");
        assert_eq!(
            status(&p, "POST", false, &[("Host", "a.example"), cross]),
            403
        );
        assert_eq!(
            status(
                &p,
                "POST",
                false,
                &[("Host", "a.example"), ("Origin", "http://a.example"), cross]
            ),
            403
        );
        assert_eq!(
            status(
                &p,
                "POST",
                false,
                &[("Host", "a.example"), ("Sec-Fetch-Site", "same-origin")]
            ),
            0
        );
        let listed = plugin("{ allowed_origins: ['https://app.other.example'] }");
        assert_eq!(
            status(
                &listed,
                "POST",
                false,
                &[("Origin", "https://app.other.example"), cross]
            ),
            0
        );
    }

    #[test]
    fn listed_origins_replace_the_own_origin() {
        let p =
            plugin("{ allowed_origins: ['https://Chat.example.com/', 'http://localhost:3000'] }");
        assert_eq!(
            status(&p, "POST", false, &[("Origin", "https://chat.example.com")]),
            0
        );
        assert_eq!(
            status(&p, "POST", false, &[("Origin", "http://localhost:3000")]),
            0
        );
        assert_eq!(
            status(
                &p,
                "POST",
                false,
                &[("Host", "a.example"), ("Origin", "http://a.example")]
            ),
            403
        );
    }

    #[test]
    fn hosts_outside_the_allowlist_get_421_whatever_the_method() {
        let p = plugin("{ allowed_hosts: [Chat.Example.com, '*.lan.example', '::1', 127.0.0.1] }");
        for host in [
            "chat.example.com",
            "CHAT.example.com:8443",
            "chat.example.com.",
            "a.lan.example",
            "[::1]:8080",
            "127.0.0.1:8080",
        ] {
            assert_eq!(status(&p, "GET", false, &[("Host", host)]), 0, "{host}");
        }
        for host in [
            "evil.example",
            "lan.example",
            "chat.example.com.evil",
            "127.0.0.2",
        ] {
            assert_eq!(status(&p, "GET", false, &[("Host", host)]), 421, "{host}");
        }
        assert_eq!(status(&p, "GET", false, &[]), 421, "no Host at all");
        // HTTP/2 puts the host in :authority, which lands in the URI.
        let mut h2 = RequestHeader::build("GET", b"/x", None).unwrap();
        h2.set_uri("https://chat.example.com/x".parse().unwrap());
        h2.append_header("Host", "evil.example").unwrap();
        assert!(
            p.verdict(&h2, true).is_none(),
            ":authority decides, as in the router"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        for yaml in [
            "{ allowed_origins: ['*'] }",
            "{ allowed_origins: ['null'] }",
            "{ allowed_origins: [] }",
            "{ allowed_origins: ['chat.example.com'] }",
            "{ allowed_origins: ['https://a.example/path'] }",
            "{ allowed_hosts: ['a.example:8080'] }",
            "{ allowed_hosts: ['a.*.example'] }",
            "{ allowed_hosts: ['https://a.example'] }",
        ] {
            let config: OriginConfig = serde_yaml_ng::from_str(yaml).unwrap();
            assert!(Origin::new(config).is_err(), "{yaml}");
        }
        assert!(serde_yaml_ng::from_str::<OriginConfig>("{ check: some }").is_err());
        assert!(serde_yaml_ng::from_str::<OriginConfig>("{ alowed_hosts: [] }").is_err());
    }
}
