//! WebSockets whose server speaks first, as Socket.IO (Open WebUI) and Jupyter's
//! kernels do: the server's first frame follows its 101 in the same write.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::harness::{Config, Gateway, Route, Upstream};
use crate::identity::{key_new, pin_hash, shipped_open_webui, SECRET};

/// The Engine.IO "open" packet a Socket.IO server sends as its first frame.
const OPEN_PACKET: &str = r#"0{"sid":"gatewarden-test","upgrades":[],"pingInterval":25000}"#;

/// Upgrades to WebSocket with the first frame in the same write as the 101, then
/// echoes; answers `GET /health` for the health checks. Runs until dropped.
async fn speak_first_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_one(stream));
        }
    });
    (addr, task)
}

async fn serve_one(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&byte[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let key = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    });
    let Some(key) = key else {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await;
        return;
    };
    let mut reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    // An unmasked text frame from the server: FIN + text, then the length.
    reply.extend_from_slice(&[0x81, OPEN_PACKET.len() as u8]);
    reply.extend_from_slice(OPEN_PACKET.as_bytes());
    if stream.write_all(&reply).await.is_err() {
        return;
    }
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    while let Some(Ok(message)) = ws.next().await {
        let echo = matches!(message, Message::Text(_) | Message::Binary(_));
        if message.is_close() || (echo && ws.send(message).await.is_err()) {
            return;
        }
    }
}

/// One Socket.IO-style session: the open packet arrives, a frame echoes, the client
/// closes. An error names the step that failed.
async fn one_session(gateway: SocketAddr, key: &str, i: usize) -> Result<(), String> {
    let request = http::Request::builder()
        .uri(format!(
            "ws://{gateway}/ws/socket.io/?EIO=4&transport=websocket"
        ))
        .header("Host", gateway.to_string())
        .header("X-API-Key", key)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .map_err(|e| e.to_string())?;
    let step = |what: &'static str| move |e: String| format!("{what}: {e}");
    let within = Duration::from_secs(10);
    let (mut ws, resp) = tokio::time::timeout(within, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("status {}", resp.status()));
    }
    let first = tokio::time::timeout(within, ws.next())
        .await
        .map_err(|_| "first frame timed out".to_string())?;
    match first {
        Some(Ok(Message::Text(t))) if t.as_str() == OPEN_PACKET => {}
        other => return Err(format!("first frame: {other:?}")),
    }
    let probe = format!("42[\"probe\",{i}]");
    ws.send(Message::text(probe.clone()))
        .await
        .map_err(|e| e.to_string())
        .map_err(step("send"))?;
    match tokio::time::timeout(within, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == probe => {}
        other => return Err(format!("echo: {other:?}")),
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Opens `n` sessions one after another and returns the failures (index, why).
pub async fn sequential_sessions(gateway: SocketAddr, key: &str, n: usize) -> Vec<(usize, String)> {
    let mut failures = Vec::new();
    for i in 0..n {
        if let Err(why) = one_session(gateway, key, i).await {
            failures.push((i, why));
        }
    }
    failures
}

/// The shipped Open WebUI config, pointed at `upstream`, with a keys file in `dir`.
fn open_webui_config(upstream: SocketAddr, dir: &Path) -> (Config, String) {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/open-webui.yaml");
    let shipped = std::fs::read_to_string(conf).unwrap();
    let keys = dir.join("keys.yaml");
    let key = key_new(
        &keys,
        &["--name", "socket", "--subject", "owner@example.com"],
    );
    (shipped_open_webui(&shipped, upstream, &keys), key)
}

/// Sessions opened one after another under the shipped Open WebUI config (two worker
/// threads, work stealing, a global response plugin and an identity chain): every one
/// keeps its first frame and echoes. No retry: a cut upgrade fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_upgrade_is_cut_after_its_101_under_the_open_webui_config() {
    let (upstream, _server) = speak_first_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, key) = open_webui_config(upstream, dir.path());
    let gw = tokio::task::spawn_blocking(move || {
        Gateway::start_with(
            config,
            &[
                ("GATEWARDEN_PIN_HASH", pin_hash()),
                ("GATEWARDEN_SESSION_SECRET", SECRET),
            ],
        )
    })
    .await
    .unwrap();
    let n: usize = std::env::var("GATEWARDEN_WS_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    // A busy machine: the gateway's threads are preempted between writing the request
    // and reading the answer, which is when a server that speaks first gets ahead.
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let started = Instant::now();
    let failures = sequential_sessions(gw.addr, &key, n).await;
    stop.store(true, Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().unwrap();
    }
    eprintln!(
        "{n} sequential WebSocket sessions in {:?}: {} cut",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {n} sessions failed; first: {:?}\n{}",
        failures.len(),
        failures.first(),
        gw.output()
    );
}

const UPGRADE_REQUEST: &str = "GET /ws?room=1 HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// An upstream that answers an upgrade with an ordinary response: the client gets that
/// response as it was, and the upstream got the request with the gateway's usual edits.
#[test]
fn an_upgrade_the_upstream_refuses_is_answered_as_the_upstream_answered() {
    let upstream = crate::harness::RecordingUpstream::start();
    let gw = Gateway::start(crate::harness::public(upstream.addr));
    let resp = crate::harness::raw(gw.addr, UPGRADE_REQUEST).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"/ws?room=1");
    assert!(resp.header("x-request-id").is_some());
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    let header = |name: &str| {
        seen[0]
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("upgrade").as_deref(), Some("websocket"));
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert!(header("x-request-id").is_some());
}

/// One public route to an upstream `app` with these settings.
fn public_app(upstream: Upstream) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", upstream)
        .route(Route::public("app", "app"))
}

/// An upgrade whose backends are all down is answered 502, as any other request is.
#[test]
fn an_upgrade_to_backends_that_are_down_is_a_bad_gateway() {
    let down = |_| -> SocketAddr {
        format!("127.0.0.1:{}", crate::harness::free_port())
            .parse()
            .unwrap()
    };
    let (a, b) = (down(0), down(1));
    let gw = Gateway::start(public_app(Upstream::of(&[a, b]).with("retries", 1)));
    let resp = crate::harness::raw(gw.addr, UPGRADE_REQUEST).unwrap();
    assert_eq!(resp.status, 502);
    assert!(resp.header("x-request-id").is_some());
}

/// An upgrade to anything but WebSocket is dropped: the request goes on as an ordinary
/// one, and the upstream never learns the client asked to switch. Relayed, an `h2c`
/// switch would let the client send the upstream HTTP/2 requests for any path, past
/// every route's checks (here: a public health route in front of a protected app).
#[test]
fn an_upgrade_to_anything_but_websocket_never_reaches_the_upstream() {
    let upstream = crate::harness::RecordingUpstream::start();
    let gw = Gateway::start(crate::harness::public(upstream.addr));
    for (asked, connection) in [
        ("h2c", "Upgrade, HTTP2-Settings"),
        ("H2C", "upgrade, http2-settings, keep-alive"),
        ("websocket, h2c", "Upgrade"),
        ("TLS/1.2", "Upgrade"),
    ] {
        let request = format!(
            "GET /health HTTP/1.1\r\nHost: app.example\r\nConnection: {connection}\r\nUpgrade: {asked}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 0\r\n\r\n"
        );
        let resp = crate::harness::raw(gw.addr, &request).unwrap();
        assert_eq!(resp.status, 200, "{asked}");
        assert_eq!(resp.body, b"/health", "{asked}");
        let seen = upstream
            .requests()
            .pop()
            .expect("the request reached the upstream");
        for (name, value) in &seen.headers {
            let name = name.to_ascii_lowercase();
            assert!(
                name != "upgrade" && name != "http2-settings",
                "{asked}: the upstream got {name}: {value}"
            );
            if name == "connection" {
                assert!(
                    !value.to_ascii_lowercase().contains("upgrade"),
                    "{asked}: the upstream got Connection: {value}"
                );
            }
        }
    }
}

/// A WebSocket handshake reaches the upstream without the fields that end at the
/// gateway: hop-by-hop ones (a `Proxy-Authorization` is for a proxy, never for the
/// upstream) and those the client named in `Connection`.
#[test]
fn a_websocket_handshake_reaches_the_upstream_without_hop_by_hop_fields() {
    let upstream = crate::harness::RecordingUpstream::start();
    let gw = Gateway::start(crate::harness::public(upstream.addr));
    let request = "GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade, X-Hop-Secret, keep-alive\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Hop-Secret: only-for-the-gateway\r\nProxy-Authorization: Basic cHJveHk6c2VjcmV0\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\r\n";
    let resp = crate::harness::raw(gw.addr, request).unwrap();
    assert_eq!(resp.status, 200);
    let seen = upstream
        .requests()
        .pop()
        .expect("the handshake reached the upstream");
    let header = |name: &str| {
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    for gone in ["x-hop-secret", "proxy-authorization", "keep-alive", "te"] {
        assert!(
            header(gone).is_empty(),
            "the upstream got {gone}: {:?}",
            header(gone)
        );
    }
    assert_eq!(header("upgrade"), ["websocket"]);
    assert_eq!(header("connection"), ["Upgrade"]);
    assert_eq!(header("sec-websocket-key"), ["dGhlIHNhbXBsZSBub25jZQ=="]);
}

/// An upstream that takes an upgrade and never answers meets the pool's
/// `read_timeout`: 504, as any other request would get.
#[test]
fn an_upgrade_the_upstream_never_answers_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    let gw = Gateway::start(public_app(
        Upstream::to(upstream).with("read_timeout", "1s"),
    ));
    let resp = crate::harness::raw(gw.addr, UPGRADE_REQUEST).unwrap();
    assert_eq!(resp.status, 504);
    assert!(
        !held.lock().unwrap().is_empty(),
        "the upstream was never reached"
    );
}
