//! Traffic control: local and Redis-shared rate limits, concurrency caps, reloads.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// A redis-server for one test: the set-up script installs it, so a missing one fails.
fn redis() -> Redis {
    Redis::start().expect("redis-server must be installed (scripts/setup.sh installs it)")
}

fn redis_binary() -> std::path::PathBuf {
    tool(&["redis-server"]).expect("redis-server")
}

/// One public route `app` whose chain is the plugin `limit` of type `type_name`.
fn limited_config(backend: SocketAddr, type_name: &str, settings: Value) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(backend))
        .plugin("limit", type_name, settings)
        .route(Route::public("app", "app").plugins(&["limit"]))
}

/// The `redis:` section for a Redis on `port`.
fn redis_at(port: u16) -> Value {
    json!({ "url": format!("redis://127.0.0.1:{port}/0") })
}

fn metric(gw: &Gateway, name_and_labels: &str) -> Option<f64> {
    let text = String::from_utf8(get(gw.admin, "/metrics", &[]).body).unwrap();
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_local_limit_answers_429_with_headers_after_the_burst() {
    let up = Upstreams::start(1);
    let gw = Gateway::start(limited_config(
        up.addr(0),
        "rate_limit",
        json!({ "rate": "3/min", "burst": 3 }),
    ));
    for remaining in [2, 1, 0] {
        let r = get(gw.addr, "/echo", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-limit"), Some("3"));
        assert_eq!(
            r.header("ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert!(r
            .header("ratelimit-reset")
            .is_some_and(|s| s.parse::<u64>().unwrap() <= 60));
    }
    let r = get(gw.addr, "/echo", &[]);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["status"], 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    poll_until("the rate-limited metric", Duration::from_secs(5), || {
        metric(
            &gw,
            "gatewarden_rate_limited_total{plugin=\"limit\",route=\"app\"}",
        ) == Some(1.0)
    });
}

#[test]
fn a_global_per_ip_limit_acts_before_authentication() {
    let up = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let out = run_cli(
        &[
            "key",
            "new",
            "--file",
            keys.to_str().unwrap(),
            "--name",
            "k",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "per_ip",
                "rate_limit",
                json!({ "rate": "2/min", "burst": 2 }),
            )
            .plugin("keys", "api_key", json!({ "keys_file": keys }))
            .set("global_plugins", json!(["per_ip"]))
            .route(Route::new("app", "app", "user").plugins(&["keys"])),
    );
    let guess = "Authorization: Bearer gw_0000000000000000000000000000000000000000000";
    assert_eq!(get(gw.addr, "/echo", &[guess]).status, 401);
    assert_eq!(get(gw.addr, "/echo", &[guess]).status, 401);
    // The third guess never reaches the key check.
    assert_eq!(get(gw.addr, "/echo", &[guess]).status, 429);
}

#[test]
fn two_gateways_share_one_limit_through_redis() {
    let redis = redis();
    let up = Upstreams::start(1);
    let config = limited_config(
        up.addr(0),
        "rate_limit",
        json!({ "rate": "10/min", "burst": 10, "backend": "redis" }),
    )
    .set("redis", redis_at(redis.port));
    let a = Gateway::start(&config);
    let b = Gateway::start(&config);
    let mut admitted = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        match get(gw.addr, "/echo", &[]).status {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // 10 per minute refills one every 6 s: this loop cannot earn more than one extra.
    assert!(
        (10..=11).contains(&admitted),
        "admitted {admitted} across two gateways"
    );
}

#[test]
fn redis_outages_follow_on_backend_error_and_limiting_resumes() {
    let mut redis = redis();
    let port = redis.port;
    let up = Upstreams::start(1);
    let allow = Gateway::start(
        limited_config(
            up.addr(0),
            "rate_limit",
            json!({
                "rate": "2/min",
                "burst": 2,
                "backend": "redis",
                "on_backend_error": "allow",
            }),
        )
        .set("redis", redis_at(port)),
    );
    let deny = Gateway::start(
        limited_config(
            up.addr(0),
            "rate_limit",
            json!({
                "key": "route",
                "rate": "100/min",
                "burst": 100,
                "backend": "redis",
                "on_backend_error": "deny",
            }),
        )
        .set("redis", redis_at(port)),
    );
    assert_eq!(get(deny.addr, "/echo", &[]).status, 200);
    redis.kill();
    for _ in 0..4 {
        assert_eq!(
            get(allow.addr, "/echo", &[]).status,
            200,
            "allow lets requests through while Redis is down"
        );
    }
    let r = get(deny.addr, "/echo", &[]);
    assert_eq!(r.status, 503, "deny refuses while Redis is down");
    assert!(metric(&allow, "gatewarden_redis_errors_total").unwrap_or(0.0) >= 1.0);

    let _redis = Redis::start_on(&redis_binary(), port);
    // The gateway reconnects by itself; then the limit applies again.
    poll_until(
        "limiting to resume after Redis returns",
        Duration::from_secs(15),
        || get(allow.addr, "/echo", &[]).status == 429,
    );
    // Each gateway finds Redis back on its own schedule: the other one may still be
    // waiting to try it again.
    poll_until(
        "deny to serve again after Redis returns",
        Duration::from_secs(15),
        || get(deny.addr, "/echo", &[]).status == 200,
    );
}

#[test]
fn max_in_flight_counts_open_streams_and_frees_the_slot_at_the_end() {
    let up = Upstreams::start(1);
    let gw = Gateway::start(limited_config(
        up.addr(0),
        "rate_limit",
        json!({ "max_in_flight": 1 }),
    ));
    let addr = gw.addr;
    use std::io::{BufRead, BufReader, Read, Write};
    let mut sse = std::net::TcpStream::connect(addr).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sse.write_all(b"GET /sse?n=3&interval_ms=400 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(sse);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    // Read until the first event: the stream is open and holds its slot.
    while !line.starts_with("data:") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    assert_eq!(get(addr, "/echo", &[]).status, 429);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(
        rest.matches("data:").count(),
        2,
        "the stream ran to its end"
    );
    poll_until("the slot to be released", Duration::from_secs(5), || {
        get(addr, "/echo", &[]).status == 200
    });
}

#[test]
fn limiter_state_survives_a_reload_that_keeps_its_settings() {
    let up = Upstreams::start(1);
    let limited = |burst: u32| {
        limited_config(
            up.addr(0),
            "rate_limit",
            json!({ "rate": "2/min", "burst": burst }),
        )
    };
    let gw = Gateway::start(limited(2));
    for _ in 0..2 {
        assert_eq!(get(gw.addr, "/echo", &[]).status, 200);
    }
    assert_eq!(get(gw.addr, "/echo", &[]).status, 429);
    // Same plugin settings, another route: the counters carry over.
    let other = Route::public("other", "app").path_prefix("/other");
    gw.rewrite(limited(2).route(other.clone()));
    gw.signal("HUP");
    poll_until("generation 2", Duration::from_secs(5), || {
        get(gw.addr, "/healthz", &[]).json()["config_generation"] == 2
    });
    assert_eq!(get(gw.addr, "/echo", &[]).status, 429);
    // New settings: a new limiter.
    gw.rewrite(limited(5).route(other));
    gw.signal("HUP");
    poll_until("generation 3", Duration::from_secs(5), || {
        get(gw.addr, "/healthz", &[]).json()["config_generation"] == 3
    });
    assert_eq!(get(gw.addr, "/echo", &[]).status, 200);
}

/// An OpenAI-style upstream: `/json` answers a completion with usage, `/sse` streams
/// chunks whose last one carries usage. Each answer costs `tokens`.
fn llm_upstream(tokens: u64) -> SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let sse = line.contains("/sse");
                let probe = line.contains("/probe");
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut out = stream;
                if probe {
                    // Costs nothing: tells whether the budget lets a caller start.
                    let _ = out.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
                } else if sse {
                    let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n");
                    let _ = out
                        .write_all(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
                    let _ = out.write_all(format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"total_tokens\":{tokens}}}}}\n\ndata: [DONE]\n\n").as_bytes());
                } else {
                    let body = format!("{{\"id\":\"c\",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":{tokens}}}}}");
                    let _ = out.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes());
                }
            });
        }
    });
    addr
}

fn budget_config(upstream: SocketAddr, backend: &str) -> Config {
    limited_config(
        upstream,
        "llm_budget",
        json!({ "key": "header:X-User", "tokens_per_minute": 100, "backend": backend }),
    )
}

#[test]
fn a_token_budget_is_spent_by_plain_and_streamed_completions() {
    let gw = Gateway::start(budget_config(llm_upstream(60), "local"));
    for path in ["/json", "/sse"] {
        let user = format!("X-User: {path}");
        // 60 tokens: under budget; 120: spent; then the caller waits for the window.
        assert_eq!(get(gw.addr, path, &[&user]).status, 200);
        assert_eq!(get(gw.addr, path, &[&user]).status, 200);
        // The charge lands when the response has ended: probe (free) until it has.
        poll_until("the budget to be spent", Duration::from_secs(5), || {
            get(gw.addr, "/probe", &[&user]).status == 429
        });
        let r = get(gw.addr, path, &[&user]);
        assert_eq!(r.status, 429, "{path}");
        assert!(r.header("retry-after").is_some());
        // Another caller has a budget of its own.
        assert_eq!(get(gw.addr, path, &["X-User: someone-else"]).status, 200);
    }
}

#[test]
fn a_token_budget_in_redis_is_shared_by_replicas() {
    let redis = redis();
    let up = llm_upstream(60);
    let config = budget_config(up, "redis").set("redis", redis_at(redis.port));
    let a = Gateway::start(&config);
    let b = Gateway::start(&config);
    // Charges happen after each response, in the background: read Redis to know when.
    let tat = || -> u64 {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "--raw", "eval", "local k = redis.call('KEYS', 'gw:llm:*')[1]; if k then return redis.call('GET', k) end return '0'", "0"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    assert_eq!(get(a.addr, "/json", &["X-User: u"]).status, 200);
    poll_until(
        "the first charge to reach Redis",
        Duration::from_secs(5),
        || tat() > 0,
    );
    let after_first = tat();
    assert_eq!(
        get(b.addr, "/json", &["X-User: u"]).status,
        200,
        "60 of 100 tokens spent"
    );
    poll_until(
        "the second charge to reach Redis",
        Duration::from_secs(5),
        || tat() > after_first,
    );
    // 120 of 100 spent across the two replicas: both refuse at once.
    assert_eq!(get(a.addr, "/json", &["X-User: u"]).status, 429);
    assert_eq!(get(b.addr, "/json", &["X-User: u"]).status, 429);
}

#[test]
fn two_gateways_share_pin_lockouts_through_redis() {
    let redis = redis();
    let up = Upstreams::start(1);
    let mut hash_pin = std::process::Command::new(bin())
        .arg("hash-pin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        hash_pin.stdin.take().unwrap().write_all(b"2468\n").unwrap();
    }
    let hash = String::from_utf8(hash_pin.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let config = Config::new()
        .with_admin()
        .set("redis", redis_at(redis.port))
        .upstream("app", Upstream::to(up.addr(0)))
        .plugin(
            "pin",
            "pin_gate",
            json!({
                "pin_hash": hash,
                "secret": "a-session-secret-of-at-least-32-bytes",
                "lockout": { "max_failures": 2, "window": "1m", "ban": "1m" },
            }),
        )
        .route(Route::new("app", "app", "user").plugins(&["pin"]));
    let a = Gateway::start(&config);
    let b = Gateway::start(&config);
    let login = |gw: &Gateway, pin: &str| {
        let body = format!("pin={pin}&next=/");
        raw(
            gw.addr,
            &format!("POST /.gatewarden/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
        )
        .unwrap()
        .status
    };
    assert_eq!(login(&a, "0000"), 401);
    assert_eq!(
        login(&b, "1111"),
        429,
        "the second failure, on another replica, starts the ban"
    );
    assert_eq!(
        login(&a, "2468"),
        429,
        "the right PIN is refused during the ban on every replica"
    );
    let page = get(b.addr, "/.gatewarden/login", &[]);
    assert_eq!(page.status, 429);
    assert!(page.header("retry-after").is_some());
}
