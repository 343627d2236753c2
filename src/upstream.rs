//! Upstream pools: backends, balancing, timeouts, upstream TLS and active health checks.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;

use crate::config::file::{
    BackendSection, HealthCheckSection, UpstreamSection, UpstreamTlsSection,
};
use crate::config::units::Span;
use crate::observe::{metrics, StatusCounters};

/// How a `hash` pool picks the key that pins a client to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

impl HashKey {
    fn parse(text: &str) -> Result<HashKey, String> {
        match text {
            "client_ip" => Ok(HashKey::ClientIp),
            "path" => Ok(HashKey::Path),
            _ => {
                if let Some(name) = text.strip_prefix("header:") {
                    let name = http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("{name:?} is not a valid header name"))?;
                    Ok(HashKey::Header(name))
                } else if let Some(name) = text.strip_prefix("cookie:").filter(|n| !n.is_empty()) {
                    Ok(HashKey::Cookie(name.to_string()))
                } else {
                    Err(format!("unknown hash_key {text:?}; use client_ip, header:NAME, cookie:NAME or path"))
                }
            }
        }
    }

    /// The bytes to hash for this request. Requests without the header or cookie all
    /// share the empty key (and so one backend), which is what sticky sessions expect.
    pub fn extract<'a>(
        &self,
        req: &'a RequestHeader,
        client_ip: &'a [u8],
        path: &'a str,
    ) -> &'a [u8] {
        match self {
            HashKey::ClientIp => client_ip,
            HashKey::Path => path.as_bytes(),
            HashKey::Header(name) => req.headers.get(name).map_or(&[], |v| v.as_bytes()),
            HashKey::Cookie(name) => req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii_start();
                    let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                    Some(value)
                })
                .unwrap_or(&[]),
        }
    }
}

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

/// A compiled upstream pool.
pub struct Pool {
    pub name: Arc<str>,
    balancer: Balancer,
    pub hash_key: Option<HashKey>,
    template: HttpPeer,
    pub retries: usize,
    slots: Vec<BackendSlot>,
    health: Option<HealthSchedule>,
    /// The backend of a one-backend pool, picked without asking the balancer.
    only: Option<Backend>,
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

fn resolve(address: &str) -> Result<SocketAddr, String> {
    address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve backend {address:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("backend {address:?} resolves to no address"))
}

impl Pool {
    /// Builds a pool from its section; `Err` lists every problem found.
    pub fn build(name: &str, section: &UpstreamSection) -> Result<Pool, Vec<(String, String)>> {
        let mut errors: Vec<(String, String)> = Vec::new();
        let mut backends = std::collections::BTreeSet::new();
        let mut first_host: Option<String> = None;
        if section.backends.is_empty() {
            errors.push((
                "backends".into(),
                "an upstream needs at least one backend".into(),
            ));
        }
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
            match resolve(address) {
                Ok(addr) => {
                    if first_host.is_none() {
                        first_host = address
                            .rsplit_once(':')
                            .map(|(h, _)| h.trim_matches(['[', ']']).to_string());
                    }
                    let backend = Backend {
                        addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                        weight,
                        ext: Default::default(),
                    };
                    if !backends.insert(backend) {
                        errors.push((
                            format!("backends[{i}]"),
                            format!("{address} is listed twice"),
                        ));
                    }
                }
                Err(e) => errors.push((format!("backends[{i}]"), e)),
            }
        }

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

        let timeouts = [
            (section.connect_timeout, CONNECT_TIMEOUT),
            (section.read_timeout, READ_TIMEOUT),
            (section.write_timeout, WRITE_TIMEOUT),
            (section.idle_timeout, IDLE_TIMEOUT),
        ]
        .map(|(set, default)| set.map_or(default, Span::get));
        let [connect, read, write, idle] = timeouts;

        let health = match &section.health_check {
            Some(hc) => match health_check(hc, tls, &sni, verify) {
                Ok(h) => Some(h),
                Err(errs) => {
                    errors.extend(errs);
                    None
                }
            },
            None => None,
        };

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

        let slots: Vec<BackendSlot> = backends
            .iter()
            .map(|b| {
                let addr = b
                    .addr
                    .as_inet()
                    .copied()
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                BackendSlot {
                    addr,
                    responses: StatusCounters::new(
                        &metrics().upstream_requests,
                        &[name, &addr.to_string()],
                    ),
                }
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
        let balancer = match balance {
            "random" => Balancer::Random(load_balancer(backends, check)),
            "hash" => Balancer::Hash(load_balancer(backends, check)),
            _ => Balancer::RoundRobin(load_balancer(backends, check)),
        };

        let mut template = HttpPeer::new(SocketAddr::from(([127, 0, 0, 1], 1)), tls, sni);
        template.options.connection_timeout = Some(connect);
        template.options.read_timeout = Some(read);
        template.options.write_timeout = Some(write);
        template.options.idle_timeout = Some(idle);
        template.options.verify_cert = verify;
        template.options.verify_hostname = verify;

        let pool = Pool {
            name: Arc::from(name),
            balancer,
            hash_key,
            template,
            retries: section.retries.unwrap_or(1),
            slots,
            health: schedule,
            only,
            section: section.clone(),
        };
        pool.publish_health();
        Ok(pool)
    }

    /// True when this pool was built from exactly `section`.
    pub fn built_from(&self, section: &UpstreamSection) -> bool {
        self.section == *section
    }

    /// Picks a healthy backend not in `exclude`. When every remaining backend is marked
    /// unhealthy, one of them is tried anyway (as Envoy's panic threshold does): a
    /// health check that is wrong about all backends must not take the whole service down.
    pub fn select(&self, key: &[u8], exclude: &[SocketAddr]) -> Option<Backend> {
        let excluded = |b: &Backend| b.addr.as_inet().is_some_and(|a| exclude.contains(a));
        // One backend: the balancer would return it healthy or not (see above), so it is
        // the answer unless it was already tried; this skips the ring walk and hashing.
        if let Some(only) = &self.only {
            return (!excluded(only)).then(|| only.clone());
        }
        with_lb!(&self.balancer, lb => lb
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
        if let Some(slot) = self.slots.iter().find(|s| s.addr == *backend) {
            slot.responses.inc(status);
        }
    }

    /// Runs a health-check pass if one is due. Passes never overlap for one pool.
    pub async fn health_check_if_due(&self, now_ms: u64) {
        let Some(schedule) = &self.health else { return };
        if now_ms < schedule.next_due_ms.load(Ordering::Relaxed)
            || schedule.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        schedule.next_due_ms.store(
            now_ms + schedule.interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        with_lb!(&self.balancer, lb => lb.backends().run_health_check(true).await);
        self.publish_health();
        schedule.running.store(false, Ordering::Release);
    }

    pub fn has_health_check(&self) -> bool {
        self.health.is_some()
    }

    fn publish_health(&self) {
        let gauge = &metrics().backend_healthy;
        with_lb!(&self.balancer, lb => {
            for backend in lb.backends().get_backend().iter() {
                let label = backend.addr.to_string();
                gauge.with_label_values(&[&self.name, &label]).set(i64::from(lb.backends().ready(backend)));
            }
        });
    }

    /// Backend addresses, for messages.
    pub fn backend_addrs(&self) -> impl Iterator<Item = &SocketAddr> {
        self.slots.iter().map(|s| &s.addr)
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

type HealthBuild = (Box<dyn HealthCheck + Send + Sync>, Duration);

fn health_check(
    hc: &HealthCheckSection,
    tls: bool,
    sni: &str,
    verify: bool,
) -> Result<HealthBuild, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let interval = hc.interval.map_or(Duration::from_secs(5), Span::get);
    let timeout = hc.timeout.map_or(Duration::from_secs(1), Span::get);
    let healthy_after = hc.healthy_after.unwrap_or(2).max(1);
    let unhealthy_after = hc.unhealthy_after.unwrap_or(3).max(1);
    let check: Box<dyn HealthCheck + Send + Sync> = match hc.kind.as_str() {
        "http" => {
            let path = hc.path.as_deref().unwrap_or("/");
            let host = if sni.is_empty() { "localhost" } else { sni };
            let mut check = HttpHealthCheck::new(host, tls);
            match RequestHeader::build("GET", path.as_bytes(), None).and_then(|mut req| {
                req.insert_header(http::header::HOST, host)?;
                req.insert_header(http::header::USER_AGENT, "gatewarden-health-check")?;
                Ok(req)
            }) {
                Ok(req) if path.starts_with('/') => check.req = req,
                _ => errors.push((
                    "health_check.path".into(),
                    format!("{path:?} is not a valid request path"),
                )),
            }
            check.consecutive_success = healthy_after;
            check.consecutive_failure = unhealthy_after;
            check.peer_template.options.connection_timeout = Some(timeout);
            check.peer_template.options.read_timeout = Some(timeout);
            check.peer_template.options.verify_cert = verify;
            check.peer_template.options.verify_hostname = verify;
            Box::new(check)
        }
        "tcp" => {
            if hc.path.is_some() {
                errors.push((
                    "health_check.path".into(),
                    "`path` only applies to `kind: http`".into(),
                ));
            }
            let mut check = if tls {
                TcpHealthCheck::new_tls(sni)
            } else {
                TcpHealthCheck::new()
            };
            check.consecutive_success = healthy_after;
            check.consecutive_failure = unhealthy_after;
            check.peer_template.options.connection_timeout = Some(timeout);
            check
        }
        other => {
            errors.push((
                "health_check.kind".into(),
                format!("unknown kind {other:?}; use http or tcp"),
            ));
            return Err(errors);
        }
    };
    if errors.is_empty() {
        Ok((check, interval))
    } else {
        Err(errors)
    }
}

/// The background service that runs every pool's health checks, on whatever config is
/// current, so pools added by a reload are checked too.
pub struct HealthChecker {
    pub state: Arc<crate::reload::State>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let started = Instant::now();
        loop {
            let snapshot = self.state.current();
            let now_ms = started.elapsed().as_millis() as u64;
            for pool in snapshot.pools.values() {
                if pool.has_health_check() {
                    let pool = pool.clone();
                    tokio::spawn(async move { pool.health_check_if_due(now_ms).await });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_balancer_skips_backends_already_tried() {
        let p = pool("{ backends: ['127.0.0.1:9', '127.0.0.1:10'] }");
        let first = picked(&p, &[]).unwrap();
        let second = picked(&p, &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(picked(&p, &[first, second]), None);
    }
}
