//! Upstream pools: backends, balancing, timeouts, upstream TLS and active health checks.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::selection::{Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;

use crate::config::file::{BackendSection, UpstreamSection, UpstreamTlsSection};
use crate::config::units::Span;
use crate::observe::{metrics, StatusCounters};

mod hash_key;
mod health;

pub use hash_key::HashKey;
use health::health_check;
pub use health::HealthChecker;

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    Hash(LoadBalancer<Consistent>),
}

macro_rules! with_lb {
    ($balancer:expr, $lb:ident => $body:expr) => {
        match $balancer {
            Balancer::RoundRobin($lb) => $body,
            Balancer::Random($lb) => $body,
            Balancer::Hash($lb) => $body,
        }
    };
}

/// A backend's place in its pool, with its response counters.
struct BackendSlot {
    addr: SocketAddr,
    responses: StatusCounters,
}

/// Active health checking of a pool.
struct HealthSchedule {
    interval: Duration,
    next_due_ms: AtomicU64,
    running: AtomicBool,
}

/// A backend as written: an IP address, or a name that is looked up when the pool
/// starts (never while a config is only read or checked).
#[derive(Debug, Clone)]
struct Target {
    host: Host,
    port: u16,
    weight: usize,
}

#[derive(Debug, Clone)]
enum Host {
    Ip(std::net::IpAddr),
    Name(String),
}

impl Target {
    /// Reads `host:port`, `IP:port` or `[IPv6]:port`; no lookup.
    fn parse(address: &str, weight: usize) -> Result<Target, String> {
        if let Ok(addr) = address.parse::<SocketAddr>() {
            return Ok(Target {
                host: Host::Ip(addr.ip()),
                port: addr.port(),
                weight,
            });
        }
        let bad = || format!("{address:?} is not HOST:PORT (such as 127.0.0.1:3000 or app:3000)");
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        if host.is_empty() || !host.chars().all(name_char) || port == 0 {
            return Err(bad());
        }
        Ok(Target {
            host: Host::Name(host.to_string()),
            port,
            weight,
        })
    }

    fn host_text(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }

    /// The address to connect to; a name is looked up (blocking).
    fn resolve(&self) -> Result<SocketAddr, String> {
        match &self.host {
            Host::Ip(ip) => Ok(SocketAddr::new(*ip, self.port)),
            Host::Name(name) => (name.as_str(), self.port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve backend {name}:{}: {e}", self.port))?
                .next()
                .ok_or_else(|| format!("backend {name}:{} resolves to no address", self.port)),
        }
    }
}

/// What a pool serves with once its backends have addresses.
struct Members {
    balancer: Balancer,
    slots: Vec<BackendSlot>,
    health: Option<HealthSchedule>,
    /// The backend of a one-backend pool, picked without asking the balancer.
    only: Option<Backend>,
}

/// A compiled upstream pool. Building one reads and checks its settings; its backends
/// get their addresses in [`Pool::start`] (at once when they are all IP addresses).
pub struct Pool {
    pub name: Arc<str>,
    pub hash_key: Option<HashKey>,
    template: HttpPeer,
    pub retries: usize,
    targets: Vec<Target>,
    members: std::sync::OnceLock<Members>,
    /// The settings it was built from: a reload with the same settings keeps this pool,
    /// and with it the backends' health and their health-check schedule.
    section: UpstreamSection,
}

/// Default timeouts, long enough for LLM streams.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(300);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound on how far a selection walks the ring looking for a usable backend.
const MAX_SELECT_STEPS: usize = 256;

impl Pool {
    /// Builds a pool from its section without any lookup; `Err` lists every problem
    /// found.
    pub fn build(name: &str, section: &UpstreamSection) -> Result<Pool, Vec<(String, String)>> {
        let mut errors: Vec<(String, String)> = Vec::new();
        if section.backends.is_empty() {
            errors.push((
                "backends".into(),
                "an upstream needs at least one backend".into(),
            ));
        }
        let mut targets = Vec::new();
        for (i, b) in section.backends.iter().enumerate() {
            let (address, weight) = match b {
                BackendSection::Address(a) => (a.as_str(), 1),
                BackendSection::Weighted(w) => (w.address.as_str(), w.weight),
            };
            if weight == 0 {
                errors.push((
                    format!("backends[{i}].weight"),
                    "weight must be at least 1".into(),
                ));
                continue;
            }
            match Target::parse(address, weight) {
                Ok(target) => targets.push(target),
                Err(e) => errors.push((format!("backends[{i}]"), e)),
            }
        }
        let first_host = targets.first().map(Target::host_text);

        let (tls, sni, verify) = match &section.tls {
            None | Some(UpstreamTlsSection::Enabled(false)) => (false, String::new(), true),
            Some(UpstreamTlsSection::Enabled(true)) => {
                (true, first_host.clone().unwrap_or_default(), true)
            }
            Some(UpstreamTlsSection::Settings(s)) => (
                true,
                s.sni
                    .clone()
                    .or_else(|| first_host.clone())
                    .unwrap_or_default(),
                s.verify.unwrap_or(true),
            ),
        };

        let hash_key = match (
            section.balance.as_deref().unwrap_or("round_robin"),
            &section.hash_key,
        ) {
            ("hash", Some(key)) => match HashKey::parse(key) {
                Ok(k) => Some(k),
                Err(e) => {
                    errors.push(("hash_key".into(), e));
                    None
                }
            },
            ("hash", None) => Some(HashKey::ClientIp),
            (_, Some(_)) => {
                errors.push((
                    "hash_key".into(),
                    "hash_key only applies to `balance: hash`".into(),
                ));
                None
            }
            _ => None,
        };

        let [connect, read, write, idle] = [
            (section.connect_timeout, CONNECT_TIMEOUT),
            (section.read_timeout, READ_TIMEOUT),
            (section.write_timeout, WRITE_TIMEOUT),
            (section.idle_timeout, IDLE_TIMEOUT),
        ]
        .map(|(set, default)| set.map_or(default, Span::get));

        if let Some(hc) = &section.health_check {
            if let Err(errs) = health_check(hc, tls, &sni, verify) {
                errors.extend(errs);
            }
        }
        let balance = section.balance.as_deref().unwrap_or("round_robin");
        if !matches!(balance, "round_robin" | "random" | "hash") {
            errors.push((
                "balance".into(),
                format!("unknown balance {balance:?}; use round_robin, random or hash"),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let mut template = HttpPeer::new(SocketAddr::from(([127, 0, 0, 1], 1)), tls, sni);
        template.options.connection_timeout = Some(connect);
        template.options.read_timeout = Some(read);
        template.options.write_timeout = Some(write);
        template.options.idle_timeout = Some(idle);
        template.options.verify_cert = verify;
        template.options.verify_hostname = verify;

        let pool = Pool {
            name: Arc::from(name),
            hash_key,
            template,
            retries: section.retries.unwrap_or(1),
            targets,
            members: std::sync::OnceLock::new(),
            section: section.clone(),
        };
        // Addresses need no lookup: the pool can serve as built.
        if pool.targets.iter().all(|t| matches!(t.host, Host::Ip(_))) {
            pool.start()?;
        }
        Ok(pool)
    }

    /// Gives the backends their addresses (looking up names, blocking) and readies the
    /// balancer and health checks. Done once; a started pool starts nothing again.
    pub fn start(&self) -> Result<(), Vec<(String, String)>> {
        if self.members.get().is_some() {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut backends = std::collections::BTreeSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            match target.resolve() {
                Ok(addr) => {
                    let backend = Backend {
                        addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                        weight: target.weight,
                        ext: Default::default(),
                    };
                    if !backends.insert(backend) {
                        errors.push((format!("backends[{i}]"), format!("{addr} is listed twice")));
                    }
                }
                Err(e) => errors.push((format!("backends[{i}]"), e)),
            }
        }
        let tls = self.uses_tls();
        let verify = self.template.options.verify_cert;
        let health = match &self.section.health_check {
            Some(hc) => match health_check(hc, tls, &self.template.sni, verify) {
                Ok(built) => Some(built),
                Err(errs) => {
                    errors.extend(errs);
                    None
                }
            },
            None => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let slots = backends
            .iter()
            .filter_map(|b| b.addr.as_inet().copied())
            .map(|addr| BackendSlot {
                addr,
                responses: StatusCounters::new(
                    &metrics().upstream_requests,
                    &[&self.name, &addr.to_string()],
                ),
            })
            .collect();
        let (check, schedule) = match health {
            Some((check, interval)) => (
                Some(check),
                Some(HealthSchedule {
                    interval,
                    next_due_ms: AtomicU64::new(0),
                    running: AtomicBool::new(false),
                }),
            ),
            None => (None, None),
        };
        let only = backends.first().filter(|_| backends.len() == 1).cloned();
        let balancer = match self.section.balance.as_deref() {
            Some("random") => Balancer::Random(load_balancer(backends, check)),
            Some("hash") => Balancer::Hash(load_balancer(backends, check)),
            _ => Balancer::RoundRobin(load_balancer(backends, check)),
        };
        // Two starts at once are serialised by the reload lock; the loser's members
        // are dropped unused.
        let _ = self.members.set(Members {
            balancer,
            slots,
            health: schedule,
            only,
        });
        self.publish_health();
        Ok(())
    }

    /// True when this pool was built from exactly `section`.
    pub fn built_from(&self, section: &UpstreamSection) -> bool {
        self.section == *section
    }

    /// Picks a healthy backend not in `exclude`. When every remaining backend is marked
    /// unhealthy, one of them is tried anyway (as Envoy's panic threshold does): a
    /// health check that is wrong about all backends must not take the whole service down.
    pub fn select(&self, key: &[u8], exclude: &[SocketAddr]) -> Option<Backend> {
        let members = self.members.get()?;
        let excluded = |b: &Backend| b.addr.as_inet().is_some_and(|a| exclude.contains(a));
        // One backend: the balancer would return it healthy or not (see above), so it is
        // the answer unless it was already tried; this skips the ring walk and hashing.
        if let Some(only) = &members.only {
            return (!excluded(only)).then(|| only.clone());
        }
        with_lb!(&members.balancer, lb => lb
            .select_with(key, MAX_SELECT_STEPS, |b, healthy| healthy && !excluded(b))
            .or_else(|| lb.select_with(key, MAX_SELECT_STEPS, |b, _| !excluded(b))))
    }

    /// A peer for `backend` with this pool's TLS and timeout settings.
    pub fn peer(&self, backend: &Backend) -> Box<HttpPeer> {
        let mut peer = Box::new(self.template.clone());
        peer._address = backend.addr.clone();
        peer
    }

    pub fn uses_tls(&self) -> bool {
        !self.template.sni.is_empty()
            || self.template.scheme == pingora::upstreams::peer::Scheme::HTTPS
    }

    /// Counts a response from `backend`.
    pub fn count_response(&self, backend: &SocketAddr, status: u16) {
        let slots = self.members.get().map_or(&[][..], |m| &m.slots);
        if let Some(slot) = slots.iter().find(|s| s.addr == *backend) {
            slot.responses.inc(status);
        }
    }

    /// Runs a health-check pass if one is due. Passes never overlap for one pool.
    pub async fn health_check_if_due(&self, now_ms: u64) {
        let Some(members) = self.members.get() else {
            return;
        };
        let Some(schedule) = &members.health else {
            return;
        };
        if now_ms < schedule.next_due_ms.load(Ordering::Relaxed)
            || schedule.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        schedule.next_due_ms.store(
            now_ms + schedule.interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        with_lb!(&members.balancer, lb => lb.backends().run_health_check(true).await);
        self.publish_health();
        schedule.running.store(false, Ordering::Release);
    }

    pub fn has_health_check(&self) -> bool {
        self.members.get().is_some_and(|m| m.health.is_some())
    }

    fn publish_health(&self) {
        let gauge = &metrics().backend_healthy;
        let Some(members) = self.members.get() else {
            return;
        };
        with_lb!(&members.balancer, lb => {
            for backend in lb.backends().get_backend().iter() {
                let label = backend.addr.to_string();
                gauge.with_label_values(&[&self.name, &label]).set(i64::from(lb.backends().ready(backend)));
            }
        });
    }

    /// Each backend and whether it is in service (what `gatewarden_backend_healthy`
    /// publishes); every backend of a pool without a health check is.
    pub fn backend_health(&self) -> Vec<(SocketAddr, bool)> {
        let Some(members) = self.members.get() else {
            return Vec::new();
        };
        with_lb!(&members.balancer, lb => lb
            .backends()
            .get_backend()
            .iter()
            .filter_map(|b| b.addr.as_inet().map(|addr| (*addr, lb.backends().ready(b))))
            .collect())
    }

    /// Backend addresses, for messages.
    pub fn backend_addrs(&self) -> impl Iterator<Item = &SocketAddr> {
        let slots = self.members.get().map_or(&[][..], |m| &m.slots);
        slots.iter().map(|s| &s.addr)
    }
}

fn load_balancer<S>(
    backends: std::collections::BTreeSet<Backend>,
    check: Option<Box<dyn HealthCheck + Send + Sync>>,
) -> LoadBalancer<S>
where
    S: pingora::lb::selection::BackendSelection + 'static,
    S::Iter: pingora::lb::selection::BackendIter,
{
    let mut backends = Backends::new(Static::new(backends));
    if let Some(check) = check {
        backends.set_health_check(check);
    }
    let lb = LoadBalancer::from_backends(backends);
    // Static discovery completes without waiting; anything else would be a bug in it.
    if let Some(Err(e)) = lb.update().now_or_never() {
        log::error!("cannot load static backends: {e}");
    }
    lb
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    #[test]
    fn hash_keys_parse_and_extract() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.append_header("Cookie", "a=1; session=abc; b=2")
            .unwrap();
        req.append_header("X-User", "u1").unwrap();
        assert_eq!(
            HashKey::parse("cookie:session")
                .unwrap()
                .extract(&req, b"", "/x"),
            b"abc"
        );
        assert_eq!(
            HashKey::parse("header:x-user")
                .unwrap()
                .extract(&req, b"", "/x"),
            b"u1"
        );
        assert_eq!(
            HashKey::parse("path").unwrap().extract(&req, b"", "/x"),
            b"/x"
        );
        assert_eq!(
            HashKey::parse("client_ip")
                .unwrap()
                .extract(&req, b"1.2.3.4", "/x"),
            b"1.2.3.4"
        );
        assert!(HashKey::parse("cookie:").is_err());
        assert!(HashKey::parse("ip").is_err());
    }

    fn pool(yaml: &str) -> Pool {
        let section: UpstreamSection = serde_yaml_ng::from_str(yaml).unwrap();
        Pool::build("test", &section).unwrap()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn picked(pool: &Pool, exclude: &[SocketAddr]) -> Option<SocketAddr> {
        pool.select(b"", exclude)
            .and_then(|b| b.addr.as_inet().copied())
    }

    #[test]
    fn a_lone_backend_is_picked_until_it_was_tried() {
        for balance in ["round_robin", "random", "hash"] {
            let p = pool(&format!(
                "{{ backends: ['127.0.0.1:9'], balance: {balance} }}"
            ));
            assert_eq!(picked(&p, &[]), Some(addr("127.0.0.1:9")), "{balance}");
            assert_eq!(picked(&p, &[addr("127.0.0.1:9")]), None, "{balance}");
        }
    }

    #[test]
    fn names_are_looked_up_when_the_pool_starts_never_when_it_is_built() {
        let p = pool("{ backends: ['localhost:9'] }");
        assert_eq!(picked(&p, &[]), None, "built, not started: no address yet");
        assert_eq!(p.backend_addrs().count(), 0);
        p.start().unwrap();
        let got = picked(&p, &[]).unwrap();
        assert!(got.ip().is_loopback() && got.port() == 9, "{got}");
        // IP addresses need no lookup: such a pool serves as built.
        let p = pool("{ backends: ['127.0.0.1:9', '[::1]:10'] }");
        assert_eq!(p.backend_addrs().count(), 2);
    }

    #[test]
    fn malformed_backends_are_errors_of_the_config() {
        for bad in [
            "localhost",
            "app:0",
            "app:http",
            ":80",
            "a b:80",
            "http://app:80",
        ] {
            let section: UpstreamSection =
                serde_yaml_ng::from_str(&format!("{{ backends: ['{bad}'] }}")).unwrap();
            let errors = Pool::build("test", &section).err().unwrap_or_default();
            assert!(
                errors
                    .iter()
                    .any(|(at, e)| at == "backends[0]" && e.contains("HOST:PORT")),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn the_balancer_skips_backends_already_tried() {
        let p = pool("{ backends: ['127.0.0.1:9', '127.0.0.1:10'] }");
        let first = picked(&p, &[]).unwrap();
        let second = picked(&p, &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(picked(&p, &[first, second]), None);
    }
}
