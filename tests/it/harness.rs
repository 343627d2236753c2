//! Starting the gateway and upstreams, and speaking HTTP to them.

#![allow(dead_code)]

use std::borrow::Borrow;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use gatewarden::demo_upstream::DemoUpstream;

pub use crate::support::config::{Config, Route, Upstream};
pub use crate::support::*;

impl Config {
    /// The file's text on the harness's addresses, and whether it has an admin listener.
    fn render(&self, listen: SocketAddr, admin: SocketAddr) -> (String, bool) {
        let mut config = self.clone().listen(listen);
        if config.has_admin() {
            config = config.admin_at(admin);
        }
        (config.to_yaml(), config.has_admin())
    }
}

/// A running gatewarden; killed on drop.
pub struct Gateway {
    process: Process,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Gateway {
    /// Writes the config to a temp dir and runs it, on loopback ports picked here.
    /// Waits until `/healthz` answers on the admin listener (or the proxy listener if
    /// there is no admin section).
    pub fn start(config: impl Borrow<Config>) -> Gateway {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: impl Borrow<Config>, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (yaml, has_admin) = config.borrow().render(addr, admin);
        let config = dir.path().join("gatewarden.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .current_dir(dir.path());
        cmd.env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut gw = Gateway {
            process: Process::spawn_command(&mut cmd),
            addr,
            admin,
            dir,
            config,
        };
        gw.wait_ready(if has_admin { admin } else { addr });
        gw
    }

    /// Writes `config` over the running gateway's file, on the same addresses; the
    /// caller reloads.
    pub fn rewrite(&self, config: impl Borrow<Config>) {
        let (yaml, _) = config.borrow().render(self.addr, self.admin);
        std::fs::write(&self.config, yaml).unwrap();
    }

    fn wait_ready(&mut self, probe: SocketAddr) {
        self.process.wait_healthy(probe);
        // Pingora binds each service on its own thread: the admin listener may be up
        // before the proxy listener, so wait for both.
        let addr = self.addr;
        poll_until(
            "the proxy listener to accept connections",
            Duration::from_secs(20),
            || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok(),
        );
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.process.output()
    }

    /// A graceful upgrade: starts `run --upgrade` on the same config, has this process
    /// hand its sockets over (SIGQUIT) and waits until the new process serves and this
    /// one has exited. The config must set `server.upgrade_sock`.
    pub fn upgrade(&self) -> Process {
        let config = self.config.display().to_string();
        let mut new = Process::spawn(&["run", "--upgrade", "-c", &config], self.dir.path());
        // The new process waits for the listening sockets; the old one hands them over on SIGQUIT.
        std::thread::sleep(Duration::from_millis(500));
        self.signal("QUIT");
        new.wait_healthy(self.admin);
        let pid = self.pid().to_string();
        poll_until("the old process to exit", Duration::from_secs(20), || {
            !Command::new("kill")
                .args(["-0", &pid])
                .status()
                .is_ok_and(|s| s.success())
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        new
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Sends a signal to the process (`"HUP"`, `"TERM"`...).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status();
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.process.exited()
    }

    /// Waits for the process to exit; panics with its output after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.process.wait_exit(timeout)
    }
}

/// Sends one request with `Host: host`, `headers` (each `Name: value`) and `body`; a
/// `Content-Length` whenever there is a body or the method is POST.
pub fn send_to(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> RawResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(addr, &req).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A reqwest client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Starts demo upstreams on a dedicated runtime thread that lives for the test.
pub struct Upstreams {
    pub runtime: tokio::runtime::Runtime,
    pub servers: Vec<DemoUpstream>,
}

impl Upstreams {
    pub fn start(n: usize) -> Upstreams {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let servers = (0..n)
            .map(|_| {
                runtime
                    .block_on(DemoUpstream::start("127.0.0.1:0"))
                    .expect("upstream")
            })
            .collect();
        Upstreams { runtime, servers }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr
    }
}

/// The port of the upstream that answered, from the demo upstream's marker header.
pub fn served_by(resp: &RawResponse) -> u16 {
    resp.header("x-demo-upstream")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no x-demo-upstream header in {resp:?}"))
}

/// A gateway with an admin listener and one public route to `backend`: the upstream
/// and the route are both named `app`.
pub fn public(backend: SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(backend))
        .route(Route::public("app", "app"))
}

/// One request as a [`RecordingUpstream`] saw it.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// The request line as sent, e.g. `GET /a/b?q=1 HTTP/1.1`.
    pub request_line: String,
    /// Header lines in arrival order, names spelled as sent.
    pub headers: Vec<(String, String)>,
    /// Body bytes received, whether or not the body completed.
    pub body_bytes: usize,
    /// The first 64 KiB of the body.
    pub body: Vec<u8>,
    /// The whole body (per Content-Length, or up to the last chunk) arrived.
    pub complete: bool,
    /// The connection is over: answered, closed or cut by the gateway.
    pub ended: bool,
}

impl Recorded {
    /// The request-target: path and query exactly as they reached the upstream.
    pub fn target(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("")
    }
}

/// A bare HTTP/1.1 upstream on plain threads that records every connection and request
/// head byte for byte, so tests can prove what did (or did not) reach an upstream. It
/// answers each complete request with 200, `x-demo-upstream: <port>` (so [`served_by`]
/// works) and the request-target as the body, then closes the connection.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RecordingUpstream {
    pub fn start() -> RecordingUpstream {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind recording upstream");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (connections.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::AcqRel);
                let r = r.clone();
                std::thread::spawn(move || record_one(stream, &r, addr.port()));
            }
        });
        RecordingUpstream {
            addr,
            connections,
            requests,
            stop,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Requests whose head arrived so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn record_one(stream: TcpStream, log: &Mutex<Vec<Recorded>>, port: u16) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Recorded {
            request_line: line.trim_end().to_string(),
            ..Recorded::default()
        });
        log.len() - 1
    };
    let update = |f: &mut dyn FnMut(&mut Recorded)| f(&mut log.lock().unwrap()[index]);
    let answered = (|| -> std::io::Result<()> {
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((n, v)) = l.split_once(':') {
                headers.push((n.to_string(), v.trim().to_string()));
            }
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let chunked =
            find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = find("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        update(&mut |r| r.headers = headers.clone());
        let read_exactly =
            |reader: &mut BufReader<TcpStream>, mut n: usize| -> std::io::Result<()> {
                let mut buf = [0u8; 8192];
                while n > 0 {
                    let got = reader.read(&mut buf[..n.min(8192)])?;
                    if got == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    update(&mut |r| {
                        r.body_bytes += got;
                        let room = (64usize << 10).saturating_sub(r.body.len());
                        r.body.extend_from_slice(&buf[..got.min(room)]);
                    });
                    n -= got;
                }
                Ok(())
            };
        if chunked {
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                let size_text = line.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_text, 16).map_err(std::io::Error::other)?;
                if size == 0 {
                    // Trailers, then the blank line that ends the message.
                    loop {
                        line.clear();
                        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                read_exactly(&mut reader, size)?;
                line.clear();
                reader.read_line(&mut line)?;
            }
        } else {
            read_exactly(&mut reader, length)?;
        }
        update(&mut |r| r.complete = true);
        let target = log.lock().unwrap()[index].target().to_string();
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-demo-upstream: {port}\r\nconnection: close\r\n\r\n{target}",
            target.len()
        )?;
        writer.flush()
    })();
    if let Err(e) = answered {
        log::debug!("recording upstream :{port}: {e}");
    }
    update(&mut |r| r.ended = true);
}

/// A WebSocket opened through the gateway.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket and checks that one text frame echoes before handing it over.
/// One attempt: an upgrade cut after its 101 fails the test.
pub async fn ws_connect<R>(
    request: R,
) -> (
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
)
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("websocket handshake in time")
    .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("gatewarden-probe"))
        .await
        .expect("the first frame is sent");
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "gatewarden-probe" => (ws, resp),
        other => panic!("the first frame did not echo: {other:?}"),
    }
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc status")
}
