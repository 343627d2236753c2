//! A real browser through the PIN login: headless Chromium driven over the Chrome
//! DevTools Protocol (a WebSocket), so what is tested is what a person gets: the
//! redirect, the form, the cookie the browser keeps, and the upstream page.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::identity::{pin_hash, PIN, SECRET};

/// Where Debian's `chromium` package puts the browser.
const CANDIDATES: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser"];

/// A headless Chromium with its own throwaway profile; killed on drop.
struct Chromium {
    child: Child,
    /// The DevTools HTTP endpoint.
    devtools: SocketAddr,
    _profile: tempfile::TempDir,
}

impl Chromium {
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
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DevTools Protocol client for one page.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    /// Calls `method`; events that arrive meanwhile are skipped.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or("DevTools closed the connection")?
                .map_err(|e| e.to_string())?;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(format!("{method}: {e}")),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// Evaluates JavaScript in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, expression: &str) -> Result<Value, String> {
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
    async fn wait_for(&mut self, expression: &str, what: &str) {
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
}

fn chromium_binary() -> Option<PathBuf> {
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists())
}

#[test]
fn a_browser_is_sent_to_the_login_page_types_the_pin_and_lands_on_the_app() {
    let Some(binary) = chromium_binary() else {
        // CI must catch a setup script that lost the package; a developer machine
        // without a browser just skips.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is not installed (looked for {CANDIDATES:?}); scripts/setup.sh installs it"
        );
        eprintln!(
            "SKIPPED browser test: chromium is not installed (apt-get install chromium, or bash scripts/setup.sh)"
        );
        return;
    };
    let ups = Upstreams::start(1);
    let gw = Gateway::start(&format!(
        "listeners: [{{ address: '{{listen}}' }}]
admin: {{ address: '{{admin}}' }}
upstreams:
  app: {{ backends: ['{}'] }}
plugins:
  pin: {{ type: pin_gate, pin_hash: '{}', secret: '{SECRET}' }}
  who: {{ type: headers, request: {{ set: {{ X-Webauth-User: '{{identity.subject}}' }} }} }}
routes:
  - {{ name: app, access: user, upstream: app, plugins: [pin, who] }}
",
        ups.addr(0),
        pin_hash(),
    ));
    let browser = Chromium::start(&binary);
    let socket = browser.page_socket();
    let app = gw.url("/?from=browser");

    ups.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let (ws, _) = tokio_tungstenite::connect_async(socket.as_str())
                .await
                .expect("DevTools WebSocket");
            let mut page = Cdp { ws, next_id: 0 };
            page.call("Page.navigate", json!({ "url": app }))
                .await
                .expect("navigate");
            page.wait_for(
                "location.pathname === '/.gatewarden/login' && document.readyState === 'complete' && !!document.querySelector('#pin')",
                "the login page",
            )
            .await;
            assert_eq!(
                page.eval("new URLSearchParams(location.search).get('next')")
                    .await
                    .unwrap(),
                "/?from=browser"
            );

            // Type the PIN as a user would, then press the button.
            page.eval("document.querySelector('#pin').focus()")
                .await
                .unwrap();
            page.call("Input.insertText", json!({ "text": PIN }))
                .await
                .expect("type the PIN");
            page.eval("document.querySelector('button[type=submit]').click()")
                .await
                .unwrap();

            page.wait_for(
                "location.pathname + location.search === '/?from=browser' && document.readyState === 'complete'",
                "the app after login",
            )
            .await;
            assert_eq!(
                page.eval("document.title").await.unwrap(),
                "Gatewarden demo",
                "the upstream's page, not the login page"
            );
            // The session cookie is set, and out of reach of the page's scripts.
            let cookies = page
                .call("Network.getCookies", json!({}))
                .await
                .expect("cookies");
            let session = cookies["cookies"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "gatewarden")
                .unwrap_or_else(|| panic!("no session cookie in {cookies}"))
                .clone();
            assert_eq!(session["httpOnly"], true, "{session}");
            assert_eq!(session["sameSite"], "Lax", "{session}");
            let visible = page.eval("document.cookie").await.unwrap();
            assert!(
                !visible.as_str().unwrap_or("").contains("gatewarden"),
                "scripts can read the session: {visible}"
            );

            // The browser's later requests carry the session; the upstream sees who
            // logged in but never the session cookie itself.
            let echo = page
                .eval("fetch('/echo/from-browser').then(r => r.text())")
                .await
                .unwrap();
            let echo: Value = serde_json::from_str(echo.as_str().unwrap()).expect("echo JSON");
            assert_eq!(echo["path"], "/echo/from-browser", "{echo}");
            let headers = echo["headers"].as_array().unwrap();
            assert!(
                headers.iter().any(|h| h[0] == "x-webauth-user" && h[1] == "pin"),
                "{echo}"
            );
            assert!(
                !headers
                    .iter()
                    .any(|h| h[0] == "cookie" && h[1].as_str().unwrap_or("").contains("gatewarden")),
                "the session cookie reached the upstream: {echo}"
            );
        })
        .await
        .expect("the browser test took over 60 s")
    });
}
