//! Routing: most specific route wins, `strip_prefix`, path normalisation shared by
//! matching and the upstream, hostile paths, and the fail-closed access check.

use std::collections::HashMap;

use serde_json::json;

use crate::harness::*;

/// Sends `method path` with `host` and returns which upstream (by name) answered, or
/// `"gateway <status>"` when the gateway answered itself.
fn who_answers(
    gw: &Gateway,
    names: &HashMap<u16, &'static str>,
    method: &str,
    host: &str,
    path: &str,
) -> String {
    let body = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{body}Connection: close\r\n\r\n");
    let resp = raw(gw.addr, &req).unwrap_or_else(|e| panic!("{method} {host}{path}: {e}"));
    match resp
        .header("x-demo-upstream")
        .and_then(|p| p.parse::<u16>().ok())
    {
        Some(port) => names.get(&port).unwrap_or(&"unknown upstream").to_string(),
        None => format!("gateway {}", resp.status),
    }
}

fn assert_gateway_error(resp: &RawResponse, status: u16, context: &str) {
    assert_eq!(resp.status, status, "{context}: {resp:?}");
    assert!(
        resp.header("x-demo-upstream").is_none(),
        "{context}: an upstream answered: {resp:?}"
    );
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{context}"
    );
    let body = resp.json();
    assert_eq!(body["status"], status, "{context}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{context}: {body}"
    );
}

#[test]
fn the_most_specific_route_wins() {
    let ups = Upstreams::start(6);
    let names: HashMap<u16, &str> = ["root", "api", "apiv1", "status", "tenant", "reader"]
        .into_iter()
        .enumerate()
        .map(|(i, n)| (ups.addr(i).port(), n))
        .collect();
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .upstream("root", Upstream::to(ups.addr(0)))
            .upstream("api", Upstream::to(ups.addr(1)))
            .upstream("apiv1", Upstream::to(ups.addr(2)))
            .upstream("status", Upstream::to(ups.addr(3)))
            .upstream("tenant", Upstream::to(ups.addr(4)))
            .upstream("reader", Upstream::to(ups.addr(5)))
            .route(Route::public("root", "root"))
            .route(Route::public("api", "api").path_prefix("/api"))
            .route(Route::public("apiv1", "apiv1").path_prefix("/api/v1/"))
            // An exact `path` has no builder method: the whole `match:` is given.
            .route(
                Route::public("status", "status")
                    .with("match", json!({ "path": "/api/v1/status" })),
            )
            .route(
                Route::public("tenant", "tenant")
                    .hosts(&["*.example.com", "Chat.Example.org"])
                    .path_prefix("/api/v1"),
            )
            .route(Route::public("reader", "reader").with(
                "match",
                json!({ "path": "/api/v1/read", "methods": ["GET"] }),
            )),
        &[],
    );
    let cases: &[(&str, &str, &str, &str)] = &[
        // exact path over any prefix
        ("GET", "localhost", "/api/v1/status", "status"),
        ("GET", "localhost", "/api/v1/status/more", "apiv1"),
        // longer prefix over shorter, on whole segments only
        ("GET", "localhost", "/api/v1/models", "apiv1"),
        ("GET", "localhost", "/api/v1", "apiv1"),
        ("GET", "localhost", "/api/v10", "api"),
        ("GET", "localhost", "/api/v2/models", "api"),
        ("GET", "localhost", "/api", "api"),
        ("GET", "localhost", "/apix", "root"),
        ("GET", "localhost", "/", "root"),
        // a route naming hosts over one without: wildcard, port, any case
        ("GET", "a.example.com", "/api/v1/models", "tenant"),
        ("GET", "A.Example.COM:8443", "/api/v1/models", "tenant"),
        ("GET", "deep.sub.example.com", "/api/v1", "tenant"),
        ("GET", "chat.example.ORG", "/api/v1/models", "tenant"),
        // the wildcard needs a subdomain, and must be a suffix on a label boundary
        ("GET", "example.com", "/api/v1/models", "apiv1"),
        ("GET", "badexample.com", "/api/v1/models", "apiv1"),
        ("GET", "a.example.com.evil.net", "/api/v1/models", "apiv1"),
        // the host route only covers its own path
        ("GET", "a.example.com", "/api/v2", "api"),
        // methods narrow: a POST falls through to the next most specific route
        ("GET", "localhost", "/api/v1/read", "reader"),
        ("POST", "localhost", "/api/v1/read", "apiv1"),
    ];
    let mut wrong = Vec::new();
    for &(method, host, path, expected) in cases {
        let got = who_answers(&gw, &names, method, host, path);
        if got != expected {
            wrong.push(format!(
                "{method} {host}{path}: expected {expected}, got {got}"
            ));
        }
    }
    assert!(wrong.is_empty(), "misrouted:\n{}", wrong.join("\n"));
}

#[test]
fn no_matching_route_is_a_json_404() {
    let ups = Upstreams::start(1);
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(ups.addr(0)))
            .route(Route::public("api", "app").path_prefix("/api"))
            .route(Route::public("reader", "app").with(
                "match",
                json!({ "path": "/read", "methods": ["GET", "HEAD"] }),
            ))
            .route(Route::public("host", "app").hosts(&["app.example.com"])),
        &[],
    );
    // Each route answers (the demo upstream's own 404s still carry its marker)...
    assert_eq!(served_by(&get(gw.addr, "/api/x", &[])), ups.addr(0).port());
    assert_eq!(served_by(&get(gw.addr, "/read", &[])), ups.addr(0).port());
    let host_req = "GET /echo HTTP/1.1\r\nHost: App.Example.com\r\nConnection: close\r\n\r\n";
    assert_eq!(
        served_by(&raw(gw.addr, host_req).unwrap()),
        ups.addr(0).port()
    );

    // ...and everything else is the gateway's JSON 404.
    assert_gateway_error(&get(gw.addr, "/other", &[]), 404, "GET /other");
    assert_gateway_error(&get(gw.addr, "/apiary", &[]), 404, "GET /apiary");
    // The Host header of `get` is localhost, not the host route's name.
    assert_gateway_error(
        &get(gw.addr, "/echo", &[]),
        404,
        "GET /echo without the host",
    );
    let post = raw(
        gw.addr,
        "POST /read HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_gateway_error(&post, 404, "POST to a GET-only route");
}

#[test]
fn strip_prefix_removes_the_prefix_and_keeps_the_query() {
    let up = RecordingUpstream::start();
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .upstream("llm", Upstream::to(up.addr))
            .route(
                Route::public("llm", "llm")
                    .path_prefix("/api/llm/")
                    .with("strip_prefix", "/api/llm"),
            ),
        &[],
    );
    // The recording upstream answers with the request-target it received.
    let cases = [
        ("/api/llm/v1/x?q=1", "/v1/x?q=1"),
        ("/api/llm/v1/chat/completions", "/v1/chat/completions"),
        ("/api/llm", "/"),
        ("/api/llm/", "/"),
        ("/api/llm?stream=true", "/?stream=true"),
        ("/api/llm//v1/./models/../x?a=%2F", "/v1/x?a=%2F"),
    ];
    for (sent, expected) in cases {
        let resp = get(gw.addr, sent, &[]);
        assert_eq!(resp.status, 200, "{sent}: {resp:?}");
        assert_eq!(String::from_utf8_lossy(&resp.body), expected, "{sent}");
    }
    // Not under the prefix on a segment boundary: no route, and nothing stripped.
    assert_gateway_error(&get(gw.addr, "/api/llmx/v1", &[]), 404, "/api/llmx/v1");
    let targets: Vec<String> = up
        .requests()
        .iter()
        .map(|r| r.target().to_string())
        .collect();
    let expected: Vec<&str> = cases.iter().map(|(_, e)| *e).collect();
    assert_eq!(targets, expected);
}

/// An `admin` route on one upstream and a catch-all `public` route on another: a hostile
/// path must reach the admin upstream (with the normalised path) or be refused.
#[test]
fn hostile_paths_reach_the_strict_route_or_are_refused() {
    let admin = RecordingUpstream::start();
    let public = RecordingUpstream::start();
    let gw = Gateway::start_with(
        Config::new()
            .with_admin()
            .upstream("admin", Upstream::to(admin.addr))
            .upstream("public", Upstream::to(public.addr))
            .route(Route::public("admin", "admin").path_prefix("/admin"))
            .route(Route::public("public", "public").path_prefix("/")),
        &[],
    );
    let send = |target: &[u8]| {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        raw_bytes(gw.addr, &req)
    };

    let refused: &[&[u8]] = &[
        b"/%2e%2e/admin",
        b"/%2E%2E/admin",
        b"/..",
        b"/public/../../admin",
        b"/public/..;/admin",
        b"/public/.;x/admin",
        b"/admin%00",
        b"/public%00/../admin",
        b"/public%01",
        b"/public%1f",
        b"/public%7F",
        b"/public%2F..%2Fadmin",
        b"/public%2f..%2fadmin",
        b"/public%5C..%5Cadmin",
        b"/public%5c..%5cadmin",
        b"/public\\..\\admin",
        b"/admin\\x",
        b"/bad%zz",
        b"/public\x01x",
        b"/public\x7f",
    ];
    for target in refused {
        let shown = String::from_utf8_lossy(target);
        match send(target) {
            Ok(resp) => assert_gateway_error(&resp, 400, &shown),
            Err(e) => panic!("{shown}: no answer from the gateway ({e}); expected 400"),
        }
    }
    assert_eq!(
        admin.connections(),
        0,
        "a refused path reached the admin upstream: {:?}",
        admin.requests()
    );
    assert_eq!(
        public.connections(),
        0,
        "a refused path reached the public upstream: {:?}",
        public.requests()
    );

    let to_admin: &[(&str, &str)] = &[
        ("/public/../admin", "/admin"),
        ("/x/%2e%2e/admin", "/admin"),
        ("/x/%2E%2e/admin/", "/admin/"),
        ("//admin", "/admin"),
        ("///admin//users", "/admin/users"),
        ("/./admin", "/admin"),
        ("/%61dmin/keys", "/admin/keys"),
        ("/public/./../admin?x=1", "/admin?x=1"),
        // absolute-form: the path inside the URL is normalised just the same
        ("http://localhost/public/../admin", "/admin"),
    ];
    for (sent, expected) in to_admin {
        let resp = send(sent.as_bytes()).unwrap_or_else(|e| panic!("{sent}: {e}"));
        assert_eq!(resp.status, 200, "{sent}: {resp:?}");
        assert_eq!(
            served_by(&resp),
            admin.addr.port(),
            "{sent} reached the public route"
        );
        assert_eq!(
            String::from_utf8_lossy(&resp.body),
            *expected,
            "{sent}: the upstream saw another path"
        );
    }
    assert_eq!(public.connections(), 0, "{:?}", public.requests());

    // The path the upstream receives is the one the gateway matched on.
    let to_public: &[(&str, &str)] = &[
        ("/a/./b//c", "/a/b/c"),
        ("/a/./b//c/?q=%2F..", "/a/b/c/?q=%2F.."),
        ("/admin/../public", "/public"),
        ("/administrator", "/administrator"),
        ("/%7Euser/%41%62c", "/~user/Abc"),
        ("/caf%c3%a9/a%20b", "/caf%C3%A9/a%20b"),
    ];
    for (sent, expected) in to_public {
        let resp = send(sent.as_bytes()).unwrap_or_else(|e| panic!("{sent}: {e}"));
        assert_eq!(resp.status, 200, "{sent}: {resp:?}");
        assert_eq!(served_by(&resp), public.addr.port(), "{sent}");
        assert_eq!(String::from_utf8_lossy(&resp.body), *expected, "{sent}");
    }
}

const NO_IDENTITY: &str = "listeners: [{ address: '127.0.0.1:LISTEN' }]
upstreams:
  app: { backends: ['127.0.0.1:9'] }
plugins:
  stamp: { type: headers, request: { set: { X-From-Gateway: '1' } } }
routes:
  - name: open
    access: public
    upstream: app
  - name: private
    match: { path_prefix: /private }
    access: user
    upstream: app
    plugins: [stamp]
  - name: implicit
    match: { path_prefix: /implicit }
    upstream: app
";

#[test]
fn a_protected_route_without_an_identity_plugin_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("g.yaml"),
        NO_IDENTITY.replace("LISTEN", &port.to_string()),
    )
    .unwrap();

    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "check: {stderr}");
    // `access: user` is on line 12; the route relying on the default `user` is reported too.
    assert!(stderr.contains("routes[1].access (line 12)"), "{stderr}");
    assert!(stderr.contains("routes[2].access"), "{stderr}");
    assert!(!stderr.contains("routes[0]"), "{stderr}");

    let out = run_cli(&["run", "-c", "g.yaml"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "run: {stderr}");
    assert!(stderr.contains("routes[1].access"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("listening"), "{stdout}");
}
