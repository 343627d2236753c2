//! Heap allocations per proxied request: gatewarden (no plugins, and the full chain of
//! `api_key` + `rate_limit` + `origin` + `headers` on a route that needs a user)
//! against a bare Pingora proxy that does nothing but forward, once without any timeout
//! and once with the upstream timeouts gatewarden sets by default.
//!
//! ```sh
//! cargo bench --bench allocs            # ALLOCS_REQUESTS=20000 for a longer count
//! ALLOCS_PROFILE=/tmp/allocs cargo bench --bench allocs   # also a dhat profile per proxy
//! ```
//!
//! Each proxy runs in a child process of this bench with dhat as the global allocator,
//! next to an upstream and a client that never allocate per request (blocking sockets,
//! fixed buffers). After a warm-up (pooled upstream connection, first-use caches), the
//! client sends `ALLOCS_REQUESTS` keep-alive requests one after another; the difference
//! in dhat's counters, divided by the number of requests, is what one request costs.
//! Background tasks (the keys-file watcher, timers) are counted too; they add a few
//! allocations per second, which over thousands of requests rounds to nothing.
//!
//! The parent prints one row per proxy and gatewarden's difference to both bare
//! proxies. Pingora boxes a timer each time a timed wait has to wait (twice: the timer
//! and the box around it), so a proxy that bounds its upstream reads and pooled
//! connections pays for that on every request; the second row is bare Pingora doing
//! the same, and the difference to it is what gatewarden itself allocates.

// Test and bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod support;
use support::Variant;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const TARGETS: [&str; 4] = [
    "pingora",
    "pingora-timeouts",
    "gatewarden-empty",
    "gatewarden-chain",
];
const WARMUP: u64 = 2_000;
const UPSTREAM_REPLY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";

fn main() {
    match std::env::var("ALLOCS_CHILD") {
        Ok(target) => child(&target),
        Err(_) => parent(),
    }
}

// --- the parent: one child per proxy, then the table ---------------------------------

fn parent() {
    let requests: u64 = std::env::var("ALLOCS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let key = support::new_key(dir.path());
    let exe = std::env::current_exe().expect("own path");

    println!("heap allocations per request, {requests} keep-alive requests after {WARMUP} warm-up");
    println!();
    println!("| proxy | allocations | bytes allocated | still live after the run |");
    println!("|---|---:|---:|---:|");
    let mut baseline = None;
    let mut rows = Vec::new();
    for target in TARGETS {
        let proxy = free_port();
        let upstream = free_port();
        let config = dir.path().join(format!("{target}.yaml"));
        let variant = match target {
            "gatewarden-chain" => Variant::Chain,
            _ => Variant::Public,
        };
        let upstream_addr = SocketAddr::from(([127, 0, 0, 1], upstream));
        let yaml = support::config(variant, 1, dir.path(), proxy, upstream_addr, |u| u);
        std::fs::write(&config, yaml).expect("write config");
        let out = Command::new(&exe)
            .env("ALLOCS_CHILD", target)
            .env("ALLOCS_REQUESTS", requests.to_string())
            .env("ALLOCS_PROXY", proxy.to_string())
            .env("ALLOCS_UPSTREAM", upstream.to_string())
            .env("ALLOCS_CONFIG", &config)
            .env("ALLOCS_KEY", &key)
            .env("RUST_LOG", "error")
            .env(
                "ALLOCS_PROFILE",
                std::env::var("ALLOCS_PROFILE").unwrap_or_default(),
            )
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
            eprintln!(
                "{target}: no result (exit {:?})\n{stdout}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::process::exit(1);
        };
        let field = |name: &str| -> f64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .expect("a RESULT field")
        };
        let (blocks, bytes, live) = (field("blocks"), field("bytes"), field("live"));
        println!("| {target} | {blocks:.1} | {bytes:.0} | {live:.0} |");
        baseline.get_or_insert(blocks);
        rows.push((target, blocks, bytes));
    }
    let base = baseline.unwrap_or_default();
    let with_timeouts = rows
        .iter()
        .find(|(target, ..)| *target == "pingora-timeouts")
        .map_or(base, |row| row.1);
    println!();
    for (target, blocks, _) in rows.iter().filter(|r| r.0.starts_with("gatewarden")) {
        println!(
            "{target}: {:+.1} allocations per request over bare Pingora, \
             {:+.1} over bare Pingora with the same upstream timeouts",
            blocks - base,
            blocks - with_timeouts
        );
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// --- the child: upstream, proxy and client in one process under dhat -----------------

fn child(target: &str) {
    // With ALLOCS_PROFILE=DIR, a dhat profile of the whole run (every allocation site,
    // with what is still live at the end) goes to DIR/<proxy>.json, for dh_view.html.
    let profile = std::env::var("ALLOCS_PROFILE")
        .ok()
        .filter(|d| !d.is_empty());
    let profiler = match &profile {
        Some(dir) => dhat::Profiler::builder()
            .file_name(Path::new(dir).join(format!("{target}.json")))
            .trim_backtraces(Some(24))
            .build(),
        None => dhat::Profiler::builder().testing().build(),
    };
    let env = |name: &str| std::env::var(name).expect(name);
    let requests: u64 = env("ALLOCS_REQUESTS").parse().expect("a number");
    let proxy: SocketAddr = format!("127.0.0.1:{}", env("ALLOCS_PROXY"))
        .parse()
        .expect("address");
    let upstream: SocketAddr = format!("127.0.0.1:{}", env("ALLOCS_UPSTREAM"))
        .parse()
        .expect("address");

    let listener = TcpListener::bind(upstream).expect("bind the upstream");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_upstream(conn));
        }
    });

    if let Some(kind) = target.strip_prefix("pingora") {
        let timeouts = kind == "-timeouts";
        std::thread::spawn(move || bare::run(proxy, upstream, timeouts));
    } else {
        let path = std::path::PathBuf::from(env("ALLOCS_CONFIG"));
        let compiled = match gatewarden::config::load(&path, 1) {
            Ok(c) => c,
            Err(e) => panic!("config: {e}"),
        };
        std::thread::spawn(move || {
            let flags = gatewarden::server::RunFlags::default();
            if let Err(e) = gatewarden::server::run(compiled, None, flags) {
                eprintln!("gatewarden: {e:#}");
            }
        });
    }

    let request = format!(
        "GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: allocs-bench\r\n\
         Accept: */*\r\nAuthorization: Bearer {}\r\n\r\n",
        env("ALLOCS_KEY")
    );
    let mut client = connect(proxy);
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..WARMUP {
        exchange(&mut client, request.as_bytes(), &mut buf);
    }
    let before = dhat::HeapStats::get();
    for _ in 0..requests {
        exchange(&mut client, request.as_bytes(), &mut buf);
    }
    let after = dhat::HeapStats::get();
    let n = requests as f64;
    println!(
        "RESULT blocks={:.2} bytes={:.1} live={}",
        (after.total_blocks - before.total_blocks) as f64 / n,
        (after.total_bytes - before.total_bytes) as f64 / n,
        after.curr_blocks as i64 - before.curr_blocks as i64,
    );
    let _ = std::io::stdout().flush();
    drop(profiler);
    // The proxy threads never return; the measurement is done.
    std::process::exit(0);
}

fn connect(addr: SocketAddr) -> TcpStream {
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(addr) {
            s.set_nodelay(true).expect("nodelay");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the proxy never listened on {addr}");
}

/// Where the header block in `buf[..len]` ends, if it has.
fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Sends one request and reads its whole response, without allocating.
fn exchange(conn: &mut TcpStream, request: &[u8], buf: &mut [u8]) {
    conn.write_all(request).expect("send");
    let mut len = 0;
    let end = loop {
        let n = conn.read(&mut buf[len..]).expect("read");
        assert!(n > 0, "the proxy closed the connection");
        len += n;
        if let Some(end) = header_end(&buf[..len]) {
            break end;
        }
    };
    let head = &buf[..end];
    assert!(head.starts_with(b"HTTP/1.1 200"), "not a 200 response");
    let body = content_length(head).expect("a Content-Length");
    while len < end + body {
        let n = conn.read(&mut buf[len..]).expect("read");
        assert!(n > 0, "the proxy closed the connection");
        len += n;
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        if !name.eq_ignore_ascii_case(b"content-length") {
            return None;
        }
        std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok()
    })
}

/// The upstream: answers every request on a connection with a fixed reply.
fn serve_upstream(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    let mut len = 0;
    loop {
        match conn.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        while let Some(end) = header_end(&buf[..len]) {
            if conn.write_all(UPSTREAM_REPLY).is_err() {
                return;
            }
            buf.copy_within(end..len, 0);
            len -= end;
        }
    }
}

/// The smallest Pingora proxy: one fixed peer, no filters. With `timeouts`, its peer
/// has the upstream timeouts gatewarden sets by default (connect 2 s, read 300 s,
/// write 60 s, idle 60 s), which Pingora enforces with timers of its own.
mod bare {
    use std::net::SocketAddr;
    use std::time::Duration;

    use async_trait::async_trait;
    use pingora::prelude::*;
    use pingora::server::configuration::ServerConf;

    struct Plain {
        upstream: SocketAddr,
        timeouts: bool,
    }

    #[async_trait]
    impl ProxyHttp for Plain {
        type CTX = ();
        fn new_ctx(&self) {}
        async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
            let mut peer = Box::new(HttpPeer::new(self.upstream, false, String::new()));
            if self.timeouts {
                let options = &mut peer.options;
                options.connection_timeout = Some(Duration::from_secs(2));
                options.read_timeout = Some(Duration::from_secs(300));
                options.write_timeout = Some(Duration::from_secs(60));
                options.idle_timeout = Some(Duration::from_secs(60));
            }
            Ok(peer)
        }
    }

    pub fn run(listen: SocketAddr, upstream: SocketAddr, timeouts: bool) {
        let conf = ServerConf {
            threads: 1,
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
        server.bootstrap();
        let mut service = http_proxy_service(&server.configuration, Plain { upstream, timeouts });
        service.add_tcp(&listen.to_string());
        server.add_service(service);
        server.run_forever();
    }
}
