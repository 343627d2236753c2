//! What the integration tests and the process-level benches share: the gatewarden
//! binary, loopback ports, child processes that die with the test, a raw HTTP/1
//! client, the tools some tests need, and typed configs ([`config`]).
//!
//! Included by path from `tests/it` and `benches`; each uses a part of it.
#![allow(dead_code)]

pub mod config;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The gatewarden binary the tests run: the one cargo built for them, or the one named
/// by `GATEWARDEN_BIN` (to run the suite against a release or PGO build).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("GATEWARDEN_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_gatewarden").to_string())
    })
}

/// A loopback port that was free a moment ago.
///
/// Ports handed to gateways come from a range below the kernel's ephemeral ports
/// (32768 and up), each at most once per test run: a port the kernel later gives to an
/// upstream bound to `:0`, or that another test took a moment ago, is never handed out.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        // Spread runs over the range so two test runs at once rarely meet.
        let start = 20_000 + (std::process::id() % 1_000) as u16 * 10;
        let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(port < 32_000, "ran out of test ports");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Starts `cmd` with its stdout and stderr collected, line by line, into one string.
fn spawn_collecting(cmd: &mut Command) -> (Child, Arc<Mutex<String>>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?}: {e}", cmd.get_program()));
    let output = Arc::new(Mutex::new(String::new()));
    let streams = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for stream in streams.into_iter().flatten() {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                output.lock().unwrap().push_str(&(line + "\n"));
            }
        });
    }
    (child, output)
}

/// Runs the binary to completion with a time bound.
pub fn run_cli(args: &[&str], dir: &Path) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gatewarden");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gatewarden {args:?} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A parsed HTTP/1.1 response from [`raw`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `request` byte for byte (so paths reach the gateway exactly as written, with
/// no client-side normalisation) and reads one response. The request should carry
/// `Connection: close` unless a Content-Length bounds the response.
pub fn raw(addr: SocketAddr, request: &str) -> std::io::Result<RawResponse> {
    raw_bytes(addr, request.as_bytes())
}

pub fn raw_bytes(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.write_all(request)?;
    read_response(&mut BufReader::new(stream))
}

/// Reads one response from a client connection, leaving the connection open when the
/// response is framed by Content-Length or chunking (for keep-alive tests).
pub fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<RawResponse> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if status != 204 && status != 304 {
        let _ = reader.read_to_end(&mut body);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// GET `path` with extra header lines (each `Name: value`).
pub fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> RawResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(addr, &req).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls `check` every 25 ms until it holds; panics with `what` after `timeout`.
/// Polls `check` until it holds; returns how long that took. Panics after `timeout`.
pub fn poll_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    start.elapsed()
}

/// A gatewarden started with any arguments (`demo`, `protect`...); killed on drop.
pub struct Process {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Process {
    pub fn spawn(args: &[&str], dir: &Path) -> Process {
        let mut cmd = Command::new(bin());
        cmd.args(args).current_dir(dir).env("RUST_LOG", "warn");
        let (child, output) = spawn_collecting(&mut cmd);
        Process { child, output }
    }

    /// Any other program (a test identity provider...), its output collected; killed
    /// on drop like a gateway.
    pub fn spawn_command(cmd: &mut Command) -> Process {
        let (child, output) = spawn_collecting(cmd);
        Process { child, output }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; panics with its output after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "still running {timeout:?} later; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `GET /healthz` on `addr` answers 200; panics with the output if the
    /// process exits or 20 s pass.
    pub fn wait_healthy(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gatewarden exited with {status}:\n{}", self.output());
            }
            if let Ok(resp) = raw(
                addr,
                "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            ) {
                if resp.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "gatewarden did not become ready on {addr}:\n{}",
            self.output()
        );
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program some tests need (`redis-server`, `chromium`): its path, or `None` when it
/// is not installed. Under CI (`CI` set) a missing tool fails the test instead: the
/// set-up script installs every one, so a missing one is a broken set-up, not a skip.
pub fn tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = names.iter().find_map(|name| {
        if name.starts_with('/') {
            return Some(PathBuf::from(name)).filter(|p| p.is_file());
        }
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{names:?} is not installed; bash scripts/setup.sh installs it"
        );
        eprintln!("SKIPPED: {names:?} is not installed (bash scripts/setup.sh installs it)");
    }
    found
}

/// A throwaway `redis-server` on a loopback port, saving nothing; killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// Starts one on a free port; `None` (outside CI) when redis-server is missing.
    pub fn start() -> Option<Redis> {
        let binary = tool(&["redis-server"])?;
        Some(Self::start_on(&binary, free_port()))
    }

    /// Starts one on `port` (to restart a stopped one where its clients look for it).
    pub fn start_on(binary: &Path, port: u16) -> Redis {
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        poll_until(
            "redis to accept connections",
            Duration::from_secs(10),
            || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
        );
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
