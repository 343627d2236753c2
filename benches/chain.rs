//! Micro-benchmarks of the per-request hot path: path normalisation, route lookup and
//! the request-side hooks of the plugins that ship today.
//!
//! Quick run: `cargo bench --bench chain -- --warm-up-time 1 --measurement-time 3`.
//! Results and the load run against nginx are recorded in BENCHMARKS.md.

// Test and bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use gatewarden::router::normalize;
use gatewarden_plugins::{BuildEnv, Ctx, Plugin, RequestHeader, RequestId, RequestParts, Verdict};

/// Twenty routes of the kinds a real config mixes: exact paths, prefixes, host-bound
/// routes and method-restricted ones. The request looked up below matches a prefix route
/// near the end of the specificity order, so `find` walks most of the list.
fn twenty_routes() -> String {
    let mut yaml = String::from(
        "listeners: [{ address: '127.0.0.1:18080' }]\n\
         upstreams:\n  app: { backends: ['127.0.0.1:18081'] }\n\
         routes:\n",
    );
    let routes = [
        ("health", "path: /health", ""),
        ("login", "path: /login", ""),
        ("logout", "path: /logout", ""),
        ("api-chat", "path_prefix: /api/chat", ""),
        ("api-models", "path_prefix: /api/models", ""),
        ("api-files", "path_prefix: /api/files", ""),
        ("api-users", "path_prefix: /api/users", ""),
        ("api-admin", "path_prefix: /api/admin", ""),
        ("api-v1", "path_prefix: /api/v1", ""),
        (
            "api-v1-post",
            "path_prefix: /api/v1/completions",
            "methods: [POST]",
        ),
        ("api", "path_prefix: /api", ""),
        ("static", "path_prefix: /static", ""),
        ("assets", "path_prefix: /assets", ""),
        ("ws", "path_prefix: /ws", ""),
        ("events", "path_prefix: /events", ""),
        ("docs", "path_prefix: /docs", ""),
        ("grafana", "path_prefix: /grafana", ""),
        ("hosted-a", "path_prefix: /", "hosts: [a.example.com]"),
        ("hosted-b", "path_prefix: /", "hosts: ['*.b.example.com']"),
        ("root", "path_prefix: /", ""),
    ];
    for (name, path, extra) in routes {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {extra}")
        };
        yaml.push_str(&format!(
            "  - {{ name: {name}, access: public, upstream: app, match: {{ {path}{extra} }} }}\n"
        ));
    }
    yaml
}

/// A browser-like request with ten headers, the kind the plugins see in practice.
fn browser_request() -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/api/chat/completions?stream=true", None)
        .expect("static request line");
    let headers = [
        ("Host", "chat.example.com"),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
        ),
        ("Accept", "text/event-stream"),
        ("Accept-Language", "en-GB,en;q=0.5"),
        ("Accept-Encoding", "gzip, deflate, br"),
        ("Content-Type", "application/json"),
        (
            "Authorization",
            "Bearer sk-0123456789abcdef0123456789abcdef",
        ),
        ("Cookie", "session=abcdef0123456789; theme=dark"),
        ("X-Webauth-User", "mallory"),
        ("Connection", "keep-alive"),
    ];
    for (name, value) in headers {
        req.append_header(name, value).expect("static header");
    }
    req
}

fn plugin(type_name: &str, yaml: &str) -> Arc<dyn Plugin> {
    let settings = serde_yaml_ng::from_str(yaml).expect("static settings");
    gatewarden_plugins::build(type_name, settings, &BuildEnv::default())
        .unwrap_or_else(|e| panic!("building {type_name}: {e}"))
}

fn ctx() -> Ctx {
    let ip: IpAddr = [127, 0, 0, 1].into();
    Ctx::new(ip, RequestId::from_random(0x1234_5678_9abc_def0), false)
}

/// The request side of a chain as the proxy runs it: every `on_request`, then every
/// `on_upstream_request` on the request's `http` head. Only the `Done` flow is possible
/// for these plugins.
fn run_chain(chain: &[Arc<dyn Plugin>], mut req: RequestHeader, ctx: &mut Ctx) -> RequestParts {
    for p in chain {
        match p.on_request(&mut req, ctx) {
            gatewarden_plugins::RequestFlow::Done(Verdict::Continue) => {}
            gatewarden_plugins::RequestFlow::Done(Verdict::Reply(_)) => {
                panic!("{} refused the bench request", p.type_name())
            }
            gatewarden_plugins::RequestFlow::Wait(_) => {
                panic!("{} unexpectedly waited", p.type_name())
            }
        }
    }
    let mut up = RequestParts::from(req);
    for p in chain {
        p.on_upstream_request(&mut up, ctx);
    }
    up
}

fn bench_normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalize");
    let plain = "/api/v1/chat/completions";
    let messy = "/api//v1/./chat/%63ompletions/../completions";
    assert!(matches!(
        normalize(plain),
        Ok(std::borrow::Cow::Borrowed(_))
    ));
    assert!(matches!(normalize(messy), Ok(std::borrow::Cow::Owned(_))));
    g.bench_function("plain_borrowed", |b| b.iter(|| normalize(black_box(plain))));
    g.bench_function("dot_segments_and_escapes", |b| {
        b.iter(|| normalize(black_box(messy)))
    });
    g.finish();
}

fn bench_router(c: &mut Criterion) {
    let compiled = match gatewarden::config::compile(&twenty_routes(), 1) {
        Ok(c) => c,
        Err(errors) => panic!("bench config does not compile: {errors:?}"),
    };
    let router = &compiled.snapshot.router;
    assert_eq!(router.routes().len(), 20);
    let get = http::Method::GET;
    let found = router.find("chat.example.com", "/api/chat/completions", &get);
    assert_eq!(found.map(|r| &*r.name), Some("api-chat"));
    let fallback = router.find("chat.example.com", "/index.html", &get);
    assert_eq!(fallback.map(|r| &*r.name), Some("root"));

    let mut g = c.benchmark_group("router_find_20_routes");
    g.bench_function("prefix_hit", |b| {
        b.iter(|| {
            router.find(
                black_box("chat.example.com"),
                black_box("/api/chat/completions"),
                &get,
            )
        })
    });
    g.bench_function("fallback_to_root", |b| {
        b.iter(|| {
            router.find(
                black_box("chat.example.com"),
                black_box("/index.html"),
                &get,
            )
        })
    });
    g.finish();
}

fn bench_plugins(c: &mut Criterion) {
    let headers = plugin(
        "headers",
        "request:\n  set: { X-Client-IP: '{client_ip}', X-Webauth-User: gw, X-Gateway-Request: '{request_id}' }\n  remove: [Cookie]\n",
    );
    let ip_filter = plugin(
        "ip_filter",
        "allow: [127.0.0.0/8, 10.0.0.0/8]\ndeny: [127.0.0.66/32]\n",
    );
    let request = browser_request();

    // Sanity: the hooks did what the bench claims to measure.
    let req = run_chain(
        &[headers.clone(), ip_filter.clone()],
        request.clone(),
        &mut ctx(),
    );
    assert!(req.headers.get("cookie").is_none());
    let users: Vec<_> = req.headers.get_all("x-webauth-user").iter().collect();
    assert_eq!(users, ["gw"]);
    assert_eq!(
        req.headers.get("x-client-ip").map(|v| v.as_bytes()),
        Some(&b"127.0.0.1"[..])
    );

    let mut g = c.benchmark_group("plugin_request_hooks_10_headers");
    // The per-iteration clone is setup that iter_batched leaves out of the hook cases; it
    // is measured here only to show how much of a raw loop it would have hidden.
    g.bench_function("request_header_clone", |b| {
        b.iter(|| black_box(&request).clone())
    });
    let cases: [(&str, Vec<Arc<dyn Plugin>>); 4] = [
        // What iter_batched itself costs per iteration; subtract it from the cases below.
        ("empty_chain", vec![]),
        ("ip_filter", vec![ip_filter.clone()]),
        ("headers", vec![headers.clone()]),
        ("headers+ip_filter", vec![headers, ip_filter]),
    ];
    for (name, chain) in cases {
        g.bench_function(name, |b| {
            b.iter_batched(
                || (request.clone(), ctx()),
                |(req, mut ctx)| run_chain(&chain, req, &mut ctx),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// An API key check (digest lookup among 1000 keys) and rate limits, local and in Redis.
fn bench_identity_and_limits(c: &mut Criterion) {
    use gatewarden_plugins::keys::{create_key, NewKey};
    let dir = tempfile::tempdir().expect("temp dir");
    let keys_file = dir.path().join("keys.yaml");
    let mut key = String::new();
    for i in 0..1000 {
        let new = NewKey {
            name: format!("k{i}"),
            role: gatewarden_plugins::Role::User,
            subject: None,
            expires_at: None,
        };
        key = create_key(&keys_file, new).expect("key").1;
    }
    let api_key = plugin(
        "api_key",
        &format!("keys_file: '{}'\nstrip: false\n", keys_file.display()),
    );
    let limit = plugin("rate_limit", "rate: 1000000000/s\nburst: 1000000000\n");
    let mut request = browser_request();
    request
        .insert_header("authorization", format!("Bearer {key}"))
        .expect("header");

    let mut g = c.benchmark_group("identity_and_limits");
    for (name, chain) in [
        ("api_key_1000_keys", vec![api_key.clone()]),
        ("rate_limit_local", vec![limit]),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || (request.clone(), ctx()),
                |(req, mut ctx)| {
                    let up = run_chain(&chain, req, &mut ctx);
                    (up, ctx)
                },
                BatchSize::SmallInput,
            )
        });
    }

    // A Redis limit: one script round trip to a local redis-server, when there is one.
    let port = 20999;
    let redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn();
    if let Ok(mut redis) = redis {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let handle = gatewarden_plugins::redis_store::RedisHandle::new(
            &format!("redis://127.0.0.1:{port}/0"),
            std::time::Duration::from_millis(250),
        )
        .expect("redis url");
        let env = BuildEnv {
            name: "bench".into(),
            redis: Some(Arc::new(handle)),
            ..BuildEnv::default()
        };
        let settings =
            serde_yaml_ng::from_str("rate: 1000000000/s\nburst: 1000000000\nbackend: redis\n")
                .expect("settings");
        let limit = gatewarden_plugins::build("rate_limit", settings, &env).expect("redis limit");
        g.bench_function("rate_limit_redis_round_trip", |b| {
            b.iter_batched(
                || (request.clone(), ctx()),
                |(mut req, mut ctx)| {
                    let verdict = runtime.block_on(limit.on_request(&mut req, &mut ctx).resolve());
                    assert!(matches!(verdict, Verdict::Continue));
                    (req, ctx)
                },
                BatchSize::SmallInput,
            )
        });
        let _ = redis.kill();
        let _ = redis.wait();
    } else {
        eprintln!("redis-server not found: skipping the Redis limit bench");
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_normalize,
    bench_router,
    bench_plugins,
    bench_identity_and_limits
);
criterion_main!(benches);
