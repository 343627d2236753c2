//! A request's place in a trace, decided when it arrives, and the span recorded for it
//! when it ends.
//!
//! What a span may hold is fixed here: the method, the path without its query, the
//! route, upstream and backend, the status, who authenticated and how. Never a header
//! value the client sent (credentials travel in headers), never a query string (some
//! clients put tokens there).

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

use super::context::{
    format_traceparent, parse_traceparent, random_span_id, random_trace_id, sample_by_ratio,
    usable_tracestate,
};

/// The W3C headers.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One request's trace identity: made when the request arrives, used for the upstream's
/// `traceparent` and, when sampled, for the span at the end.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The trusted caller's span, when the request continues its trace.
    pub parent: Option<[u8; 8]>,
    /// The trace flags passed on: the parent's, with the sampled bit as decided.
    pub flags: u8,
    /// A trusted caller's `tracestate`, passed on as it came.
    pub tracestate: Option<HeaderValue>,
    pub start: SystemTime,
}

impl RequestTrace {
    /// The trace of a request with these headers. Only a trusted peer's `traceparent`
    /// is continued (and then its sampling decision followed); any other request starts
    /// a trace of its own, sampled by `ratio`.
    pub fn begin(headers: &http::HeaderMap, peer_trusted: bool, ratio: f64) -> RequestTrace {
        let start = SystemTime::now();
        let parent = peer_trusted
            .then(|| headers.get(&TRACEPARENT))
            .flatten()
            .and_then(|v| parse_traceparent(v.as_bytes()));
        match parent {
            Some(p) => RequestTrace {
                trace_id: p.trace_id,
                span_id: random_span_id(),
                parent: Some(p.span_id),
                flags: p.flags,
                tracestate: headers
                    .get(&TRACESTATE)
                    .filter(|v| usable_tracestate(v))
                    .cloned(),
                start,
            },
            None => {
                let trace_id = random_trace_id();
                RequestTrace {
                    trace_id,
                    span_id: random_span_id(),
                    parent: None,
                    flags: u8::from(sample_by_ratio(&trace_id, ratio)),
                    tracestate: None,
                    start,
                }
            }
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 != 0
    }

    /// Replaces whatever trace headers the client sent with this request's own.
    pub fn propagate(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            TRACEPARENT.clone(),
            format_traceparent(&self.trace_id, &self.span_id, self.sampled()),
        );
        match &self.tracestate {
            Some(state) => {
                headers.insert(TRACESTATE.clone(), state.clone());
            }
            None => {
                headers.remove(&TRACESTATE);
            }
        }
    }
}

/// What the end of a request tells the span: plain values, copied out of the request's
/// state by the proxy, none of them a credential.
pub struct Outcome<'a> {
    pub method: &'a str,
    /// The path as the client sent it, without the query.
    pub path: &'a str,
    /// 0 when no response was written (the client went away first).
    pub status: u16,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub client: IpAddr,
    pub subject: Option<&'a str>,
    pub auth_method: Option<&'a str>,
    pub auth_failure: Option<&'a str>,
    pub request_id: &'a str,
}

/// A finished span, as queued for export.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub trace_state: Option<String>,
    pub flags: u8,
    pub name: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// A 5xx: the span's status is ERROR.
    pub error: bool,
    pub status: u16,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl SpanRecord {
    /// The span of a finished request.
    pub fn finish(trace: &RequestTrace, o: &Outcome) -> SpanRecord {
        let end = SystemTime::now();
        let name = match o.route {
            Some(route) => format!("{} {route}", o.method),
            None => o.method.to_string(),
        };
        let mut attributes: Vec<(&'static str, Value)> = Vec::with_capacity(14);
        let mut text = |key: &'static str, v: &str| attributes.push((key, Value::Str(v.into())));
        text("http.request.method", o.method);
        text("url.path", o.path);
        text("client.address", &o.client.to_string());
        text("gatewarden.request_id", o.request_id);
        if let Some(route) = o.route {
            text("gatewarden.route", route);
        }
        if let Some(upstream) = o.upstream {
            text("gatewarden.upstream", upstream);
        }
        if let Some(backend) = o.backend {
            text("gatewarden.backend", &backend.to_string());
        }
        if let Some(method) = o.auth_method {
            text("gatewarden.auth.method", method);
        }
        if let Some(subject) = o.subject {
            text("enduser.id", subject);
        }
        if let Some(reason) = o.auth_failure {
            text("gatewarden.auth.failure", reason);
        }
        let error = o.status >= 500;
        if error {
            text("error.type", &o.status.to_string());
        }
        if o.status > 0 {
            attributes.push(("http.response.status_code", Value::Int(i64::from(o.status))));
        }
        SpanRecord {
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent_span_id: trace.parent,
            trace_state: trace
                .tracestate
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            flags: trace.flags,
            name,
            start_unix_nano: unix_nanos(trace.start),
            end_unix_nano: unix_nanos(end).max(unix_nanos(trace.start)),
            attributes,
            error,
            status: o.status,
        }
    }

    /// The ERROR status's message: the reason phrase of the status.
    pub fn status_message(&self) -> &'static str {
        http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_trusted_parent_is_continued_and_its_decision_followed() {
        let h = headers(&[("traceparent", PARENT), ("tracestate", "rojo=1")]);
        let t = RequestTrace::begin(&h, true, 0.0);
        assert_eq!(
            super::super::context::hex(&t.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(t.parent, Some(0x00f067aa0ba902b7u64.to_be_bytes()));
        assert!(t.sampled(), "the parent sampled it, whatever the ratio");
        assert_eq!(t.tracestate.as_ref().unwrap(), "rojo=1");
        let unsampled = PARENT.replace("-01", "-00");
        let h = headers(&[("traceparent", &unsampled)]);
        assert!(!RequestTrace::begin(&h, true, 1.0).sampled());
    }

    #[test]
    fn an_untrusted_parent_is_ignored() {
        let h = headers(&[("traceparent", PARENT), ("tracestate", "rojo=1")]);
        let t = RequestTrace::begin(&h, false, 0.0);
        assert_ne!(
            super::super::context::hex(&t.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(t.parent, None);
        assert!(t.tracestate.is_none());
        assert!(!t.sampled(), "ratio 0 decides");
        assert!(RequestTrace::begin(&h, false, 1.0).sampled());
    }

    #[test]
    fn propagation_replaces_the_clients_headers() {
        let h = headers(&[("traceparent", PARENT), ("tracestate", "forged=1")]);
        let t = RequestTrace::begin(&h, false, 1.0);
        let mut up = h.clone();
        t.propagate(&mut up);
        let sent = parse_traceparent(up.get(&TRACEPARENT).unwrap().as_bytes()).unwrap();
        assert_eq!((sent.trace_id, sent.span_id), (t.trace_id, t.span_id));
        assert!(up.get(&TRACESTATE).is_none());
        assert_eq!(up.get_all(&TRACEPARENT).iter().count(), 1);
    }

    #[test]
    fn a_span_records_no_query_and_errors_on_5xx() {
        let t = RequestTrace::begin(&http::HeaderMap::new(), false, 1.0);
        let o = Outcome {
            method: "POST",
            path: "/v1/chat",
            status: 502,
            route: Some("llm"),
            upstream: Some("ollama"),
            backend: Some("127.0.0.1:11434".parse().unwrap()),
            client: "10.0.0.1".parse().unwrap(),
            subject: Some("alice"),
            auth_method: Some("api_key"),
            auth_failure: None,
            request_id: "abc",
        };
        let s = SpanRecord::finish(&t, &o);
        assert_eq!(s.name, "POST llm");
        assert!(s.error);
        assert_eq!(s.status_message(), "Bad Gateway");
        let get = |k: &str| {
            s.attributes
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v)
        };
        assert_eq!(get("url.path"), Some(&Value::Str("/v1/chat".into())));
        assert_eq!(get("http.response.status_code"), Some(&Value::Int(502)));
        assert_eq!(get("enduser.id"), Some(&Value::Str("alice".into())));
        assert!(s.end_unix_nano >= s.start_unix_nano);
    }
}
