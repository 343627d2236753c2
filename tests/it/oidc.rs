//! The `oidc` and `jwt` plugins against a real OpenID provider: the certified
//! `oidc-provider` package run by Node from tests/oidc-provider/, on loopback. A small
//! browser here follows redirects, keeps cookies per host and posts the provider's
//! login form, so every login goes through the provider's real endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::*;

const CLIENT_ID: &str = "gatewarden";
const CLIENT_SECRET: &str = "test-client-secret-0123456789";
const API: &str = "urn:gatewarden:api";
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const CALLBACK: &str = "/.gatewarden/oidc/callback";

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider")
}

/// Whether the provider can run here. Missing on a developer's machine: the test says
/// so and passes; missing in CI (`CI=true`): the test fails.
fn provider_installed() -> bool {
    let installed = provider_dir().join("node_modules/oidc-provider").is_dir()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !installed {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "the test OpenID provider is not installed: run scripts/setup.sh (npm ci --prefix tests/oidc-provider)"
        );
        eprintln!("SKIPPED: node or tests/oidc-provider/node_modules missing; run `npm ci --prefix tests/oidc-provider`");
    }
    installed
}

/// A running provider; killed on drop.
struct Idp {
    process: Process,
    port: u16,
}

impl Idp {
    /// Starts the provider on `port` with its keys in `keys` (a new signing key first
    /// when `rotate`), its client allowed to come back to `gateway`.
    fn start(port: u16, keys: &Path, gateway: Option<&Gateway>, rotate: bool) -> Idp {
        Self::start_with(port, keys, gateway, rotate, "client_secret_basic")
    }

    /// Like [`Idp::start`], with the only token endpoint authentication method the
    /// provider offers.
    fn start_with(
        port: u16,
        keys: &Path,
        gateway: Option<&Gateway>,
        rotate: bool,
        auth_method: &str,
    ) -> Idp {
        let (redirect, logout) = match gateway {
            Some(gw) => (gw.url(CALLBACK), gw.url("/")),
            None => ("http://127.0.0.1:1/cb".to_string(), String::new()),
        };
        let mut cmd = Command::new("node");
        cmd.arg(provider_dir().join("provider.mjs"))
            .env("PORT", port.to_string())
            .env("KEY_DIR", keys)
            .env("REDIRECT_URIS", redirect)
            .env("POST_LOGOUT_URIS", logout)
            .env("ROTATE", if rotate { "1" } else { "0" })
            .env("AUTH_METHOD", auth_method);
        let mut process = Process::spawn_command(&mut cmd);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        poll_until(
            "the OpenID provider to answer discovery",
            Duration::from_secs(20),
            || {
                assert!(!process.exited(), "provider exited:\n{}", process.output());
                raw(
                    addr,
                    &format!("GET /.well-known/openid-configuration HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"),
                )
                .is_ok_and(|r| r.status == 200)
            },
        );
        Idp { process, port }
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// POSTs a form to the token endpoint with the client's credentials (HTTP Basic).
    fn token_request(&self, form: &str) -> RawResponse {
        let basic = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
        let request = format!(
            "POST /token HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nAuthorization: Basic {basic}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            self.port,
            form.len()
        );
        raw(self.addr(), &request).expect("token endpoint")
    }

    /// A JWT access token for the API, minted by the provider (client credentials).
    fn access_token(&self) -> String {
        let resp = self.token_request(&format!(
            "grant_type=client_credentials&scope=api&resource={}",
            API.replace(':', "%3A")
        ));
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        resp.json()["access_token"].as_str().unwrap().to_string()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("provider output:\n{}", self.process.output());
        }
    }
}

/// Splits `http://host:port/target` into authority and request-target.
fn split(url: &str) -> (&str, &str) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not a loopback http URL: {url}"));
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// A `Location` made absolute against the URL it answered.
fn resolve(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else {
        format!("http://{}{location}", split(base).0)
    }
}

/// A browser: cookies per host, redirects followed, forms posted.
#[derive(Default, Clone)]
struct Browser {
    cookies: HashMap<String, HashMap<String, String>>,
}

impl Browser {
    fn send(&mut self, method: &str, url: &str, form: Option<&str>, extra: &[&str]) -> RawResponse {
        let (authority, target) = split(url);
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: text/html,application/xhtml+xml\r\n"
        );
        if let Some(jar) = self.cookies.get(authority).filter(|j| !j.is_empty()) {
            let pairs: Vec<String> = jar.iter().map(|(n, v)| format!("{n}={v}")).collect();
            req.push_str(&format!("Cookie: {}\r\n", pairs.join("; ")));
        }
        for h in extra {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if let Some(body) = form {
            req.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(form.unwrap_or(""));
        let addr: SocketAddr = authority.parse().unwrap();
        let resp = raw(addr, &req).unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let jar = self.cookies.entry(authority.to_string()).or_default();
        for (name, value) in &resp.headers {
            if !name.eq_ignore_ascii_case("set-cookie") {
                continue;
            }
            let Some((n, v)) = value.split(';').next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            if v.is_empty() || value.to_ascii_lowercase().contains("max-age=0") {
                jar.remove(n.trim());
            } else {
                jar.insert(n.trim().to_string(), v.trim().to_string());
            }
        }
        resp
    }

    fn get(&mut self, url: &str) -> RawResponse {
        self.send("GET", url, None, &[])
    }

    /// GETs `url` and follows redirects; stops before requesting a URL whose target
    /// starts with `stop_before` and returns it instead.
    fn follow(
        &mut self,
        url: &str,
        stop_before: Option<&str>,
    ) -> Result<(String, RawResponse), String> {
        let mut url = url.to_string();
        for _ in 0..20 {
            if stop_before.is_some_and(|p| split(&url).1.starts_with(p)) {
                return Err(url);
            }
            let resp = self.get(&url);
            if !matches!(resp.status, 301 | 302 | 303 | 307 | 308) {
                return Ok((url, resp));
            }
            let location = resp.header("location").expect("a redirect with Location");
            url = resolve(&url, location);
        }
        panic!("too many redirects, last {url}");
    }

    /// From a page of the gateway through the provider's login form, as `user`; stops
    /// before `stop_before` when given.
    fn login(
        &mut self,
        start: &str,
        user: &str,
        stop_before: Option<&str>,
    ) -> Result<(String, RawResponse), String> {
        let (form_url, page) = self.follow(start, stop_before)?;
        assert!(
            page.status == 200 && form_url.contains("/interaction/"),
            "expected the provider's login form, got {} at {form_url}: {}",
            page.status,
            String::from_utf8_lossy(&page.body)
        );
        let resp = self.send(
            "POST",
            &format!("{form_url}/login"),
            Some(&format!("login={user}&password=password")),
            &[],
        );
        assert_eq!(resp.status, 303, "{}", String::from_utf8_lossy(&resp.body));
        let next = resolve(&form_url, resp.header("location").unwrap());
        self.follow(&next, stop_before)
    }

    /// A login as `user` up to the gateway's callback URL, not yet requested.
    fn until_callback(&mut self, start: &str, user: &str) -> String {
        match self.login(start, user, Some(CALLBACK)) {
            Err(callback) => callback,
            Ok((url, resp)) => panic!(
                "never reached the callback; ended at {url} with {}",
                resp.status
            ),
        }
    }
}

fn oidc_config(idp_port: u16, upstream: SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(upstream))
        .plugin(
            "sso",
            "oidc",
            json!({
                "issuer": format!("http://127.0.0.1:{idp_port}"),
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scopes": ["openid", "email", "groups"],
                "role_claim": "groups",
                "admin_values": ["gateway-admins"],
                "secret": SECRET,
            }),
        )
        .plugin(
            "who",
            "headers",
            json!({
                "request": {
                    "set": {
                        "X-Auth-Subject": "{identity.subject}",
                        "X-Auth-Role": "{identity.role}",
                    }
                }
            }),
        )
        .route(Route::public("public", "app").path_prefix("/public"))
        .route(
            Route::new("admin", "app", "admin")
                .path_prefix("/admin")
                .plugins(&["sso", "who"]),
        )
        .route(
            Route::new("app", "app", "user")
                .path_prefix("/")
                .plugins(&["sso", "who"]),
        )
}

fn header<'r>(rec: &'r Recorded, name: &str) -> Option<&'r str> {
    rec.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn set_cookies(resp: &RawResponse) -> Vec<&str> {
    resp.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn body(resp: &RawResponse) -> String {
    String::from_utf8_lossy(&resp.body).into_owned()
}

#[test]
fn a_browser_logs_in_at_the_provider_and_reaches_the_upstream_as_itself() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw = Gateway::start(oidc_config(idp_port, rec.addr));
    let keys = tempfile::tempdir().unwrap();
    let idp = Idp::start(idp_port, keys.path(), Some(&gw), false);

    // A page without a session: to the login path, then to the provider with the
    // authorization code flow, PKCE, state and nonce.
    let mut alice = Browser::default();
    let first = alice.get(&gw.url("/admin/page?x=1"));
    assert_eq!(first.status, 302);
    let login = resolve(&gw.url("/"), first.header("location").unwrap());
    assert!(login.contains("/.gatewarden/login?next="), "{login}");
    let to_idp = alice.get(&login);
    assert_eq!(to_idp.status, 302, "{}", body(&to_idp));
    let authorize = to_idp.header("location").unwrap();
    assert!(
        authorize.starts_with(&format!("{}/auth?", idp.issuer())),
        "{authorize}"
    );
    for part in [
        "response_type=code",
        "client_id=gatewarden",
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "scope=openid%20email%20groups",
    ] {
        assert!(authorize.contains(part), "{part} missing: {authorize}");
    }
    let state_cookie = set_cookies(&to_idp).join("\n");
    assert!(
        state_cookie.starts_with("gatewarden_oidc=")
            && state_cookie.contains("HttpOnly")
            && state_cookie.contains("SameSite=Lax"),
        "{state_cookie}"
    );

    // Through the provider's login form and back to the callback.
    let callback = alice.login(authorize, "alice", Some(CALLBACK)).unwrap_err();
    let done = alice.get(&callback);
    assert_eq!(done.status, 303, "{}", body(&done));
    assert_eq!(done.header("location"), Some("/admin/page?x=1"));
    let cookies = set_cookies(&done);
    assert!(
        cookies.iter().any(|c| c.starts_with("gatewarden=")
            && c.contains("HttpOnly")
            && c.contains("SameSite=Lax")
            && c.contains("Path=/")),
        "{cookies:?}"
    );
    assert!(
        cookies.iter().any(|c| c.starts_with("gatewarden_oidc=;")),
        "the login state is cleared: {cookies:?}"
    );
    let page = alice.get(&gw.url("/admin/page?x=1"));
    assert_eq!(page.status, 200, "{}", body(&page));
    assert_eq!(body(&page), "/admin/page?x=1");
    let seen = rec.requests().pop().unwrap();
    assert_eq!(header(&seen, "x-auth-subject"), Some("alice"));
    assert_eq!(header(&seen, "x-auth-role"), Some("admin"));
    assert!(
        header(&seen, "cookie").is_none_or(|c| !c.contains("gatewarden")),
        "the session never reaches the upstream: {seen:?}"
    );

    // bob is in no admin group: a user, refused on admin routes.
    let mut bob = Browser::default();
    let (_, home) = bob.login(&gw.url("/home"), "bob", None).unwrap();
    assert_eq!((home.status, body(&home).as_str()), (200, "/home"));
    assert_eq!(
        header(&rec.requests().pop().unwrap(), "x-auth-role"),
        Some("user")
    );
    assert_eq!(bob.get(&gw.url("/admin/x")).status, 403);

    // Logout clears the session and ends the provider's session too (RP-initiated).
    let origin = format!("Origin: http://{}", gw.addr);
    let out = alice.send("POST", &gw.url("/.gatewarden/logout"), Some(""), &[&origin]);
    assert_eq!(out.status, 303, "{}", body(&out));
    let end = out.header("location").unwrap();
    assert!(
        end.starts_with(&format!(
            "{}/session/end?client_id=gatewarden&post_logout_redirect_uri=",
            idp.issuer()
        )),
        "{end}"
    );
    assert!(set_cookies(&out)
        .iter()
        .any(|c| c.starts_with("gatewarden=;")));
    assert_eq!(
        alice.get(end).status,
        200,
        "the provider accepts the logout request"
    );
    let after = alice.send(
        "GET",
        &gw.url("/admin/page"),
        None,
        &["Accept: application/json"],
    );
    // The browser sends Accept: text/html too; the session is gone either way.
    assert!(matches!(after.status, 302 | 401), "{}", after.status);
    assert_eq!(
        get(gw.addr, "/home", &["Accept: application/json"]).status,
        401
    );
    let output = gw.output();
    assert!(
        !output.contains(CLIENT_SECRET) && !output.contains(SECRET),
        "secrets never reach the log: {output}"
    );
}

#[test]
fn a_provider_that_takes_the_client_secret_in_the_form_works_too() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw = Gateway::start(oidc_config(idp_port, rec.addr));
    let keys = tempfile::tempdir().unwrap();
    let _idp = Idp::start_with(
        idp_port,
        keys.path(),
        Some(&gw),
        false,
        "client_secret_post",
    );
    let mut dave = Browser::default();
    let (_, page) = dave.login(&gw.url("/page"), "dave", None).unwrap();
    assert_eq!((page.status, body(&page).as_str()), (200, "/page"));
    assert_eq!(
        header(&rec.requests().pop().unwrap(), "x-auth-subject"),
        Some("dave")
    );
}

#[test]
fn replayed_or_foreign_state_never_logs_in() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw = Gateway::start(oidc_config(idp_port, rec.addr));
    // A second replica with the same settings: it shares no memory with the first.
    let replica = Gateway::start(oidc_config(idp_port, rec.addr));
    let keys = tempfile::tempdir().unwrap();
    let idp = Idp::start(idp_port, keys.path(), Some(&gw), false);

    let mut alice = Browser::default();
    let callback = alice.until_callback(&gw.url("/page"), "alice");
    let before_use = alice.clone();
    let first = alice.get(&callback);
    assert_eq!(first.status, 303, "{}", body(&first));
    let reached = rec.requests().len();

    // The same callback again, state cookie and all: refused by this gateway, which
    // remembers the state, and by a replica, whose code exchange the provider refuses.
    let mut replay = before_use.clone();
    let again = replay.get(&callback);
    assert_eq!(again.status, 400, "{}", body(&again));
    assert!(body(&again).contains("already"), "{}", body(&again));
    assert!(
        replay.get(&gw.url("/page")).status == 302,
        "no session from a replay"
    );
    let mut other = before_use.clone();
    let on_replica = other.send(
        "GET",
        &callback.replace(&gw.addr.to_string(), &replica.addr.to_string()),
        None,
        &[&format!(
            "Cookie: gatewarden_oidc={}",
            before_use.cookies[&gw.addr.to_string()]["gatewarden_oidc"]
        )],
    );
    assert_eq!(on_replica.status, 400, "{}", body(&on_replica));
    assert!(
        body(&on_replica).contains("invalid_grant"),
        "{}",
        body(&on_replica)
    );

    // Another browser's callback (login CSRF): no state cookie, or a state cookie of
    // its own login that does not match.
    let mut bob = Browser::default();
    let bobs = bob.until_callback(&gw.url("/page"), "bob");
    let mut stranger = Browser::default();
    assert_eq!(stranger.get(&bobs).status, 400);
    let mut mallory = Browser::default();
    let _ = mallory.until_callback(&gw.url("/page"), "mallory");
    let crossed = mallory.get(&bobs);
    assert_eq!(crossed.status, 400, "{}", body(&crossed));
    assert!(body(&crossed).contains("state"), "{}", body(&crossed));
    // bob's own login is still good: refusals of others do not use it up.
    assert_eq!(bob.get(&bobs).status, 303);

    assert_eq!(
        rec.requests().len(),
        reached,
        "nothing reached the upstream"
    );
    // The refused exchange on the replica was logged without the client secret.
    let output = replica.output();
    assert!(output.contains("oidc"), "the refusal is logged: {output}");
    assert!(!output.contains(CLIENT_SECRET), "{output}");
    drop(idp);
}

#[test]
fn a_callback_without_its_pkce_verifier_is_refused_and_so_is_the_exchange() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw = Gateway::start(oidc_config(idp_port, rec.addr));
    let keys = tempfile::tempdir().unwrap();
    let idp = Idp::start(idp_port, keys.path(), Some(&gw), false);

    let mut alice = Browser::default();
    let callback = alice.until_callback(&gw.url("/page"), "alice");
    let jar = alice.cookies[&gw.addr.to_string()].clone();
    let sealed = &jar["gatewarden_oidc"];

    // The verifier lives only in the signed state cookie: without it, refused.
    let mut bare = Browser::default();
    let without = bare.get(&callback);
    assert_eq!(without.status, 400, "{}", body(&without));
    // A cookie whose verifier was swapped, under the old signature: refused.
    let (payload, tag) = sealed.split_once('.').unwrap();
    let mut state: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    state["v"] = json!("attacker-chosen-verifier-attacker-chosen-verif");
    let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(state.to_string()));
    let refused = bare.send(
        "GET",
        &callback,
        None,
        &[&format!("Cookie: gatewarden_oidc={forged}")],
    );
    assert_eq!(refused.status, 400, "{}", body(&refused));
    assert!(body(&refused).contains("not valid"), "{}", body(&refused));
    assert!(rec.requests().is_empty(), "nothing reached the upstream");

    // The provider itself refuses to exchange a PKCE code without the right verifier.
    let code = callback
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap()
        .to_string();
    let redirect = gw.url(CALLBACK).replace(':', "%3A").replace('/', "%2F");
    let no_verifier = idp.token_request(&format!(
        "grant_type=authorization_code&code={code}&redirect_uri={redirect}"
    ));
    assert_eq!(no_verifier.status, 400, "{}", body(&no_verifier));
    assert_eq!(no_verifier.json()["error"], "invalid_grant");
    let wrong = idp.token_request(&format!(
        "grant_type=authorization_code&code={code}&redirect_uri={redirect}&code_verifier=dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    ));
    assert_eq!(wrong.status, 400, "{}", body(&wrong));
    assert_eq!(wrong.json()["error"], "invalid_grant");
}

#[test]
fn provider_refusals_and_open_redirects_end_on_the_gateway() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw = Gateway::start(oidc_config(idp_port, rec.addr));
    let keys = tempfile::tempdir().unwrap();
    let _idp = Idp::start(idp_port, keys.path(), Some(&gw), false);

    // The user cancels at the provider: it answers access_denied; a clear 403.
    let mut carol = Browser::default();
    let (form_url, _) = carol.follow(&gw.url("/page"), None).unwrap();
    let cancel = carol.send("POST", &format!("{form_url}/login"), Some("abort=1"), &[]);
    assert_eq!(cancel.status, 303);
    let back = resolve(&form_url, cancel.header("location").unwrap());
    let denied = carol.follow(&back, None).unwrap().1;
    assert_eq!(denied.status, 403, "{}", body(&denied));
    assert!(body(&denied).contains("access_denied"), "{}", body(&denied));
    let json = get(
        gw.addr,
        "/.gatewarden/oidc/callback?error=server_error&error_description=%3Cscript%3E&state=x",
        &["Accept: application/json"],
    );
    assert_eq!(json.status, 400);
    assert!(json.json()["error"]
        .as_str()
        .unwrap()
        .contains("server_error"));

    // `next` never leaves the site.
    for evil in [
        "%2F%2Fevil.example",
        "https%3A%2F%2Fevil.example%2F",
        "%2F%5Cevil.example",
        "%2F%252f%252fevil.example",
    ] {
        let mut b = Browser::default();
        let callback =
            b.until_callback(&gw.url(&format!("/.gatewarden/login?next={evil}")), "alice");
        let done = b.get(&callback);
        assert_eq!(done.status, 303, "{}", body(&done));
        assert_eq!(done.header("location"), Some("/"), "next={evil}");
    }
    assert!(rec.requests().is_empty());
}

fn jwt_config(idp: &Idp, upstream: SocketAddr) -> Config {
    let iss = idp.issuer();
    Config::new()
        .with_admin()
        .upstream("app", Upstream::to(upstream))
        .plugin(
            "api",
            "jwt",
            json!({
                "issuer": iss,
                "audiences": [API],
                "jwks_url": format!("{iss}/jwks"),
                "algorithms": ["RS256"],
                "jwks_cooldown": "1s",
            }),
        )
        .plugin(
            "who",
            "headers",
            json!({ "request": { "set": { "X-Auth-Subject": "{identity.subject}" } } }),
        )
        .route(
            Route::new("api", "app", "user")
                .path_prefix("/")
                .plugins(&["api", "who"]),
        )
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[test]
fn the_providers_tokens_pass_jwt_forgeries_do_not_and_rotation_is_picked_up() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let keys = tempfile::tempdir().unwrap();
    let idp = Idp::start(idp_port, keys.path(), None, false);
    let gw = Gateway::start(jwt_config(&idp, rec.addr));
    let call = |token: &str| {
        get(
            gw.addr,
            "/api",
            &[&format!("Authorization: Bearer {token}")],
        )
    };

    let token = idp.access_token();
    let ok = call(&token);
    assert_eq!(ok.status, 200, "{}", body(&ok));
    assert_eq!(
        header(&rec.requests().pop().unwrap(), "x-auth-subject"),
        Some(CLIENT_ID)
    );
    let reached = rec.requests().len();

    // Forgeries built on the provider's real token and keys.
    let kid = kid_of(&token);
    let real = claims_of(&token);
    let private =
        EncodingKey::from_rsa_pem(&std::fs::read(keys.path().join("signing.pem")).unwrap())
            .unwrap();
    let public_pem = std::fs::read(keys.path().join("signing.pub.pem")).unwrap();
    let signed = |changes: Value| {
        let mut c = real.clone();
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.clone());
        encode(&h, &c, &private).unwrap()
    };
    let none = format!(
        "{}.{}.",
        b64(json!({ "alg": "none", "typ": "at+jwt", "kid": kid })
            .to_string()
            .as_bytes()),
        b64(real.to_string().as_bytes())
    );
    let unsigned = format!(
        "{}.{}",
        b64(json!({ "alg": "HS256", "typ": "at+jwt", "kid": kid })
            .to_string()
            .as_bytes()),
        b64(real.to_string().as_bytes())
    );
    let hs = format!(
        "{unsigned}.{}",
        jsonwebtoken::crypto::sign(
            unsigned.as_bytes(),
            &EncodingKey::from_secret(&public_pem),
            Algorithm::HS256
        )
        .unwrap()
    );
    let now = jsonwebtoken::get_current_timestamp();
    for (what, forged) in [
        ("alg none", none),
        ("HS256 keyed with the RSA public key", hs),
        ("wrong iss", signed(json!({ "iss": "http://127.0.0.1:1" }))),
        ("wrong aud", signed(json!({ "aud": "urn:other" }))),
        (
            "expired",
            signed(json!({ "exp": now - 120, "iat": now - 420 })),
        ),
    ] {
        let resp = call(&forged);
        assert_eq!(resp.status, 401, "{what}: {}", body(&resp));
    }
    assert_eq!(
        rec.requests().len(),
        reached,
        "no forgery reached the upstream"
    );
    // The control: the same key and claims unchanged pass, so the refusals above are
    // for what was changed.
    assert_eq!(call(&signed(json!({}))).status, 200);

    // The provider rotates: a new signing key, published before the old one.
    drop(idp);
    let idp = Idp::start(idp_port, keys.path(), None, true);
    let rotated = idp.access_token();
    assert_ne!(kid_of(&rotated), kid, "the provider signs with its new key");
    let resp = call(&rotated);
    assert_eq!(
        resp.status,
        200,
        "the new key is fetched on first sight: {}",
        body(&resp)
    );
    assert_eq!(
        call(&token).status,
        200,
        "tokens of the old key still pass while it is published"
    );
}

#[test]
fn discovery_is_retried_while_other_routes_serve() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw = Gateway::start(oidc_config(idp_port, rec.addr));

    // No provider yet: public routes serve, protected ones send browsers to log in,
    // and the login answers 503 with Retry-After rather than hang.
    assert_eq!(get(gw.addr, "/public/ok", &[]).status, 200);
    let nav = get(gw.addr, "/page", &["Accept: text/html"]);
    assert_eq!(nav.status, 302);
    let started = std::time::Instant::now();
    let pending = get(
        gw.addr,
        "/.gatewarden/login?next=/page",
        &["Accept: text/html"],
    );
    assert_eq!(pending.status, 503, "{}", body(&pending));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(pending.header("retry-after").is_some());
    assert!(pending.json()["error"]
        .as_str()
        .unwrap()
        .contains("identity provider"));
    assert_eq!(get(gw.addr, "/public/still", &[]).status, 200);

    let keys = tempfile::tempdir().unwrap();
    let _idp = Idp::start(idp_port, keys.path(), Some(&gw), false);
    poll_until("discovery to succeed", Duration::from_secs(45), || {
        get(
            gw.addr,
            "/.gatewarden/login?next=/page",
            &["Accept: text/html"],
        )
        .status
            == 302
    });
    let mut alice = Browser::default();
    let (_, page) = alice.login(&gw.url("/page"), "alice", None).unwrap();
    assert_eq!((page.status, body(&page).as_str()), (200, "/page"));
}

#[test]
fn an_admin_from_the_provider_opens_the_console_and_a_user_does_not() {
    if !provider_installed() {
        return;
    }
    let rec = RecordingUpstream::start();
    let idp_port = free_port();
    let gw =
        Gateway::start(oidc_config(idp_port, rec.addr).admin_console(json!({ "login": "sso" })));
    let keys = tempfile::tempdir().unwrap();
    let _idp = Idp::start(idp_port, keys.path(), Some(&gw), false);
    let admin_host = gw.admin.to_string();
    // The session cookie each browser got on the proxy listener, as the browser would
    // send it to the admin listener on the same host.
    let session_of = |user: &str| {
        let mut browser = Browser::default();
        let (_, page) = browser.login(&gw.url("/home"), user, None).unwrap();
        assert_eq!(page.status, 200, "{}", body(&page));
        let value = browser.cookies[&gw.addr.to_string()]["gatewarden"].clone();
        format!("Cookie: gatewarden={value}")
    };
    let on_admin =
        |path: &str, cookie: &str| send_to(gw.admin, &admin_host, "GET", path, &[cookie], "");

    let alice = session_of("alice");
    let view = on_admin("/ui/session", &alice).json();
    assert_eq!(
        (view["signed_in"].clone(), view["as"].clone()),
        (json!(true), json!("alice")),
        "{view}"
    );
    assert_eq!(on_admin("/admin/config", &alice).status, 200);

    let bob = session_of("bob");
    let view = on_admin("/ui/session", &bob).json();
    assert_eq!(view["signed_in"], false, "{view}");
    assert!(
        view["refused"].as_str().unwrap_or("").contains("bob"),
        "{view}"
    );
    assert_eq!(on_admin("/admin/config", &bob).status, 403);
}
