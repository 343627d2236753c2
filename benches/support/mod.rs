//! What the process-level benches (`allocs`, `idle_conns`, `sse_delay`) share: the
//! gatewarden binary, its two configurations (a public route with no plugins, and the
//! production chain on an `access: user` route), a user key made with the real CLI,
//! loopback ports, and a gateway child process that is killed on drop.
//!
//! Each bench uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

#[path = "../../tests/support/mod.rs"]
mod shared;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
// Each bench uses a different part.
#[allow(unused_imports)]
pub use shared::config::{Config, Route, Upstream};
#[allow(unused_imports)]
pub use shared::{bin, free_port, Process};

/// The value of environment knob `name`, or `default` when unset; a value that does
/// not parse stops the bench with its name.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// One public route, empty chain: the proxy core alone.
    Public,
    /// `api_key` + `rate_limit` (never triggers) + `origin` + `headers` on an
    /// `access: user` route, as in `benches/conf/gatewarden-chain.yaml`.
    Chain,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Public => "public",
            Variant::Chain => "chain",
        }
    }

    /// Parses a comma-separated list such as `public,chain`.
    pub fn list(text: &str) -> Vec<Variant> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "public" => Variant::Public,
                "chain" => Variant::Chain,
                other => panic!("unknown variant {other:?}: use public and/or chain"),
            })
            .collect()
    }
}

/// Runs `gatewarden key new` into `dir/keys.yaml` (bounded in time) and returns the
/// plaintext key.
pub fn new_key(dir: &Path) -> String {
    let out = shared::run_cli(
        &["key", "new", "--file", "keys.yaml", "--name", "bench"],
        dir,
    );
    assert!(
        out.status.success(),
        "gatewarden key new failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).expect("key is UTF-8");
    let key = key.trim().to_string();
    assert!(!key.is_empty(), "gatewarden key new printed no key");
    key
}

/// A gateway config: `threads` workers, one listener on `port`, one upstream `app` at
/// `upstream` (`tune` adds settings to it, such as a longer `read_timeout`), and the
/// routes of `variant`. The chain reads its keys from `dir/keys.yaml`.
pub fn config(
    variant: Variant,
    threads: usize,
    dir: &Path,
    port: u16,
    upstream: SocketAddr,
    tune: impl FnOnce(Upstream) -> Upstream,
) -> String {
    let config = Config::new()
        .server("threads", threads)
        .server("pid_file", format!("{}/gatewarden.pid", dir.display()))
        .server("upgrade_sock", format!("{}/upgrade.sock", dir.display()))
        .server("grace_period_seconds", 0)
        .server("graceful_shutdown_timeout_seconds", 1)
        .listen(SocketAddr::from(([127, 0, 0, 1], port)))
        .upstream(
            "app",
            tune(Upstream::to(upstream).with("idle_timeout", "60s")),
        );
    let config = match variant {
        Variant::Public => config.route(Route::public("app", "app")),
        Variant::Chain => config
            .plugin(
                "keys",
                "api_key",
                json!({ "keys_file": format!("{}/keys.yaml", dir.display()) }),
            )
            .plugin(
                "per_key",
                "rate_limit",
                json!({ "key": "identity", "rate": "10000000/s", "burst": 10_000_000 }),
            )
            .plugin("same_origin", "origin", json!({}))
            .plugin(
                "proxy_headers",
                "headers",
                json!({
                    "request": {
                        "set": {
                            "X-Client-IP": "{client_ip}",
                            "X-Gateway-Request": "{request_id}",
                            "X-User": "{identity.subject}",
                        },
                        "remove": ["X-Debug"],
                    },
                    "response": { "set": { "X-Frame-Options": "DENY" }, "remove": ["Server"] },
                }),
            )
            .route(Route::new("app", "app", "user").plugins(&[
                "keys",
                "per_key",
                "same_origin",
                "proxy_headers",
            ])),
    };
    config.to_yaml()
}

/// A running `gatewarden run`; killed and reaped on drop, so every exit path
/// (including a panic unwinding out of the bench) takes it down.
pub struct GatewayProcess {
    process: Process,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The header line a client sends to pass the chain (`Authorization: Bearer …\r\n`),
    /// empty for the public variant.
    pub auth: String,
}

impl GatewayProcess {
    /// Writes the config of `variant` to a fresh temp dir (with a key for the chain) and
    /// starts the binary on it. Not yet ready: see [`GatewayProcess::wait_ready`].
    pub fn spawn(
        variant: Variant,
        threads: usize,
        upstream: SocketAddr,
        tune: impl FnOnce(Upstream) -> Upstream,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let auth = match variant {
            Variant::Public => String::new(),
            Variant::Chain => format!("Authorization: Bearer {}\r\n", new_key(dir.path())),
        };
        let port = free_port();
        let path = dir.path().join("gatewarden.yaml");
        let yaml = config(variant, threads, dir.path(), port, upstream, tune);
        std::fs::write(&path, yaml).expect("write config");
        let process = Process::spawn(&["run", "-c", "gatewarden.yaml"], dir.path());
        GatewayProcess {
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            auth,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Everything the gateway printed so far.
    pub fn log(&self) -> String {
        self.process.output()
    }

    /// Panics with the gateway's output if it has exited.
    pub fn assert_alive(&mut self) {
        if self.process.exited() {
            panic!("gatewarden exited:\n{}", self.log());
        }
    }

    /// Retries `probe` (one end-to-end exchange through the gateway) until it succeeds,
    /// for at most 30 s; panics with the gateway's output if it exits or never answers.
    pub fn wait_ready(&mut self, mut probe: impl FnMut(&GatewayProcess) -> std::io::Result<()>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.assert_alive();
            match probe(self) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("gatewarden not ready in 30 s ({e}):\n{}", self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A proxy started by `benches/load.sh` rather than by the bench: nginx, HAProxy,
/// Caddy, a gatewarden build, each already pointed at the bench's upstream.
pub struct External {
    pub name: String,
    pub addr: SocketAddr,
    /// Every process whose memory counts for it (nginx's master and workers, Caddy
    /// and the auth endpoint it asks).
    pub pids: Vec<u32>,
}

/// The targets in `BENCH_TARGETS` (`name=127.0.0.1:port@pid,pid name=...`, the
/// `@pids` part optional), or `None` when the bench should start its own gateways.
pub fn external_targets() -> Option<Vec<External>> {
    let list = std::env::var("BENCH_TARGETS").ok()?;
    let targets = list
        .split_whitespace()
        .map(|entry| {
            let (name, rest) = entry
                .split_once('=')
                .unwrap_or_else(|| panic!("BENCH_TARGETS entry {entry:?} is not name=address"));
            let (addr, pids) = rest.split_once('@').unwrap_or((rest, ""));
            External {
                name: name.to_string(),
                addr: addr
                    .parse()
                    .unwrap_or_else(|_| panic!("BENCH_TARGETS: {addr:?} is not an address")),
                pids: pids
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        p.parse()
                            .unwrap_or_else(|_| panic!("BENCH_TARGETS: bad pid {p:?}"))
                    })
                    .collect(),
            }
        })
        .collect();
    Some(targets)
}

/// What the bench measures, for its settings line: the binary it starts, or the
/// proxies of `BENCH_TARGETS`.
pub fn measured() -> &'static str {
    if std::env::var_os("BENCH_TARGETS").is_some() {
        "the proxies benches/load.sh started"
    } else {
        bin()
    }
}

/// The header line every request to an external target carries: the bench key that
/// `benches/load.sh` made (`BENCH_KEY`), or nothing.
pub fn external_auth() -> String {
    match std::env::var("BENCH_KEY") {
        Ok(key) if !key.is_empty() => format!("Authorization: Bearer {key}\r\n"),
        _ => String::new(),
    }
}

/// Prints one markdown table row; `cells` are already formatted.
pub fn table_row(cells: &[String]) {
    println!("| {} |", cells.join(" | "));
}

/// `value / reference` as a two-decimal ratio, or `-` without a reference.
pub fn ratio(value: f64, reference: Option<f64>) -> String {
    match reference {
        Some(r) if r > 0.0 => format!("{:.2}", value / r),
        _ => "-".to_string(),
    }
}
