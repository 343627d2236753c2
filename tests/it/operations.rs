//! Operations: the audit plugin, the access log, log rotation, stopping and upgrades.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[test]
fn audit_lines_record_unsafe_requests_without_secrets_and_follow_rotation() {
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
            "ci",
            "--subject",
            "robot",
        ],
        dir.path(),
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let audit = dir.path().join("audit.jsonl");
    let access = dir.path().join("access.jsonl");
    // `access: user` is the default the route used to rely on, written out.
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .set("access_log", access.display().to_string())
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "keys",
                "api_key",
                json!({ "keys_file": keys.display().to_string() }),
            )
            .plugin(
                "audit",
                "audit",
                json!({ "file": audit.display().to_string() }),
            )
            .route(Route::new("app", "app", "user").plugins(&["audit", "keys"])),
    );
    let auth = format!("Authorization: Bearer {key}");
    let post = format!(
        "POST /echo/x?token=query-secret HTTP/1.1\r\nHost: t\r\n{auth}\r\nCookie: session=cookie-secret\r\nContent-Length: 11\r\nConnection: close\r\n\r\nbody-secret"
    );
    assert_eq!(raw(gw.addr, &post).unwrap().status, 200);
    assert_eq!(get(gw.addr, "/echo/read", &[&auth]).status, 200);
    let bad = "POST /echo/x HTTP/1.1\r\nHost: t\r\nX-API-Key: gw_wrong\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eq!(raw(gw.addr, bad).unwrap().status, 401);

    poll_until("two audit lines", Duration::from_secs(5), || {
        lines(&audit).len() == 2
    });
    let audited = lines(&audit);
    assert_eq!(audited[0]["method"], "POST");
    assert_eq!(audited[0]["path"], "/echo/x");
    assert_eq!(audited[0]["subject"], "robot");
    assert_eq!(audited[0]["auth"], "api_key");
    assert_eq!(audited[0]["status"], 200);
    assert_eq!(audited[0]["route"], "app");
    assert_eq!(audited[0]["upstream"], "app");
    assert_eq!(audited[0]["request_id"].as_str().unwrap().len(), 32);
    assert!(audited[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        audited[1]["status"], 401,
        "refused requests are audited too"
    );
    poll_until("three access log lines", Duration::from_secs(5), || {
        lines(&access).len() == 3
    });

    for file in [&audit, &access] {
        let text = std::fs::read_to_string(file).unwrap();
        for secret in [
            key.as_str(),
            "query-secret",
            "cookie-secret",
            "body-secret",
            "gw_wrong",
        ] {
            assert!(
                !text.contains(secret),
                "{secret} leaked into {}",
                file.display()
            );
        }
    }

    // Rotation: move the file away, signal, and new lines go to a new file.
    std::fs::rename(&audit, dir.path().join("audit.jsonl.1")).unwrap();
    gw.signal("USR1");
    poll_until(
        "the audit file to be reopened",
        Duration::from_secs(5),
        || {
            let _ = raw(gw.addr, &post);
            !lines(&audit).is_empty()
        },
    );
    // Lines queued before the reopen may still land in the rotated file; none are lost.
    assert!(lines(&dir.path().join("audit.jsonl.1")).len() >= 2);
}

/// The access log names an upstream only for requests that went to it: the gateway's
/// own 401 and 429 contacted none.
#[test]
fn access_log_lines_name_an_upstream_only_when_it_was_contacted() {
    let up = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let key = crate::identity::key_new(&keys, &["--name", "ci"]);
    let access = dir.path().join("access.jsonl");
    // `access: user` is the default the route used to rely on, written out.
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .set("access_log", access.display().to_string())
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "keys",
                "api_key",
                json!({ "keys_file": keys.display().to_string() }),
            )
            .plugin(
                "once",
                "rate_limit",
                json!({ "key": "identity", "rate": "1/h", "burst": 1 }),
            )
            .route(Route::new("app", "app", "user").plugins(&["keys", "once"])),
    );
    let auth = format!("Authorization: Bearer {key}");
    // A line is written once its response is out: each is waited for before the next
    // request, which may be served by another thread (or shard) and logged first.
    for (n, (auth, status)) in [(&auth[..], 200), ("", 401), (&auth[..], 429)]
        .into_iter()
        .enumerate()
    {
        let headers: Vec<&str> = [auth].into_iter().filter(|h| !h.is_empty()).collect();
        assert_eq!(get(gw.addr, "/echo", &headers).status, status);
        poll_until(
            "the request's access log line",
            Duration::from_secs(5),
            || lines(&access).len() == n + 1,
        );
    }
    let logged: Vec<_> = lines(&access)
        .iter()
        .map(|l| (l["status"].as_u64().unwrap(), l["upstream"].clone()))
        .collect();
    assert_eq!(
        logged,
        [
            (200, serde_json::json!("app")),
            (401, serde_json::Value::Null),
            (429, serde_json::Value::Null),
        ]
    );
}

#[test]
fn an_unwritable_audit_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("g.yaml"),
        Config::new()
            .upstream("a", Upstream::named("127.0.0.1:9"))
            .plugin(
                "audit",
                "audit",
                json!({ "file": "/nonexistent/dir/audit.jsonl" }),
            )
            .route(Route::public("r", "a").plugins(&["audit"]))
            .to_yaml(),
    )
    .unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugins.audit (type: audit)"));
}

/// Sends requests in a loop from a few threads until stopped; counts what failed.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, threads: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match raw(
                            addr,
                            "GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                        ) {
                            Ok(r) if r.status == 200 => ok += 1,
                            Ok(r) => failures.push(format!("status {}", r.status)),
                            Err(e) => failures.push(e.to_string()),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the load; returns the number of successes and every failure.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().map(|t| t.join().unwrap()).fold(
            (0, Vec::new()),
            |(n, mut f), (ok, fails)| {
                f.extend(fails);
                (n + ok, f)
            },
        )
    }
}

#[test]
fn twenty_reloads_under_load_fail_no_request() {
    let up = Upstreams::start(1);
    let gw = Gateway::start(public(up.addr(0)));
    let load = Load::start(gw.addr, 3);
    for generation in 2..=21 {
        // Each reload really changes the config: a new route every time.
        gw.rewrite(public(up.addr(0)).route(
            Route::public(&format!("r{generation}"), "app").path_prefix(&format!("/r{generation}")),
        ));
        gw.signal("HUP");
        poll_until("the reload", Duration::from_secs(5), || {
            get(gw.admin, "/healthz", &[]).json()["config_generation"] == generation
        });
    }
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failures during reloads, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 20, "the load ran ({ok} requests)");
}

#[test]
fn a_graceful_upgrade_fails_no_request_and_lets_streams_finish() {
    let up = Upstreams::start(1);
    // The old process exits once its stream is done, not after the grace period.
    // The socket and pid file are relative to the temp dir both processes run in.
    let old = Gateway::start(
        public(up.addr(0))
            .server("grace_period_seconds", 60)
            .server("graceful_shutdown_timeout_seconds", 10)
            .server("upgrade_sock", "upgrade.sock")
            .server("pid_file", "gw.pid"),
    );
    let addr = old.addr;
    let stream = std::thread::spawn(move || get(addr, "/sse?n=4&interval_ms=500", &[]));
    let load = Load::start(old.addr, 2);
    std::thread::sleep(Duration::from_millis(300));

    let _new = old.upgrade();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failures during the upgrade, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 10);
    let sse = stream.join().unwrap();
    assert_eq!(sse.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&sse.body).matches("data:").count(),
        4,
        "the stream finished on the old process"
    );
    assert_eq!(
        get(addr, "/echo", &[]).status,
        200,
        "the new process serves"
    );
}

/// A gateway whose graceful stop may take a minute: long enough that a stop which sat
/// out the grace period, rather than waiting for what is in flight, shows.
fn gateway_with_minute_grace(up: &Upstreams) -> Gateway {
    Gateway::start(
        public(up.addr(0))
            .server("grace_period_seconds", 60)
            .server("graceful_shutdown_timeout_seconds", 5),
    )
}

/// Opens a stream of `n` server-sent events 500 ms apart and reads its first event.
fn open_stream(addr: std::net::SocketAddr, n: u32) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "GET /sse?n={n}&interval_ms=500 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(conn);
    assert!(
        next_event(&mut reader).is_some(),
        "the stream's first event"
    );
    reader
}

/// The next `data:` line of a stream; `None` once it ends or breaks.
fn next_event(reader: &mut std::io::BufReader<std::net::TcpStream>) -> Option<String> {
    use std::io::BufRead;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line.starts_with("data:") => return Some(line),
            Ok(_) => {}
        }
    }
}

#[test]
fn an_idle_gateway_stops_soon_after_sigterm() {
    let up = Upstreams::start(1);
    let mut gw = gateway_with_minute_grace(&up);
    assert_eq!(get(gw.addr, "/echo", &[]).status, 200);
    gw.signal("TERM");
    // Nothing is in flight: well under the 60 s grace period, with room for a loaded
    // machine.
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

#[test]
fn a_stop_lets_a_stream_finish_then_exits() {
    let up = Upstreams::start(1);
    let mut gw = gateway_with_minute_grace(&up);
    let mut stream = open_stream(gw.addr, 6);
    gw.signal("TERM");
    let mut events = 1;
    while next_event(&mut stream).is_some() {
        events += 1;
        assert!(!gw.exited(), "the gateway exited with a stream in flight");
    }
    assert_eq!(events, 6, "the stream ran to its end");
    // The stream was all that was left.
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

#[test]
fn a_second_signal_during_a_stop_ends_it_at_once() {
    let up = Upstreams::start(1);
    for second in ["INT", "TERM"] {
        let mut gw = gateway_with_minute_grace(&up);
        // A stream that would outlast the grace period.
        let mut stream = open_stream(gw.addr, 1000);
        gw.signal("TERM");
        // The stop waits for the stream, which goes on.
        assert!(next_event(&mut stream).is_some());
        assert!(next_event(&mut stream).is_some());
        assert!(!gw.exited(), "the first signal waits for the stream");
        gw.signal(second);
        gw.wait_exit(Duration::from_secs(10));
        while next_event(&mut stream).is_some() {}
    }
}

#[test]
fn a_daemon_keeps_relative_paths_and_working_plugins() {
    let up = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Relative paths: resolved against the directory `run` started in, also after the fork.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        dir.path().join("g.yaml"),
        Config::new()
            .listen(addr)
            .server("pid_file", "gw.pid")
            .server("error_log", "err.log")
            .server("upgrade_sock", "up.sock")
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "audit",
                "audit",
                json!({ "file": "audit.jsonl", "methods": "all" }),
            )
            .route(Route::public("app", "app").plugins(&["audit"]))
            .to_yaml(),
    )
    .unwrap();
    let out = run_cli(&["run", "-c", "g.yaml", "--daemon"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid_file = dir.path().join("gw.pid");
    poll_until("the daemon's pid file", Duration::from_secs(10), || {
        pid_file.exists()
    });
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &self.0])
                .status();
        }
    }
    let _kill = Kill(pid);
    poll_until("the daemon to serve", Duration::from_secs(10), || {
        raw(
            addr,
            "GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .is_ok_and(|r| r.status == 200)
    });
    // The audit writer thread must exist in the daemon, not only in the parent that exited.
    poll_until(
        "an audit line written by the daemon",
        Duration::from_secs(5),
        || {
            let _ = get(addr, "/echo", &[]);
            !lines(&dir.path().join("audit.jsonl")).is_empty()
        },
    );
}

/// Reloads are built one at a time, each with a generation of its own: twenty
/// `POST /admin/reload` at once end twenty generations later, each answered with a
/// different generation.
#[test]
fn concurrent_reloads_each_get_a_generation_of_their_own() {
    const KEY: &str = "concurrent-reload-key-0123456789";
    let up = Upstreams::start(1);
    // Enough routes that a build takes a moment, as a real config does: builds that
    // overlapped would meet.
    let mut config = public(up.addr(0)).admin_key(KEY);
    for i in 0..500 {
        config =
            config.route(Route::public(&format!("r{i}"), "app").path_prefix(&format!("/r{i}")));
    }
    let gw = Gateway::start(config);
    let start = std::sync::Arc::new(std::sync::Barrier::new(20));
    let admin = gw.admin;
    let reloads: Vec<_> = (0..20)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let req = format!("POST /admin/reload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let resp = raw(admin, &req).expect("reload");
                assert_eq!(resp.status, 200, "{resp:?}");
                resp.json()["config_generation"].as_u64().expect("generation")
            })
        })
        .collect();
    let mut generations: Vec<u64> = reloads.into_iter().map(|t| t.join().unwrap()).collect();
    generations.sort_unstable();
    assert_eq!(generations, (2..=21).collect::<Vec<u64>>());
    assert_eq!(
        get(gw.admin, "/healthz", &[]).json()["config_generation"],
        21
    );
}

/// A log writer that cannot keep up drops lines rather than stall requests, and says
/// so in `gatewarden_log_lines_dropped_total`. Here the audit log is a pipe nobody
/// reads: once its buffer and the one-line queue are full, every line is dropped.
#[test]
fn a_full_log_queue_is_counted() {
    let up = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("audit.pipe");
    let made = std::process::Command::new("mkfifo").arg(&pipe).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    // Held open (read and write, so opening does not wait), never read.
    let _held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pipe)
        .unwrap();
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "audit",
                "audit",
                json!({ "file": pipe.display().to_string(), "methods": "all", "queue": 1 }),
            )
            .route(Route::public("app", "app").plugins(&["audit"])),
    );
    let dropped = |gw: &Gateway| {
        let text = String::from_utf8_lossy(&get(gw.admin, "/metrics", &[]).body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("gatewarden_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(dropped(&gw), 0.0);
    // Each audit line is some 300 bytes; a pipe buffer holds 64 KiB.
    let long_path = format!("/echo/{}", "x".repeat(1000));
    for _ in 0..400 {
        assert_eq!(get(gw.addr, &long_path, &[]).status, 200);
    }
    poll_until(
        "dropped lines to be counted",
        Duration::from_secs(10),
        || dropped(&gw) > 0.0,
    );
}

/// A loopback listener that accepts connections and never answers, counting them: a
/// JWKS endpoint or identity provider that hangs.
struct Silent {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Silent {
    fn start() -> Silent {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream);
            }
        });
        Silent { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `check` reads the config and the files it names, and nothing else: no JWKS fetch,
/// no provider discovery, however slow those endpoints would be.
#[test]
fn check_touches_no_network() {
    let jwks = Silent::start();
    let provider = Silent::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatewarden.yaml");
    let in_dir = |name: &str| dir.path().join(name).display().to_string();
    let file = Config::new()
        .listen("127.0.0.1:1".parse().unwrap())
        .set("access_log", in_dir("access.jsonl"))
        .upstream("app", Upstream::named("127.0.0.1:2"))
        .plugin("audit", "audit", json!({ "file": in_dir("audit.jsonl") }))
        .plugin(
            "sso",
            "jwt",
            json!({
                "issuer": "https://idp.example/",
                "audiences": ["app"],
                "jwks_url": format!("http://{}/jwks", jwks.addr),
                "algorithms": ["RS256"],
            }),
        )
        .plugin(
            "login",
            "oidc",
            json!({
                "issuer": format!("http://{}/", provider.addr),
                "client_id": "gateway",
                "client_secret": "a-client-secret-for-the-test",
                "secret": "a-session-secret-of-more-than-32-bytes",
            }),
        )
        .route(
            Route::new("api", "app", "user")
                .path_prefix("/api")
                .plugins(&["sso"]),
        )
        .route(Route::new("app", "app", "user").plugins(&["login", "audit"]));
    std::fs::write(&config, file.to_yaml()).unwrap();
    let out = run_cli(&["check", "-c", config.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 2 routes"));
    // Give a stray connection time to show up.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!((jwks.accepted(), provider.accepted()), (0, 0));
    // Nor does it create the log files it names, valid config or not.
    std::fs::write(&config, file.set("acess_log", "x").to_yaml()).unwrap();
    let out = run_cli(&["check", "-c", config.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for log in ["access.jsonl", "audit.jsonl"] {
        assert!(!dir.path().join(log).exists(), "check created {log}");
    }
}

/// A reload whose new `jwt` plugin fetches from a JWKS endpoint that never answers is
/// built off the request threads: requests keep being served while it waits, and the
/// reload ends (the fetch is bounded) with the new config in force.
#[test]
fn a_reload_waiting_on_a_jwks_fetch_holds_up_no_request() {
    const KEY: &str = "slow-reload-admin-key-0123456789";
    let jwks = Silent::start();
    let up = Upstreams::start(1);
    let base = public(up.addr(0)).admin_key(KEY);
    let gw = Gateway::start(&base);
    gw.rewrite(
        base.plugin(
            "sso",
            "jwt",
            json!({
                "issuer": "https://idp.example/",
                "audiences": ["app"],
                "jwks_url": format!("http://{}/jwks", jwks.addr),
                "algorithms": ["RS256"],
            }),
        )
        .route(
            Route::new("api", "app", "user")
                .path_prefix("/api")
                .plugins(&["sso"]),
        ),
    );
    let admin_addr = gw.admin;
    let reload = std::thread::spawn(move || {
        let req = format!("POST /admin/reload HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let resp = raw(admin_addr, &req).expect("reload");
        (resp, std::time::Instant::now())
    });
    poll_until(
        "the reload to ask for the keys",
        Duration::from_secs(5),
        || jwks.accepted() > 0,
    );
    // While the reload waits for the JWKS: requests are served, every one.
    let mut slowest = Duration::ZERO;
    let mut served_at = std::time::Instant::now();
    for _ in 0..50 {
        let started = std::time::Instant::now();
        assert_eq!(get(gw.addr, "/echo", &[]).status, 200);
        slowest = slowest.max(started.elapsed());
        served_at = std::time::Instant::now();
    }
    let (resp, reloaded_at) = reload.join().unwrap();
    assert!(
        served_at < reloaded_at,
        "the reload finished before the requests sent during it"
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["config_generation"], 2);
    // The keys could not be fetched: tokens are refused, never waved through.
    assert_eq!(
        get(gw.addr, "/api/x", &["Authorization: Bearer a.b.c"]).status,
        401
    );
    eprintln!("slowest of 50 requests during the reload: {slowest:?}");
}

/// A log file that cannot be opened (here: a directory by that name) passes `check`,
/// which opens nothing, but `run` refuses to serve with it.
#[test]
fn run_refuses_a_log_file_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("audit.jsonl")).unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("g.yaml"),
        Config::new()
            .listen(format!("127.0.0.1:{port}").parse().unwrap())
            .upstream("a", Upstream::named("127.0.0.1:9"))
            .plugin("audit", "audit", json!({ "file": "audit.jsonl" }))
            .route(Route::public("r", "a").plugins(&["audit"]))
            .to_yaml(),
    )
    .unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let out = run_cli(&["run", "-c", "g.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plugins.audit"),
        "{out:?}"
    );
}
