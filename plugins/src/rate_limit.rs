//! `rate_limit`: requests per key over time, and concurrent requests per key.
//!
//! ```yaml
//! plugins:
//!   per_ip:
//!     type: rate_limit
//!     key: client_ip          # client_ip | identity | header:NAME | route
//!     rate: 20/s              # N/s, N/min or N/h
//!     burst: 40               # at once, before the rate applies (default: N)
//!     max_in_flight: 8        # optional: concurrent requests per key, long streams included
//!     backend: local          # local | redis (the top-level `redis:` block)
//!     on_backend_error: allow # allow | deny, while Redis is unreachable
//! ```
//!
//! The algorithm is GCRA, a token bucket with `burst` tokens refilled at `rate`: a key may
//! send `burst` requests at once, then one per `1/rate`. Over any stretch of time T a key
//! gets at most `burst + rate × T` requests. Every response of the route carries
//! `RateLimit-Limit` (the burst), `RateLimit-Remaining` and `RateLimit-Reset` (seconds
//! until the bucket is full); a 429 also carries `Retry-After`.
//!
//! `key: client_ip` counts an IPv6 client by its /64 network, as one IPv4 address behind
//! NAT counts once: rotating addresses within a /64 does not skip the limit.
//! `key: identity` limits per caller (subject); requests without identity fall back to
//! the client address, as do `header:` keys whose header is missing, so that leaving a
//! header out never lands a client in one shared bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::gcra::{Decision, Gcra, LocalTable, RedisGcra, RedisMode};
use crate::redis_store;
use crate::units::Rate;
use crate::{
    BuildEnv, Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader, ResponseParts, Verdict,
};

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// What the `RateLimit-*` headers of this response say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitInfo {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

/// Settings of a `rate_limit` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// What is limited: `client_ip` (default), `identity`, `header:NAME` or `route`.
    #[serde(default = "default_key")]
    pub key: String,
    /// `N/s`, `N/min` or `N/h`.
    pub rate: Option<Rate>,
    /// Requests allowed at once (default: N of the rate).
    pub burst: Option<u64>,
    /// Concurrent requests per key, streams included.
    pub max_in_flight: Option<u32>,
    /// `local` (default) or `redis`.
    #[serde(default)]
    pub backend: Backend,
    /// What to do while Redis is unreachable: `allow` (default) or `deny` (503).
    #[serde(default)]
    pub on_backend_error: OnError,
}

fn default_key() -> String {
    "client_ip".into()
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Redis,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Allow,
    Deny,
}

/// Whose bucket a request falls in; shared by the traffic plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    ClientIp,
    Identity,
    Header(HeaderName),
    Route,
}

impl KeySource {
    pub fn parse(text: &str) -> Result<KeySource, String> {
        Ok(match text {
            "client_ip" => KeySource::ClientIp,
            "identity" => KeySource::Identity,
            "route" => KeySource::Route,
            other => match other.strip_prefix("header:") {
                Some(name) => KeySource::Header(
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("key: {name:?} is not a header name"))?,
                ),
                None => {
                    return Err(format!(
                        "unknown key {other:?}; use client_ip, identity, header:NAME or route"
                    ))
                }
            },
        })
    }

    /// The key's bytes for this request, written into `buf` when they must be built.
    /// The first byte separates the kinds, so an identity never shares an address's
    /// bucket; a missing identity or header falls back to the client address.
    pub fn bytes<'a>(
        &self,
        req: &'a RequestHeader,
        ctx: &'a Ctx,
        buf: &'a mut [u8; 17],
    ) -> &'a [u8] {
        let ip = |buf: &'a mut [u8; 17]| -> &'a [u8] {
            buf[0] = b'i';
            buf[1..].copy_from_slice(&match crate::client_network(ctx.client_ip) {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            });
            &buf[..]
        };
        match self {
            KeySource::ClientIp => ip(buf),
            KeySource::Identity => match &ctx.identity {
                Some(id) => id.subject.as_bytes(),
                None => ip(buf),
            },
            KeySource::Header(name) => match req.headers.get(name) {
                Some(v) if !v.is_empty() => v.as_bytes(),
                _ => ip(buf),
            },
            KeySource::Route => ctx.route.as_deref().map_or(b"" as &[u8], str::as_bytes),
        }
    }
}

/// Concurrent requests per key.
#[derive(Default)]
struct InflightTable {
    counts: Mutex<HashMap<u64, u32>>,
}

/// The concurrency slots a request holds, kept in its [`Ctx::ext`].
#[derive(Default)]
struct InflightSlots(Vec<InflightSlot>);

/// A held concurrency slot; gives it back when the request's context is dropped,
/// whether the response completed, failed or the client went away.
pub struct InflightSlot {
    table: Arc<InflightTable>,
    key: u64,
}

impl std::fmt::Debug for InflightSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InflightSlot")
    }
}

impl Drop for InflightSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The runtime form of a `rate_limit` plugin.
pub struct RateLimit {
    key: KeySource,
    gcra: Option<Gcra>,
    max_in_flight: Option<u32>,
    local: LocalTable,
    inflight: Arc<InflightTable>,
    redis: Option<RedisGcra>,
    on_error: OnError,
}

impl RateLimit {
    pub fn new(config: RateLimitConfig, env: &BuildEnv) -> Result<Self, String> {
        let key = KeySource::parse(&config.key)?;
        let gcra = match &config.rate {
            Some(rate) => Some(Gcra::new(
                rate.count,
                rate.per,
                config.burst.unwrap_or(rate.count),
            )),
            None if config.burst.is_some() => return Err("`burst` needs a `rate`".into()),
            None => None,
        };
        if gcra.is_none() && config.max_in_flight.is_none() {
            return Err("set `rate`, `max_in_flight`, or both".into());
        }
        if config.max_in_flight == Some(0) {
            return Err("max_in_flight must be at least 1".into());
        }
        let redis = match config.backend {
            Backend::Local => None,
            Backend::Redis => Some(RedisGcra::new(env, "rl")?),
        };
        Ok(RateLimit {
            key,
            gcra,
            max_in_flight: config.max_in_flight,
            local: LocalTable::default(),
            inflight: Arc::new(InflightTable::default()),
            redis,
            on_error: config.on_backend_error,
        })
    }

    fn take_slot(&self, key: u64, ctx: &mut Ctx) -> bool {
        let Some(max) = self.max_in_flight else {
            return true;
        };
        let mut counts = self
            .inflight
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        drop(counts);
        ctx.ext
            .get_or_default::<InflightSlots>()
            .0
            .push(InflightSlot {
                table: self.inflight.clone(),
                key,
            });
        true
    }

    /// Records the decision for the response headers; the tightest limit of a chain wins.
    fn note(&self, gcra: &Gcra, d: &Decision, ctx: &mut Ctx) {
        let info = RateLimitInfo {
            limit: gcra.burst(),
            remaining: d.remaining,
            reset_secs: d.reset.as_secs_f64().ceil() as u64,
        };
        if ctx
            .rate_limit
            .is_none_or(|prev| info.remaining < prev.remaining)
        {
            ctx.rate_limit = Some(info);
        }
    }

    fn refuse(&self, retry_after: Duration, ctx: &mut Ctx) -> Reply {
        ctx.rate_limited = true;
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut reply = Reply::error(429, "rate limit exceeded")
            .with_header(http::header::RETRY_AFTER, &secs.to_string());
        if let Some(info) = ctx.rate_limit {
            reply = add_headers(reply, info);
        }
        reply
    }
}

fn add_headers(reply: Reply, info: RateLimitInfo) -> Reply {
    reply
        .with_header(RATELIMIT_LIMIT.clone(), &info.limit.to_string())
        .with_header(RATELIMIT_REMAINING.clone(), &info.remaining.to_string())
        .with_header(RATELIMIT_RESET.clone(), &info.reset_secs.to_string())
}

impl crate::PluginType for RateLimit {
    const TYPE: &'static str = "rate_limit";
    type Config = RateLimitConfig;

    fn build(config: RateLimitConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        RateLimit::new(config, env)
    }
}

impl Plugin for RateLimit {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            response: self.gcra.is_some(),
            ..Hooks::default()
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        let mut buf = [0u8; 17];
        let bytes = self.key.bytes(req, ctx, &mut buf);
        let key = self.local.hash(bytes);
        let redis_key = self.redis.as_ref().map(|r| r.key(bytes));
        if !self.take_slot(key, ctx) {
            ctx.rate_limited = true;
            return RequestFlow::reply(
                Reply::error(429, "too many concurrent requests")
                    .with_header(http::header::RETRY_AFTER, "1"),
            );
        }
        let Some(gcra) = &self.gcra else {
            return RequestFlow::CONTINUE;
        };
        let Some(redis) = &self.redis else {
            let d = self.local.spend(gcra, key, 1);
            self.note(gcra, &d, ctx);
            return if d.allowed {
                RequestFlow::CONTINUE
            } else {
                RequestFlow::reply(self.refuse(d.retry_after, ctx))
            };
        };
        let redis_key = redis_key.unwrap_or_default();
        RequestFlow::Wait(Box::pin(async move {
            match redis.call(&redis_key, gcra, 1, RedisMode::Spend).await {
                Ok(d) => {
                    self.note(gcra, &d, ctx);
                    if d.allowed {
                        Verdict::Continue
                    } else {
                        Verdict::Reply(self.refuse(d.retry_after, ctx))
                    }
                }
                Err(e) => backend_failed(self.on_error, &e),
            }
        }))
    }

    fn on_response(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        if let Some(info) = ctx.rate_limit {
            let h = &mut resp.headers;
            h.insert(RATELIMIT_LIMIT.clone(), number(info.limit));
            h.insert(RATELIMIT_REMAINING.clone(), number(info.remaining));
            h.insert(RATELIMIT_RESET.clone(), number(info.reset_secs));
        }
    }
}

/// `n` as a header value, cut from this thread's value block (`HeaderValue::from(u64)`
/// allocates twice).
fn number(n: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    // Digits are always a valid value; the fallback is never taken.
    crate::value::header_value(digits.format(n).as_bytes())
        .unwrap_or_else(|| HeaderValue::from_static("0"))
}

/// The verdict while Redis is unreachable.
pub fn backend_failed(on_error: OnError, error: &str) -> Verdict {
    redis_store::report_error("rate limit", &error);
    match on_error {
        OnError::Allow => Verdict::Continue,
        OnError::Deny => Verdict::Reply(
            Reply::error(503, "rate limiter unavailable")
                .with_header(http::header::RETRY_AFTER, "1"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, RequestId, Role};

    fn plugin(yaml: &str) -> RateLimit {
        RateLimit::new(serde_yaml_ng::from_str(yaml).unwrap(), &BuildEnv::default()).unwrap()
    }

    fn ctx(ip: &str) -> Ctx {
        Ctx::new(ip.parse().unwrap(), RequestId::from_random(0), false)
    }

    fn status(p: &RateLimit, c: &mut Ctx, headers: &[(&str, &str)]) -> u16 {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        let status = match p.on_request(&mut req, c) {
            RequestFlow::Done(Verdict::Continue) => 200,
            RequestFlow::Done(Verdict::Reply(r)) => r.status,
            RequestFlow::Wait(_) => 0,
        };
        status
    }

    #[test]
    fn numbers_become_their_decimal_digits() {
        for n in [0, 7, 1_000_000, u64::MAX] {
            assert_eq!(number(n), n.to_string().as_str());
        }
    }

    #[test]
    fn rates_parse() {
        use crate::units::parse_rate;
        assert_eq!(parse_rate("20/s").unwrap(), (20, Duration::from_secs(1)));
        assert_eq!(parse_rate("5/min").unwrap(), (5, Duration::from_secs(60)));
        assert_eq!(
            parse_rate("100/h").unwrap(),
            (100, Duration::from_secs(3600))
        );
        for bad in ["20", "0/s", "x/s", "20/day"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_per_client_ip_with_headers() {
        let p = plugin("{ rate: 2/min, burst: 2 }");
        let mut c = ctx("192.0.2.1");
        assert_eq!(status(&p, &mut c, &[]), 200);
        assert_eq!(c.rate_limit.unwrap().remaining, 1);
        assert_eq!(status(&p, &mut ctx("192.0.2.1"), &[]), 200);
        let mut c = ctx("192.0.2.1");
        assert_eq!(status(&p, &mut c, &[]), 429);
        assert!(c.rate_limited);
        assert_eq!(status(&p, &mut ctx("192.0.2.2"), &[]), 200);
    }

    #[test]
    fn identity_and_header_keys_fall_back_to_the_address() {
        let p = plugin("{ key: identity, rate: 1/min }");
        let mut alice = ctx("192.0.2.1");
        alice.identity = Some(Identity {
            subject: Arc::from("alice"),
            role: Role::User,
            method: "t",
        });
        assert_eq!(status(&p, &mut alice, &[]), 200);
        // Same address, no identity: its own bucket.
        assert_eq!(status(&p, &mut ctx("192.0.2.1"), &[]), 200);
        let h = plugin("{ key: 'header:X-Tenant', rate: 1/min }");
        assert_eq!(status(&h, &mut ctx("192.0.2.9"), &[("X-Tenant", "a")]), 200);
        assert_eq!(status(&h, &mut ctx("192.0.2.8"), &[("X-Tenant", "a")]), 429);
        assert_eq!(status(&h, &mut ctx("192.0.2.8"), &[]), 200);
    }

    #[test]
    fn in_flight_slots_are_released_when_the_request_ends() {
        let p = plugin("{ max_in_flight: 1 }");
        let mut first = ctx("192.0.2.1");
        assert_eq!(status(&p, &mut first, &[]), 200);
        assert_eq!(status(&p, &mut ctx("192.0.2.1"), &[]), 429);
        drop(first);
        assert_eq!(status(&p, &mut ctx("192.0.2.1"), &[]), 200);
    }

    #[test]
    fn settings_are_checked() {
        let bad = |yaml: &str| {
            RateLimit::new(serde_yaml_ng::from_str(yaml).unwrap(), &BuildEnv::default()).is_err()
        };
        assert!(bad("{}"));
        assert!(bad("{ rate: 1/s, backend: redis }"));
        assert!(bad("{ key: ip, rate: 1/s }"));
        assert!(bad("{ burst: 3 }"));
        assert!(bad("{ max_in_flight: 0 }"));
    }
}
