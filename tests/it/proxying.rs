//! Always-on proxy behaviour: forwarding headers, the `headers` and `ip_filter` plugins,
//! body limits, `/healthz`, `/metrics`, reload, and `${env:}` in a config.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// Every value of header `name` in a demo upstream's `/echo` answer, in order.
fn echoed(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("not an /echo answer: {echo}"))
        .iter()
        .filter(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

/// GET `path` with header lines given verbatim (odd spellings and duplicates survive).
fn get_with(gw: &Gateway, path: &str, host: &str, headers: &[&str]) -> RawResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(gw.addr, &req).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn assert_json_error(resp: &RawResponse, status: u16) {
    assert_eq!(resp.status, status, "{resp:?}");
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{resp:?}"
    );
    let body = resp.json();
    assert_eq!(body["status"], status, "{body}");
    assert!(body["error"].is_string(), "{body}");
}

fn is_request_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Forwarding headers an attacker would like the upstream to believe.
const SPOOFED: &[&str] = &[
    "X-Forwarded-For: 6.6.6.6",
    "x-FORWARDED-for: 7.7.7.7, 8.8.8.8",
    "X-Forwarded-Proto: https",
    "X-FORWARDED-HOST: evil.example",
    "x-forwarded-host: evil2.example",
    "X-Real-IP: 6.6.6.6",
    "x-real-ip: 7.7.7.7",
    "X-Request-Id: 0123456789abcdef0123456789abcdef",
    "x-REQUEST-id: attacker-chosen",
    "Forwarded: for=6.6.6.6;proto=https;host=evil.example",
    "FORWARDED: for=7.7.7.7",
    "X-Original-URL: /admin",
    "x-original-url: /admin/keys",
    "X-Rewrite-URL: /admin",
    "X-REWRITE-URL: /admin/keys",
];

#[test]
fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start_with(public(ups.addr(0)), &[]);
    let resp = get_with(&gw, "/echo", "app.test:8080", SPOOFED);
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = resp.json();
    assert_eq!(echoed(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echoed(&echo, "x-real-ip"), ["127.0.0.1"]);
    assert_eq!(echoed(&echo, "x-forwarded-proto"), ["http"]);
    assert_eq!(echoed(&echo, "x-forwarded-host"), ["app.test:8080"]);
    for gone in ["forwarded", "x-original-url", "x-rewrite-url"] {
        assert_eq!(
            echoed(&echo, gone),
            Vec::<String>::new(),
            "{gone} reached the upstream"
        );
    }
    let ids = echoed(&echo, "x-request-id");
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(is_request_id(&ids[0]), "{ids:?}");
    assert_eq!(
        resp.header("x-request-id"),
        Some(ids[0].as_str()),
        "the client's id differs from the upstream's"
    );

    // Every request gets its own id, also on the gateway's own answers.
    let again = get_with(&gw, "/echo", "app.test", SPOOFED);
    let id2 = again.header("x-request-id").unwrap_or_default().to_string();
    assert!(is_request_id(&id2) && id2 != ids[0], "{id2} vs {}", ids[0]);
    let refused = get_with(&gw, "/%2e%2e/x", "app.test", SPOOFED);
    assert_eq!(refused.status, 400);
    assert!(
        refused.header("x-request-id").is_some_and(is_request_id),
        "{refused:?}"
    );
}

/// README, "Header name spelling": one spelling per name on the way up, whatever the
/// client wrote, with every value and duplicate intact.
#[test]
fn header_names_reach_the_upstream_in_one_spelling_with_every_value() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start_with(public(up.addr), &[]);
    let sent = [
        "X-Custom-Thing: one",
        "x-CUSTOM-thing: two",
        "USER-AGENT: probe/1",
        "content-type: text/plain",
    ];
    let resp = get_with(&gw, "/x", "app.test", &sent);
    assert_eq!(resp.status, 200, "{resp:?}");
    let requests = up.requests();
    let lines: Vec<String> = requests[0]
        .headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}"))
        .collect();
    for expected in [
        "Host: app.test",
        "x-custom-thing: one",
        "x-custom-thing: two",
        "user-agent: probe/1",
        "Content-Type: text/plain",
        "x-forwarded-for: 127.0.0.1",
        "x-real-ip: 127.0.0.1",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected:?} not among {lines:?}"
        );
    }
    // The same on the way down, for the upstream's headers and the gateway's own.
    let names: Vec<&str> = resp.headers.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["Content-Length", "x-demo-upstream", "x-request-id"] {
        assert!(
            names.contains(&expected),
            "{expected:?} not among {names:?}"
        );
    }
}

#[test]
fn a_trusted_proxy_is_believed() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start_with(
        public(ups.addr(0)).set("trusted_proxies", json!(["127.0.0.0/8"])),
        &[],
    );
    let resp = get_with(
        &gw,
        "/echo",
        "app.test",
        &[
            "X-Forwarded-For: 6.6.6.6, 203.0.113.7",
            "x-forwarded-for: 127.0.0.5",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: chat.example.com",
            "X-Request-Id: trace-abc-123",
        ],
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = resp.json();
    // 127.0.0.5 is another trusted proxy, so the client is the next address to its left;
    // the peer is appended to the chain rather than replacing it.
    assert_eq!(echoed(&echo, "x-real-ip"), ["203.0.113.7"]);
    assert_eq!(
        echoed(&echo, "x-forwarded-for"),
        ["6.6.6.6, 203.0.113.7, 127.0.0.5, 127.0.0.1"]
    );
    assert_eq!(echoed(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(echoed(&echo, "x-forwarded-host"), ["chat.example.com"]);
    assert_eq!(echoed(&echo, "x-request-id"), ["trace-abc-123"]);
    assert_eq!(resp.header("x-request-id"), Some("trace-abc-123"));

    // A request id that could break a log line is not taken over.
    let resp = get_with(&gw, "/echo", "app.test", &["X-Request-Id: a b"]);
    let ids = echoed(&resp.json(), "x-request-id");
    assert!(ids.len() == 1 && is_request_id(&ids[0]), "{ids:?}");
    // Without X-Forwarded-For the trusted peer itself is the client.
    assert_eq!(echoed(&resp.json(), "x-real-ip"), ["127.0.0.1"]);
}

#[test]
fn the_headers_plugin_sets_and_removes_headers_both_ways() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(ups.addr(0)))
            .plugin(
                "stamp",
                "headers",
                json!({
                    "request": {
                        "set": {
                            "X-Client-IP": "{client_ip}",
                            "X-Trace": "id={request_id}",
                            "X-Webauth-User": "gateway",
                        },
                        "remove": ["X-Debug", "Cookie"],
                    },
                    "response": {
                        "set": { "X-Frame-Options": "DENY" },
                        "remove": ["X-Demo-Upstream"],
                    },
                }),
            )
            .route(Route::public("stamped", "app").plugins(&["stamp"]))
            .route(Route::public("plain", "app").path_prefix("/plain")),
        &[],
    );
    let spoof = [
        "x-client-ip: 6.6.6.6",
        "X-CLIENT-IP: 7.7.7.7",
        "X-Client-Ip: 8.8.8.8",
        "x-webauth-user: admin",
        "X-WEBAUTH-USER: root",
        "X-Trace: id=forged",
        "X-Debug: 1",
        "x-DEBUG: 2",
        "Cookie: session=secret",
        "X-Kept: yes",
    ];
    let resp = get_with(&gw, "/echo", "localhost", &spoof);
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = resp.json();
    let id = resp
        .header("x-request-id")
        .expect("x-request-id")
        .to_string();
    assert_eq!(echoed(&echo, "x-client-ip"), ["127.0.0.1"]);
    assert_eq!(echoed(&echo, "x-trace"), [format!("id={id}")]);
    assert_eq!(echoed(&echo, "x-webauth-user"), ["gateway"]);
    assert_eq!(echoed(&echo, "x-debug"), Vec::<String>::new());
    assert_eq!(echoed(&echo, "cookie"), Vec::<String>::new());
    assert_eq!(echoed(&echo, "x-kept"), ["yes"]);
    let frame: Vec<_> = resp
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-frame-options"))
        .collect();
    assert_eq!(frame.len(), 1, "{resp:?}");
    assert_eq!(frame[0].1, "DENY");
    assert!(resp.header("x-demo-upstream").is_none(), "{resp:?}");

    // The same request on a route without the plugin: the headers are the client's.
    let plain = get_with(&gw, "/plain", "localhost", &["X-Debug: 1"]);
    assert_eq!(plain.status, 404, "the demo upstream has no /plain");
    assert!(
        plain.header("x-demo-upstream").is_some() && plain.header("x-frame-options").is_none(),
        "{plain:?}"
    );
}

#[test]
fn ip_filter_refuses_before_the_upstream_and_cannot_be_spoofed() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(up.addr))
            .plugin("no_local", "ip_filter", json!({ "deny": ["127.0.0.0/8"] }))
            .plugin("local_only", "ip_filter", json!({ "allow": ["127.0.0.1"] }))
            .plugin(
                "office",
                "ip_filter",
                json!({ "allow": ["203.0.113.0/24"] }),
            )
            .route(
                Route::public("denied", "app")
                    .plugins(&["no_local"])
                    .path_prefix("/denied"),
            )
            .route(
                Route::public("allowed", "app")
                    .plugins(&["local_only"])
                    .path_prefix("/allowed"),
            )
            .route(
                Route::public("office", "app")
                    .plugins(&["office"])
                    .path_prefix("/office"),
            ),
        &[],
    );
    assert_json_error(&get_with(&gw, "/denied", "localhost", &[]), 403);
    // From an untrusted peer, claiming an office address changes nothing.
    let spoofed = get_with(
        &gw,
        "/office",
        "localhost",
        &[
            "X-Forwarded-For: 203.0.113.5",
            "X-Real-IP: 203.0.113.5",
            "Forwarded: for=203.0.113.5",
        ],
    );
    assert_json_error(&spoofed, 403);
    assert_eq!(
        up.connections(),
        0,
        "a refused request reached the upstream: {:?}",
        up.requests()
    );

    let allowed = get_with(&gw, "/allowed/x", "localhost", &[]);
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(allowed.body, b"/allowed/x");
    assert_eq!(up.connections(), 1);
}

#[test]
fn ip_filter_uses_the_client_derived_through_trusted_proxies() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .set("trusted_proxies", json!(["127.0.0.0/8"]))
            .upstream("app", Upstream::to(up.addr))
            .plugin("block", "ip_filter", json!({ "deny": ["198.51.100.0/24"] }))
            .plugin(
                "office",
                "ip_filter",
                json!({ "allow": ["203.0.113.0/24"] }),
            )
            .set("global_plugins", json!(["block"]))
            .route(Route::public("app", "app"))
            .route(
                Route::public("office", "app")
                    .plugins(&["office"])
                    .path_prefix("/office"),
            ),
        &[],
    );
    let status = |path: &str, xff: Option<&str>| {
        let header = xff.map(|v| format!("X-Forwarded-For: {v}"));
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        get_with(&gw, path, "localhost", &headers).status
    };
    assert_eq!(status("/", Some("198.51.100.9")), 403);
    assert_eq!(status("/", Some("203.0.113.5, 198.51.100.9")), 403);
    assert_eq!(
        status("/office", Some("198.51.100.9")),
        403,
        "deny runs globally, before the route's allow list"
    );
    assert_eq!(
        status("/office", None),
        403,
        "the proxy itself is not in the office range"
    );
    assert_eq!(up.connections(), 0, "{:?}", up.requests());
    // Only the right-most untrusted address counts: what the client wrote to its left is noise.
    assert_eq!(status("/", Some("198.51.100.9, 203.0.113.5")), 200);
    assert_eq!(status("/office", Some("203.0.113.5")), 200);
    assert_eq!(status("/", None), 200);
    assert_eq!(up.connections(), 3);
}

fn limits_config(backend: std::net::SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .set("max_request_body", "1KiB")
        .upstream("app", Upstream::to(backend))
        .route(Route::public("small", "app"))
        .route(
            Route::public("big", "app")
                .with("max_request_body", "4KiB")
                .path_prefix("/big"),
        )
}

fn post_head(path: &str, framing: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\nConnection: close\r\n\r\n")
}

#[test]
fn a_declared_body_over_the_limit_is_413_before_any_upstream_connection() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start_with(limits_config(up.addr), &[]);
    // Only the head is sent: the gateway must answer without waiting for the body.
    for (path, len) in [
        ("/upload", 1025),
        ("/upload", 1 << 30),
        ("/big/upload", 4097),
    ] {
        let resp = raw(gw.addr, &post_head(path, &format!("Content-Length: {len}")))
            .unwrap_or_else(|e| panic!("{path} {len}: {e}"));
        assert_json_error(&resp, 413);
    }
    // curl sends large uploads with `Expect: 100-continue`: refuse instead of inviting the body.
    let expect = post_head("/upload", "Content-Length: 5000\r\nExpect: 100-continue");
    assert_json_error(&raw(gw.addr, &expect).unwrap(), 413);
    assert_eq!(
        up.connections(),
        0,
        "the upstream was contacted: {:?}",
        up.requests()
    );

    let body = vec![b'x'; 1024];
    let mut req = post_head("/upload", "Content-Length: 1024").into_bytes();
    req.extend_from_slice(&body);
    let resp = raw_bytes(gw.addr, &req).unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    let body = vec![b'y'; 3000];
    let mut req = post_head("/big/upload", "Content-Length: 3000").into_bytes();
    req.extend_from_slice(&body);
    let resp = raw_bytes(gw.addr, &req).unwrap();
    assert_eq!(resp.status, 200, "the route's own limit applies: {resp:?}");
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[0].complete && seen[0].body == vec![b'x'; 1024],
        "{:?}",
        seen[0]
    );
    assert!(seen[1].complete && seen[1].body == body, "{:?}", seen[1]);
}

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

#[test]
fn a_chunked_body_over_the_limit_is_cut_off() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start_with(limits_config(up.addr), &[]);
    let requests_to = |target: &str| -> Vec<Recorded> {
        up.requests()
            .into_iter()
            .filter(|r| r.target() == target)
            .collect()
    };

    // Two 800-byte chunks cross the 1 KiB limit; the final chunk is never sent, so the
    // gateway can only answer because it counted, not because the body ended.
    let mut req = post_head("/upload/whole", "Transfer-Encoding: chunked").into_bytes();
    req.extend(chunk(&[b'a'; 800]));
    req.extend(chunk(&[b'b'; 800]));
    let resp = raw_bytes(gw.addr, &req).expect("an answer before the body ended");
    assert_json_error(&resp, 413);

    // Streamed: the first chunk reaches the upstream while the client is still sending,
    // and the chunk that crosses the limit ends the request.
    let mut conn = TcpStream::connect(gw.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut first = post_head("/upload/streamed", "Transfer-Encoding: chunked").into_bytes();
    first.extend(chunk(&[b'c'; 800]));
    conn.write_all(&first).unwrap();
    poll_until(
        "the first chunk to reach the upstream",
        Duration::from_secs(10),
        || {
            requests_to("/upload/streamed")
                .first()
                .is_some_and(|r| r.body_bytes == 800)
        },
    );
    conn.write_all(&chunk(&[b'd'; 800])).unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    poll_until(
        "the streamed upstream request to be aborted",
        Duration::from_secs(10),
        || requests_to("/upload/streamed")[0].ended,
    );
    let streamed = requests_to("/upload/streamed");
    assert_eq!(streamed.len(), 1, "{streamed:?}");
    assert!(
        !streamed[0].complete && streamed[0].body_bytes == 800,
        "{streamed:?}"
    );

    // Under the limit, a chunked body arrives intact.
    let mut req = post_head("/big/upload", "Transfer-Encoding: chunked").into_bytes();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for part in data.chunks(700) {
        req.extend(chunk(part));
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw_bytes(gw.addr, &req).unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    let intact = requests_to("/big/upload");
    assert!(
        intact.len() == 1 && intact[0].complete && intact[0].body == data,
        "{intact:?}"
    );

    // Whether or not the gateway had opened an upstream request for the first upload,
    // no more than the limit went through and that request is over.
    poll_until(
        "the first upstream request, if any, to be aborted",
        Duration::from_secs(10),
        || requests_to("/upload/whole").iter().all(|r| r.ended),
    );
    for r in requests_to("/upload/whole") {
        assert!(!r.complete && r.body_bytes <= 1024, "{r:?}");
    }
}

#[test]
fn the_demo_echo_sees_a_body_under_the_limit_intact() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start_with(limits_config(ups.addr(0)), &[]);
    let body: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let req = format!("{}{body}", post_head("/echo", "Content-Length: 1000"));
    let resp = raw(gw.addr, &req).unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = resp.json();
    assert_eq!(echo["body_len"], 1000);
    assert_eq!(echo["body"], body);
}

fn health_json(resp: &RawResponse) -> Value {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{resp:?}"
    );
    resp.json()
}

#[test]
fn healthz_answers_on_both_listeners_and_can_be_turned_off() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start_with(public(ups.addr(0)), &[]);
    let expected = serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION"), "config_generation": 1 });
    for addr in [gw.addr, gw.admin] {
        let body = health_json(&get(addr, "/healthz", &[]));
        assert_eq!(body, expected, "on {addr}");
    }
    // Answered by the gateway, not forwarded.
    assert!(get(gw.addr, "/healthz", &[])
        .header("x-demo-upstream")
        .is_none());

    let off = Gateway::start_with(public(ups.addr(0)).set("health_path", Value::Null), &[]);
    let resp = get(off.addr, "/healthz", &[]);
    assert_eq!(
        served_by(&resp),
        ups.addr(0).port(),
        "with health_path: null, /healthz is routed like any path"
    );
    assert_eq!(resp.status, 404, "the demo upstream has no /healthz");
    assert_eq!(
        health_json(&get(off.admin, "/healthz", &[])),
        expected,
        "the admin listener keeps /healthz"
    );
}

/// The value of the sample of `name` whose labels include every pair of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            })
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

fn metrics_text(gw: &Gateway) -> String {
    let resp = get(gw.admin, "/metrics", &[]);
    assert_eq!(resp.status, 200, "{resp:?}");
    String::from_utf8(resp.body).expect("metrics are text")
}

/// An SDK that stops reading a stream at the event it wanted (`data: [DONE]`) and a
/// browser that reloads in the middle of a download: the client goes away, which is
/// counted, and is no error or warning of the gateway's.
#[test]
fn a_client_that_goes_away_mid_response_is_counted_not_logged_as_an_error() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start(public(ups.addr(0)));
    for (path, enough) in [
        ("/sse?n=100&interval_ms=50", b"data:".as_slice()),
        ("/bytes/100000000", b"\r\n\r\n".as_slice()),
    ] {
        let mut conn = TcpStream::connect(gw.addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(enough.len()).any(|w| w == enough) {
            let n = conn.read(&mut buf).expect("part of the response");
            assert!(n > 0, "the response ended early: {path}");
            got.extend_from_slice(&buf[..n]);
        }
        drop(conn);
    }
    poll_until("both disconnects counted", Duration::from_secs(10), || {
        sample(
            &metrics_text(&gw),
            "gatewarden_client_disconnects_total",
            &[("route", "app")],
        ) == Some(2.0)
    });
    assert_eq!(
        get(gw.addr, "/echo", &[]).status,
        200,
        "the gateway serves on"
    );
    let output = gw.output();
    assert!(
        !output.contains("ERROR") && !output.contains("WARN"),
        "a client going away is logged as a problem:\n{output}"
    );
}

#[test]
fn metrics_count_requests_upstream_responses_and_backend_health() {
    let ups = Upstreams::start(1);
    let backend = ups.addr(0).to_string();
    let gw = Gateway::start_with(public(ups.addr(0)), &[]);
    for path in ["/echo", "/echo", "/status/503", "/%2e%2e/"] {
        get(gw.addr, path, &[]);
    }
    // Pingora counts a request in its logging phase, after the client has the answer.
    let mut text = String::new();
    poll_until(
        "all four requests to be counted",
        Duration::from_secs(5),
        || {
            text = metrics_text(&gw);
            let count = |status| sample(&text, "gatewarden_requests_total", &[("status", status)]);
            count("200") == Some(2.0) && count("503") == Some(1.0) && count("400") == Some(1.0)
        },
    );
    let has = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
    };

    assert_eq!(
        has(
            "gatewarden_requests_total",
            &[("route", "app"), ("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        has(
            "gatewarden_requests_total",
            &[("route", "app"), ("status", "503")]
        ),
        1.0
    );
    assert_eq!(has("gatewarden_requests_total", &[("status", "400")]), 1.0);
    assert_eq!(
        has(
            "gatewarden_request_duration_seconds_count",
            &[("route", "app")]
        ),
        3.0
    );
    assert!(
        has(
            "gatewarden_request_duration_seconds_bucket",
            &[("route", "app"), ("le", "+Inf")]
        ) >= 3.0
    );
    assert_eq!(
        has(
            "gatewarden_upstream_requests_total",
            &[
                ("upstream", "app"),
                ("backend", &backend),
                ("status", "200")
            ]
        ),
        2.0
    );
    assert_eq!(
        has(
            "gatewarden_upstream_requests_total",
            &[
                ("upstream", "app"),
                ("backend", &backend),
                ("status", "503")
            ]
        ),
        1.0
    );
    assert_eq!(
        has(
            "gatewarden_backend_healthy",
            &[("upstream", "app"), ("backend", &backend)]
        ),
        1.0
    );
    assert!(
        text.contains("# TYPE gatewarden_inflight_requests gauge"),
        "{text}"
    );
    // Public routes never count auth failures, and nothing here rate-limits.
    assert!(!text.contains("gatewarden_auth_failures_total{"), "{text}");
    assert!(!text.contains("gatewarden_rate_limited_total{"), "{text}");
    // Nothing is in flight once the answers are out; a leak would show as a stuck gauge.
    poll_until(
        "gatewarden_inflight_requests to drop to 0",
        Duration::from_secs(5),
        || sample(&metrics_text(&gw), "gatewarden_inflight_requests", &[]) == Some(0.0),
    );
}

const ADMIN_KEY: &str = "reload-key-0123456789abcdef";

/// A config with public routes `/a` (to `a`) plus one extra route per `(prefix, upstream)`.
fn reload_config(a: SocketAddr, b: SocketAddr, extra_routes: &[(&str, &str)]) -> Config {
    let mut config = Config::new()
        .admin_key(ADMIN_KEY)
        .upstream("a", Upstream::to(a))
        .upstream("b", Upstream::to(b))
        .route(Route::public("a", "a").path_prefix("/a"));
    for (prefix, upstream) in extra_routes {
        config = config.route(Route::public(&format!("r{prefix}"), upstream).path_prefix(prefix));
    }
    config
}

fn generation(gw: &Gateway) -> u64 {
    health_json(&get(gw.admin, "/healthz", &[]))["config_generation"]
        .as_u64()
        .expect("a generation")
}

fn admin_post(gw: &Gateway, path: &str, key: Option<&str>) -> RawResponse {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    raw(gw.admin, &req).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

#[test]
fn reload_by_sighup_and_admin_api_keeps_the_old_config_on_errors() {
    let ups = Upstreams::start(2);
    let (a, b) = (ups.addr(0), ups.addr(1));
    let gw = Gateway::start_with(reload_config(a, b, &[]), &[]);
    assert_eq!(generation(&gw), 1);
    assert_eq!(get(gw.addr, "/b/echo", &[]).status, 404);

    gw.rewrite(reload_config(a, b, &[("/b", "b")]));
    gw.signal("HUP");
    poll_until("generation 2 after SIGHUP", Duration::from_secs(10), || {
        generation(&gw) == 2
    });
    assert_eq!(served_by(&get(gw.addr, "/b/echo", &[])), ups.addr(1).port());
    assert_eq!(served_by(&get(gw.addr, "/a", &[])), ups.addr(0).port());
    assert_eq!(
        health_json(&get(gw.addr, "/healthz", &[]))["config_generation"],
        2
    );

    // A broken file: the old config stays in force, and the failure is counted.
    gw.rewrite(reload_config(a, b, &[("/b", "b")]).set("bogus_key", 1));
    gw.signal("HUP");
    poll_until(
        "a failed reload to be counted",
        Duration::from_secs(10),
        || {
            sample(
                &metrics_text(&gw),
                "gatewarden_config_reloads_total",
                &[("result", "error")],
            ) == Some(1.0)
        },
    );
    assert_eq!(generation(&gw), 2);
    assert_eq!(served_by(&get(gw.addr, "/b/echo", &[])), ups.addr(1).port());
    assert_eq!(
        sample(
            &metrics_text(&gw),
            "gatewarden_config_reloads_total",
            &[("result", "ok")]
        ),
        Some(1.0)
    );

    // The admin API needs the key, and reports a rejected file.
    for key in [None, Some("reload-key-0123456789abcdeX"), Some("")] {
        let resp = admin_post(&gw, "/admin/reload", key);
        assert_json_error(&resp, 401);
        assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
    }
    let rejected = admin_post(&gw, "/admin/reload", Some(ADMIN_KEY));
    assert_eq!(rejected.status, 422, "{rejected:?}");
    assert!(
        rejected.json()["problems"]
            .to_string()
            .contains("bogus_key"),
        "{rejected:?}"
    );
    assert_eq!(generation(&gw), 2);

    gw.rewrite(reload_config(a, b, &[("/b", "b"), ("/c", "a")]));
    let resp = admin_post(&gw, "/admin/reload", Some(ADMIN_KEY));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["config_generation"], 3);
    assert_eq!(generation(&gw), 3);
    assert_eq!(served_by(&get(gw.addr, "/c", &[])), ups.addr(0).port());
    assert_eq!(served_by(&get(gw.addr, "/b/echo", &[])), ups.addr(1).port());
}

#[test]
fn env_references_expand_and_a_missing_one_is_named() {
    let ups = Upstreams::start(2);
    // The part's port comes from the environment variable `part_port`.
    let config = |part_port: &str| {
        Config::new()
            .with_admin()
            .upstream("whole", Upstream::named("${env:GW_IT_WHOLE_BACKEND}"))
            .upstream(
                "part",
                Upstream::named(&format!("127.0.0.1:${{env:{part_port}}}")),
            )
            .route(Route::public("whole", "whole"))
            .route(Route::public("part", "part").path_prefix("/part"))
    };
    let port = ups.addr(1).port().to_string();
    let gw = Gateway::start_with(
        config("GW_IT_PART_PORT"),
        &[
            ("GW_IT_WHOLE_BACKEND", &ups.addr(0).to_string()),
            ("GW_IT_PART_PORT", &port),
        ],
    );
    assert_eq!(served_by(&get(gw.addr, "/echo", &[])), ups.addr(0).port());
    assert_eq!(served_by(&get(gw.addr, "/part", &[])), ups.addr(1).port());

    let dir = tempfile::tempdir().unwrap();
    let missing = config("GW_IT_NEVER_SET_0F3A")
        .listen("127.0.0.1:8080".parse().unwrap())
        .admin_at("127.0.0.1:9091".parse().unwrap())
        .to_yaml();
    std::fs::write(dir.path().join("g.yaml"), missing).unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("GW_IT_NEVER_SET_0F3A"), "{stderr}");
    assert!(stderr.contains("upstreams.part.backends[0]"), "{stderr}");
    // GW_IT_WHOLE_BACKEND is not set for `check` either: every problem is reported at once.
    assert!(stderr.contains("GW_IT_WHOLE_BACKEND"), "{stderr}");
}

/// Opens a client connection, sends two keep-alive requests on it (both must be
/// answered), then waits up to `wait` for the gateway to close it. Returns how long the
/// connection stayed open after the second answer, or `None` if it was still open.
fn idle_close_after(gw: &Gateway, extra_header: &str, wait: Duration) -> Option<Duration> {
    let stream = TcpStream::connect(gw.addr).expect("connect");
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    for _ in 0..2 {
        let request = format!("GET /echo HTTP/1.1\r\nHost: localhost\r\n{extra_header}\r\n");
        writer.write_all(request.as_bytes()).expect("send");
        let resp = read_response(&mut reader).expect("a keep-alive answer");
        assert_eq!(resp.status, 200);
    }
    let answered = std::time::Instant::now();
    reader.get_ref().set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    match reader.read(&mut byte) {
        Ok(0) => Some(answered.elapsed()),
        Ok(_) => panic!("unexpected bytes on an idle connection"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        // A reset is a close too.
        Err(_) => Some(answered.elapsed()),
    }
}

#[test]
fn idle_client_connections_are_closed_after_the_keepalive_timeout() {
    let up = Upstreams::start(1);
    let config = |timeout: Option<u64>| match timeout {
        Some(seconds) => public(up.addr(0)).server("client_keepalive_timeout_seconds", seconds),
        None => public(up.addr(0)),
    };

    let gw = Gateway::start(config(Some(1)));
    let open_for = idle_close_after(&gw, "", Duration::from_secs(20))
        .expect("an idle connection must be closed after the 1 s keep-alive timeout");
    assert!(
        open_for >= Duration::from_millis(500),
        "closed after {open_for:?}, before the keep-alive timeout"
    );
    // A client cannot ask for a longer one.
    idle_close_after(&gw, "Keep-Alive: timeout=600\r\n", Duration::from_secs(20))
        .expect("a client's Keep-Alive: timeout must not extend the gateway's");

    // The default (75 s) keeps the same connection open well past a second.
    let gw = Gateway::start(config(None));
    assert_eq!(idle_close_after(&gw, "", Duration::from_secs(3)), None);

    // 0 turns keep-alive off: the answer says so and the connection closes.
    let gw = Gateway::start(config(Some(0)));
    let resp = raw(gw.addr, "GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("answer");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
}

/// A gateway whose graceful stop would leave connections 10 s to finish: what the stop
/// closes sooner, or still answers, shows in well under that.
fn gateway_with_long_grace(up: &Upstreams) -> Gateway {
    Gateway::start(
        public(up.addr(0))
            .server("grace_period_seconds", 10)
            .server("graceful_shutdown_timeout_seconds", 10),
    )
}

#[test]
fn a_graceful_stop_closes_idle_client_connections_at_once() {
    let up = Upstreams::start(1);
    // Connections left to the grace period would stay open for its 10 s.
    let gw = gateway_with_long_grace(&up);
    // One connection between two requests, and one that never sent a byte.
    let used = TcpStream::connect(gw.addr).expect("connect");
    let mut reader = std::io::BufReader::new(used.try_clone().expect("clone"));
    (&used)
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    assert_eq!(read_response(&mut reader).expect("an answer").status, 200);
    let silent = TcpStream::connect(gw.addr).expect("connect");
    std::thread::sleep(Duration::from_millis(300));

    gw.signal("TERM");
    let stopped = std::time::Instant::now();
    for (name, mut stream) in [("kept-alive", &used), ("silent", &silent)] {
        stream
            .set_read_timeout(Some(Duration::from_secs(8)))
            .unwrap();
        match stream.read(&mut [0u8; 1]) {
            Ok(0) => {}
            Ok(_) => panic!("{name}: unexpected bytes on an idle connection"),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{name}: still open 8 s after the stop"
            ),
        }
        // Well under the 10 s grace period, with room for a loaded machine.
        assert!(
            stopped.elapsed() < Duration::from_secs(6),
            "{name}: closed only after {:?}",
            stopped.elapsed()
        );
    }
}

#[test]
fn a_first_request_just_after_a_graceful_stop_is_still_served() {
    let up = Upstreams::start(1);
    let gw = gateway_with_long_grace(&up);
    // Accepted and parked before the stop; its request is still on the way when the
    // stop begins (a client racing a graceful upgrade). It must not be dropped unanswered.
    let late = TcpStream::connect(gw.addr).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    gw.signal("TERM");
    std::thread::sleep(Duration::from_millis(100));
    (&late)
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    late.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut reader = std::io::BufReader::new(late);
    let response = read_response(&mut reader).expect("an answer, not a closed connection");
    assert_eq!(response.status, 200);
}

#[test]
fn any_client_write_buffer_size_delivers_whole_responses() {
    let up = Upstreams::start(1);
    // No buffer at all, one smaller than a response head, and one larger than the body.
    for bytes in [0, 100, 65536] {
        let gw = Gateway::start(public(up.addr(0)).server("client_write_buffer_bytes", bytes));
        for size in [1, 1460, 16384, 200_000] {
            let resp = get(gw.addr, &format!("/bytes/{size}"), &[]);
            assert_eq!(resp.status, 200, "buffer {bytes}, body {size}");
            let expected: Vec<u8> = (0..size).map(|k| (k % 256) as u8).collect();
            assert!(
                resp.body == expected,
                "buffer {bytes}: body of {size} bytes differs"
            );
        }
    }
}
