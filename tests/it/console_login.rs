//! The console opened with a login plugin's session instead of the admin key: an admin's
//! PIN session signs in, a user's does not, writes made with it must come from the
//! console's page, signing out ends it on the gateway's routes too, and all of it in a
//! real browser that logs in on the proxy listener and then opens the admin listener.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::chromium::Chromium;
use crate::console::{send, text};
use crate::harness::*;
use crate::identity::{cookie_pair, key_new, login, pin_hash, PIN, SECRET};

const ADMIN_KEY: &str = "console-login-admin-key-0123";
const LOGIN_URL: &str = "http://gateway.test/.gatewarden/login";

/// A gateway whose `app` route is behind a `pin` login of `role`, with an `api` route
/// whose keys live in a keys file, and whose console accepts `pin`'s sessions; with the
/// admin key too when `admin_key` is set.
struct Setup {
    gw: Gateway,
    _ups: Upstreams,
    _keys_dir: tempfile::TempDir,
}

fn setup(role: &str, admin_key: Option<&str>) -> Setup {
    let ups = Upstreams::start(1);
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("keys.yaml");
    key_new(&keys, &["--name", "laptop"]);
    let mut config = Config::new()
        .with_admin()
        .admin_console(json!({ "login": "pin", "login_url": LOGIN_URL }))
        .upstream("app", Upstream::to(ups.addr(0)))
        .plugin(
            "pin",
            "pin_gate",
            json!({ "pin_hash": pin_hash(), "secret": SECRET, "role": role }),
        )
        .plugin("keys", "api_key", json!({ "keys_file": keys }))
        .route(
            Route::new("api", "app", "user")
                .path_prefix("/v1/")
                .plugins(&["keys"]),
        )
        .route(Route::new("app", "app", "user").plugins(&["pin"]));
    if let Some(key) = admin_key {
        config = config.admin_key(key);
    }
    Setup {
        // At `info`: the admin API's log of changes is what one test reads.
        gw: Gateway::start_with(config, &[("RUST_LOG", "info")]),
        _ups: ups,
        _keys_dir: keys_dir,
    }
}

/// A PIN session on the proxy listener, as a `Cookie:` header line.
fn pin_session(gw: &Gateway) -> String {
    let resp = login(gw.addr, PIN, "/", &[]);
    assert_eq!(resp.status, 303, "{resp:?}");
    format!("Cookie: {}", cookie_pair(&resp))
}

/// The headers the console's page sends with a write.
fn from_the_console(admin: SocketAddr) -> [String; 2] {
    [
        format!("Origin: http://{admin}"),
        "X-Gatewarden-Console: 1".to_string(),
    ]
}

#[test]
fn an_admin_session_from_the_pin_login_opens_the_console_and_its_writes_need_the_page() {
    let s = setup("admin", Some(ADMIN_KEY));
    let gw = &s.gw;
    let cookie = pin_session(gw);
    let console = from_the_console(gw.admin);
    let console: Vec<&str> = console.iter().map(String::as_str).collect();

    let view = send(gw.admin, "GET", "/ui/session", &[&cookie], "").json();
    assert_eq!(view["signed_in"], true, "{view}");
    assert_eq!(view["as"], "pin", "{view}");
    assert_eq!(view["key_sign_in"], true, "{view}");
    assert_eq!(view["login"], json!({ "name": "pin", "url": LOGIN_URL }));
    let anonymous = send(gw.admin, "GET", "/ui/session", &[], "").json();
    assert_eq!(anonymous["signed_in"], false, "{anonymous}");
    assert_eq!(anonymous["login"]["name"], "pin", "{anonymous}");

    // Reads with the session.
    let keys = send(gw.admin, "GET", "/admin/keys", &[&cookie], "");
    assert_eq!(keys.status, 200, "{keys:?}");
    // A write without the console's header and Origin is what another site's form
    // could send with the cookie: refused, and nothing made.
    let body = json!({ "name": "from-a-form" }).to_string();
    for headers in [
        vec![cookie.as_str()],
        vec![cookie.as_str(), console[1]],
        vec![cookie.as_str(), "Origin: http://evil.example", console[1]],
    ] {
        let refused = send(gw.admin, "POST", "/admin/keys", &headers, &body);
        assert_eq!(refused.status, 403, "{headers:?}: {refused:?}");
    }
    let mut headers = vec![cookie.as_str()];
    headers.extend_from_slice(&console);
    let made = send(
        gw.admin,
        "POST",
        "/admin/keys",
        &headers,
        &json!({ "name": "made-with-the-pin-session" }).to_string(),
    );
    assert_eq!(made.status, 201, "{made:?}");
    let made = made.json();
    let (made_id, made_key) = (made["id"].as_str().unwrap(), made["key"].as_str().unwrap());
    let listed = send(gw.admin, "GET", "/admin/keys", &[&cookie], "").json();
    let names: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["laptop", "made-with-the-pin-session"], "{listed}");

    // A forged or foreign session is no session.
    for bad in [
        "Cookie: gatewarden=forged",
        "Cookie: gatewarden_admin=forged",
    ] {
        assert_eq!(
            send(gw.admin, "GET", "/admin/keys", &[bad], "").status,
            401,
            "{bad}"
        );
        let view = send(gw.admin, "GET", "/ui/session", &[bad], "").json();
        assert_eq!(view["signed_in"], false, "{bad}: {view}");
    }

    // Signing out in the console ends the PIN session everywhere: on the admin
    // listener, and on the gateway's own routes.
    assert_eq!(
        get(gw.addr, "/", &[&cookie, "Accept: application/json"]).status,
        200
    );
    let out = send(gw.admin, "POST", "/ui/sign-out", &headers, "");
    assert_eq!(out.status, 200, "{out:?}");
    let cleared: Vec<&str> = out
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        cleared
            .iter()
            .any(|c| c.starts_with("gatewarden=;") && c.contains("Max-Age=0")),
        "{cleared:?}"
    );
    assert_eq!(
        send(gw.admin, "GET", "/admin/keys", &[&cookie], "").status,
        401
    );
    assert_eq!(
        get(gw.addr, "/", &[&cookie, "Accept: application/json"]).status,
        401
    );
    // The admin key still works beside it.
    let bearer = format!("Authorization: Bearer {ADMIN_KEY}");
    assert_eq!(
        send(gw.admin, "GET", "/admin/keys", &[&bearer], "").status,
        200
    );
    // A key pasted whole where its id goes is no key id; then the right id.
    let pasted = format!("/admin/keys/{made_key}");
    assert_eq!(
        send(gw.admin, "DELETE", &pasted, &[&bearer], "").status,
        404
    );
    let stray = format!("/admin/{made_key}");
    assert_eq!(send(gw.admin, "POST", &stray, &[&bearer], "").status, 404);
    let by_id = format!("/admin/keys/{made_id}");
    assert_eq!(send(gw.admin, "DELETE", &by_id, &[&bearer], "").status, 200);

    // Every change is in the gateway's log with who made it, and no key is.
    let log = gw.output();
    for line in [
        format!("admin: POST /admin/keys by \"pin\" through login pin: 201 (key {made_id})"),
        "admin: DELETE /admin/keys/… by the admin key: 404".to_string(),
        "admin: POST /admin/… by the admin key: 404".to_string(),
        format!("admin: DELETE /admin/keys/{made_id} by the admin key: 200"),
    ] {
        assert!(log.contains(&line), "{line} in {log}");
    }
    assert!(!log.contains(made_key), "a key in the log: {log}");
    assert!(!log.contains("admin: GET"), "reads are not changes: {log}");
}

#[test]
fn a_user_session_is_refused_and_without_an_admin_key_only_the_login_opens_it() {
    let s = setup("user", None);
    let gw = &s.gw;
    let cookie = pin_session(gw);
    // Good on the route it was made for...
    assert_eq!(
        get(gw.addr, "/", &[&cookie, "Accept: application/json"]).status,
        200
    );
    // ...but not an admin's.
    let view = send(gw.admin, "GET", "/ui/session", &[&cookie], "").json();
    assert_eq!(view["signed_in"], false, "{view}");
    assert_eq!(view["key_sign_in"], false, "{view}");
    assert!(
        view["refused"]
            .as_str()
            .unwrap_or("")
            .contains("not as an admin"),
        "{view}"
    );
    let refused = send(gw.admin, "GET", "/admin/keys", &[&cookie], "");
    assert_eq!(refused.status, 403, "{refused:?}");

    // With no admin key, no bearer token opens the admin API, whatever it is, and the
    // console has no key form to post to.
    for bearer in [
        "Authorization: Bearer ",
        "Authorization: Bearer anything-at-all-0123456789",
    ] {
        assert_eq!(
            send(gw.admin, "GET", "/admin/keys", &[bearer], "").status,
            401,
            "{bearer}"
        );
    }
    let form = send(
        gw.admin,
        "POST",
        "/ui/sign-in",
        &["Content-Type: application/x-www-form-urlencoded"],
        "key=anything-at-all-0123456789",
    );
    assert_eq!(form.status, 404, "{form:?}");
    assert!(form.header("set-cookie").is_none(), "{form:?}");
}

#[test]
fn an_admin_logs_in_on_the_gateway_and_the_console_knows_them_in_a_browser() {
    let Some(browser) = Chromium::start_or_skip() else {
        return;
    };
    let s = setup("admin", None);
    let gw = &s.gw;
    let console = format!("http://{}/ui/", gw.admin);
    let app = format!("http://{}/", gw.addr);
    let shots = tempfile::tempdir().unwrap();
    let shots_dir = shots.path().to_path_buf();

    browser.drive_within(Duration::from_secs(60), |mut page| async move {
        // Not yet logged in: the console offers the gateway's login, and no key form.
        page.navigate(&console).await;
        page.wait_for(
            "document.readyState === 'complete' && !document.getElementById('login-way').hidden",
            "the way in through the login",
        )
        .await;
        assert_eq!(
            page.eval("document.getElementById('signin-form').hidden")
                .await
                .unwrap(),
            true
        );
        assert_eq!(
            text(
                page.eval("document.getElementById('login-link').href")
                    .await
                    .unwrap()
            ),
            LOGIN_URL
        );
        assert_eq!(
            text(
                page.eval("document.getElementById('login-name').textContent")
                    .await
                    .unwrap()
            ),
            "pin"
        );
        let png = page.screenshot(&shots_dir, "login-offered").await;
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

        // The PIN typed on the gateway's own login page, on the proxy listener.
        page.log_in(&app, "/").await;

        // The same browser opens the console on the admin listener: signed in.
        page.navigate(&console).await;
        page.wait_for("document.body.dataset.ready === 'true'", "the console")
            .await;
        assert_eq!(
            text(
                page.eval("document.getElementById('signed-in-as').textContent")
                    .await
                    .unwrap()
            ),
            "Signed in as pin"
        );
        // A write from the page goes through with the login's session.
        page.create_key_in_console("made-after-the-pin").await;

        // Signing out here logs the browser out of the gateway too.
        page.click("#sign-out").await;
        page.wait_for(
            "document.readyState === 'complete' && !document.getElementById('signin').hidden",
            "the sign-in page again",
        )
        .await;
        page.navigate(&app).await;
        page.wait_for(
            "location.pathname === '/.gatewarden/login' && document.readyState === 'complete'",
            "the gateway's login page again",
        )
        .await;
    });
}
