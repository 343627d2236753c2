//! A real browser through the gateway: headless Chromium driven over the Chrome
//! DevTools Protocol (a WebSocket), so what is tested is what a person gets: the PIN
//! login with the cookie the browser keeps, the theme the page is drawn with, and the
//! cross-origin writes a hostile page cannot make with that cookie.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::chromium::{Cdp, Chromium};
use crate::harness::*;
use crate::identity::{pin_hash, PIN, SECRET};

/// One request as the browser put it on the wire, and the status it got back.
#[derive(Debug)]
struct Exchange {
    /// The `Origin` header the browser sent, if any.
    origin: Option<String>,
    /// Names of the cookies the browser sent.
    cookies: Vec<String>,
    status: u64,
}

impl Cdp {
    /// Opens `url` on a route behind `pin_gate`, expects to be sent to the login page
    /// with `next` pointing back, types the PIN as a user would, and waits until the
    /// browser is back on `next`.
    pub(crate) async fn log_in(&mut self, url: &str, next: &str) {
        self.navigate(url).await;
        self.wait_for(
            "location.pathname === '/.gatewarden/login' && document.readyState === 'complete' && !!document.querySelector('#pin')",
            "the login page",
        )
        .await;
        assert_eq!(
            self.eval("new URLSearchParams(location.search).get('next')")
                .await
                .unwrap(),
            next
        );
        self.type_into("#pin", PIN).await;
        self.click("button[type=submit]").await;
        self.wait_for(
            &format!(
                "location.pathname + location.search === {} && document.readyState === 'complete'",
                json!(next)
            ),
            "the app after login",
        )
        .await;
    }

    /// The `method url` request the page made (needs `Network.enable`) and its answer,
    /// as they went over the wire.
    async fn exchange(&mut self, method: &str, url: &str) -> Exchange {
        self.wait_event(&format!("the answer to {method} {url}"), |events| {
            let id = &events.iter().find(|e| {
                e["method"] == "Network.requestWillBeSent"
                    && e["params"]["request"]["url"] == url
                    && e["params"]["request"]["method"] == method
            })?["params"]["requestId"];
            let of = |event: &str| {
                events
                    .iter()
                    .find(|e| e["method"] == event && e["params"]["requestId"] == *id)
                    .map(|e| &e["params"])
            };
            let sent = of("Network.requestWillBeSentExtraInfo")?;
            let answer = of("Network.responseReceivedExtraInfo")?;
            let header = |name: &str| {
                sent["headers"].as_object().and_then(|h| {
                    h.iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(name))
                        .and_then(|(_, v)| v.as_str())
                        .map(str::to_string)
                })
            };
            let cookies = header("cookie")
                .unwrap_or_default()
                .split(';')
                .filter_map(|c| c.split_once('=').map(|(n, _)| n.trim().to_string()))
                .collect();
            Some(Exchange {
                origin: header("origin"),
                cookies,
                status: answer["statusCode"].as_u64()?,
            })
        })
        .await
    }
}

/// A server on plain threads that answers every request with the same HTML page: a site
/// of another origin than the gateway.
struct PageServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl PageServer {
    fn start(html: String) -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind page server");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let html = Arc::new(html);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let html = html.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let Ok(mut writer) = stream.try_clone() else {
                        return;
                    };
                    // Reading the head first: closing with unread bytes would reset
                    // the connection under the response.
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if line.trim_end().is_empty() {
                            break;
                        }
                        line.clear();
                    }
                    let _ = write!(
                        writer,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                        html.len()
                    );
                });
            }
        });
        PageServer { addr, stop }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// A gateway with an admin listener, the upstream `app` at `backend` and a `pin`
/// plugin (PIN login); the caller adds the rest of the plugins and the route.
fn behind_the_pin(backend: SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(backend))
        .plugin(
            "pin",
            "pin_gate",
            json!({ "pin_hash": pin_hash(), "secret": SECRET }),
        )
}

#[test]
fn a_browser_is_sent_to_the_login_page_types_the_pin_and_lands_on_the_app() {
    let Some(browser) = Chromium::start_or_skip() else {
        return;
    };
    let ups = Upstreams::start(1);
    let gw = Gateway::start(
        behind_the_pin(ups.addr(0))
            .plugin(
                "who",
                "headers",
                json!({ "request": { "set": { "X-Webauth-User": "{identity.subject}" } } }),
            )
            .route(Route::new("app", "app", "user").plugins(&["pin", "who"])),
    );
    let app = gw.url("/?from=browser");

    browser.drive(|mut page| async move {
        page.log_in(&app, "/?from=browser").await;
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
            headers
                .iter()
                .any(|h| h[0] == "x-webauth-user" && h[1] == "pin"),
            "{echo}"
        );
        assert!(
            !headers
                .iter()
                .any(|h| h[0] == "cookie" && h[1].as_str().unwrap_or("").contains("gatewarden")),
            "the session cookie reached the upstream: {echo}"
        );
    });
}

#[test]
fn the_injected_theme_is_applied_in_the_browser() {
    let Some(browser) = Chromium::start_or_skip() else {
        return;
    };
    let ups = Upstreams::start(1);
    let theme_dir = tempfile::tempdir().unwrap();
    let theme = theme_dir.path().join("theme.css");
    std::fs::write(&theme, "body { background-color: rgb(1, 2, 3) }\n").unwrap();
    // The same upstream page twice: under /themed/ with the theme, elsewhere without.
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(ups.addr(0)))
            .plugin("theme", "css_inject", json!({ "file": theme }))
            .route(Route::public("plain", "app"))
            .route(
                Route::public("themed", "app")
                    .path_prefix("/themed/")
                    .with("strip_prefix", "/themed")
                    .plugins(&["theme"]),
            ),
    );
    let (themed, plain) = (gw.url("/themed/"), gw.url("/"));

    browser.drive(|mut page| async move {
        let body_style = "(() => { const s = getComputedStyle(document.body); \
             return [s.backgroundColor, s.maxWidth, document.title]; })()";
        let loaded = "document.readyState === 'complete' && document.title !== ''";

        page.navigate(&themed).await;
        page.wait_for(loaded, "the themed page").await;
        let style = page.eval(body_style).await.unwrap();
        assert_eq!(
            style[0], "rgb(1, 2, 3)",
            "the theme is not applied: {style}"
        );
        // The page's own stylesheet still applies: the theme was added, nothing lost.
        assert_eq!(style[1], "736px", "{style}");
        assert_eq!(style[2], "Gatewarden demo", "{style}");

        page.navigate(&plain).await;
        page.wait_for(
            &format!("location.href === {} && {loaded}", json!(plain)),
            "the plain page",
        )
        .await;
        let style = page.eval(body_style).await.unwrap();
        assert_eq!(style[1], "736px", "not the demo page: {style}");
        assert_ne!(
            style[0], "rgb(1, 2, 3)",
            "a route without css_inject is themed"
        );
    });
}

/// A hostile page: on load it POSTs to the gateway with `fetch`, cookies included,
/// like a CSRF attack would; `#csrf` is a form that POSTs there too.
fn hostile_page(gateway: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><title>hostile</title></head>
<body>
<form id="csrf" method="POST"><input type="hidden" name="x" value="1"></form>
<script>
const from = location.hostname;
document.getElementById("csrf").action = "{gateway}/api/form?from=" + from;
window.attempt = fetch("{gateway}/api/x?from=" + from, {{
  method: "POST", credentials: "include", body: "x"
}}).then(r => "read the answer: " + r.status, e => "no answer: " + e.name);
</script>
</body></html>
"#
    )
}

#[test]
fn a_cross_origin_page_cannot_post_with_the_users_cookie() {
    let Some(browser) = Chromium::start_or_skip() else {
        return;
    };
    let up = RecordingUpstream::start();
    let gw = Gateway::start(
        behind_the_pin(up.addr)
            .plugin("same_origin", "origin", json!({}))
            .route(Route::new("app", "app", "user").plugins(&["pin", "same_origin"])),
    );
    let gateway = format!("http://{}", gw.addr);
    let hostile = PageServer::start(hostile_page(&gateway));
    let posts_upstream = || {
        up.requests()
            .iter()
            .filter(|r| !r.request_line.starts_with("GET "))
            .map(|r| r.request_line.clone())
            .collect::<Vec<_>>()
    };

    let (app, hostile_port) = (gw.url("/app"), hostile.addr.port());

    browser.drive(|mut page| async move {
        page.log_in(&app, "/app").await;
        page.call("Network.enable", json!({})).await.unwrap();

        // The same host on another port is another origin but the same site, so the
        // browser sends the SameSite=Lax session along: only the origin check stands
        // in the way. A different host name is another site: no cookie at all.
        for (host, same_site) in [("127.0.0.1", true), ("localhost", false)] {
            let origin = format!("http://{host}:{hostile_port}");
            page.navigate(&format!("{origin}/")).await;
            page.wait_for(
                &format!(
                    "location.origin === {} && document.readyState === 'complete'",
                    json!(origin)
                ),
                "the hostile page",
            )
            .await;
            let attempt = page.eval("window.attempt").await.unwrap();
            // Without CORS headers the page cannot even read the refusal.
            assert!(
                attempt.as_str().unwrap_or("").starts_with("no answer"),
                "{attempt}"
            );
            let fetched = page
                .exchange("POST", &format!("{gateway}/api/x?from={host}"))
                .await;

            page.eval("document.getElementById('csrf').submit()")
                .await
                .unwrap();
            let target = format!("{gateway}/api/form?from={host}");
            page.wait_for(
                &format!(
                    "location.href === {} && document.readyState === 'complete'",
                    json!(target)
                ),
                "the form's answer",
            )
            .await;
            let submitted = page.exchange("POST", &target).await;

            for (how, exchange) in [("fetch", fetched), ("form", submitted)] {
                assert_eq!(exchange.origin.as_deref(), Some(origin.as_str()), "{how}");
                let with_cookie = exchange.cookies.iter().any(|c| c == "gatewarden");
                if same_site {
                    assert!(with_cookie, "{how} from {origin}: {exchange:?}");
                    assert_eq!(exchange.status, 403, "{how} from {origin}: {exchange:?}");
                } else {
                    assert!(!with_cookie, "{how} from {origin}: {exchange:?}");
                    assert!(
                        [401, 403].contains(&exchange.status),
                        "{how} from {origin}: {exchange:?}"
                    );
                }
            }
            // The gateway answered both, so anything forwarded would be recorded.
            assert_eq!(posts_upstream(), Vec::<String>::new(), "from {origin}");
        }

        // The same write from the app's own page goes through: the refusals above
        // were about where the request came from, not about the request.
        page.navigate(&app).await;
        page.wait_for(
            &format!(
                "location.origin === {} && document.readyState === 'complete'",
                json!(gateway)
            ),
            "the app",
        )
        .await;
        let own = page
            .eval("fetch('/api/x?from=app', { method: 'POST', body: 'x' }).then(r => r.status)")
            .await
            .unwrap();
        assert_eq!(own, 200);
        assert_eq!(posts_upstream(), ["POST /api/x?from=app HTTP/1.1"]);
    });
}
