//! Browser protections: the `origin` plugin (CSRF and DNS rebinding) and the `cors`
//! plugin (preflights answered by the gateway, CORS headers on every answer).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::harness::*;

/// Sends `method path` with `Host: host` and extra header lines; a body of `body` when
/// it is not empty.
fn send(addr: SocketAddr, method: &str, path: &str, host: &str, headers: &[&str]) -> RawResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if method == "POST" {
        req.push_str("Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}");
    } else {
        req.push_str("\r\n");
    }
    raw(addr, &req).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn assert_json_error(resp: &RawResponse, status: u16) {
    assert_eq!(resp.status, status, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json()["status"], status, "{resp:?}");
}

fn origin_config(backend: SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(backend))
        .plugin("same_origin", "origin", json!({}))
        .plugin(
            "pinned",
            "origin",
            json!({ "allowed_hosts": ["localhost", "127.0.0.1"] }),
        )
        .route(Route::public("app", "app").plugins(&["same_origin"]))
        .route(
            Route::public("pinned", "app")
                .path_prefix("/pinned")
                .plugins(&["pinned"]),
        )
}

#[test]
fn origin_answers_421_to_a_host_name_outside_the_allowlist() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start(origin_config(up.addr));
    let port = gw.addr.port();
    // A DNS-rebinding page reaches 127.0.0.1 under its own name.
    let rebound = send(
        gw.addr,
        "GET",
        "/pinned/x",
        &format!("rebind.evil.example:{port}"),
        &[],
    );
    assert_json_error(&rebound, 421);
    let rebound_post = send(
        gw.addr,
        "POST",
        "/pinned/x",
        "rebind.evil.example",
        &[&format!("Origin: http://rebind.evil.example:{port}")],
    );
    assert_json_error(&rebound_post, 421);
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    for host in [
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        "127.0.0.1".into(),
    ] {
        let resp = send(gw.addr, "GET", "/pinned/x", &host, &[]);
        assert_eq!(resp.status, 200, "{host}: {resp:?}");
    }
    assert_eq!(up.requests().len(), 3);
}

#[test]
fn origin_refuses_cross_site_writes_and_lets_same_origin_and_non_browsers_through() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start(origin_config(up.addr));
    let host = gw.addr.to_string();
    let own = format!("Origin: http://{host}");
    let wrong_scheme = format!("Origin: https://{host}");
    for (what, headers) in [
        ("a foreign Origin", vec!["Origin: http://evil.example"]),
        ("Origin: null", vec!["Origin: null"]),
        (
            "the right host over the wrong scheme",
            vec![wrong_scheme.as_str()],
        ),
        (
            "Sec-Fetch-Site: cross-site",
            vec!["Sec-Fetch-Site: cross-site"],
        ),
    ] {
        let resp = send(gw.addr, "POST", "/api/chat", &host, &headers);
        assert_eq!(resp.status, 403, "{what}: {resp:?}");
        assert_json_error(&resp, 403);
    }
    for method in ["PUT", "PATCH", "DELETE"] {
        let resp = send(
            gw.addr,
            method,
            "/x",
            &host,
            &["Origin: https://evil.example"],
        );
        assert_eq!(resp.status, 403, "{method}");
    }
    assert!(
        up.requests().is_empty(),
        "refused writes reached the upstream: {:?}",
        up.requests()
    );

    let same_origin = send(
        gw.addr,
        "POST",
        "/api/chat",
        &host,
        &[own.as_str(), "Sec-Fetch-Site: same-origin"],
    );
    assert_eq!(same_origin.status, 200, "{same_origin:?}");
    let curl = send(
        gw.addr,
        "POST",
        "/api/chat",
        &host,
        &["User-Agent: curl/8.5.0"],
    );
    assert_eq!(curl.status, 200, "{curl:?}");
    // Reads are not writes: a cross-origin GET (an <img>, a link) still works.
    let read = send(
        gw.addr,
        "GET",
        "/page",
        &host,
        &["Origin: http://evil.example"],
    );
    assert_eq!(read.status, 200, "{read:?}");
    let seen = up.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].request_line.starts_with("POST /api/chat"));
    assert_eq!(seen[0].body, b"{}");
}

#[test]
fn origin_refuses_a_websocket_from_a_foreign_page_and_accepts_its_own() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start(origin_config(ups.addr(0)));
    let request = |origin: &str| {
        let mut req = format!("ws://{}/ws", gw.addr)
            .into_client_request()
            .expect("ws request");
        req.headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).expect("origin"));
        req
    };
    ups.runtime.block_on(async {
        let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
        match within(tokio_tungstenite::connect_async(request(
            "http://evil.example",
        )))
        .await
        .expect("handshake answered in time")
        {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
            Err(e) => panic!("expected 403, got {e}"),
            Ok(_) => panic!("a foreign page opened a WebSocket"),
        }
        let own = format!("http://{}", gw.addr);
        let (mut ws, _) = ws_connect(request(&own)).await;
        ws.send(Message::text("same origin")).await.expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("frame");
        assert_eq!(echo, Message::text("same origin"));
    });
}

const ADMIN_KEY: &str = "browser-safety-admin-key-0123456789";
const APP: &str = "http://app.example";

/// An API that needs a key, with `cors` after the identity plugin: preflights must
/// still be answered without one.
fn cors_config(backend: SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .upstream("api", Upstream::to(backend))
        .plugin("keys", "api_key", json!({ "admin_key": ADMIN_KEY }))
        .plugin(
            "app_cors",
            "cors",
            json!({
                "allowed_origins": [APP],
                "allowed_methods": ["GET", "POST"],
                "allowed_headers": ["Authorization", "Content-Type"],
                "expose_headers": ["X-Request-Id"],
                "allow_credentials": true,
                "max_age": "10m",
            }),
        )
        .route(Route::new("api", "api", "user").plugins(&["keys", "app_cors"]))
}

#[test]
fn cors_preflights_are_answered_by_the_gateway_without_credentials() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start(cors_config(up.addr));
    let host = gw.addr.to_string();
    let preflight = |origin: &str| {
        send(
            gw.addr,
            "OPTIONS",
            "/v1/chat/completions",
            &host,
            &[
                &format!("Origin: {origin}"),
                "Access-Control-Request-Method: POST",
                "Access-Control-Request-Headers: authorization, content-type",
            ],
        )
    };
    let ok = preflight(APP);
    assert_eq!(ok.status, 204, "{ok:?}");
    assert!(ok.body.is_empty());
    assert_eq!(ok.header("access-control-allow-origin"), Some(APP));
    assert_eq!(ok.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(
        ok.header("access-control-allow-headers"),
        Some("Authorization, Content-Type")
    );
    assert_eq!(ok.header("access-control-max-age"), Some("600"));
    assert_eq!(ok.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(ok.header("vary"), Some("Origin"));

    let refused = preflight("http://evil.example");
    assert_json_error(&refused, 403);
    assert_eq!(refused.header("access-control-allow-origin"), None);
    assert_eq!(refused.header("access-control-allow-credentials"), None);

    // An OPTIONS that is not a preflight is an ordinary request: it needs a key.
    let plain = send(gw.addr, "OPTIONS", "/v1/models", &host, &[]);
    assert_json_error(&plain, 401);
    assert!(
        up.requests().is_empty(),
        "the upstream saw an OPTIONS: {:?}",
        up.requests()
    );
}

#[test]
fn cors_headers_go_on_answers_to_allowed_origins_only() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start(cors_config(up.addr));
    let host = gw.addr.to_string();
    let bearer = format!("Authorization: Bearer {ADMIN_KEY}");
    let vary_has_origin = |resp: &RawResponse| {
        resp.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("vary"))
            .any(|(_, v)| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("origin"))
            })
    };

    let allowed = send(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &host,
        &[&format!("Origin: {APP}"), &bearer],
    );
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(allowed.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        allowed.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        allowed.header("access-control-expose-headers"),
        Some("X-Request-Id")
    );
    assert!(vary_has_origin(&allowed), "{allowed:?}");

    let foreign = send(
        gw.addr,
        "GET",
        "/v1/models",
        &host,
        &["Origin: http://evil.example", &bearer],
    );
    assert_eq!(foreign.status, 200, "{foreign:?}");
    assert_eq!(foreign.header("access-control-allow-origin"), None);
    assert_eq!(foreign.header("access-control-allow-credentials"), None);
    assert!(vary_has_origin(&foreign), "{foreign:?}");

    // The page must be able to read why it was refused.
    let no_key = send(
        gw.addr,
        "GET",
        "/v1/models",
        &host,
        &[&format!("Origin: {APP}")],
    );
    assert_json_error(&no_key, 401);
    assert_eq!(no_key.header("access-control-allow-origin"), Some(APP));
    assert!(vary_has_origin(&no_key), "{no_key:?}");

    assert_eq!(up.requests().len(), 2, "{:?}", up.requests());
}
