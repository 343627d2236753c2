//! Faults, each with a defined outcome: upstreams that refuse, hang, reset in the
//! middle of a response head, a body or an SSE stream, or answer garbage; a keys file
//! rewritten by another process while requests are checked against it; `gatewarden key
//! new` killed with SIGKILL in the middle of a write.
//!
//! Covered by other modules and not repeated here: no live backend at all is a 502
//! (`upstreams::no_live_backend_answers_502_json`), a connect timeout a 504
//! (`upstreams::connect_timeout_answers_504_long_before_the_default`), Redis going down
//! and coming back (`traffic::redis_outages_follow_on_backend_error_and_limiting_resumes`),
//! a bad config on reload keeping the old one
//! (`proxying::reload_by_sighup_and_admin_api_keeps_the_old_config_on_errors`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;
use crate::identity::key_new;

// ---------------------------------------------------------------- a faulty upstream

/// An upstream whose behaviour is picked by the request path (see [`misbehave`]).
struct FaultyUpstream {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl FaultyUpstream {
    fn start() -> FaultyUpstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = misbehave(stream).await;
                });
            }
        });
        FaultyUpstream {
            addr,
            _runtime: runtime,
        }
    }
}

/// Ends a connection with a TCP reset rather than a clean close.
fn reset(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn misbehave(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let pause = || tokio::time::sleep(Duration::from_millis(100));
    match path.as_str() {
        "/ok" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await?;
        }
        "/hang" => tokio::time::sleep(Duration::from_secs(10)).await,
        "/close-before-head" => {}
        "/reset-before-head" => reset(stream),
        "/reset-mid-head" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-le")
                .await?;
            pause().await;
            reset(stream);
        }
        "/garbage" => {
            stream
                .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\nnot http at all\r\n\r\n")
                .await?;
        }
        "/reset-mid-body" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n")
                .await?;
            stream.write_all(&[b'x'; 1000]).await?;
            pause().await;
            reset(stream);
        }
        "/close-mid-body" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n")
                .await?;
            stream.write_all(&[b'x'; 1000]).await?;
            pause().await;
        }
        "/reset-mid-chunked" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
                .await?;
            pause().await;
            reset(stream);
        }
        "/sse-reset" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
                .await?;
            for i in 0..3 {
                let event = format!("data: event {i}\n\n");
                stream
                    .write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                    .await?;
                stream.flush().await?;
                pause().await;
            }
            reset(stream);
        }
        _ => {
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- a careful client

/// What a client got: the status (0 when no head arrived), the body bytes, whether the
/// body ended as its framing says, and the SSE events seen.
#[derive(Debug)]
struct Got {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
    complete: bool,
    took: Duration,
}

fn fetch(addr: SocketAddr, path: &str) -> Got {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let took = started.elapsed();
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Got {
            status: 0,
            content_type: None,
            body: Vec::new(),
            complete: false,
            took,
        };
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let raw = &got[end + 4..];
    let (body, complete) = if let Some(len) = field("content-length:") {
        let len: usize = len.parse().unwrap();
        (raw.to_vec(), raw.len() == len)
    } else if field("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        dechunk(raw)
    } else {
        (raw.to_vec(), true)
    };
    Got {
        status,
        content_type: field("content-type:"),
        body,
        complete,
        took,
    }
}

/// The data of a chunked body, and whether its last chunk arrived.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
            return (body, false);
        };
        if size == 0 {
            return (body, true);
        }
        let start = line_end + 2;
        if raw.len() < start + size + 2 {
            body.extend_from_slice(&raw[start.min(raw.len())..]);
            return (body, false);
        }
        body.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

// ---------------------------------------------------------------- upstream faults

#[derive(Debug)]
enum Outcome {
    /// The gateway answers this status itself, as JSON.
    Json(u16),
    /// The upstream's 200 head reaches the client, then the body stops short of its
    /// framing: the client can tell the response is incomplete.
    Truncated {
        content_type: &'static str,
        body_starts: &'static str,
    },
}

#[test]
fn upstream_faults_have_defined_outcomes_and_the_gateway_keeps_serving() {
    let faulty = FaultyUpstream::start();
    let nobody: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream(
                "faulty",
                Upstream::to(faulty.addr)
                    .with("read_timeout", "1s")
                    .with("retries", 0),
            )
            .upstream("refusing", Upstream::to(nobody).with("retries", 0))
            .route(Route::public("faulty", "faulty"))
            .route(Route::public("refusing", "refusing").path_prefix("/refused")),
    );
    assert_eq!(fetch(gw.addr, "/ok").status, 200);

    let cases: &[(&str, Outcome)] = &[
        ("/refused", Outcome::Json(502)),
        ("/hang", Outcome::Json(504)),
        ("/close-before-head", Outcome::Json(502)),
        ("/reset-before-head", Outcome::Json(502)),
        ("/reset-mid-head", Outcome::Json(502)),
        ("/garbage", Outcome::Json(502)),
        (
            "/reset-mid-body",
            Outcome::Truncated {
                content_type: "application/octet-stream",
                body_starts: "xxxxxxxxxx",
            },
        ),
        (
            "/close-mid-body",
            Outcome::Truncated {
                content_type: "application/octet-stream",
                body_starts: "xxxxxxxxxx",
            },
        ),
        (
            "/reset-mid-chunked",
            Outcome::Truncated {
                content_type: "application/json",
                body_starts: "{\"a\":",
            },
        ),
        (
            "/sse-reset",
            Outcome::Truncated {
                content_type: "text/event-stream",
                body_starts: "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n",
            },
        ),
    ];
    let mut wrong = Vec::new();
    for (path, outcome) in cases {
        let got = fetch(gw.addr, path);
        let ok = match outcome {
            Outcome::Json(status) => {
                got.status == *status
                    && got.content_type.as_deref() == Some("application/json")
                    && serde_json::from_slice::<serde_json::Value>(&got.body)
                        .is_ok_and(|v| v["status"] == *status)
            }
            Outcome::Truncated {
                content_type,
                body_starts,
            } => {
                got.status == 200
                    && got.content_type.as_deref() == Some(*content_type)
                    && !got.complete
                    && got.body.starts_with(body_starts.as_bytes())
            }
        };
        if !ok {
            wrong.push(format!(
                "{path}: expected {outcome:?}, got {} {:?} complete={} body={:?}",
                got.status,
                got.content_type,
                got.complete,
                String::from_utf8_lossy(&got.body[..got.body.len().min(120)])
            ));
        }
        // Nothing hangs: the gateway gives up within the upstream's 1 s read timeout.
        if got.took > Duration::from_secs(5) {
            wrong.push(format!("{path}: took {:?}", got.took));
        }
        // And it stays healthy: the next request is served as usual.
        let next = fetch(gw.addr, "/ok");
        if next.status != 200 || next.body != b"ok" {
            wrong.push(format!("after {path}: the next request got {next:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(fetch(gw.admin, "/healthz").status, 200);
}

// ---------------------------------------------------------------- the keys file

/// An admin listener and one `user` route to `upstream` behind the keys in `keys_file`.
fn keys_config(upstream: SocketAddr, keys_file: &Path) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(upstream))
        .plugin(
            "keys",
            "api_key",
            json!({ "keys_file": keys_file.display().to_string() }),
        )
        .route(Route::new("app", "app", "user").plugins(&["keys"]))
}

/// Sends requests with `key` on a few threads until `stop`; counts answers by status.
fn hammer(
    addr: SocketAddr,
    key: String,
    stop: Arc<AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let threads = (0..3)
        .map(|_| {
            let (key, stop, ok, refused) = (key.clone(), stop.clone(), ok.clone(), refused.clone());
            std::thread::spawn(move || {
                let header = format!("X-API-Key: {key}");
                while !stop.load(Ordering::Relaxed) {
                    match get(addr, "/echo", &[&header]).status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    (threads, ok, refused)
}

/// Rewrites `path` with `text` in place, as a careless script or editor would:
/// truncate, pause, write half, pause, write the rest.
fn rewrite_in_place(path: &Path, text: &[u8], pause: Duration) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    std::thread::sleep(pause);
    let half = text.len() / 2;
    f.write_all(&text[..half]).unwrap();
    std::thread::sleep(pause);
    f.write_all(&text[half..]).unwrap();
}

/// Rewrites `path` with `text` atomically: a temporary file, then a rename.
fn rewrite_atomically(path: &Path, text: &[u8], n: usize) {
    let tmp = path.with_extension(format!("tmp{n}"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_keys_file_rewritten_while_requests_are_checked_never_drops_a_valid_key() {
    let ups = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let key = key_new(&keys, &["--name", "steady"]);
    // Two versions of the file that both hold the steady key: the writer flips between
    // them, so the gateway sees real changes to reload.
    let one = std::fs::read(&keys).unwrap();
    key_new(&keys, &["--name", "coming-and-going"]);
    let two = std::fs::read(&keys).unwrap();
    let gw = Gateway::start(keys_config(ups.addr(0), &keys));
    assert_eq!(
        get(gw.addr, "/echo", &[&format!("X-API-Key: {key}")]).status,
        200
    );

    for (how, write) in [
        ("atomic", rewrite_atomically as fn(&Path, &[u8], usize)),
        ("in place", |p: &Path, t: &[u8], _| {
            rewrite_in_place(p, t, Duration::from_millis(2))
        }),
        // A writer stalled long enough for the watcher to read the empty file and the
        // half-written one (a loaded machine does this to the quick writer too): both
        // are refused and the previous keys stay.
        ("stalling in place", |p: &Path, t: &[u8], _| {
            rewrite_in_place(p, t, Duration::from_millis(1300))
        }),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, ok, refused) = hammer(gw.addr, key.clone(), stop.clone());
        let until = Instant::now() + Duration::from_secs(4);
        let mut n = 0;
        while Instant::now() < until {
            write(&keys, if n % 2 == 0 { &one } else { &two }, n);
            n += 1;
            std::thread::sleep(Duration::from_millis(15));
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
        assert!(ok > 50, "{how}: only {ok} requests went through");
        assert_eq!(
            refused,
            0,
            "{how} rewrites: {refused} of {} requests with a valid key were refused",
            ok + refused
        );
    }
    // The gateway still follows the file: a revocation written atomically applies.
    let out = run_cli(
        &[
            "key",
            "revoke",
            "--file",
            &keys.display().to_string(),
            &key[..9],
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    poll_until("the revocation to apply", Duration::from_secs(5), || {
        get(gw.addr, "/echo", &[&format!("X-API-Key: {key}")]).status == 401
    });
}

#[test]
fn killing_key_new_mid_write_never_leaves_a_broken_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let file = keys.display().to_string();
    key_new(&keys, &["--name", "first", "--role", "admin"]);
    let ups = Upstreams::start(1);
    let config = dir.path().join("gatewarden.yaml");
    std::fs::write(
        &config,
        keys_config(ups.addr(0), &keys)
            .listen("127.0.0.1:1".parse().unwrap())
            .admin_at("127.0.0.1:2".parse().unwrap())
            .to_yaml(),
    )
    .unwrap();
    // Kill points spread over a run's life (startup, hashing, the locked write and
    // rename); the seed varies per run, the delays are printed on failure.
    let started = Instant::now();
    key_new(&keys, &["--name", "timing"]);
    let run = started.elapsed().as_micros() as u64;
    let seed = std::process::id() as u64;
    let mut killed = 0;
    let mut finished = 0;
    for i in 0..40u64 {
        let delay = Duration::from_micros(
            (seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % (run + run / 5),
        );
        let mut child = std::process::Command::new(bin())
            .args(["key", "new", "--file", &file, "--name", &format!("k{i}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        // SIGKILL: no destructor, no cleanup, no chance to finish the write.
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        child.wait().unwrap();
        let text = std::fs::read_to_string(&keys).unwrap();
        let parsed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| {
            panic!("run {i} (killed after {delay:?}): the keys file no longer parses: {e}\n{text}")
        });
        let n = parsed["keys"].as_sequence().map_or(0, |k| k.len());
        assert!(n >= 1, "run {i}: the first key is gone:\n{text}");
    }
    assert!(
        killed > 0,
        "no run was killed mid-way ({finished} finished)"
    );
    let list = run_cli(&["key", "list", "--file", &file], dir.path());
    assert!(list.status.success(), "{list:?}");
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(listed.contains("first"), "{listed}");
    let check = run_cli(&["check", "-c", &config.display().to_string()], dir.path());
    assert!(
        check.status.success(),
        "check after the kills: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // The lock died with its holders: a new key can still be made, and shows up.
    let last = key_new(&keys, &["--name", "after-the-storm"]);
    assert!(last.starts_with("gw_"));
    let list = run_cli(&["key", "list", "--file", &file], dir.path());
    assert!(String::from_utf8_lossy(&list.stdout).contains("after-the-storm"));
    // Temporary files of killed writes stay behind (nothing runs at SIGKILL); they are
    // hidden, never read, and do not disturb later writes.
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".keys.yaml.tmp.")
            })
        })
        .count();
    eprintln!("{leftovers} temporary files left by killed writes");
    eprintln!("{killed} runs killed mid-way, {finished} finished first (a run takes {run} µs)");
}
