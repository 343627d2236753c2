//! Per-request state shared by the core and the plugins of one request.

use std::any::Any;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

/// What a caller may do once recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

/// What a per-client limit or lockout counts: an IPv4 address, or the /64 network of an
/// IPv6 address. A /64 is one subscriber's network, as one IPv4 address behind NAT is:
/// an attacker given one has billions of addresses to rotate through, and rotating
/// them must not skip a limit.
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// A recognised caller, set by an identity plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Who the caller is: a key's subject, `pin`, a JWT `sub`.
    pub subject: Arc<str>,
    pub role: Role,
    /// Which mechanism recognised the caller (`api_key`, `session`, `jwt`, ...).
    pub method: &'static str,
}

/// A request id: 32 hex characters made by the gateway, or a trusted proxy's id of up to
/// 64 visible ASCII characters. Stored inline so minting one never allocates.
#[derive(Clone, Copy)]
pub struct RequestId {
    buf: [u8; RequestId::MAX],
    len: u8,
}

impl RequestId {
    pub const MAX: usize = 64;

    /// A fresh id from 128 random bits.
    pub fn from_random(bits: u128) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; Self::MAX];
        for (i, slot) in buf.iter_mut().take(32).enumerate() {
            *slot = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
        }
        RequestId { buf, len: 32 }
    }

    /// Accepts an id handed on by a trusted proxy when it is short, visible ASCII.
    pub fn from_trusted(value: &[u8]) -> Option<Self> {
        if value.is_empty() || value.len() > Self::MAX {
            return None;
        }
        if !value.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let mut buf = [0u8; Self::MAX];
        buf[..value.len()].copy_from_slice(value);
        Some(RequestId {
            buf,
            len: value.len() as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this cannot fail; fall back to "" rather than panic.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }

    /// The id as an `X-Request-Id` value, cut from this thread's value block.
    pub fn header_value(&self) -> http::HeaderValue {
        // Visible ASCII is always a valid value; the fallback is never taken.
        crate::value::header_value(self.as_str().as_bytes())
            .unwrap_or_else(|| http::HeaderValue::from_static(""))
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IP address as text, on the stack. IPv4 is written digit by digit: `Display` for
/// an address goes through the formatter's padding path, which cost more than every
/// other forwarding header together (instructions per request, `CALLGRIND=1 bash
/// benches/load.sh`).
pub struct IpText {
    buf: [u8; IpText::MAX],
    len: usize,
}

impl IpText {
    /// The longest IPv6 text: eight groups, or six and an IPv4 tail (45 bytes).
    const MAX: usize = 45;

    pub fn new(ip: IpAddr) -> Self {
        let mut text = IpText {
            buf: [0; Self::MAX],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            // Rare enough that the standard text (with `::` compression) is worth it.
            IpAddr::V6(v6) => {
                let _ = write!(text, "{v6}");
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons and hex letters are ever pushed.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        s.bytes().for_each(|b| self.push(b));
        Ok(())
    }
}

/// Per-request state of plugins, one value of each type: a plugin keeps its own state
/// type here, so adding a plugin adds no field to [`Ctx`]. Nothing is allocated until a
/// plugin stores something, so a request whose plugins keep no state pays nothing.
#[derive(Default)]
pub struct Extensions {
    slots: Vec<Box<dyn Any + Send + Sync>>,
}

impl Extensions {
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.slots.iter().find_map(|s| s.downcast_ref())
    }

    pub fn get_mut<T: Any>(&mut self) -> Option<&mut T> {
        self.slots.iter_mut().find_map(|s| s.downcast_mut())
    }

    /// Stores `value`, replacing any earlier value of its type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        match self.get_mut::<T>() {
            Some(slot) => *slot = value,
            None => self.slots.push(Box::new(value)),
        }
    }

    /// The value of type `T`, stored as its default first if there is none.
    pub fn get_or_default<T: Any + Send + Sync + Default>(&mut self) -> &mut T {
        let at = match self.slots.iter().position(|s| s.is::<T>()) {
            Some(at) => at,
            None => {
                self.slots.push(Box::new(T::default()));
                self.slots.len() - 1
            }
        };
        // Found or just pushed as a `T`: the downcast holds; the fallback never runs.
        match self.slots[at].downcast_mut() {
            Some(value) => value,
            None => unreachable!("slot {at} holds a value of another type"),
        }
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Extensions({} values)", self.slots.len())
    }
}

/// State of one request, handed to every hook of every plugin in the chain.
///
/// The core's fields are named here; a plugin keeps its own per-request state in
/// [`Ctx::ext`], never in itself.
#[derive(Debug)]
pub struct Ctx {
    /// The client as derived from the TCP peer and `trusted_proxies`.
    pub client_ip: IpAddr,
    pub request_id: RequestId,
    /// True when the client reached us over HTTPS (a TLS listener, or `https` from a
    /// trusted proxy).
    pub https: bool,
    /// Set by an identity plugin; read by the core's access check.
    pub identity: Option<Identity>,
    /// Why a credential was refused, for `gatewarden_auth_failures_total{reason}`.
    pub auth_failure: Option<&'static str>,
    /// The matched route's name (set by the core).
    pub route: Option<Arc<str>>,
    /// The tightest rate limit seen, for the `RateLimit-*` response headers.
    pub rate_limit: Option<crate::rate_limit::RateLimitInfo>,
    /// Set when a limit refused the request, for `gatewarden_rate_limited_total`.
    pub rate_limited: bool,
    /// When the request arrived.
    pub started: std::time::Instant,
    /// The upstream pool the request went to, set by the core once a backend is
    /// picked; `None` while the chain runs and for the gateway's own replies.
    pub upstream: Option<Arc<str>>,
    /// Plugins' own per-request state, by type.
    pub ext: Extensions,
    /// Set by a plugin that asked the upstream for an uncompressed body: the core then
    /// compresses the response itself when the client's `Accept-Encoding` allows it.
    pub compress_response: bool,
    /// The id of the API key the caller presented, for usage accounting.
    pub key_id: Option<Arc<str>>,
    /// The LLM tokens the response reported (`usage` of an OpenAI-style answer), set
    /// by a plugin that reads them, for usage accounting.
    pub llm_tokens: Option<TokenUsage>,
}

/// The tokens an LLM response reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

impl Ctx {
    pub fn new(client_ip: IpAddr, request_id: RequestId, https: bool) -> Self {
        Ctx {
            client_ip,
            request_id,
            https,
            identity: None,
            auth_failure: None,
            route: None,
            rate_limit: None,
            rate_limited: false,
            started: std::time::Instant::now(),
            upstream: None,
            ext: Extensions::default(),
            compress_response: false,
            key_id: None,
            llm_tokens: None,
        }
    }

    /// Records the caller an identity plugin recognised. Every credential of a request
    /// is checked, so a request may be recognised more than once; two credentials that
    /// name different callers (subject or role) are a [`Conflict`], which the plugin
    /// refuses rather than pick one of them.
    pub fn identify(&mut self, identity: Identity) -> Result<(), Conflict> {
        match &self.identity {
            None => {
                self.identity = Some(identity);
                Ok(())
            }
            Some(known) if known.subject == identity.subject && known.role == identity.role => {
                Ok(())
            }
            Some(_) => {
                self.auth_failure = Some("conflicting_credentials");
                Err(Conflict)
            }
        }
    }
}

/// Credentials in one request that name different callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_hold_one_value_per_type() {
        #[derive(Default, Debug, PartialEq)]
        struct Count(u32);
        let mut ext = Extensions::default();
        assert_eq!(ext.get::<Count>(), None);
        ext.get_or_default::<Count>().0 += 2;
        ext.get_or_default::<Count>().0 += 1;
        ext.insert(7u8);
        assert_eq!(ext.get::<Count>(), Some(&Count(3)));
        ext.insert(Count(9));
        assert_eq!(ext.get::<Count>(), Some(&Count(9)));
        assert_eq!(ext.get::<u8>(), Some(&7));
    }

    #[test]
    fn limits_count_ipv6_clients_by_their_64() {
        let net = |ip: &str| client_network(ip.parse().unwrap()).to_string();
        assert_eq!(net("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(net("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_eq!(net("203.0.113.7"), "203.0.113.7");
        assert_eq!(net("::ffff:203.0.113.7"), "203.0.113.7");
    }

    #[test]
    fn a_second_caller_in_one_request_is_a_conflict() {
        let who = |subject: &str, role| Identity {
            subject: Arc::from(subject),
            role,
            method: "test",
        };
        let mut ctx = Ctx::new(
            "127.0.0.1".parse().unwrap(),
            RequestId::from_random(1),
            false,
        );
        assert_eq!(ctx.identify(who("alice", Role::User)), Ok(()));
        assert_eq!(ctx.identify(who("alice", Role::User)), Ok(()));
        assert_eq!(ctx.identify(who("alice", Role::Admin)), Err(Conflict));
        assert_eq!(ctx.identify(who("bob", Role::User)), Err(Conflict));
        assert_eq!(ctx.auth_failure, Some("conflicting_credentials"));
        assert_eq!(&*ctx.identity.unwrap().subject, "alice");
    }

    #[test]
    fn ip_text_matches_the_standard_spelling() {
        let samples = [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "203.0.113.255",
            "255.255.255.255",
            "::",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.128",
            "1111:2222:3333:4444:5555:6666:7777:8888",
        ];
        for sample in samples {
            let ip: IpAddr = sample.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string(), "{sample}");
        }
        // Every octet value, in every position.
        for octet in 0..=255u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(
                octet,
                255 - octet,
                octet / 2,
                octet,
            ));
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
    }

    #[test]
    fn ids_become_header_values_as_they_are() {
        let random = RequestId::from_random(0xfeed);
        assert_eq!(random.header_value(), random.as_str());
        let trusted = RequestId::from_trusted(b"lb-7f3a:req/42~x").unwrap();
        assert_eq!(trusted.header_value(), "lb-7f3a:req/42~x");
    }

    #[test]
    fn random_ids_are_32_hex_chars() {
        let id = RequestId::from_random(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.as_str(), "0123456789abcdef0011223344556677");
    }

    #[test]
    fn trusted_ids_must_be_short_visible_ascii() {
        assert_eq!(
            RequestId::from_trusted(b"abc-123").unwrap().as_str(),
            "abc-123"
        );
        assert!(RequestId::from_trusted(b"").is_none());
        assert!(RequestId::from_trusted(b"a b").is_none());
        assert!(RequestId::from_trusted(b"a\r\nb").is_none());
        assert!(RequestId::from_trusted(&[b'a'; 65]).is_none());
    }
}
