//! OpenTelemetry traces: the spans a gateway exports, decoded by the official OTLP
//! protobuf definitions (the `opentelemetry-proto` Python package) in a small collector,
//! and the `traceparent` the upstream receives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// The api_key plugin's admin key: the only valid credential of the run.
const PLUGIN_KEY: &str = "tracing-plugin-key-0123456789";
/// The admin listener's key.
const ADMIN_KEY: &str = "tracing-admin-key-0123456789abc";
/// The token the gateway sends the collector.
const COLLECTOR_TOKEN: &str = "collector-token-0123456789";
/// Other secrets a client sends: a wrong key, a cookie, a query parameter.
const WRONG_KEY: &str = "gw_wrongwrongwrongwrongwrongwrongwrongwrongw";
const COOKIE_SECRET: &str = "cookie-secret-0123456789";
const QUERY_SECRET: &str = "query-secret-0123456789";

const TRUSTED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRUSTED_PARENT: &str = "00f067aa0ba902b7";

/// A collector that takes POST /v1/traces, decodes each body as an
/// `ExportTraceServiceRequest` and prints a line per span (`SPAN {json}`), plus the raw
/// body (`RAW <hex>`) and the request's headers (`HEADERS {json}`).
const COLLECTOR: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None

class Collector(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces":
            self.send_response(404); self.end_headers(); return
        print("HEADERS " + json.dumps({k.lower(): v for k, v in self.headers.items()}), flush=True)
        print("RAW " + body.hex(), flush=True)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    print("SPAN " + json.dumps({
                        "resource": resource,
                        "scope": ss.scope.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "trace_state": s.trace_state,
                        "flags": s.flags,
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status_code": s.status.code,
                        "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    }), flush=True)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Collector)
print("PORT %d" % server.server_address[1], flush=True)
server.serve_forever()
"#;

/// A Python that can import the OTLP protobuf definitions; `None` (a skip) outside CI
/// when there is none, a failure under CI, where scripts/setup.sh installs them.
fn python_with_otlp() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = Command::new(&python)
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if importable {
        return Some(python);
    }
    let message = format!(
        "the opentelemetry-proto Python package is not installed for {python} \
         (bash scripts/setup.sh installs it)"
    );
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED: {message}");
    None
}

/// The running collector and what it has printed.
struct Collector {
    process: Process,
    url: String,
}

impl Collector {
    fn start(python: &str) -> Collector {
        let process = Process::spawn_command(Command::new(python).args(["-c", COLLECTOR]));
        let mut port = None;
        poll_until("the collector to listen", Duration::from_secs(20), || {
            port = process
                .output()
                .lines()
                .find_map(|l| l.strip_prefix("PORT ").map(str::to_owned));
            port.is_some()
        });
        Collector {
            url: format!("http://127.0.0.1:{}", port.unwrap_or_default()),
            process,
        }
    }

    fn lines(&self, prefix: &str) -> Vec<String> {
        self.process
            .output()
            .lines()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
            .collect()
    }

    /// The spans of one gateway (told apart by `service.name`).
    fn spans(&self, service: &str) -> Vec<Value> {
        self.lines("SPAN ")
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|s| s["resource"]["service.name"] == service)
            .collect()
    }

    fn wait_for(&self, service: &str, count: usize) -> Vec<Value> {
        poll_until(
            &format!("{count} spans from {service}"),
            Duration::from_secs(20),
            || self.spans(service).len() >= count,
        );
        self.spans(service)
    }
}

/// A gateway with an api_key route to `app` and a public route to a closed port.
fn config(
    collector: &Collector,
    service: &str,
    app: SocketAddr,
    trusted: bool,
    tracing: Value,
) -> Config {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut section = json!({
        "otlp_endpoint": collector.url,
        "service_name": service,
        "headers": { "authorization": format!("Bearer {COLLECTOR_TOKEN}") },
        "export_interval": "100ms",
    });
    if let (Value::Object(section), Value::Object(extra)) = (&mut section, tracing) {
        section.extend(extra);
    }
    let mut config = Config::new()
        .with_admin()
        .admin_key(ADMIN_KEY)
        .set("tracing", section)
        .upstream("app", Upstream::to(app))
        .upstream("down", Upstream::to(dead))
        .plugin("keys", "api_key", json!({ "admin_key": PLUGIN_KEY }))
        .route(
            Route::new("api", "app", "user")
                .path_prefix("/api")
                .plugins(&["keys"]),
        )
        .route(Route::public("broken", "down").path_prefix("/broken"));
    if trusted {
        config = config.set("trusted_proxies", json!(["127.0.0.1/32"]));
    }
    config
}

/// A collector, a recording upstream and a gateway tracing to the one and proxying to
/// the other; `None` when the collector cannot run here.
fn setup(
    service: &str,
    trusted: bool,
    tracing: Value,
) -> Option<(Collector, RecordingUpstream, Gateway)> {
    let collector = Collector::start(&python_with_otlp()?);
    let app = RecordingUpstream::start();
    let gw = Gateway::start(config(&collector, service, app.addr, trusted, tracing));
    Some((collector, app, gw))
}

fn by_status(spans: &[Value]) -> BTreeMap<i64, Value> {
    spans
        .iter()
        .map(|s| {
            let status = s["attributes"]["http.response.status_code"]
                .as_i64()
                .unwrap();
            (status, s.clone())
        })
        .collect()
}

/// The `traceparent` the upstream got with its last request: (trace id, parent id, flags).
fn upstream_traceparent(upstream: &RecordingUpstream) -> (String, String, String) {
    let last = upstream
        .requests()
        .pop()
        .expect("a request reached the upstream");
    let values: Vec<&String> = last
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values.len(), 1, "{:?}", last.headers);
    let parts: Vec<&str> = values[0].split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{}", values[0]);
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn header_of(upstream: &RecordingUpstream, name: &str) -> Option<String> {
    let last = upstream.requests().pop()?;
    last.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

#[test]
fn spans_reach_an_otlp_collector_with_trace_context_and_no_secrets() {
    // Trusted peer: its trace is continued. Spans wait for a full batch or the stop.
    let Some((collector, app, mut gw)) =
        setup("gw-trusted", true, json!({ "export_interval": "1h" }))
    else {
        return;
    };
    let refused = get(
        gw.addr,
        &format!("/api/refused?token={QUERY_SECRET}"),
        &[&format!("X-API-Key: {WRONG_KEY}")],
    );
    assert_eq!(refused.status, 401);
    let ok = get(
        gw.addr,
        &format!("/api/ok?api_key={QUERY_SECRET}"),
        &[
            &format!("Authorization: Bearer {PLUGIN_KEY}"),
            &format!("Cookie: sid={COOKIE_SECRET}"),
            &format!("traceparent: 00-{TRUSTED_TRACE}-{TRUSTED_PARENT}-01"),
            "tracestate: rojo=00f067aa0ba902b7",
        ],
    );
    assert_eq!(ok.status, 200);
    let (sent_trace, sent_parent, sent_flags) = upstream_traceparent(&app);
    assert_eq!(
        header_of(&app, "tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7")
    );
    let broken = get(gw.addr, "/broken/x", &[]);
    assert_eq!(broken.status, 502);

    // The admin API shows the collector's token masked.
    let shown = get(
        gw.admin,
        "/admin/config",
        &[&format!("Authorization: Bearer {ADMIN_KEY}")],
    );
    assert_eq!(shown.status, 200);
    let shown = String::from_utf8_lossy(&shown.body).to_string();
    assert!(!shown.contains(COLLECTOR_TOKEN), "{shown}");
    assert!(shown.contains("********"), "{shown}");
    assert!(shown.contains("otlp_endpoint"), "{shown}");

    // Nothing yet (the interval is an hour); the stop sends it all.
    std::thread::sleep(Duration::from_millis(300));
    assert!(collector.spans("gw-trusted").is_empty());
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).success());
    let spans = collector.wait_for("gw-trusted", 3);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let spans = by_status(&spans);

    let s = &spans[&200];
    assert_eq!(s["name"], "GET api");
    assert_eq!(s["kind"], 2, "SERVER");
    assert_eq!(s["scope"], "gatewarden");
    assert_eq!(s["resource"]["service.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["trace_id"], TRUSTED_TRACE);
    assert_eq!(s["parent_span_id"], TRUSTED_PARENT);
    assert_eq!(s["trace_state"], "rojo=00f067aa0ba902b7");
    assert_eq!(s["status_code"], 0, "unset");
    assert_eq!(s["flags"].as_u64().unwrap() & 0xff, 1, "sampled");
    let a = &s["attributes"];
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/api/ok");
    assert_eq!(a["gatewarden.route"], "api");
    assert_eq!(a["gatewarden.upstream"], "app");
    assert_eq!(a["gatewarden.backend"], app.addr.to_string());
    assert_eq!(a["gatewarden.auth.method"], "api_key");
    assert_eq!(a["enduser.id"], "admin");
    assert!(s["end"].as_u64().unwrap() >= s["start"].as_u64().unwrap());
    // The upstream's parent is the gateway's span, in the caller's trace.
    assert_eq!(sent_trace, TRUSTED_TRACE);
    assert_eq!(Value::from(sent_parent), s["span_id"]);
    assert_eq!(sent_flags, "01");

    let s = &spans[&401];
    assert_eq!(s["name"], "GET api");
    assert_eq!(s["parent_span_id"], "", "no traceparent: a root span");
    assert_ne!(s["trace_id"], TRUSTED_TRACE);
    assert_eq!(s["status_code"], 0);
    let a = &s["attributes"];
    assert_eq!(a["url.path"], "/api/refused");
    assert!(a.get("enduser.id").is_none() && a.get("gatewarden.upstream").is_none());

    let s = &spans[&502];
    assert_eq!(s["name"], "GET broken");
    assert_eq!(s["status_code"], 2, "ERROR");
    let a = &s["attributes"];
    assert_eq!(a["gatewarden.upstream"], "down");
    assert!(a["gatewarden.backend"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(a["error.type"], "502");

    // The collector got its token, and nothing else secret went anywhere.
    for headers in collector.lines("HEADERS ") {
        let headers: Value = serde_json::from_str(&headers).unwrap();
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert_eq!(
            headers["authorization"],
            format!("Bearer {COLLECTOR_TOKEN}")
        );
    }
    let raw: Vec<u8> = collector
        .lines("RAW ")
        .iter()
        .flat_map(|hex| {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>()
        })
        .collect();
    let raw = String::from_utf8_lossy(&raw).to_string();
    let decoded = collector.lines("SPAN ").join("\n");
    for secret in [
        PLUGIN_KEY,
        ADMIN_KEY,
        COLLECTOR_TOKEN,
        WRONG_KEY,
        COOKIE_SECRET,
        QUERY_SECRET,
    ] {
        assert!(!raw.contains(secret), "{secret} in the exported bytes");
        assert!(!decoded.contains(secret), "{secret} in a span");
    }
    assert!(
        !decoded.contains('?'),
        "a query string in a span: {decoded}"
    );
}

#[test]
fn an_untrusted_traceparent_starts_a_new_trace() {
    let Some((collector, app, gw)) = setup("gw-untrusted", false, json!({})) else {
        return;
    };
    let ok = get(
        gw.addr,
        "/api/x",
        &[
            &format!("Authorization: Bearer {PLUGIN_KEY}"),
            // Unsampled: an untrusted caller cannot turn sampling off either.
            &format!("traceparent: 00-{TRUSTED_TRACE}-{TRUSTED_PARENT}-00"),
            "tracestate: forged=1",
        ],
    );
    assert_eq!(ok.status, 200);
    let (sent_trace, sent_parent, sent_flags) = upstream_traceparent(&app);
    assert_eq!(header_of(&app, "tracestate"), None);
    // Exported while running, after the 100 ms interval.
    let spans = collector.wait_for("gw-untrusted", 1);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let s = &spans[0];
    assert_ne!(s["trace_id"], TRUSTED_TRACE);
    assert_eq!(s["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(s["parent_span_id"], "");
    assert_eq!(s["trace_state"], "");
    assert_eq!(Value::from(sent_trace), s["trace_id"]);
    assert_eq!(Value::from(sent_parent), s["span_id"]);
    assert_eq!(sent_flags, "01");
}

#[test]
fn a_zero_sample_ratio_exports_nothing_and_still_propagates() {
    let Some((collector, app, mut gw)) = setup("gw-unsampled", false, json!({ "sample_ratio": 0 }))
    else {
        return;
    };
    for _ in 0..5 {
        let ok = get(
            gw.addr,
            "/api/x",
            &[&format!("Authorization: Bearer {PLUGIN_KEY}")],
        );
        assert_eq!(ok.status, 200);
    }
    assert_eq!(get(gw.addr, "/broken/x", &[]).status, 502);
    let (trace, parent, flags) = upstream_traceparent(&app);
    assert_eq!((trace.len(), parent.len(), flags.as_str()), (32, 16, "00"));
    assert_ne!(trace, "0".repeat(32));
    // The stop flushes: anything recorded would have been sent by the time it exits.
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(20)).success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(collector.lines("SPAN ").is_empty());
    assert!(collector.lines("RAW ").is_empty());
}

#[test]
fn a_reload_changes_or_turns_off_tracing() {
    let Some((collector, app, gw)) = setup("gw-reload-a", false, json!({})) else {
        return;
    };
    let auth = format!("Authorization: Bearer {PLUGIN_KEY}");
    assert_eq!(get(gw.addr, "/api/a", &[&auth]).status, 200);
    collector.wait_for("gw-reload-a", 1);

    gw.rewrite(config(
        &collector,
        "gw-reload-b",
        app.addr,
        false,
        json!({}),
    ));
    gw.signal("HUP");
    poll_until(
        "spans under the new service name",
        Duration::from_secs(20),
        || {
            assert_eq!(get(gw.addr, "/api/b", &[&auth]).status, 200);
            std::thread::sleep(Duration::from_millis(150));
            !collector.spans("gw-reload-b").is_empty()
        },
    );

    // Off: the client's own trace headers reach the upstream untouched.
    let off =
        config(&collector, "gw-reload-b", app.addr, false, json!({})).set("tracing", Value::Null);
    gw.rewrite(off);
    gw.signal("HUP");
    let client = format!("00-{TRUSTED_TRACE}-{TRUSTED_PARENT}-01");
    poll_until("tracing to be off", Duration::from_secs(20), || {
        let traceparent = format!("traceparent: {client}");
        assert_eq!(get(gw.addr, "/api/c", &[&auth, &traceparent]).status, 200);
        header_of(&app, "traceparent").as_deref() == Some(client.as_str())
    });
    // Spans of the requests traced before the reload took effect are sent by now.
    std::thread::sleep(Duration::from_millis(400));
    let before = collector.spans("gw-reload-b").len();
    assert_eq!(get(gw.addr, "/api/d", &[&auth]).status, 200);
    assert_eq!(header_of(&app, "traceparent"), None);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(collector.spans("gw-reload-b").len(), before);
}
