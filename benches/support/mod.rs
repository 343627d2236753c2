//! What the process-level benches (`allocs`, `idle_conns`, `sse_delay`) share: the
//! gatewarden binary, its two configurations (a public route with no plugins, and the
//! production chain on an `access: user` route), a user key made with the real CLI,
//! loopback ports, and a gateway child process that is killed on drop.
//!
//! Each bench uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway binary: the one cargo built for this bench, unless `GATEWARDEN_BIN`
/// names another build to compare (say, one built with `--no-default-features`).
pub fn bin() -> PathBuf {
    std::env::var_os("GATEWARDEN_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_gatewarden").into())
}

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

/// A loopback port that was free a moment ago, below the kernel's ephemeral range
/// (32768 and up, where many client ends may be taking ports). `skip` separates the
/// ports of gateways started one after another by the same bench.
pub fn free_port(skip: u16) -> u16 {
    let start = 20_000 + (std::process::id() % 1_000) as u16 * 10 + skip;
    (start..32_000)
        .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free loopback port below 32000")
}

/// Runs `gatewarden key new` into `dir/keys.yaml` (bounded in time) and returns the
/// plaintext key.
pub fn new_key(dir: &Path) -> String {
    let mut child = Command::new(bin())
        .args(["key", "new", "--file", "keys.yaml", "--name", "bench"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gatewarden key new");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait for key new").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gatewarden key new did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("key new output");
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
/// `upstream` (with `upstream_options` such as `read_timeout: 60s` added to it), and
/// the routes of `variant`. The chain reads its keys from `dir/keys.yaml`.
pub fn config(
    variant: Variant,
    threads: usize,
    dir: &Path,
    port: u16,
    upstream: SocketAddr,
    upstream_options: &str,
) -> String {
    let dir = dir.display();
    let head = format!(
        "server:
  threads: {threads}
  pid_file: {dir}/gatewarden.pid
  upgrade_sock: {dir}/upgrade.sock
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
listeners: [{{ address: '127.0.0.1:{port}' }}]
upstreams:
  app: {{ backends: ['{upstream}'], idle_timeout: 60s{upstream_options} }}
"
    );
    let routes = match variant {
        Variant::Public => "routes:
  - name: app
    access: public
    upstream: app
"
        .to_string(),
        Variant::Chain => format!(
            "plugins:
  keys: {{ type: api_key, keys_file: {dir}/keys.yaml }}
  per_key: {{ type: rate_limit, key: identity, rate: 10000000/s, burst: 10000000 }}
  same_origin: {{ type: origin }}
  proxy_headers:
    type: headers
    request:
      set: {{ X-Client-IP: '{{client_ip}}', X-Gateway-Request: '{{request_id}}', X-User: '{{identity.subject}}' }}
      remove: [X-Debug]
    response:
      set: {{ X-Frame-Options: DENY }}
      remove: [Server]
routes:
  - name: app
    access: user
    upstream: app
    plugins: [keys, per_key, same_origin, proxy_headers]
"
        ),
    };
    head + &routes
}

/// A running `gatewarden run`; killed and reaped on drop, so every exit path
/// (including a panic unwinding out of the bench) takes it down.
pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The header line a client sends to pass the chain (`Authorization: Bearer …\r\n`),
    /// empty for the public variant.
    pub auth: String,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// Writes the config of `variant` to a fresh temp dir (with a key for the chain) and
    /// starts the binary on it, output to `gatewarden.log` there. Not yet ready: see
    /// [`GatewayProcess::wait_ready`].
    pub fn spawn(
        variant: Variant,
        threads: usize,
        upstream: SocketAddr,
        upstream_options: &str,
        port_skip: u16,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let auth = match variant {
            Variant::Public => String::new(),
            Variant::Chain => format!("Authorization: Bearer {}\r\n", new_key(dir.path())),
        };
        let port = free_port(port_skip);
        let path = dir.path().join("gatewarden.yaml");
        let yaml = config(
            variant,
            threads,
            dir.path(),
            port,
            upstream,
            upstream_options,
        );
        std::fs::write(&path, yaml).expect("write config");
        let log = std::fs::File::create(dir.path().join("gatewarden.log")).expect("log file");
        let child = Command::new(bin())
            .arg("run")
            .arg("-c")
            .arg(&path)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .expect("start gatewarden");
        GatewayProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            auth,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gatewarden.log")).unwrap_or_default()
    }

    /// Panics with the gateway's output if it has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("gatewarden exited with {status}:\n{}", self.log());
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
