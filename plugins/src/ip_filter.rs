//! `ip_filter`: allow or deny clients by address.
//!
//! ```yaml
//! plugins:
//!   office_only:
//!     type: ip_filter
//!     allow: [192.0.2.0/24, 2001:db8::/32]
//!     deny: [192.0.2.66/32]
//! ```
//!
//! The client address is the one the core derived with `trusted_proxies`, so a client
//! cannot pick its own by sending `X-Forwarded-For`. `deny` wins over `allow`; with an
//! `allow` list, everything not on it is refused. Refusals are 403.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader};

/// Settings of an `ip_filter` plugin.
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    /// Addresses or CIDR ranges let through; empty means everyone not denied.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Addresses or CIDR ranges refused with 403.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The runtime form of an `ip_filter` plugin.
pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    refusal: Reply,
}

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))
}

impl IpFilter {
    pub fn new(config: IpFilterConfig) -> Result<Self, String> {
        let parse = |list: &[String]| {
            list.iter()
                .map(|s| parse_cidr(s))
                .collect::<Result<Vec<_>, _>>()
        };
        let allow = parse(&config.allow).map_err(|e| format!("allow: {e}"))?;
        let deny = parse(&config.deny).map_err(|e| format!("deny: {e}"))?;
        if allow.is_empty() && deny.is_empty() {
            return Err("set at least one of `allow` or `deny`".into());
        }
        Ok(IpFilter {
            allow,
            deny,
            refusal: Reply::error(403, "client address not allowed"),
        })
    }

    fn admits(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 client reaching a dual-stack listener shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(Into::into).unwrap_or(ip),
            v4 => v4,
        };
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

impl crate::PluginType for IpFilter {
    const TYPE: &'static str = "ip_filter";
    type Config = IpFilterConfig;

    fn build(config: IpFilterConfig, _env: &crate::BuildEnv) -> Result<Self, String> {
        IpFilter::new(config)
    }
}

impl Plugin for IpFilter {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            ..Hooks::default()
        }
    }

    fn on_request<'a>(&'a self, _req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        if self.admits(ctx.client_ip) {
            RequestFlow::CONTINUE
        } else {
            RequestFlow::reply(self.refusal.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(yaml: &str) -> IpFilter {
        IpFilter::new(serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn deny_wins_over_allow() {
        let f = filter("{ allow: [10.0.0.0/8], deny: [10.6.6.6] }");
        assert!(f.admits("10.1.1.1".parse().unwrap()));
        assert!(!f.admits("10.6.6.6".parse().unwrap()));
        assert!(!f.admits("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn mapped_ipv4_is_matched_as_ipv4() {
        let f = filter("{ deny: [192.0.2.0/24] }");
        assert!(!f.admits("::ffff:192.0.2.9".parse().unwrap()));
        assert!(f.admits("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn bad_ranges_and_empty_filters_are_refused() {
        assert!(
            IpFilter::new(serde_yaml_ng::from_str("{ allow: [10.0.0.0/33] }").unwrap()).is_err()
        );
        assert!(IpFilter::new(IpFilterConfig::default()).is_err());
    }

    #[test]
    fn refusals_are_403() {
        let f = filter("{ deny: [0.0.0.0/0] }");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut ctx = Ctx::new(
            "192.0.2.1".parse().unwrap(),
            crate::RequestId::from_random(0),
            false,
        );
        let status = match f.on_request(&mut req, &mut ctx) {
            RequestFlow::Done(crate::Verdict::Reply(r)) => r.status,
            _ => 0,
        };
        assert_eq!(status, 403);
    }
}
