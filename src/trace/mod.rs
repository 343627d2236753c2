//! OpenTelemetry traces: one SERVER span per request, exported over OTLP/HTTP, and W3C
//! Trace Context passed to the upstream.
//!
//! - [`context`]: `traceparent` parsing and writing, the ratio sampler;
//! - [`span`]: a request's trace identity and the span recorded when it ends;
//! - [`export`]: the bounded queue and the thread that batches and POSTs;
//! - [`proto`]: the protobuf body.
//!
//! A [`Tracer`] belongs to a config snapshot, so a reload that changes `tracing:` swaps
//! it (the old one sends what it holds and stops once the old config is dropped).

pub mod context;
pub mod export;
pub mod proto;
pub mod span;

use std::sync::Arc;
use std::time::Duration;

use crate::config::file::TracingSection;

pub use span::{Outcome, RequestTrace, SpanRecord};

const DEFAULT_SERVICE_NAME: &str = "gatewarden";
const DEFAULT_QUEUE: usize = 2048;
const DEFAULT_BATCH: usize = 512;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The path OTLP/HTTP collectors take traces on, under their base URL.
const TRACES_PATH: &str = "/v1/traces";

/// The tracing of one config: how requests are sampled and where spans go.
pub struct Tracer {
    section: TracingSection,
    sample_ratio: f64,
    exporter: export::Exporter,
}

impl Tracer {
    /// Checks a `tracing:` section and builds its tracer (not started). Errors are
    /// `(key under tracing, message)`.
    pub fn build(section: TracingSection) -> Result<Tracer, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut bad = |key: &str, message: String| errors.push((key.to_string(), message));
        let endpoint = section.otlp_endpoint.trim_end_matches('/');
        match endpoint.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() =>
            {
                if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                    bad(
                        "otlp_endpoint",
                        "no credentials in the URL; give the collector's token under `headers`"
                            .into(),
                    );
                }
                if uri.query().is_some() {
                    bad("otlp_endpoint", "a base URL without a query".into());
                }
            }
            _ => bad(
                "otlp_endpoint",
                format!(
                    "{:?} is not an http(s) URL such as http://127.0.0.1:4318",
                    section.otlp_endpoint
                ),
            ),
        }
        let sample_ratio = section.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            bad("sample_ratio", "between 0 and 1".into());
        }
        if section.service_name.as_deref() == Some("") {
            bad("service_name", "must not be empty".into());
        }
        let mut headers = Vec::new();
        for (name, value) in &section.headers {
            let valid_name = http::HeaderName::from_bytes(name.as_bytes()).is_ok();
            // The value is a secret: never quoted back, even when it is wrong.
            let valid_value = http::HeaderValue::from_str(value.expose()).is_ok();
            if !valid_name {
                bad("headers", format!("{name:?} is not a header name"));
            } else if !valid_value {
                bad(
                    &format!("headers.{name}"),
                    "not a valid header value".into(),
                );
            } else {
                headers.push((name.clone(), value.expose().to_string()));
            }
        }
        for (key, value) in [
            ("queue_size", section.queue_size),
            ("batch_size", section.batch_size),
        ] {
            if value == Some(0) {
                bad(key, "at least 1".into());
            }
        }
        let interval = section.export_interval.map_or(DEFAULT_INTERVAL, Into::into);
        let timeout = section.export_timeout.map_or(DEFAULT_TIMEOUT, Into::into);
        if interval.is_zero() {
            bad("export_interval", "longer than 0".into());
        }
        if timeout.is_zero() {
            bad("export_timeout", "longer than 0".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let settings = export::Settings {
            url: format!("{endpoint}{TRACES_PATH}"),
            headers,
            resource_service_name: section
                .service_name
                .clone()
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string()),
            queue_size: section.queue_size.unwrap_or(DEFAULT_QUEUE),
            batch_size: section.batch_size.unwrap_or(DEFAULT_BATCH),
            interval,
            timeout,
        };
        Ok(Tracer {
            section,
            sample_ratio,
            exporter: export::Exporter::new(settings),
        })
    }

    /// The tracer for `section`: `previous` when it was built from the same settings (a
    /// reload keeps its queue and thread), else a new one.
    pub fn kept_or_built(
        section: TracingSection,
        previous: Option<&Arc<Tracer>>,
    ) -> Result<Arc<Tracer>, Vec<(String, String)>> {
        match previous.filter(|t| t.section == section) {
            Some(kept) => Ok(kept.clone()),
            None => Tracer::build(section).map(Arc::new),
        }
    }

    /// Starts exporting; once the config is about to serve.
    pub fn start(&self) -> Result<(), String> {
        self.exporter.start()
    }

    /// The trace of an arriving request.
    pub fn begin(&self, headers: &http::HeaderMap, peer_trusted: bool) -> RequestTrace {
        RequestTrace::begin(headers, peer_trusted, self.sample_ratio)
    }

    /// Records a finished request: only sampled ones make a span at all.
    pub fn end(&self, trace: &RequestTrace, outcome: &Outcome) {
        if trace.sampled() {
            self.exporter.offer(SpanRecord::finish(trace, outcome));
        }
    }

    /// Sends what is queued, waiting at most `bound` (at shutdown).
    pub fn flush(&self, bound: Duration) -> bool {
        self.exporter.flush(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> TracingSection {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn keys(result: Result<Tracer, Vec<(String, String)>>) -> Vec<String> {
        match result {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|(k, _)| k).collect(),
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(keys(Tracer::build(section(
            "otlp_endpoint: http://127.0.0.1:4318/"
        )))
        .is_empty());
        let t = Tracer::build(section("otlp_endpoint: http://127.0.0.1:4318/")).unwrap();
        assert_eq!(t.sample_ratio, 1.0);
        for (yaml, key) in [
            ("otlp_endpoint: 127.0.0.1:4318", "otlp_endpoint"),
            ("otlp_endpoint: ftp://c:4318", "otlp_endpoint"),
            ("otlp_endpoint: http://u:pw@c:4318", "otlp_endpoint"),
            (
                "{ otlp_endpoint: 'http://c', sample_ratio: 1.5 }",
                "sample_ratio",
            ),
            (
                "{ otlp_endpoint: 'http://c', sample_ratio: -0.1 }",
                "sample_ratio",
            ),
            (
                "{ otlp_endpoint: 'http://c', service_name: '' }",
                "service_name",
            ),
            ("{ otlp_endpoint: 'http://c', queue_size: 0 }", "queue_size"),
            (
                "{ otlp_endpoint: 'http://c', export_interval: 0s }",
                "export_interval",
            ),
            (
                "{ otlp_endpoint: 'http://c', headers: { 'bad name': x } }",
                "headers",
            ),
        ] {
            assert_eq!(keys(Tracer::build(section(yaml))), [key], "{yaml}");
        }
        assert!(
            serde_yaml_ng::from_str::<TracingSection>("{ otlp_endpoint: x, nope: 1 }").is_err()
        );
    }

    #[test]
    fn a_bad_header_value_is_not_quoted_back() {
        let Err(errors) = Tracer::build(section(
            "{ otlp_endpoint: 'http://c', headers: { authorization: \"Bearer s3cret\\n\" } }",
        )) else {
            panic!("accepted");
        };
        assert!(!format!("{errors:?}").contains("s3cret"));
    }
}
