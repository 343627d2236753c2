//! `server.shards`: several single-threaded services per listener, each on a socket of
//! its own. Every test here holds one kept-alive connection on each shard (the
//! per-shard connection counter tells which shard took a connection) and shows that
//! what the config holds is one copy for all of them: rate limits, lockouts, keys,
//! session revocations, metrics, reloads and health checks.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

use crate::harness::*;
use crate::replicas::{admin, pin_config, ADMIN_KEY};

const SHARDS: usize = 4;

/// A kept-alive client connection to a known shard.
struct Pinned {
    shard: String,
    conn: BufReader<TcpStream>,
}

impl Pinned {
    /// Sends a request (head and body as written) and reads its response; the
    /// connection stays open.
    fn send(&mut self, request: &str) -> RawResponse {
        self.conn
            .get_mut()
            .write_all(request.as_bytes())
            .unwrap_or_else(|e| panic!("shard {}: send: {e}", self.shard));
        read_response(&mut self.conn).unwrap_or_else(|e| panic!("shard {}: {e}", self.shard))
    }

    fn get(&mut self, path: &str, headers: &[&str]) -> RawResponse {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n");
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        self.send(&request)
    }
}

/// The metrics page's values of `name` by their `label`, for the proxy listener.
fn by_label(gw: &Gateway, name: &str, label: &str) -> BTreeMap<String, f64> {
    let text = String::from_utf8(get(gw.admin, "/metrics", &[]).body).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            let start = labels.find(&format!("{label}=\""))? + label.len() + 2;
            let end = start + labels[start..].find('"')?;
            Some((labels[start..end].to_string(), value.parse().ok()?))
        })
        .collect()
}

fn accepted_by_shard(gw: &Gateway) -> BTreeMap<String, f64> {
    by_label(gw, "gatewarden_client_connections_total", "shard")
}

/// One kept-alive connection on each of the gateway's [`SHARDS`] shards: connections
/// are opened until the kernel has handed one to every shard.
fn one_per_shard(gw: &Gateway) -> Vec<Pinned> {
    let mut pinned: Vec<Pinned> = Vec::new();
    for _ in 0..400 {
        if pinned.len() == SHARDS {
            pinned.sort_by(|a, b| a.shard.cmp(&b.shard));
            return pinned;
        }
        let before = accepted_by_shard(gw);
        let stream = TcpStream::connect(gw.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut conn = Pinned {
            shard: String::new(),
            conn: BufReader::new(stream),
        };
        // Answered, so accepted and counted.
        assert_eq!(conn.get("/healthz", &[]).status, 200);
        let after = accepted_by_shard(gw);
        let grew: Vec<&String> = after
            .iter()
            .filter(|(shard, n)| before.get(*shard).is_none_or(|b| b < n))
            .map(|(shard, _)| shard)
            .collect();
        // More than one grew: the connection of the harness's start-up probe was
        // counted meanwhile, and this one's shard is not known.
        if grew.len() == 1 && !pinned.iter().any(|p| &p.shard == grew[0]) {
            conn.shard = grew[0].clone();
            pinned.push(conn);
        }
    }
    panic!(
        "400 connections reached only shards {:?}",
        accepted_by_shard(gw)
    );
}

fn sharded(config: Config) -> Gateway {
    Gateway::start(config.server("shards", SHARDS as u64))
}

#[test]
fn every_shard_accepts_and_the_log_names_the_count() {
    let up = Upstreams::start(1);
    let gw = sharded(public(up.addr(0)));
    let mut pinned = one_per_shard(&gw);
    let shards: Vec<&str> = pinned.iter().map(|p| p.shard.as_str()).collect();
    assert_eq!(shards, ["0", "1", "2", "3"]);
    for p in &mut pinned {
        assert_eq!(p.get("/echo", &[]).status, 200, "shard {}", p.shard);
    }
    let output = gw.output();
    assert!(
        output.contains(&format!("listening on http://{} (4 shards)", gw.addr)),
        "{output}"
    );
}

#[test]
fn a_rate_limit_allows_exactly_its_burst_across_shards() {
    let up = Upstreams::start(1);
    let gw = sharded(
        public(up.addr(0))
            .plugin(
                "limit",
                "rate_limit",
                json!({ "rate": "5/min", "burst": 5 }),
            )
            .route(
                Route::public("limited", "app")
                    .path_prefix("/echo/limited")
                    .plugins(&["limit"]),
            ),
    );
    let mut pinned = one_per_shard(&gw);
    let mut statuses = Vec::new();
    // Round the shards three times: 12 requests against one budget of 5.
    for _ in 0..3 {
        for p in &mut pinned {
            statuses.push(p.get("/echo/limited", &[]).status);
        }
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429, 429, 429, 429, 429]
    );
}

#[test]
fn a_lockout_started_on_some_shards_holds_on_the_others() {
    let up = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.htpasswd");
    let hash = bcrypt::hash("correct horse", 5).unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let gw = sharded(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "team",
                "basic_auth",
                json!({
                    "users_file": users,
                    "lockout": { "max_failures": 3, "window": "10m", "ban": "15m" },
                }),
            )
            .route(Route::new("app", "app", "user").plugins(&["team"])),
    );
    let basic = |password: &str| {
        format!(
            "Authorization: Basic {}",
            B64.encode(format!("alice:{password}"))
        )
    };
    let mut pinned = one_per_shard(&gw);
    assert_eq!(
        pinned[3].get("/echo", &[&basic("correct horse")]).status,
        200
    );
    // One wrong password on each of three shards: the third starts the ban.
    let wrong: Vec<u16> = pinned[..3]
        .iter_mut()
        .map(|p| p.get("/echo", &[&basic("wrong")]).status)
        .collect();
    assert_eq!(wrong, [401, 401, 429]);
    // The right password on the fourth shard is refused too.
    let right = pinned[3].get("/echo", &[&basic("correct horse")]);
    assert_eq!(right.status, 429, "{right:?}");
}

#[test]
fn keys_made_and_revoked_through_the_admin_api_hold_on_every_shard() {
    let up = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    crate::identity::key_new(&keys, &["--name", "ops", "--role", "admin"]);
    let gw = sharded(
        Config::new()
            .admin_key(ADMIN_KEY)
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin("keys", "api_key", json!({ "keys_file": keys }))
            .route(Route::new("app", "app", "user").plugins(&["keys"])),
    );
    let mut pinned = one_per_shard(&gw);
    let made = admin(&gw, "POST", "/admin/keys", r#"{"name":"ci"}"#);
    assert_eq!(made.status, 201, "{made:?}");
    let key = made.json()["key"].as_str().unwrap().to_string();
    let id = made.json()["id"].as_str().unwrap().to_string();
    let bearer = format!("Authorization: Bearer {key}");
    let all_answer = |pinned: &mut Vec<Pinned>, status: u16| {
        for p in pinned.iter_mut() {
            poll_until(
                &format!("shard {} to answer {status}", p.shard),
                Duration::from_secs(5),
                || p.get("/echo", &[&bearer]).status == status,
            );
        }
    };
    all_answer(&mut pinned, 200);
    let revoked = admin(&gw, "DELETE", &format!("/admin/keys/{id}"), "");
    assert_eq!(revoked.status, 200, "{revoked:?}");
    all_answer(&mut pinned, 401);
}

#[test]
fn a_session_revoked_by_subject_ends_on_every_shard() {
    let up = Upstreams::start(1);
    let gw = sharded(pin_config(
        up.addr(0),
        json!({
            "pin_hash": crate::identity::pin_hash(),
            "secret": crate::identity::SECRET,
        }),
    ));
    let mut pinned = one_per_shard(&gw);
    let body = format!("pin={}&next=/", crate::identity::PIN);
    let login = pinned[0].send(&format!(
        "POST /.gatewarden/login HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(login.status, 303, "{login:?}");
    let cookie = format!("Cookie: {}", crate::identity::cookie_pair(&login));
    for p in &mut pinned {
        assert_eq!(p.get("/echo", &[&cookie]).status, 200, "shard {}", p.shard);
    }
    let revoked = admin(
        &gw,
        "POST",
        "/admin/sessions/revoke",
        r#"{"subject":"pin"}"#,
    );
    assert_eq!(revoked.status, 200, "{revoked:?}");
    for p in &mut pinned {
        assert_eq!(p.get("/echo", &[&cookie]).status, 401, "shard {}", p.shard);
    }
}

#[test]
fn metrics_count_each_request_once() {
    let up = Upstreams::start(1);
    let gw = sharded(public(up.addr(0)));
    let mut pinned = one_per_shard(&gw);
    for round in 0..3 {
        for p in &mut pinned {
            let r = p.get(&format!("/echo?round={round}"), &[]);
            assert_eq!(r.status, 200);
        }
    }
    // The access log and metrics run once the response is out: poll.
    poll_until("12 requests counted", Duration::from_secs(5), || {
        by_label(&gw, "gatewarden_requests_total", "route").get("app") == Some(&12.0)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        by_label(&gw, "gatewarden_requests_total", "route").get("app"),
        Some(&12.0)
    );
}

#[test]
fn a_reload_reaches_every_shard() {
    let up = Upstreams::start(1);
    let before = Config::new()
        .admin_key(ADMIN_KEY)
        .upstream("app", Upstream::to(up.addr(0)))
        .route(Route::public("a", "app").path_prefix("/echo/a"));
    let after = before
        .clone()
        .route(Route::public("b", "app").path_prefix("/echo/b"));
    let gw = sharded(before);
    let mut pinned = one_per_shard(&gw);
    for p in &mut pinned {
        assert_eq!(p.get("/echo/b", &[]).status, 404, "shard {}", p.shard);
    }
    // By signal, then through the admin API.
    gw.rewrite(after.clone().server("shards", SHARDS as u64));
    gw.signal("HUP");
    for p in &mut pinned {
        poll_until(
            &format!("shard {} to serve the new route", p.shard),
            Duration::from_secs(5),
            || p.get("/echo/b", &[]).status == 200,
        );
        assert_eq!(p.get("/healthz", &[]).json()["config_generation"], 2);
    }
    gw.rewrite(
        after
            .route(Route::public("c", "app").path_prefix("/echo/c"))
            .server("shards", SHARDS as u64),
    );
    let reloaded = admin(&gw, "POST", "/admin/reload", "");
    assert_eq!(reloaded.status, 200, "{reloaded:?}");
    for p in &mut pinned {
        assert_eq!(p.get("/echo/c", &[]).status, 200, "shard {}", p.shard);
        assert_eq!(p.get("/healthz", &[]).json()["config_generation"], 3);
    }
}

#[test]
fn health_checks_run_once_per_pool_not_once_per_shard() {
    let backend = RecordingUpstream::start();
    let gw = sharded(
        Config::new()
            .with_admin()
            .upstream(
                "app",
                Upstream::to(backend.addr).with(
                    "health_check",
                    json!({ "kind": "http", "path": "/health", "interval": "200ms" }),
                ),
            )
            .route(Route::public("app", "app")),
    );
    let checks = || {
        backend
            .requests()
            .iter()
            .filter(|r| r.target() == "/health")
            .count()
    };
    poll_until("a first health check", Duration::from_secs(10), || {
        checks() > 0
    });
    let (start, first) = (Instant::now(), checks());
    std::thread::sleep(Duration::from_secs(2));
    let (elapsed, made) = (start.elapsed(), checks() - first);
    // One check every 200 ms; one per shard would be four times that.
    let most = (elapsed.as_millis() / 200) as usize + 2;
    assert!(
        (1..=most).contains(&made),
        "{made} health checks in {elapsed:?}"
    );
    assert_eq!(get(gw.addr, "/x", &[]).status, 200);
}

#[test]
fn check_names_the_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = |shards: serde_json::Value| {
        Config::new()
            .listen("127.0.0.1:8080".parse().unwrap())
            .server("shards", shards)
            .upstream("app", Upstream::to("127.0.0.1:3000".parse().unwrap()))
            .route(Route::public("app", "app"))
            .to_yaml()
    };
    std::fs::write(dir.path().join("g.yaml"), config(json!(3))).unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("shards: 3 per listener"), "{stdout}");
    std::fs::write(dir.path().join("g.yaml"), config(json!(1))).unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("shards:"), "{stdout}");
}

/// `GATEWARDEN_TEST_SHARDS` reaches the configs the other tests build, so the CI run
/// with shards tests what it says it does.
#[test]
fn the_test_shard_setting_reaches_the_test_configs() {
    let up = Upstreams::start(1);
    let gw = Gateway::start(public(up.addr(0)));
    poll_until("the listener line", Duration::from_secs(5), || {
        gw.output().contains("listening on")
    });
    let output = gw.output();
    match crate::support::config::test_shards() {
        Some(serde_json::Value::Number(n)) if n.as_u64() > Some(1) => {
            assert!(output.contains(&format!("({n} shards)")), "{output}")
        }
        Some(serde_json::Value::Number(_)) | None => {
            assert!(!output.contains("shards)"), "{output}")
        }
        Some(auto) => assert_eq!(
            output.contains("shards)"),
            std::thread::available_parallelism().unwrap().get() > 1,
            "{auto}: {output}"
        ),
    }
}

/// The inodes of the sockets listening on `port` (IPv4), from `/proc/net/tcp`.
fn listening_sockets(port: u16) -> std::collections::BTreeSet<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let listening = fields.get(3)? == &"0A";
            (local_port == port && listening).then(|| fields.get(9)?.parse().ok())?
        })
        .collect()
}

/// A graceful upgrade hands every shard's socket to the new process: after it, the
/// same sockets listen, none bound anew, none closed.
#[test]
fn an_upgrade_hands_every_shard_socket_over() {
    let up = Upstreams::start(1);
    let old = sharded(
        public(up.addr(0))
            .server("grace_period_seconds", 10)
            .server("upgrade_sock", "upgrade.sock"),
    );
    // The gateway answers once one shard listens; the others follow moments later.
    poll_until("every shard to listen", Duration::from_secs(10), || {
        listening_sockets(old.addr.port()).len() == SHARDS
    });
    let before = listening_sockets(old.addr.port());
    assert_eq!(before.len(), SHARDS, "{before:?}");
    let new = old.upgrade();
    assert_eq!(
        listening_sockets(old.addr.port()),
        before,
        "{}",
        new.output()
    );
    assert_eq!(get(old.addr, "/echo", &[]).status, 200);
}
