//! Headless Chromium driven over the Chrome DevTools Protocol (a WebSocket), shared by
//! the browser tests: start it (or skip without one, outside CI), open a page, run
//! JavaScript in it, wait for the DOM, take screenshots.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// Where Debian's `chromium` package puts the browser.
const CANDIDATES: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser"];

/// How long one test may talk to the browser once it is up.
const SESSION_LIMIT: Duration = Duration::from_secs(30);

/// A headless Chromium with its own throwaway profile; killed on drop.
pub(crate) struct Chromium {
    child: Child,
    /// The DevTools HTTP endpoint.
    devtools: SocketAddr,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts the browser, or returns `None` on a machine without one. CI must catch a
    /// setup script that lost the package; a developer machine without a browser just
    /// skips.
    pub(crate) fn start_or_skip() -> Option<Chromium> {
        let Some(binary) = CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists()) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "chromium is not installed (looked for {CANDIDATES:?}); scripts/setup.sh installs it"
            );
            eprintln!(
                "SKIPPED browser test: chromium is not installed (apt-get install chromium, or bash scripts/setup.sh)"
            );
            return None;
        };
        Some(Chromium::start(&binary))
    }

    fn start(binary: &Path) -> Chromium {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--no-proxy-server",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut browser = Chromium {
            child,
            devtools: SocketAddr::from(([127, 0, 0, 1], 0)),
            _profile: profile,
        };
        // With port 0 Chromium picks a free port and writes it to this file.
        let port_file = browser._profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!("chromium exited with {status} before DevTools came up");
            }
            let port = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u16>().ok()));
            if let Some(port) = port {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open DevTools in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        browser.devtools = SocketAddr::from(([127, 0, 0, 1], port));
        browser
    }

    /// The WebSocket URL of the first page target.
    fn page_socket(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Chromium builds the WebSocket URLs from this Host header.
            let request = format!(
                "GET /json/list HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.devtools
            );
            if let Ok(resp) = raw(self.devtools, &request) {
                if let Ok(Value::Array(targets)) = serde_json::from_slice::<Value>(&resp.body) {
                    if let Some(url) = targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    {
                        return url.to_string();
                    }
                }
            }
            assert!(Instant::now() < deadline, "chromium shows no page target");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `session` against the browser's page on a runtime of its own, within
    /// [`SESSION_LIMIT`].
    pub(crate) fn drive<F: Future<Output = ()>>(&self, session: impl FnOnce(Cdp) -> F) {
        self.drive_within(SESSION_LIMIT, session);
    }

    /// Like [`Chromium::drive`], for a session that needs longer (one that waits for
    /// health checks, say).
    pub(crate) fn drive_within<F: Future<Output = ()>>(
        &self,
        limit: Duration,
        session: impl FnOnce(Cdp) -> F,
    ) {
        let socket = self.page_socket();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(limit, async {
                let (ws, _) = tokio_tungstenite::connect_async(socket.as_str())
                    .await
                    .expect("DevTools WebSocket");
                session(Cdp {
                    ws,
                    next_id: 0,
                    events: Vec::new(),
                })
                .await
            })
            .await
            .unwrap_or_else(|_| panic!("the browser session took over {limit:?}"))
        });
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DevTools Protocol client for one page.
pub(crate) struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    /// Events received so far, oldest first; only domains that were enabled send any.
    events: Vec<Value>,
}

impl Cdp {
    /// The next message from DevTools, as JSON.
    async fn recv(&mut self) -> Result<Value, String> {
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or("DevTools closed the connection")?
                .map_err(|e| e.to_string())?;
            if let Message::Text(text) = msg {
                return serde_json::from_str(&text).map_err(|e| e.to_string());
            }
        }
    }

    /// Calls `method`; events that arrive meanwhile are kept in `events`.
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let v = self.recv().await?;
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(format!("{method}: {e}")),
                    None => Ok(v["result"].clone()),
                };
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates JavaScript in the page (awaiting a promise) and returns its value.
    pub(crate) async fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expression}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expression` is true; navigation in between is fine.
    pub(crate) async fn wait_for(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.eval(expression).await == Ok(Value::Bool(true)) {
                return;
            }
            if Instant::now() > deadline {
                let at = self.eval("location.href").await;
                panic!("timed out waiting for {what} (page at {at:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// Waits until the events received so far give `find` an answer, reading more as
    /// they come.
    pub(crate) async fn wait_event<T>(
        &mut self,
        what: &str,
        find: impl Fn(&[Value]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = find(&self.events) {
                return found;
            }
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Ok(Ok(v)) if v.get("method").is_some() => self.events.push(v),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("waiting for {what}: {e}"),
                Err(_) => panic!("timed out waiting for {what}; events: {:#?}", self.events),
            }
        }
    }

    /// Focuses the element `selector` and types `text` into it, as a person would.
    pub(crate) async fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "document.querySelector({}).focus()",
            json!(selector)
        ))
        .await
        .unwrap_or_else(|e| panic!("focus {selector}: {e}"));
        self.call("Input.insertText", json!({ "text": text }))
            .await
            .unwrap_or_else(|e| panic!("type into {selector}: {e}"));
    }

    /// Clicks the element `selector`.
    pub(crate) async fn click(&mut self, selector: &str) {
        self.eval(&format!(
            "document.querySelector({}).click()",
            json!(selector)
        ))
        .await
        .unwrap_or_else(|e| panic!("click {selector}: {e}"));
    }

    /// A PNG of the page as it is drawn now, written to `dir/name.png`; the path.
    pub(crate) async fn screenshot(&mut self, dir: &Path, name: &str) -> PathBuf {
        use base64::Engine;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("screenshot {name} is not base64: {e}"));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        path
    }
}
