//! The LLM route: the server-held key injected by `upstream_auth`, the theme injected by
//! `css_inject`, and the worked example `conf/chat-and-llm.yaml` run as shipped, with a
//! browser session and with the official `openai` Python package.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

// ------------------------------------------------------------------ a scripted upstream

/// One request as the scripted upstream received it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    method: String,
    target: String,
    /// Header lines in arrival order, names as sent.
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Seen {
    /// Every value sent under `name`, in any spelling.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

type Handler = dyn Fn(&Seen, &mut TcpStream) -> std::io::Result<()> + Send + Sync;

/// A bare HTTP/1.1 upstream on plain threads: it records each request, then lets the
/// test's handler write the response byte for byte (framing, split writes, pauses),
/// then closes the connection.
pub(crate) struct ScriptedUpstream {
    pub(crate) addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl ScriptedUpstream {
    pub(crate) fn start(
        handler: impl Fn(&Seen, &mut TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted upstream");
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (log, flag) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (log, handler) = (log.clone(), handler.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &log, &*handler);
                });
            }
        });
        ScriptedUpstream { addr, seen, stop }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_one(stream: TcpStream, log: &Mutex<Vec<Seen>>, handler: &Handler) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let mut seen = Seen {
        method: parts.next().unwrap_or("").to_string(),
        target: parts.next().unwrap_or("").to_string(),
        ..Seen::default()
    };
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            seen.headers.push((n.to_string(), v.trim().to_string()));
        }
    }
    let length = seen
        .all("content-length")
        .first()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    seen.body.resize(length, 0);
    reader.read_exact(&mut seen.body)?;
    log.lock().unwrap().push(seen.clone());
    handler(&seen, &mut writer)?;
    writer.flush()
}

/// Writes a response with a Content-Length, its body in the given pieces (flushed and
/// a moment apart, so the gateway reads them as separate chunks).
pub(crate) fn write_sized(
    out: &mut TcpStream,
    head: &str,
    pieces: &[&[u8]],
) -> std::io::Result<()> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    write!(
        out,
        "{head}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    )?;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
        out.write_all(piece)?;
        out.flush()?;
    }
    Ok(())
}

fn write_chunked_head(out: &mut TcpStream, head: &str) -> std::io::Result<()> {
    write!(
        out,
        "{head}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )?;
    out.flush()
}

fn write_chunk(out: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(out, "{:x}\r\n", data.len())?;
    out.write_all(data)?;
    out.write_all(b"\r\n")?;
    out.flush()
}

fn end_chunks(out: &mut TcpStream) -> std::io::Result<()> {
    out.write_all(b"0\r\n\r\n")?;
    out.flush()
}

// ------------------------------------------------------------------------ css_inject

const THEME: &str = "body { background: rgb(1, 2, 3) }";
const STYLE: &str = "<style>body { background: rgb(1, 2, 3) }</style>";

/// A page whose `</HEAD >` the upstream splits over two writes, with a second
/// `</head>` later and bytes of every kind around.
const PAGE_START: &str =
    "<!doctype html><html><head><meta charset=utf-8><title>Ünïcode ✓</title></HE";
const PAGE_END: &str = "AD ><body><pre>not the head: </head></pre>\0\u{1}end</body></html>\n";

fn injected_page() -> String {
    format!("{PAGE_START}{PAGE_END}").replacen("</HEAD >", &format!("{STYLE}</HEAD >"), 1)
}

/// Serves the test pages of the `css_inject` tests.
fn page_upstream(sse_go: mpsc::Receiver<()>) -> ScriptedUpstream {
    let sse_go = Mutex::new(sse_go);
    ScriptedUpstream::start(move |req, out| {
        match req.target.as_str() {
        "/page" => write_sized(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\netag: \"v1\"\r\naccept-ranges: bytes",
            &[PAGE_START.as_bytes(), PAGE_END.as_bytes()],
        ),
        "/gzipped" => {
            let body = gzip(format!("{PAGE_START}{PAGE_END}").as_bytes());
            write_sized(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-encoding: gzip",
                &[&body],
            )
        }
        "/json" => write_sized(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json",
            &[br#"{"html": "<head></head>"}"#],
        ),
        "/missing" => write_sized(
            out,
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/html",
            &[b"<html><head></head><body>no such page</body></html>"],
        ),
        "/chunked-page" => {
            write_chunked_head(out, "HTTP/1.1 200 OK\r\ncontent-type: text/html")?;
            write_chunk(out, PAGE_START.as_bytes())?;
            write_chunk(out, PAGE_END.as_bytes())?;
            end_chunks(out)
        }
        "/image" => write_sized(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: image/svg+xml",
            &[b"<svg xmlns='http://www.w3.org/2000/svg'><head></head></svg>"],
        ),
        "/events" => {
            write_chunked_head(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache",
            )?;
            write_chunk(out, b"data: </head> one\n\n")?;
            // The second event waits until the client has the first: a gateway that
            // buffered (to inject, or to compress) would hold the first one back.
            let _ = sse_go
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            write_chunk(out, b"data: two\n\n")?;
            end_chunks(out)
        }
        _ => write_sized(out, "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain", &[b"?"]),
    }
    })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("a valid gzip body");
    out
}

/// A gateway whose one public route puts [`THEME`] into pages from `upstream`; the
/// theme file lives in the returned directory.
fn css_gateway(upstream: SocketAddr) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let theme = dir.path().join("theme.css");
    std::fs::write(&theme, THEME).unwrap();
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(upstream))
            .plugin(
                "theme",
                "css_inject",
                json!({ "file": theme.display().to_string() }),
            )
            .route(
                Route::public("app", "app")
                    .path_prefix("/")
                    .plugins(&["theme"]),
            ),
    );
    (gw, dir)
}

const PAGE_LOAD: &str = "Accept: text/html,application/xhtml+xml,*/*;q=0.8";

#[test]
fn the_theme_goes_right_before_head_once_and_the_rest_is_byte_identical() {
    let (_tx, rx) = mpsc::channel();
    let up = page_upstream(rx);
    let (gw, _theme) = css_gateway(up.addr);
    let resp = get(gw.addr, "/page", &[PAGE_LOAD]);
    assert_eq!(resp.status, 200);
    assert_eq!(
        String::from_utf8(resp.body.clone()).unwrap(),
        injected_page()
    );
    // The page grew: the upstream's length, validator and ranges no longer hold.
    assert_eq!(resp.header("content-length"), None, "{resp:?}");
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.header("etag"), Some("W/\"v1\""));
    assert_eq!(resp.header("accept-ranges"), None);
    // No compression was asked for, so none is applied.
    assert_eq!(resp.header("content-encoding"), None);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].all("accept-encoding"), ["identity"]);
}

/// HTTP/1.0 has no chunked framing. A page whose length the theme changed, or that the
/// upstream sent chunked, reaches an HTTP/1.0 client as it is, ended by closing the
/// connection, and uncompressed (compressing would need chunked framing too).
#[test]
fn an_http10_client_never_gets_chunked_framing() {
    let (_tx, rx) = mpsc::channel();
    let up = page_upstream(rx);
    let (gw, _theme) = css_gateway(up.addr);
    for target in ["/page", "/chunked-page"] {
        let mut conn = TcpStream::connect(gw.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            conn,
            "GET {target} HTTP/1.0\r\nHost: localhost\r\n{PAGE_LOAD}\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        .unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got)
            .expect("the gateway closes the connection");
        let text = String::from_utf8(got).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{target}: {head}");
        assert!(!head.contains("transfer-encoding"), "{target}: {head}");
        assert!(!head.contains("content-encoding"), "{target}: {head}");
        assert!(!head.contains("connection: keep-alive"), "{target}: {head}");
        assert_eq!(body, injected_page(), "{target}");
    }
}

#[test]
fn pages_are_compressed_for_clients_that_accept_gzip() {
    let (_tx, rx) = mpsc::channel();
    let up = page_upstream(rx);
    let (gw, _theme) = css_gateway(up.addr);
    let resp = get(gw.addr, "/page", &[PAGE_LOAD, "Accept-Encoding: gzip"]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-encoding"), Some("gzip"), "{resp:?}");
    assert!(
        resp.header("vary")
            .is_some_and(|v| v.to_ascii_lowercase().contains("accept-encoding")),
        "{resp:?}"
    );
    assert_eq!(
        String::from_utf8(gunzip(&resp.body)).unwrap(),
        injected_page()
    );
    // The upstream was asked for the page uncompressed, whatever the client accepts.
    assert_eq!(up.seen()[0].all("accept-encoding"), ["identity"]);
}

#[test]
fn a_page_the_upstream_compresses_anyway_passes_untouched() {
    let (_tx, rx) = mpsc::channel();
    let up = page_upstream(rx);
    let (gw, _theme) = css_gateway(up.addr);
    let resp = get(gw.addr, "/gzipped", &[PAGE_LOAD, "Accept-Encoding: gzip"]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-encoding"), Some("gzip"));
    let original = gzip(format!("{PAGE_START}{PAGE_END}").as_bytes());
    assert_eq!(resp.body, original);
    let length = original.len().to_string();
    assert_eq!(resp.header("content-length"), Some(length.as_str()));
}

#[test]
fn json_errors_images_events_and_websockets_are_untouched() {
    let (tx, rx) = mpsc::channel();
    let up = page_upstream(rx);
    let demo = Upstreams::start(1);
    let (gw, _theme) = css_gateway(up.addr);
    for (path, accept, body, length) in [
        (
            "/json",
            "Accept: application/json",
            &br#"{"html": "<head></head>"}"#[..],
            "25",
        ),
        (
            "/missing",
            PAGE_LOAD,
            b"<html><head></head><body>no such page</body></html>",
            "51",
        ),
        (
            "/image",
            "Accept: image/*",
            b"<svg xmlns='http://www.w3.org/2000/svg'><head></head></svg>",
            "59",
        ),
    ] {
        let resp = get(gw.addr, path, &[accept]);
        assert_eq!(resp.body, body, "{path}");
        assert_eq!(resp.header("content-length"), Some(length), "{path}");
        assert_eq!(resp.header("content-encoding"), None, "{path}");
    }
    // A JSON call keeps its own Accept-Encoding: only page loads are asked uncompressed.
    let resp = get(
        gw.addr,
        "/json",
        &["Accept: application/json", "Accept-Encoding: gzip, br"],
    );
    assert_eq!(resp.status, 200);
    let json_seen = up
        .seen()
        .into_iter()
        .rfind(|s| s.target == "/json")
        .unwrap();
    assert_eq!(json_seen.all("accept-encoding"), ["gzip, br"]);

    // Events stream one by one, unchanged and uncompressed, even when the request
    // looked like a page load that accepts gzip.
    demo.runtime.block_on(async {
        let mut resp = client()
            .get(gw.url("/events"))
            .header("accept", "text/html, text/event-stream")
            .header("accept-encoding", "gzip")
            .send()
            .await
            .expect("events");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-encoding").is_none(), "{resp:?}");
        let mut body = Vec::new();
        while !body.ends_with(b"\n\n") {
            let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
                .await
                .expect("the first event arrives while the stream is open")
                .expect("body")
                .expect("more body");
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"data: </head> one\n\n");
        tx.send(()).unwrap();
        while let Some(chunk) = resp.chunk().await.expect("body") {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"data: </head> one\n\ndata: two\n\n");
    });

    // WebSocket upgrades go through with their frames as sent.
    let (gw, _theme) = css_gateway(demo.addr(0));
    demo.runtime.block_on(async {
        let (mut ws, _) = ws_connect(format!("ws://{}/ws", gw.addr)).await;
        let text = "<html><head></head></html>";
        ws.send(Message::text(text)).await.expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("frame");
        assert_eq!(echoed, Message::text(text));
        ws.close(None).await.expect("close");
    });
}

#[test]
fn a_100_mib_page_streams_through_in_bounded_memory() {
    const MIB: usize = 1 << 20;
    const FILLER: usize = 100 * MIB;
    const HEAD: &[u8] = b"<!doctype html><html><head>";
    const TAIL: &[u8] = b"</head><body>end</body></html>";
    // Real pages are full of `</`: each one is a candidate the scan has to look at. The
    // head closes only at the very end, so every byte is scanned and carried over.
    let line = b"<p>lorem ipsum dolor sit amet, consectetur adipiscing elit</p>\n";
    let block: Vec<u8> = line.iter().copied().cycle().take(64 * 1024).collect();
    let block = Arc::new(block);
    let up = {
        let block = block.clone();
        ScriptedUpstream::start(move |_, out| {
            write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                HEAD.len() + FILLER + TAIL.len()
            )?;
            out.write_all(HEAD)?;
            for _ in 0..FILLER / block.len() {
                out.write_all(&block)?;
            }
            out.write_all(TAIL)
        })
    };
    let (gw, _theme) = css_gateway(up.addr);
    let before = peak_rss_bytes(gw.pid());
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (total, head_ok, tail) = runtime.block_on(async {
        let mut resp = client
            .get(gw.url("/big"))
            .header("accept", "text/html")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-length").is_none());
        let mut total = 0usize;
        let mut start = Vec::new();
        let mut tail: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.expect("body") {
            if start.len() < HEAD.len() {
                start.extend_from_slice(&chunk[..chunk.len().min(HEAD.len())]);
            }
            total += chunk.len();
            tail.extend_from_slice(&chunk);
            let keep = tail.len().saturating_sub(256);
            tail.drain(..keep);
        }
        (total, start.starts_with(HEAD), tail)
    });
    let peak = peak_rss_bytes(gw.pid());
    eprintln!(
        "100 MiB page: gateway peak RSS {} MiB (at start {} MiB)",
        peak >> 20,
        before >> 20
    );
    assert_eq!(total, HEAD.len() + FILLER + STYLE.len() + TAIL.len());
    assert!(head_ok);
    let expected_tail = [STYLE.as_bytes(), TAIL].concat();
    assert!(
        tail.ends_with(&expected_tail),
        "{}",
        String::from_utf8_lossy(&tail)
    );
    assert!(peak < 150 << 20, "gateway peak RSS {} MiB", peak >> 20);
}

// --------------------------------------------------------------------- upstream_auth

const SERVER_KEY: &str = "sk-upstream-0123456789-server-only-SECRET";

/// Creates a keys file with one user key; returns the file's directory, its path and
/// the key.
fn keys_file() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.yaml");
    let (_, key) = gatewarden_plugins::keys::create_key(
        &path,
        gatewarden_plugins::keys::NewKey {
            name: "laptop".into(),
            role: gatewarden_plugins::Role::User,
            subject: Some("ann".into()),
            expires_at: None,
        },
    )
    .expect("create key");
    (dir, path, key)
}

const ADMIN_KEY: &str = "admin-key-for-the-config-api-0123";

/// A gateway whose `llm` route needs an API key and swaps it for [`SERVER_KEY`], which
/// is written into the YAML itself so that masking is tested too.
fn auth_gateway(upstream: SocketAddr, keys: &Path) -> Gateway {
    let dead = free_port();
    Gateway::start_with(
        Config::new()
            .admin_key(ADMIN_KEY)
            .upstream("llm", Upstream::to(upstream))
            .upstream("gone", Upstream::named(&format!("127.0.0.1:{dead}")))
            .plugin(
                "keys",
                "api_key",
                json!({ "keys_file": keys.display().to_string() }),
            )
            .plugin(
                "llm_key",
                "upstream_auth",
                json!({ "value": format!("Bearer {SERVER_KEY}") }),
            )
            .route(
                Route::new("llm", "llm", "user")
                    .path_prefix("/v1")
                    .plugins(&["keys", "llm_key"]),
            )
            .route(
                Route::new("key_swap_listed_first", "llm", "user")
                    .path_prefix("/v2")
                    .plugins(&["llm_key", "keys"]),
            )
            .route(
                Route::new("down", "gone", "user")
                    .path_prefix("/down")
                    .plugins(&["keys", "llm_key"]),
            ),
        // Everything the gateway and Pingora would log about a request, so a leak shows.
        &[("RUST_LOG", "debug")],
    )
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> RawResponse {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(addr, &req).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[test]
fn the_upstream_sees_only_the_server_key() {
    let (_dir, keys, user_key) = keys_file();
    let up = RecordingUpstream::start();
    let gw = auth_gateway(up.addr, &keys);
    let bearer = format!("Authorization: Bearer {user_key}");
    let x_api_key = format!("X-API-Key: {user_key}");
    for headers in [
        &[bearer.as_str()][..],
        // The key in X-API-Key and another scheme's credential in Authorization.
        &[x_api_key.as_str(), "Authorization: Basic bWFsbG9yeTpwdw=="][..],
    ] {
        let resp = request(gw.addr, "POST", "/v1/chat/completions", headers);
        assert_eq!(resp.status, 200, "{headers:?}: {resp:?}");
    }
    // A bearer token is the api_key plugin's to check (its default sources read both
    // headers), and Authorization sent twice is ambiguous: neither reaches anyone.
    for headers in [
        &[x_api_key.as_str(), "authorization: Bearer one"][..],
        &[
            x_api_key.as_str(),
            "authorization: Bearer one",
            "AUTHORIZATION: Bearer two",
        ][..],
    ] {
        let resp = request(gw.addr, "POST", "/v1/chat/completions", headers);
        assert_eq!(resp.status, 401, "{headers:?}: {resp:?}");
    }
    // The order of the chain does not matter: listed before the identity plugin, the
    // key swap still leaves the caller's key for it to check.
    let resp = request(gw.addr, "POST", "/v2/chat/completions", &[&bearer]);
    assert_eq!(resp.status, 200, "{resp:?}");
    let requests = up.requests();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        let auth: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.as_str())
            .collect();
        let server_value = format!("Bearer {SERVER_KEY}");
        assert_eq!(auth, [server_value.as_str()], "{r:?}");
        assert!(
            !r.headers.iter().any(|(_, v)| v.contains(&user_key)),
            "the caller's key went upstream: {r:?}"
        );
        assert!(!r
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("x-api-key")));
    }
}

#[test]
fn unauthenticated_requests_never_reach_the_upstream_and_the_key_never_shows() {
    let (_dir, keys, user_key) = keys_file();
    let up = RecordingUpstream::start();
    let gw = auth_gateway(up.addr, &keys);
    let mut seen_by_client = String::new();
    let mut record = |resp: &RawResponse| {
        for (n, v) in &resp.headers {
            seen_by_client.push_str(&format!("{n}: {v}\n"));
        }
        seen_by_client.push_str(&String::from_utf8_lossy(&resp.body));
    };
    // The real key with its last character changed (to another one, whatever it was).
    let (head, last) = user_key.split_at(user_key.len() - 1);
    let wrong = format!(
        "Authorization: Bearer {head}{}",
        if last == "x" { "y" } else { "x" }
    );
    for headers in [
        &[][..],
        &[wrong.as_str()][..],
        &["Authorization: Bearer not-a-gatewarden-key"][..],
        &["X-API-Key: gw_forged"][..],
    ] {
        let resp = request(gw.addr, "POST", "/v1/chat/completions", headers);
        assert_eq!(resp.status, 401, "{headers:?}: {resp:?}");
        record(&resp);
    }
    assert_eq!(
        up.connections(),
        0,
        "a refused request reached the upstream"
    );

    // An accepted request, and one whose upstream is down (an error the gateway writes).
    let bearer = format!("Authorization: Bearer {user_key}");
    let ok = request(gw.addr, "POST", "/v1/chat/completions", &[&bearer]);
    assert_eq!(ok.status, 200);
    record(&ok);
    let down = request(gw.addr, "POST", "/down/x", &[&bearer]);
    assert_eq!(down.status, 502);
    record(&down);

    let metrics = get(gw.admin, "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    record(&metrics);
    let config = get(
        gw.admin,
        "/admin/config",
        &[&format!("Authorization: Bearer {ADMIN_KEY}")],
    );
    assert_eq!(config.status, 200, "{config:?}");
    record(&config);
    assert!(seen_by_client.contains("upstream_auth"), "{seen_by_client}");

    assert!(
        !seen_by_client.contains(SERVER_KEY),
        "the server key was shown to a client:\n{seen_by_client}"
    );
    // The log lines arrive through a pipe read by another thread: wait for them.
    poll_until(
        "the failed request to be logged",
        Duration::from_secs(5),
        || gw.output().contains("upstream gone"),
    );
    let output = gw.output();
    assert!(
        !output.contains(SERVER_KEY),
        "the server key was logged:\n{output}"
    );
}

// ------------------------------------------------------------ the worked example

const EXAMPLE_KEY: &str = "sk-llm-example-key-never-in-a-browser-42";
const EXAMPLE_PIN: &str = "97531";
const EXAMPLE_SECRET: &str = "worked-example-session-secret-0123456789";
const WORDS: [&str; 4] = ["Hello", " from", " behind", " the gateway"];

/// An OpenAI-compatible server: `POST /v1/chat/completions` streams [`WORDS`] as
/// `chat.completion.chunk` events, sending each word only after the client has
/// acknowledged the previous one with `GET /ack/N` (sent directly, not through the
/// gateway). So a client gets every word while the stream is still open, or the test
/// fails: a buffering gateway would hold the first word until the end.
struct FakeLlm {
    upstream: ScriptedUpstream,
    /// Per completion: for each word after the first, whether its predecessor had been
    /// acknowledged before it was sent.
    acked: Arc<Mutex<Vec<Vec<bool>>>>,
}

impl FakeLlm {
    fn start() -> FakeLlm {
        let (tx, rx) = mpsc::channel::<usize>();
        let (tx, rx) = (Mutex::new(tx), Mutex::new(rx));
        let acked: Arc<Mutex<Vec<Vec<bool>>>> = Arc::default();
        let log = acked.clone();
        let upstream = ScriptedUpstream::start(move |req, out| {
            if let Some(n) = req.target.strip_prefix("/ack/") {
                let _ = tx.lock().unwrap().send(n.parse().unwrap_or(usize::MAX));
                return write_sized(out, "HTTP/1.1 200 OK\r\ncontent-type: text/plain", &[b"ok"]);
            }
            if req.method != "POST" || req.target != "/v1/chat/completions" {
                return write_sized(
                    out,
                    "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain",
                    &[b"?"],
                );
            }
            let rx = rx.lock().unwrap();
            while rx.try_recv().is_ok() {}
            write_chunked_head(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache",
            )?;
            let mut acks = Vec::new();
            for (i, word) in WORDS.iter().enumerate() {
                if i > 0 {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut got = false;
                    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                        match rx.recv_timeout(left) {
                            Ok(n) if n == i - 1 => {
                                got = true;
                                break;
                            }
                            Ok(_) => continue,
                            Err(_) => break,
                        }
                    }
                    acks.push(got);
                }
                let event = serde_json::json!({
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "created": 1_700_000_000,
                    "model": "test-model",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}],
                });
                write_chunk(out, format!("data: {event}\n\n").as_bytes())?;
            }
            let last = serde_json::json!({
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": "test-model",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            });
            write_chunk(out, format!("data: {last}\n\ndata: [DONE]\n\n").as_bytes())?;
            log.lock().unwrap().push(acks);
            end_chunks(out)
        });
        FakeLlm { upstream, acked }
    }

    fn completions(&self) -> Vec<Seen> {
        self.upstream
            .seen()
            .into_iter()
            .filter(|s| s.target == "/v1/chat/completions")
            .collect()
    }
}

/// The repository's `conf/`.
fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf")
}

/// `conf/chat-and-llm.yaml` as shipped, with only its addresses and file paths pointed
/// at this test's listeners, upstreams and keys file.
fn worked_example(chat_ui: SocketAddr, llm: SocketAddr, keys: &Path) -> Gateway {
    let shipped = std::fs::read_to_string(conf_dir().join("chat-and-llm.yaml")).unwrap();
    for from in [
        "127.0.0.1:8080",
        "127.0.0.1:9091",
        "127.0.0.1:3000",
        "127.0.0.1:4000",
        "/var/lib/gatewarden/keys.yaml",
        "conf/theme.css",
    ] {
        assert!(
            shipped.contains(from),
            "conf/chat-and-llm.yaml no longer has {from}"
        );
    }
    // The harness puts in its own listener and admin addresses; the rest is pointed
    // here value by value, every other setting as shipped.
    let mut example: serde_json::Value = serde_yaml_ng::from_str(&shipped).unwrap();
    example["upstreams"]["chat_ui"]["backends"] = json!([chat_ui.to_string()]);
    example["upstreams"]["llm"]["backends"] = json!([llm.to_string()]);
    example["plugins"]["keys"]["keys_file"] = json!(keys.display().to_string());
    example["plugins"]["theme"]["file"] = json!(conf_dir().join("theme.css").display().to_string());
    let config = Config::from_yaml(&serde_yaml_ng::to_string(&example).unwrap());
    let pin_hash = gatewarden_plugins::pin_gate::hash_pin(EXAMPLE_PIN).unwrap();
    Gateway::start_with(
        config,
        &[
            ("GATEWARDEN_PIN_HASH", pin_hash.as_str()),
            ("GATEWARDEN_SESSION_SECRET", EXAMPLE_SECRET),
            ("LLM_API_KEY", EXAMPLE_KEY),
        ],
    )
}

/// The chat UI: one page.
fn chat_ui() -> ScriptedUpstream {
    ScriptedUpstream::start(|_, out| {
        write_sized(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8",
            &[b"<!doctype html><html><head><title>Chat</title></head><body><main id=chat></main></body></html>"],
        )
    })
}

/// Logs in through the PIN form; returns the session cookie as `name=value`.
fn log_in(gw: &Gateway) -> String {
    let body = format!("pin={EXAMPLE_PIN}&next=/");
    let resp = raw(
        gw.addr,
        &format!(
            "POST /.gatewarden/login HTTP/1.1\r\nHost: {}\r\nOrigin: http://{}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            gw.addr,
            gw.addr,
            body.len()
        ),
    )
    .expect("login");
    assert_eq!(resp.status, 303, "{resp:?}");
    let cookie = resp.header("set-cookie").expect("a session cookie");
    cookie.split(';').next().unwrap().to_string()
}

fn ack(llm: &FakeLlm, n: usize) {
    let resp = get(llm.upstream.addr, &format!("/ack/{n}"), &[]);
    assert_eq!(resp.status, 200);
}

/// Parses the `delta.content` of each `chat.completion.chunk` in an SSE body.
fn words_of(sse: &str) -> Vec<String> {
    sse.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .filter_map(|data| {
            let v: serde_json::Value = serde_json::from_str(data).ok()?;
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn the_worked_example_streams_a_completion_to_a_browser_session_with_the_server_key() {
    let (_dir, keys, _) = keys_file();
    let (ui, llm) = (chat_ui(), FakeLlm::start());
    let gw = worked_example(ui.addr, llm.upstream.addr, &keys);
    let cookie = log_in(&gw);
    let origin = format!("http://{}", gw.addr);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = client();
    runtime.block_on(async {
        // What the chat page's fetch() sends: its cookie, its origin, no key at all.
        let mut resp = http
            .post(gw.url("/api/llm/v1/chat/completions"))
            .header("cookie", &cookie)
            .header("origin", &origin)
            .header("sec-fetch-site", "same-origin")
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .body(r#"{"model":"test-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .expect("completion");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        let mut body = String::new();
        let mut words = Vec::new();
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(15), resp.chunk())
                .await
                .expect("each word arrives while the stream is open")
                .expect("body");
            let Some(chunk) = chunk else { break };
            body.push_str(std::str::from_utf8(&chunk).unwrap());
            let now = words_of(&body);
            // Acknowledge each word as it arrives, which releases the next.
            for n in words.len()..now.len() {
                ack(&llm, n);
            }
            words = now;
        }
        assert_eq!(words, WORDS);
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    });
    assert_eq!(*llm.acked.lock().unwrap(), [vec![true; WORDS.len() - 1]]);
    let seen = llm.completions();
    assert_eq!(seen.len(), 1);
    let server_value = format!("Bearer {EXAMPLE_KEY}");
    assert_eq!(seen[0].all("authorization"), [server_value.as_str()]);
    assert!(
        !seen[0].headers.iter().any(|(_, v)| v.contains(&cookie)),
        "the session cookie went to the LLM: {:?}",
        seen[0].headers
    );
}

#[test]
fn the_worked_example_themes_the_chat_and_refuses_strangers() {
    let (_dir, keys, _) = keys_file();
    let (ui, llm) = (chat_ui(), FakeLlm::start());
    let gw = worked_example(ui.addr, llm.upstream.addr, &keys);
    let theme = std::fs::read_to_string(conf_dir().join("theme.css")).unwrap();

    // Without a session: the browser is sent to the login page, an API client gets 401.
    let resp = get(gw.addr, "/", &[PAGE_LOAD]);
    assert_eq!(resp.status, 302);
    assert!(resp
        .header("location")
        .unwrap()
        .starts_with("/.gatewarden/login"));
    let resp = request(
        gw.addr,
        "POST",
        "/api/llm/v1/chat/completions",
        &["Content-Type: application/json"],
    );
    assert_eq!(resp.status, 401);
    assert!(llm.completions().is_empty());

    let cookie = log_in(&gw);
    let cookie_header = format!("Cookie: {cookie}");
    let resp = get(gw.addr, "/", &[PAGE_LOAD, &cookie_header]);
    assert_eq!(resp.status, 200);
    let page = String::from_utf8(resp.body).unwrap();
    assert_eq!(
        page,
        format!(
            "<!doctype html><html><head><title>Chat</title><style>{theme}</style></head><body><main id=chat></main></body></html>"
        )
    );
    assert_eq!(ui.seen()[0].all("accept-encoding"), ["identity"]);

    // A hostile page cannot make the browser post to the API with the user's cookie.
    let resp = request(
        gw.addr,
        "POST",
        "/api/llm/v1/chat/completions",
        &[
            &cookie_header,
            "Origin: https://evil.example",
            "Sec-Fetch-Site: cross-site",
            "Content-Type: application/json",
        ],
    );
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(llm.completions().is_empty());
}

// ---------------------------------------------------------- the official openai client

/// A Python interpreter that can `import openai`. Installs the package from PyPI when
/// it is missing (scripts/setup.sh does so for CI). Outside CI a machine without it
/// skips the test with a note; under `CI=true` that is a failure.
fn python_with_openai() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = || {
        Command::new(&python)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_openai() {
        let mut install = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(child) = &mut install {
            let deadline = Instant::now() + Duration::from_secs(180);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if has_openai() {
        return Some(python);
    }
    let message = format!(
        "the `openai` Python package is not installed for {python} and could not be installed \
         (bash scripts/setup.sh installs it)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("skipping: {message}");
    None
}

const OPENAI_SCRIPT: &str = r#"
import sys, urllib.request
import openai

base_url, api_key, llm = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(
    base_url=base_url,
    api_key=api_key,
    max_retries=0,
    timeout=30,
)
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
stream = client.chat.completions.create(
    model="test-model",
    messages=[{"role": "user", "content": "Say hello"}],
    stream=True,
)
n = 0
for chunk in stream:
    if not chunk.choices or chunk.choices[0].delta.content is None:
        continue
    print("word:" + chunk.choices[0].delta.content, flush=True)
    # Tell the server this word arrived; it sends the next one only then.
    direct.open(f"{llm}/ack/{n}", timeout=10).read()
    n += 1
print("done", flush=True)
"#;

#[test]
fn the_official_openai_client_streams_a_completion_through_the_gateway() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let (_dir, keys, user_key) = keys_file();
    let (ui, llm) = (chat_ui(), FakeLlm::start());
    let gw = worked_example(ui.addr, llm.upstream.addr, &keys);
    let script_dir = tempfile::tempdir().unwrap();
    let script = script_dir.path().join("stream.py");
    std::fs::write(&script, OPENAI_SCRIPT).unwrap();

    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg(gw.url("/api/llm/v1"))
        .arg(&user_key)
        .arg(format!("http://{}", llm.upstream.addr))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.to_ascii_lowercase().ends_with("_proxy") || name.starts_with("OPENAI_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().expect("start python");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the openai client did not finish in time:\n{}", gw.output());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("python output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    let words: Vec<_> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("word:"))
        .collect();
    assert_eq!(words, WORDS, "{stdout}");
    assert!(stdout.trim_end().ends_with("done"), "{stdout}");
    // Every word reached the client before the server sent the next one.
    assert_eq!(*llm.acked.lock().unwrap(), [vec![true; WORDS.len() - 1]]);

    let seen = llm.completions();
    assert_eq!(seen.len(), 1);
    let server_value = format!("Bearer {EXAMPLE_KEY}");
    assert_eq!(seen[0].all("authorization"), [server_value.as_str()]);
    let sent: HashMap<_, _> = seen[0]
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.as_str()))
        .collect();
    assert!(
        !sent.values().any(|v| v.contains(&user_key)),
        "the gatewarden key went upstream: {sent:?}"
    );
    assert!(
        sent.get("user-agent")
            .is_some_and(|ua| ua.contains("OpenAI")),
        "{sent:?}"
    );
}
