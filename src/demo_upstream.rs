//! A small HTTP/1.1 upstream for demos and integration tests.
//!
//! It exercises the proxy paths that matter for a gateway: request echoing (to see what the
//! gateway forwarded), streamed responses (SSE, large downloads), streamed uploads, WebSocket
//! upgrades, arbitrary status codes and slow responses. Every response carries
//! `x-demo-upstream: <port>` so tests can tell which backend answered.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use bytes::Bytes;
use futures_util::{stream, SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha1::{Digest, Sha1};
use tokio::{net::TcpListener, sync::watch};
use tokio_tungstenite::{
    tungstenite::{protocol::Role, Message},
    WebSocketStream,
};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// `/echo` only returns bodies up to this size; larger ones are counted, not buffered.
const ECHO_BODY_LIMIT: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;

/// Byte `k` of every `/bytes/{n}` response is `k % 256`, so clients can verify content and
/// offsets (e.g. after range or resume handling) without the server allocating anything.
static PATTERN: [u8; CHUNK] = pattern();

const fn pattern() -> [u8; CHUNK] {
    let mut buf = [0u8; CHUNK];
    let mut i = 0;
    while i < CHUNK {
        buf[i] = i as u8;
        i += 1;
    }
    buf
}

/// A running demo upstream; dropping it does NOT stop it (it runs on the runtime), call `shutdown()`.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
}

impl DemoUpstream {
    /// Bind `addr` (e.g. "127.0.0.1:0") and serve on the current tokio runtime.
    pub async fn start(addr: &str) -> std::io::Result<DemoUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, addr.port(), rx));
        Ok(DemoUpstream { addr, shutdown })
    }

    /// Stops accepting and gracefully closes open connections: idle keep-alive connections
    /// close at once, in-flight responses and upgraded WebSockets run to completion.
    pub fn shutdown(&self) {
        // `send_replace` (unlike `send`) works even when no receiver is currently alive.
        self.shutdown.send_replace(true);
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped `DemoUpstream` closes the channel; that must not stop the server.
    if rx.wait_for(|&stop| stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn accept_loop(listener: TcpListener, port: u16, rx: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE; back off instead of spinning on the error.
                    log::warn!("demo upstream :{port}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(rx.clone()) => return,
        };
        let rx = rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, port));
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let res = tokio::select! {
                res = conn.as_mut() => res,
                () = stopped(rx) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = res {
                log::debug!("demo upstream :{port}: connection error: {e}");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, port: u16) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let mut resp = match path.as_str() {
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        "/health" => respond(StatusCode::OK, "text/plain", "ok"),
        "/sse" => sse(query),
        "/ws" => websocket(req),
        "/sink" => match read_body(req.into_body(), 0).await {
            Ok((received, _)) => json_response(StatusCode::OK, json!({ "received": received })),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        p if p == "/echo" || p.starts_with("/echo/") => echo(req, query).await,
        p => {
            if let Some(arg) = p.strip_prefix("/status/") {
                match arg.parse::<u16>() {
                    Ok(code @ 200..=599) => status(code),
                    _ => error(StatusCode::BAD_REQUEST, "status must be 200..=599"),
                }
            } else if let Some(arg) = p.strip_prefix("/delay/") {
                match arg.parse::<u64>() {
                    Ok(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        json_response(StatusCode::OK, json!({ "delayed_ms": ms }))
                    }
                    Err(_) => error(StatusCode::BAD_REQUEST, "delay must be milliseconds"),
                }
            } else if let Some(arg) = p.strip_prefix("/bytes/") {
                match arg.parse::<u64>() {
                    Ok(n) => bytes_response(n),
                    Err(_) => error(StatusCode::BAD_REQUEST, "length must be a number"),
                }
            } else {
                error(StatusCode::NOT_FOUND, "not found")
            }
        }
    };
    resp.headers_mut()
        .insert("x-demo-upstream", HeaderValue::from(port));
    Ok(resp)
}

// Responses are assembled via `Response::new` + `*_mut` rather than the builder, which keeps
// construction infallible without `expect`.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, value: Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({ "error": message, "status": status.as_u16() }),
    )
}

fn status(code: u16) -> Response<Body> {
    // `code` was range-checked by the caller, so this fallback is unreachable in practice.
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if matches!(code, 204 | 304) {
        // These statuses must not carry a body.
        let mut resp = Response::new(Full::default().boxed_unsync());
        *resp.status_mut() = status;
        return resp;
    }
    json_response(status, json!({ "status": code }))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// Drains `body` frame by frame, keeping at most `keep` bytes so huge uploads cost no memory.
/// Returns the total length and the body if it fitted.
async fn read_body(
    mut body: Incoming,
    keep: usize,
) -> Result<(u64, Option<Vec<u8>>), hyper::Error> {
    let (mut total, mut kept) = (0u64, Some(Vec::new()));
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        }; // trailers
        total += data.len() as u64;
        kept = kept.filter(|buf| buf.len() + data.len() <= keep);
        if let Some(buf) = &mut kept {
            buf.extend_from_slice(&data);
        }
    }
    Ok((total, kept))
}

async fn echo(req: Request<Incoming>, query: Option<&str>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let (body_len, body) = match read_body(body, ECHO_BODY_LIMIT).await {
        Ok(read) => read,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    // `HeaderMap` groups repeated names together, so order is per name, not fully as sent.
    let headers: Vec<[String; 2]> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            [name.as_str().to_owned(), value]
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": query,
            "headers": headers,
            "body_len": body_len,
            "body": body.map(|b| String::from_utf8_lossy(&b).into_owned()),
        }),
    )
}

fn sse(query: Option<&str>) -> Response<Body> {
    let count: u64 = query_param(query, "n")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let interval = Duration::from_millis(
        query_param(query, "interval_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    // Sleeping between frames makes the body pend, which is what makes hyper flush each
    // event onto the wire immediately.
    let events = stream::unfold(1u64, move |i| async move {
        if i > count {
            return None;
        }
        if i > 1 {
            tokio::time::sleep(interval).await;
        }
        let event = Bytes::from(format!("data: {{\"n\": {i}}}\n\n"));
        Some((Ok(Frame::data(event)), i + 1))
    });
    let mut resp = Response::new(StreamBody::new(events).boxed_unsync());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn bytes_response(n: u64) -> Response<Body> {
    let chunks = stream::unfold(n, |remaining| async move {
        if remaining == 0 {
            return None;
        }
        // `CHUNK` is a multiple of 256, so every chunk continues the `k % 256` pattern.
        let len = remaining.min(CHUNK as u64) as usize;
        let chunk = Bytes::from_static(&PATTERN[..len]);
        Some((Ok(Frame::data(chunk)), remaining - len as u64))
    });
    let mut resp = Response::new(StreamBody::new(chunks).boxed_unsync());
    let headers = resp.headers_mut();
    let content_type = HeaderValue::from_static("application/octet-stream");
    headers.insert(header::CONTENT_TYPE, content_type);
    // An explicit length makes hyper send a sized body rather than chunked encoding.
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    resp
}

fn websocket(req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let is_websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (true, Some(key)) = (is_websocket, headers.get(header::SEC_WEBSOCKET_KEY)) else {
        return error(StatusCode::BAD_REQUEST, "expected a websocket upgrade");
    };
    let accept = websocket_accept(key.as_bytes());
    tokio::spawn(async move {
        // Resolves only after hyper has written the 101 below and handed over the socket.
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(upgraded) => upgraded,
            Err(e) => return log::debug!("demo upstream: websocket upgrade failed: {e}"),
        };
        let io = TokioIo::new(upgraded);
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        // Pings and the close handshake are answered by tungstenite itself; keep reading until
        // it reports the stream closed so the close reply gets flushed.
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    log::debug!("demo upstream: websocket error: {e}");
                    break;
                }
            }
        }
    });
    let mut resp = Response::new(Full::default().boxed_unsync());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

/// `Sec-WebSocket-Accept` per RFC 6455 §4.2.2.
fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    BASE64.encode(Sha1::new().chain_update(key).chain_update(GUID).finalize())
}

// Links and script use relative URLs so the page also works behind a gateway path prefix.
const INDEX_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Gatewarden demo</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  code { background: #f2f2f2; padding: 0 .3em; border-radius: 3px; }
  pre { background: #111; color: #9f9; padding: .8rem; border-radius: 6px; min-height: 3em; white-space: pre-wrap; }
  li { margin: .2em 0; }
</style>
</head>
<body>
<h1>Gatewarden demo upstream</h1>
<p>If you can read this, the gateway let you through.</p>
<h2>Endpoints</h2>
<ul>
  <li><a href="echo?hello=world"><code>/echo</code></a> &mdash; the request as received, as JSON</li>
  <li><a href="sse?n=5&amp;interval_ms=500"><code>/sse?n=5&amp;interval_ms=500</code></a> &mdash; server-sent events</li>
  <li><code>/ws</code> &mdash; WebSocket echo</li>
  <li><a href="status/418"><code>/status/{code}</code></a> &mdash; any status</li>
  <li><a href="delay/1000"><code>/delay/{ms}</code></a> &mdash; slow response</li>
  <li><a href="bytes/1048576"><code>/bytes/{n}</code></a> &mdash; n streamed bytes</li>
  <li><code>/sink</code> &mdash; discards the request body, reports its size</li>
  <li><a href="health"><code>/health</code></a></li>
</ul>
<h2>Live</h2>
<p><button id="sse">Stream events</button> <button id="ws">WebSocket echo</button></p>
<pre id="log"></pre>
<script>
const log = (line) => { document.getElementById("log").textContent += line + "\n"; };
document.getElementById("sse").onclick = () => {
  const es = new EventSource("sse?n=5&interval_ms=500");
  // EventSource reconnects when a stream ends, so close it after the last event.
  es.onmessage = (e) => { log("sse: " + e.data); if (JSON.parse(e.data).n === 5) es.close(); };
  es.onerror = () => { log("sse: error"); es.close(); };
};
document.getElementById("ws").onclick = () => {
  const url = new URL("ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.onopen = () => ws.send("hello at " + new Date().toLocaleTimeString());
  ws.onmessage = (e) => { log("ws echo: " + e.data); ws.close(); };
  ws.onerror = () => log("ws: error");
};
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends `head` (plus `body` chunks, written separately) and reads until the server closes.
    async fn raw(addr: SocketAddr, head: &str, body: &[&[u8]]) -> (String, Vec<u8>) {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        for chunk in body {
            conn.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).await.unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(buf[..split].to_vec()).unwrap();
        (head.to_ascii_lowercase(), buf[split + 4..].to_vec())
    }

    #[tokio::test]
    async fn echo_reports_request() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        let req = "POST /echo/a/b?x=1 HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nX-A: 2\r\n\
                   Content-Length: 5\r\nConnection: close\r\n\r\nhello";
        let (head, body) = raw(up.addr, req, &[]).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains(&format!("x-demo-upstream: {}", up.addr.port())));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/echo/a/b");
        assert_eq!(v["query"], "x=1");
        assert_eq!(v["body_len"], 5);
        assert_eq!(v["body"], "hello");
        let headers = v["headers"].as_array().unwrap();
        assert!(headers.contains(&json!(["x-a", "1"])) && headers.contains(&json!(["x-a", "2"])));
        up.shutdown();
    }

    #[tokio::test]
    async fn status_and_not_found() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        let (head, _) = raw(
            up.addr,
            "GET /status/418 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            &[],
        )
        .await;
        assert!(head.starts_with("http/1.1 418"), "{head}");
        let (head, body) = raw(
            up.addr,
            "GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            &[],
        )
        .await;
        assert!(head.starts_with("http/1.1 404"), "{head}");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"error": "not found", "status": 404})
        );
        up.shutdown();
    }

    #[tokio::test]
    async fn sse_events_are_spaced() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        let mut conn = TcpStream::connect(up.addr).await.unwrap();
        let req = "GET /sse?n=3&interval_ms=300 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        conn.write_all(req.as_bytes()).await.unwrap();
        let start = Instant::now();
        let (mut buf, mut seen) = (Vec::new(), Vec::new());
        let mut chunk = [0u8; 4096];
        loop {
            let n = conn.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let events = String::from_utf8_lossy(&buf)
                .matches("data: {\"n\": ")
                .count();
            seen.resize(events, start.elapsed());
        }
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("text/event-stream") && text.contains("data: {\"n\": 3}\n\n"));
        assert_eq!(seen.len(), 3);
        // Buffered output would deliver all events together; ~600 ms apart means streaming.
        assert!(seen[2] - seen[0] >= Duration::from_millis(400), "{seen:?}");
        up.shutdown();
    }

    #[tokio::test]
    async fn websocket_echoes() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", up.addr))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
        ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(vec![1, 2, 3])
        );
        ws.close(None).await.unwrap();
        let (head, _) = raw(
            up.addr,
            "GET /ws HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            &[],
        )
        .await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        up.shutdown();
    }

    #[tokio::test]
    async fn bytes_streams_exact_length() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        let req = "GET /bytes/1000000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        let (head, body) = raw(up.addr, req, &[]).await;
        assert!(head.contains("content-length: 1000000"), "{head}");
        assert_eq!(body.len(), 1_000_000);
        assert!(body.iter().enumerate().all(|(k, &b)| b == k as u8));
        up.shutdown();
    }

    #[tokio::test]
    async fn sink_counts_streamed_body() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        let chunk = [b"20000\r\n".as_slice(), &[7u8; 0x20000], b"\r\n"].concat();
        let mut parts = vec![chunk.as_slice(); 4];
        parts.push(b"0\r\n\r\n");
        let req = "POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        let (_, body) = raw(up.addr, req, &parts).await;
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({ "received": 4 * 0x20000 })
        );
        up.shutdown();
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let up = DemoUpstream::start("127.0.0.1:0").await.unwrap();
        up.shutdown();
        for _ in 0..100 {
            if TcpStream::connect(up.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("still accepting after shutdown");
    }
}
