//! The operator's console on the admin listener: its page and headers, the sign-in
//! with the admin key for a session cookie, the refusal of writes that other sites
//! could make with that cookie, the figures behind it, and the whole of it in a real
//! browser.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::chromium::{Cdp, Chromium};
use crate::harness::*;
use crate::identity::{encode, key_new};

const ADMIN_KEY: &str = "console-admin-key-0123456789";

/// A gateway whose `app` route needs an API key from a keys file, to two backends
/// checked over TCP every 200 ms, with the console on.
struct Setup {
    gw: Gateway,
    ups: Upstreams,
    /// A user key made before the start.
    user_key: String,
    _keys_dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let ups = Upstreams::start(2);
    let keys_dir = tempfile::tempdir().unwrap();
    let keys: PathBuf = keys_dir.path().join("keys.yaml");
    let user_key = key_new(&keys, &["--name", "laptop", "--subject", "alice"]);
    key_new(&keys, &["--name", "ops", "--role", "admin"]);
    let check = json!({
        "kind": "tcp", "interval": "200ms", "timeout": "200ms",
        "healthy_after": 1, "unhealthy_after": 2,
    });
    let gw = Gateway::start(
        Config::new()
            .admin_key(ADMIN_KEY)
            .upstream(
                "app",
                Upstream::of(&[ups.addr(0), ups.addr(1)]).with("health_check", check),
            )
            .plugin("keys", "api_key", json!({ "keys_file": keys }))
            .route(Route::new("app", "app", "user").plugins(&["keys"])),
    );
    Setup {
        gw,
        ups,
        user_key,
        _keys_dir: keys_dir,
    }
}

/// Sends one request to the admin listener, addressed to it by its own `Host`.
pub(crate) fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> RawResponse {
    send_to(admin, &admin.to_string(), method, path, headers, body)
}

/// Posts the sign-in form with `key`, as the console's page would.
fn sign_in(admin: SocketAddr, key: &str, extra: &[&str]) -> RawResponse {
    let mut headers = vec!["Content-Type: application/x-www-form-urlencoded"];
    headers.extend_from_slice(extra);
    send(
        admin,
        "POST",
        "/ui/sign-in",
        &headers,
        &format!("key={}", encode(key)),
    )
}

/// Signs in with the admin key; the `Cookie:` header line that carries the session.
fn session_cookie(admin: SocketAddr) -> String {
    let resp = sign_in(admin, ADMIN_KEY, &[]);
    assert_eq!(resp.status, 303, "{resp:?}");
    let set = resp.header("set-cookie").expect("a session cookie");
    format!("Cookie: {}", set.split(';').next().unwrap())
}

#[test]
fn the_console_page_has_a_strict_policy_and_its_data_needs_a_sign_in() {
    let s = setup();
    let admin = s.gw.admin;
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let resp = send(admin, "GET", path, &[], "");
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
        assert!(resp.header("content-type").unwrap().starts_with(kind));
        let csp = resp.header("content-security-policy").unwrap_or("");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} in {csp:?}");
        }
        assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    }
    let page = String::from_utf8(send(admin, "GET", "/ui/", &[], "").body).unwrap();
    // Nothing inline for the policy to forbid, and a layout for small screens.
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "{page}"
    );
    assert!(page.contains(r#"name="viewport""#));
    // The bare prefix leads to the page.
    let bare = send(admin, "GET", "/ui", &[], "");
    assert_eq!((bare.status, bare.header("location")), (303, Some("/ui/")));

    let session = send(admin, "GET", "/ui/session", &[], "");
    assert_eq!(session.json()["signed_in"], false);
    let wrong = format!("Authorization: Bearer {}", "x".repeat(ADMIN_KEY.len()));
    for path in [
        "/admin/keys",
        "/admin/backends",
        "/admin/stats",
        "/admin/usage",
        "/admin/config",
    ] {
        for headers in [
            vec![],
            vec![wrong.as_str()],
            // A cookie of the right name that no gateway signed.
            vec!["Cookie: gatewarden_admin=eyJhbGciOiJIUzI1NiJ9.e30.x"],
        ] {
            let resp = send(admin, "GET", path, &headers, "");
            assert_eq!(resp.status, 401, "{path} with {headers:?}: {resp:?}");
        }
    }
}

#[test]
fn the_admin_key_is_exchanged_for_a_strict_http_only_session_cookie() {
    let s = setup();
    let admin = s.gw.admin;

    let wrong = sign_in(admin, "not-the-admin-key-0123456", &[]);
    assert_eq!(wrong.status, 303, "{wrong:?}");
    assert_eq!(wrong.header("location"), Some("/ui/?signin=failed"));
    assert!(wrong.header("set-cookie").is_none(), "{wrong:?}");
    // Another site's page cannot sign the browser in, even with the right key.
    let hostile = sign_in(admin, ADMIN_KEY, &["Origin: http://evil.example"]);
    assert_eq!(hostile.status, 403, "{hostile:?}");
    assert!(hostile.header("set-cookie").is_none());

    let resp = sign_in(admin, ADMIN_KEY, &[&format!("Origin: http://{admin}")]);
    assert_eq!(resp.status, 303, "{resp:?}");
    assert_eq!(resp.header("location"), Some("/ui/"));
    let set = resp.header("set-cookie").unwrap();
    let mut attributes: Vec<&str> = set.split(';').map(str::trim).collect();
    let pair = attributes.remove(0);
    assert!(pair.starts_with("gatewarden_admin="), "{set}");
    assert!(
        !pair.contains(ADMIN_KEY),
        "the cookie is not the key: {set}"
    );
    for wanted in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(attributes.contains(&wanted), "{wanted} in {set}");
    }
    // The admin listener speaks plain HTTP: a Secure cookie would never come back.
    assert!(!attributes.contains(&"Secure"), "{set}");

    let cookie = format!("Cookie: {pair}");
    assert_eq!(
        send(admin, "GET", "/ui/session", &[&cookie], "").json()["signed_in"],
        true
    );
    let keys = send(admin, "GET", "/admin/keys", &[&cookie], "");
    assert_eq!(keys.status, 200, "{keys:?}");
    assert_eq!(keys.json()["keys"].as_array().unwrap().len(), 2);

    // Signing out ends the session itself: a copy of the cookie kept elsewhere is
    // refused too.
    let origin = format!("Origin: http://{admin}");
    let out = send(
        admin,
        "POST",
        "/ui/sign-out",
        &[&cookie, &origin, "X-Gatewarden-Console: 1"],
        "",
    );
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(
        send(admin, "GET", "/admin/keys", &[&cookie], "").status,
        401
    );
}

#[test]
fn a_write_with_the_console_cookie_must_come_from_the_console() {
    let s = setup();
    let admin = s.gw.admin;
    let cookie = session_cookie(admin);
    let ours = format!("Origin: http://{admin}");
    let header = "X-Gatewarden-Console: 1";
    let json_body = "Content-Type: application/json";
    let body = r#"{"name": "from-a-test"}"#;
    let count = || {
        send(admin, "GET", "/admin/keys", &[&cookie], "").json()["keys"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(count(), 2);
    for (what, headers) in [
        (
            "another site's page",
            vec![
                cookie.as_str(),
                "Origin: http://evil.example",
                header,
                json_body,
            ],
        ),
        (
            "a sandboxed page",
            vec![&cookie, "Origin: null", header, json_body],
        ),
        (
            "a plain form of this origin",
            vec![&cookie, &ours, json_body],
        ),
        ("no origin", vec![&cookie, header, json_body]),
    ] {
        for (method, path) in [("POST", "/admin/keys"), ("POST", "/admin/reload")] {
            let resp = send(admin, method, path, &headers, body);
            assert_eq!(resp.status, 403, "{what}: {method} {path}: {resp:?}");
        }
        let revoke = send(admin, "DELETE", "/admin/keys/k_x", &headers, "");
        assert_eq!(revoke.status, 403, "{what}: {revoke:?}");
        let out = send(admin, "POST", "/ui/sign-out", &headers, "");
        assert_eq!(out.status, 403, "{what}: {out:?}");
    }
    assert_eq!(count(), 2, "a refused write changed nothing");

    let made = send(
        admin,
        "POST",
        "/admin/keys",
        &[&cookie, &ours, header, json_body],
        body,
    );
    assert_eq!(made.status, 201, "{made:?}");
    assert_eq!(count(), 3);
    // The admin key as a bearer token needs none of that: no browser sends it alone.
    let bearer = format!("Authorization: Bearer {ADMIN_KEY}");
    let made = send(admin, "POST", "/admin/keys", &[&bearer, json_body], body);
    assert_eq!(made.status, 201, "{made:?}");
}

#[test]
fn the_admin_api_reports_backend_health_and_recent_route_traffic() {
    let s = setup();
    let (gw, admin) = (&s.gw, s.gw.admin);
    let bearer = format!("Authorization: Bearer {ADMIN_KEY}");
    let key = format!("X-API-Key: {}", s.user_key);
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/echo", &[&key]).status, 200);
    }
    assert_eq!(get(gw.addr, "/status/503", &[&key]).status, 503);
    assert_eq!(get(gw.addr, "/status/404", &[&key]).status, 404);

    // Counted once the answer is out, so the last ones may lag a moment.
    let mut stats = Value::Null;
    poll_until("the requests counted", Duration::from_secs(5), || {
        stats = send(admin, "GET", "/admin/stats", &[&bearer], "").json();
        stats["routes"][0]["requests"] == 8
    });
    let app = &stats["routes"][0];
    assert_eq!(app["route"], "app", "{stats}");
    assert_eq!(app["requests"], 8, "{stats}");
    assert_eq!(app["server_errors"], 1, "{stats}");
    assert_eq!(app["client_errors"], 1, "{stats}");
    assert_eq!(app["server_error_rate"], 0.125, "{stats}");
    assert!(app["p50_ms"].as_u64().is_some_and(|ms| ms >= 1), "{stats}");
    assert!(app["p99_ms"].as_u64() >= app["p50_ms"].as_u64(), "{stats}");
    assert!(app["per_second"].as_f64().unwrap() > 0.0, "{stats}");

    let backends = || -> Vec<(String, bool)> {
        let body = send(admin, "GET", "/admin/backends", &[&bearer], "").json();
        assert_eq!(body["upstreams"][0]["name"], "app", "{body}");
        assert_eq!(body["upstreams"][0]["health_check"], true, "{body}");
        body["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap().to_string(),
                    b["healthy"] == true,
                )
            })
            .collect()
    };
    let (a, b) = (s.ups.addr(0).to_string(), s.ups.addr(1).to_string());
    let mut both = vec![(a.clone(), true), (b.clone(), true)];
    both.sort();
    assert_eq!(backends(), both);
    s.ups.servers[1].shutdown();
    poll_until(
        "the stopped backend reported unhealthy",
        Duration::from_secs(10),
        || backends().contains(&(b.clone(), false)),
    );
    assert!(backends().contains(&(a, true)));
}

/// The value of a DOM expression as a string.
pub(crate) fn text(v: Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

impl Cdp {
    /// Creates a key named `name` with the console's form, and waits until the page
    /// shows its plaintext and lists it.
    pub(crate) async fn create_key_in_console(&mut self, name: &str) {
        self.type_into("#key-name", name).await;
        self.click("#key-form button[type=submit]").await;
        self.wait_for(
            &format!(
                "!document.getElementById('created').hidden && \
                 !!document.querySelector('#keys tr[data-name={}]')",
                serde_json::to_string(name).unwrap()
            ),
            "the new key",
        )
        .await;
    }
}

#[test]
fn an_operator_runs_the_gateway_from_the_console_in_a_browser() {
    let Some(browser) = Chromium::start_or_skip() else {
        return;
    };
    let s = setup();
    // Kept where `GATEWARDEN_SCREENSHOTS` says, to look at; else thrown away.
    let shots = tempfile::tempdir().unwrap();
    let kept = std::env::var_os("GATEWARDEN_SCREENSHOTS").map(PathBuf::from);
    if let Some(dir) = &kept {
        std::fs::create_dir_all(dir).unwrap();
    }
    let shots_dir = kept.as_deref().unwrap_or(shots.path());
    let console = format!("http://{}/ui/", s.gw.admin);
    let gateway = s.gw.addr;
    let stopped = s.ups.addr(1).to_string();
    let setup = &s;
    // A key whose name and subject are markup, as anyone allowed to name keys could
    // make: the console must show them as text.
    let hostile = r#"<img src=x onerror="window.pwned=1">"#;
    let made = send(
        s.gw.admin,
        "POST",
        "/admin/keys",
        &[&format!("Authorization: Bearer {ADMIN_KEY}")],
        &json!({ "name": hostile, "subject": "<b>bold</b>" }).to_string(),
    );
    assert_eq!(made.status, 201, "{made:?}");

    browser.drive_within(Duration::from_secs(90), |mut page| async move {
        let mut pngs = Vec::new();
        page.navigate(&console).await;
        page.wait_for(
            "!!document.getElementById('signin') && !document.getElementById('signin').hidden",
            "the sign-in form",
        )
        .await;
        // A wrong key first: no session, and the form says why.
        page.type_into("#admin-key", "wrong-key-0123456789abc").await;
        page.click("#signin-form button").await;
        page.wait_for(
            "document.readyState === 'complete' && !document.getElementById('signin-error').hidden",
            "the wrong key refused",
        )
        .await;
        pngs.push(page.screenshot(shots_dir, "1-sign-in-refused").await);

        page.type_into("#admin-key", ADMIN_KEY).await;
        page.click("#signin-form button").await;
        page.wait_for("document.body.dataset.ready === 'true'", "the console")
            .await;
        // The session is out of the page's reach.
        assert_eq!(text(page.eval("document.cookie").await.unwrap()), "");
        let shown = page
            .eval(
                "[...document.querySelectorAll('#keys td')].map(td => td.textContent).join('|')",
            )
            .await
            .unwrap();
        assert!(
            text(shown.clone()).contains(&format!("{hostile}|")) && text(shown.clone()).contains("|<b>bold</b>|"),
            "{shown}"
        );
        let injected = page
            .eval("document.querySelectorAll('#keys img, #keys b').length + (window.pwned || 0)")
            .await
            .unwrap();
        assert_eq!(injected, 0, "markup from the API became elements");
        pngs.push(page.screenshot(shots_dir, "2-signed-in").await);
        // On a phone's screen nothing runs off the side: wide tables scroll in place.
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true }),
        )
        .await
        .unwrap();
        page.wait_for(
            "window.innerWidth === 390 && document.documentElement.scrollWidth <= 390",
            "the console to fit a phone's width",
        )
        .await;
        pngs.push(page.screenshot(shots_dir, "2-phone").await);
        page.call("Emulation.clearDeviceMetricsOverride", json!({}))
            .await
            .unwrap();

        // A key made in the console, its plaintext read from the page, works.
        page.create_key_in_console("made-in-the-console").await;
        let plaintext = text(
            page.eval("document.getElementById('created-key').textContent")
                .await
                .unwrap(),
        );
        assert!(plaintext.starts_with("gw_"), "{plaintext:?}");
        pngs.push(page.screenshot(shots_dir, "3-key-created").await);
        let header = format!("X-API-Key: {plaintext}");
        poll_until("the new key works", Duration::from_secs(5), || {
            get(gateway, "/echo", &[&header]).status == 200
        });

        // Revoked in the console, it is refused.
        page.click("#keys tr[data-name=\"made-in-the-console\"] button.revoke")
            .await;
        page.wait_for(
            "document.querySelector('#keys tr[data-name=\"made-in-the-console\"]').dataset.status === 'revoked'",
            "the key shown revoked",
        )
        .await;
        poll_until("the revoked key is refused", Duration::from_secs(5), || {
            get(gateway, "/echo", &[&header]).status == 401
        });

        // The last admin key cannot go, and the console says why.
        page.click("#keys tr[data-name=\"ops\"] button.revoke").await;
        page.wait_for(
            "document.getElementById('key-error').textContent.includes('last active admin key')",
            "the last-admin refusal",
        )
        .await;

        // A stopped backend shows as unhealthy within a few refreshes.
        setup.ups.servers[1].shutdown();
        page.wait_for(
            &format!(
                "(document.querySelector('#backends tr[data-backend=\"{stopped}\"]') || {{dataset: {{}}}}).dataset.healthy === 'false'"
            ),
            "the stopped backend shown unhealthy",
        )
        .await;
        let row = text(
            page.eval(&format!(
                "document.querySelector('#backends tr[data-backend=\"{stopped}\"]').textContent"
            ))
            .await
            .unwrap(),
        );
        assert!(row.contains("unhealthy"), "{row}");
        // The requests made above are in the route's figures.
        page.wait_for(
            "Number(document.querySelector('#routes tr[data-route=\"app\"] td:nth-child(3)').textContent) >= 2",
            "the route's requests",
        )
        .await;
        page.eval("document.getElementById('backends').scrollIntoView()")
            .await
            .unwrap();
        pngs.push(page.screenshot(shots_dir, "4-backend-down").await);

        // A broken config file is refused, and the console shows where.
        let mut bad = std::fs::read_to_string(&setup.gw.config).unwrap();
        bad.push_str("\nroutez: []\n");
        std::fs::write(&setup.gw.config, bad).unwrap();
        page.click("#reload").await;
        page.wait_for(
            "!document.getElementById('reload-error').hidden",
            "the reload's error",
        )
        .await;
        let shown = text(
            page.eval("document.getElementById('reload-error').textContent")
                .await
                .unwrap(),
        );
        assert!(
            shown.contains("config rejected") && shown.contains("routez"),
            "{shown}"
        );
        page.eval("document.getElementById('reload').scrollIntoView()")
            .await
            .unwrap();
        pngs.push(page.screenshot(shots_dir, "5-reload-refused").await);
        // Put right, the file is taken.
        let good = std::fs::read_to_string(&setup.gw.config)
            .unwrap()
            .replace("\nroutez: []\n", "\n");
        std::fs::write(&setup.gw.config, good).unwrap();
        page.click("#reload").await;
        page.wait_for(
            "document.getElementById('reload-result').textContent.includes('generation 2') && document.getElementById('reload-error').hidden",
            "the reload's success",
        )
        .await;

        // Signing out leaves the page without access.
        page.click("#sign-out").await;
        page.wait_for(
            "document.readyState === 'complete' && !!document.getElementById('signin') && !document.getElementById('signin').hidden",
            "the sign-in form again",
        )
        .await;
        let status = page
            .eval("fetch('/admin/keys').then(r => r.status)")
            .await
            .unwrap();
        assert_eq!(status, 401);

        for png in pngs {
            let bytes = std::fs::read(&png).unwrap();
            assert!(bytes.len() > 1000, "{}: {} bytes", png.display(), bytes.len());
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", png.display());
        }
    });
}
