//! Metrics (Prometheus, atomics on the hot path) and request ids.

use std::sync::{Arc, LazyLock, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every gatewarden metric, registered once per process.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub client_disconnects: IntCounterVec,
    pub client_connections: IntCounterVec,
    pub backend_healthy: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub inflight: IntGauge,
    pub redis_errors: IntCounter,
    pub log_lines_dropped: IntCounter,
    pub key_store_errors: IntCounter,
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounter,
    pub trace_export_failures: IntCounter,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let counter =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
    let requests = counter(
        "gatewarden_requests_total",
        "Requests answered, by route and status.",
        &["route", "status"],
    )?;
    let upstream_requests = counter(
        "gatewarden_upstream_requests_total",
        "Responses received from upstream backends.",
        &["upstream", "backend", "status"],
    )?;
    let auth_failures = counter(
        "gatewarden_auth_failures_total",
        "Requests refused for missing or bad credentials.",
        &["route", "reason"],
    )?;
    let rate_limited = counter(
        "gatewarden_rate_limited_total",
        "Requests refused by a rate limit.",
        &["route", "plugin"],
    )?;
    let client_disconnects = counter(
        "gatewarden_client_disconnects_total",
        "Requests whose client went away before the response was complete.",
        &["route"],
    )?;
    let client_connections = counter(
        "gatewarden_client_connections_total",
        "Client connections accepted, by listener and shard (`-` without shards).",
        &["listener", "shard"],
    )?;
    let config_reloads = counter(
        "gatewarden_config_reloads_total",
        "Configuration reloads.",
        &["result"],
    )?;
    let duration = HistogramVec::new(
        HistogramOpts::new(
            "gatewarden_request_duration_seconds",
            "Time from request to the end of the response.",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ]),
        &["route"],
    )?;
    registry.register(Box::new(duration.clone()))?;
    let backend_healthy = IntGaugeVec::new(
        Opts::new(
            "gatewarden_backend_healthy",
            "1 when the backend passes its health check.",
        ),
        &["upstream", "backend"],
    )?;
    registry.register(Box::new(backend_healthy.clone()))?;
    let redis_errors = IntCounter::new(
        "gatewarden_redis_errors_total",
        "Failed Redis commands (timeouts, refused connections, errors).",
    )?;
    registry.register(Box::new(redis_errors.clone()))?;
    let log_lines_dropped = IntCounter::new(
        "gatewarden_log_lines_dropped_total",
        "Audit and access log lines dropped because the writer's queue was full.",
    )?;
    registry.register(Box::new(log_lines_dropped.clone()))?;
    let key_store_errors = IntCounter::new(
        "gatewarden_key_store_errors_total",
        "Failed reads of the key set shared through Redis; each left the keys loaded last in force.",
    )?;
    registry.register(Box::new(key_store_errors.clone()))?;
    let simple = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
        let c = IntCounter::new(name, help)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let trace_spans_exported = simple(
        "gatewarden_trace_spans_exported_total",
        "Spans the OTLP collector accepted.",
    )?;
    let trace_spans_dropped = simple(
        "gatewarden_trace_spans_dropped_total",
        "Spans lost: the export queue was full, or the collector refused or could not be reached.",
    )?;
    let trace_export_failures = simple(
        "gatewarden_trace_export_failures_total",
        "Export requests to the OTLP collector that failed.",
    )?;
    let inflight = IntGauge::new("gatewarden_inflight_requests", "Requests being served now.")?;
    registry.register(Box::new(inflight.clone()))?;
    Ok(Metrics {
        registry,
        requests,
        duration,
        upstream_requests,
        auth_failures,
        rate_limited,
        client_disconnects,
        client_connections,
        backend_healthy,
        config_reloads,
        inflight,
        redis_errors,
        log_lines_dropped,
        key_store_errors,
        trace_spans_exported,
        trace_spans_dropped,
        trace_export_failures,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // Only fails on duplicate or malformed metric names, which are fixed above.
    build().unwrap_or_else(|e| panic!("metric definitions are invalid: {e}"))
});

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition of every metric.
pub fn render() -> Vec<u8> {
    let mut out = Vec::with_capacity(8192);
    // Plugins count Redis errors in an atomic of their own; publish it here.
    let m = metrics();
    let redis = gatewarden_plugins::redis_store::error_count();
    m.redis_errors
        .inc_by(redis.saturating_sub(m.redis_errors.get()));
    let dropped = gatewarden_plugins::line_writer::dropped_count();
    m.log_lines_dropped
        .inc_by(dropped.saturating_sub(m.log_lines_dropped.get()));
    let failed = gatewarden_plugins::key_store::failure_count();
    m.key_store_errors
        .inc_by(failed.saturating_sub(m.key_store_errors.get()));
    let families = metrics().registry.gather();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        log::warn!("cannot encode metrics: {e}");
    }
    out
}

/// Counters indexed by HTTP status, resolved from the label set on first use so that
/// counting a request is one atomic add.
pub struct StatusCounters {
    labels: Vec<String>,
    vec: IntCounterVec,
    by_status: Box<[OnceLock<IntCounter>]>,
}

impl StatusCounters {
    /// `labels` are the label values before the trailing `status` label.
    pub fn new(vec: &IntCounterVec, labels: &[&str]) -> Self {
        StatusCounters {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            vec: vec.clone(),
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn inc(&self, status: u16) {
        let Some(slot) = self.by_status.get(status.wrapping_sub(100) as usize) else {
            return;
        };
        slot.get_or_init(|| {
            let status = status.to_string();
            let mut values: Vec<&str> = self.labels.iter().map(String::as_str).collect();
            values.push(&status);
            self.vec.with_label_values(&values)
        })
        .inc();
    }
}

/// The per-route metric handles, resolved when the route is compiled.
pub struct RouteMetrics {
    pub requests: StatusCounters,
    pub duration: Histogram,
    pub auth_failures: IntCounterVec,
    pub client_disconnects: IntCounter,
    /// The last minutes of requests, for the console.
    pub window: Arc<crate::console::window::RouteWindow>,
    route: Arc<str>,
}

impl RouteMetrics {
    pub fn new(route: &Arc<str>) -> Self {
        let m = metrics();
        RouteMetrics {
            requests: StatusCounters::new(&m.requests, &[route]),
            duration: m.duration.with_label_values(&[route]),
            auth_failures: m.auth_failures.clone(),
            client_disconnects: m.client_disconnects.with_label_values(&[route]),
            window: crate::console::window::for_route(route),
            route: route.clone(),
        }
    }

    pub fn rate_limited(&self, plugin: &str) {
        metrics()
            .rate_limited
            .with_label_values(&[&self.route, plugin])
            .inc();
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures
            .with_label_values(&[&self.route, reason])
            .inc();
    }
}

/// Decrements the in-flight gauge when the request's context is dropped, whatever path
/// the request took.
#[derive(Debug)]
pub struct InflightGuard(());

impl InflightGuard {
    pub fn enter() -> Self {
        metrics().inflight.inc();
        InflightGuard(())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        metrics().inflight.dec();
    }
}

/// A fresh 128-bit request id.
pub fn new_request_id() -> gatewarden_plugins::RequestId {
    gatewarden_plugins::RequestId::from_random(rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counters_count_by_status() {
        let route: Arc<str> = Arc::from("observe-test");
        let m = RouteMetrics::new(&route);
        m.requests.inc(200);
        m.requests.inc(200);
        m.requests.inc(404);
        m.requests.inc(7); // out of range: ignored, never a panic
        assert_eq!(
            metrics()
                .requests
                .with_label_values(&["observe-test", "200"])
                .get(),
            2
        );
        let text = String::from_utf8(render()).unwrap();
        assert!(text.contains("gatewarden_requests_total{route=\"observe-test\",status=\"404\"} 1"));
    }
}
