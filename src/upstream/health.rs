//! Active health checks: built from a pool's settings, and run for every pool of the
//! config in force.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_http::RequestHeader;

use crate::config::file::HealthCheckSection;
use crate::config::units::Span;

type HealthBuild = (Box<dyn HealthCheck + Send + Sync>, Duration);

pub(super) fn health_check(
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
