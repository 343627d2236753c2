//! Identity and access: API keys and the keys file, the `api_key` plugin, the central
//! access check, PIN login with signed session cookies, TOTP, lockout, identity
//! templates, the admin keys/config API, and `check` on identity settings.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use serde_json::{json, Value};

use crate::harness::*;

/// The PIN every test gateway uses.
pub(crate) const PIN: &str = "24681357";
/// Session secrets: the current one signs, the old one only verifies.
pub(crate) const SECRET: &str = "test-session-secret-0123456789abcdef";
const OLD_SECRET: &str = "an-older-session-secret-0123456789abcd";
pub(crate) const UNKNOWN_SECRET: &str = "nobody-knows-this-secret-0123456789ab";
/// `admin_key` of the api_key plugin, and `admin.api_key` of the admin listener.
const PLUGIN_ADMIN_KEY: &str = "plugin-admin-key-0123456789";
const ADMIN_API_KEY: &str = "admin-api-key-0123456789abcdef";
/// RFC 6238's SHA-1 test secret, "12345678901234567890", in base32.
const TOTP_BASE32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
const TOTP_SECRET: &[u8] = b"12345678901234567890";

/// How long a change to the keys file may take to reach a running gateway.
const PICKUP: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- helpers

/// Runs the binary with `input` on stdin, bounded in time.
fn run_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gatewarden");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gatewarden {args:?} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// The argon2id hash of [`PIN`], made once per test run by `gatewarden hash-pin`.
pub(crate) fn pin_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let out = run_with_stdin(&["hash-pin"], &format!("{PIN}\n"));
        assert!(out.status.success(), "hash-pin failed: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// `gatewarden key new --file FILE ARGS...`; returns the plaintext key.
pub(crate) fn key_new(file: &Path, args: &[&str]) -> String {
    let file = file.display().to_string();
    let mut all = vec!["key", "new", "--file", file.as_str()];
    all.extend_from_slice(args);
    let out = run_cli(&all, Path::new("/"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "key new {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.trim().to_string()
}

/// `gatewarden key ACTION --file FILE ARGS...`, whatever its exit code.
fn key_cmd(action: &str, file: &Path, args: &[&str]) -> (Output, String, String) {
    let file = file.display().to_string();
    let mut all = vec!["key", action, "--file", file.as_str()];
    all.extend_from_slice(args);
    let out = run_cli(&all, Path::new("/"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The row of `key list` for the key with this id.
fn list_row(file: &Path, id: &str) -> String {
    let (out, stdout, stderr) = key_cmd("list", file, &[]);
    assert!(out.status.success(), "{stdout}{stderr}");
    stdout
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no row for {id} in:\n{stdout}"))
        .to_string()
}

/// The keys file as YAML.
fn keys_yaml(file: &Path) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(file).expect("keys file")).expect("YAML")
}

/// The LAST USED column of a `key list` row (names and subjects without spaces).
fn last_used(row: &str) -> Option<String> {
    let cells: Vec<&str> = row.split_whitespace().collect();
    // id name prefix role subject created(date time) expires("-" or date time) last-used
    let at = if cells[7] == "-" { 8 } else { 9 };
    (cells[at] != "-").then(|| format!("{} {}", cells[at], cells[at + 1]))
}

/// The stored record whose `prefix` starts the plaintext `key`.
fn record_of(file: &Path, key: &str) -> serde_yaml_ng::Value {
    keys_yaml(file)["keys"]
        .as_sequence()
        .expect("keys list")
        .iter()
        .find(|k| k["prefix"].as_str().is_some_and(|p| key.starts_with(p)))
        .cloned()
        .unwrap_or_else(|| panic!("no record for {}...", &key[..9]))
}

fn is_key(text: &str) -> bool {
    text.len() == 46
        && text.starts_with("gw_")
        && text[3..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Percent-encodes everything but unreserved characters (form and query values).
pub(crate) fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends one request with `headers` (each `Name: value`) and `body`.
fn send(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> RawResponse {
    send_to(addr, "localhost", method, path, headers, body)
}

/// Posts the login form.
pub(crate) fn login(addr: SocketAddr, pin: &str, next: &str, headers: &[&str]) -> RawResponse {
    let mut all = vec!["Content-Type: application/x-www-form-urlencoded"];
    all.extend_from_slice(headers);
    send(
        addr,
        "POST",
        "/.gatewarden/login",
        &all,
        &format!("pin={}&next={}", encode(pin), encode(next)),
    )
}

/// `name=value` of the response's `Set-Cookie`.
pub(crate) fn cookie_pair(resp: &RawResponse) -> String {
    resp.header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie in {resp:?}"))
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_string()
}

/// The attributes of the response's `Set-Cookie` (after `name=value`).
fn cookie_attributes(resp: &RawResponse) -> Vec<String> {
    resp.header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie in {resp:?}"))
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_string())
        .collect()
}

/// Logs in with the right PIN and returns the session cookie as `name=value`.
pub(crate) fn session(addr: SocketAddr) -> String {
    let resp = login(addr, PIN, "/", &[]);
    assert_eq!(resp.status, 303, "login failed: {resp:?}");
    cookie_pair(&resp)
}

/// Every value of header `name` (lowercase) in a demo `/echo` answer.
fn echoed(json: &serde_json::Value, name: &str) -> Vec<String> {
    json["headers"]
        .as_array()
        .expect("echo headers")
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap_or("").to_string())
        .collect()
}

fn error_of(resp: &RawResponse) -> String {
    resp.json()["error"].as_str().unwrap_or("").to_string()
}

/// The gateway's 401: a JSON error body and `WWW-Authenticate: Bearer`.
#[track_caller]
fn assert_401(resp: &RawResponse) {
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert!(
        resp.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "no WWW-Authenticate: Bearer in {resp:?}"
    );
    assert_eq!(resp.json()["status"], 401);
}

/// A redirect to the login page that comes back to `next` afterwards.
#[track_caller]
fn assert_login_redirect(resp: &RawResponse, next: &str) {
    assert_eq!(resp.status, 302, "{resp:?}");
    assert_eq!(
        resp.header("location"),
        Some(format!("/.gatewarden/login?next={next}").as_str()),
        "{resp:?}"
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 session token in the gateway's format, signed with `secret`.
pub(crate) fn mint(secret: &str, sub: &str, role: &str, exp_from_now: i64) -> String {
    let now = unix_now() as i64;
    let claims = serde_json::json!({
        "sub": sub, "role": role, "amr": "pin", "iat": now, "exp": now + exp_from_now,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// The RFC 6238 code (HMAC-SHA1, 30 s steps, 6 digits) at `unix` seconds.
fn totp(secret: &[u8], unix: u64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).expect("hmac key");
    mac.update(&(unix / 30).to_be_bytes());
    let d = mac.finalize().into_bytes();
    let o = (d[19] & 0x0f) as usize;
    let v = u32::from_be_bytes([d[o] & 0x7f, d[o + 1], d[o + 2], d[o + 3]]) % 1_000_000;
    format!("{v:06}")
}

/// A gateway with API keys and a PIN login in front of `upstream`:
///
/// - `/echo/api`: access user, api_key only (no login page);
/// - `/echo/ops`: access admin, api_key only;
/// - `/echo/open`: public, but a presented key is still checked;
/// - everything else: access user, pin_gate then api_key.
///
/// Every route stamps `X-Webauth-User` and `X-Role` from the identity.
struct Setup {
    gw: Gateway,
    keys: PathBuf,
    /// Role user, subject alice@example.com.
    user_key: String,
    /// Role admin, from the keys file.
    admin_key: String,
    _keys_dir: tempfile::TempDir,
}

fn setup(upstream: SocketAddr) -> Setup {
    setup_with(upstream, json!({}), |config| config)
}

/// Like [`setup`], with `pin` settings added to the pin_gate plugin and `top` applied to
/// the config (for top-level settings).
fn setup_with(upstream: SocketAddr, pin: Value, top: impl FnOnce(Config) -> Config) -> Setup {
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("keys.yaml");
    let user_key = key_new(
        &keys,
        &["--name", "alice-laptop", "--subject", "alice@example.com"],
    );
    let admin_key = key_new(&keys, &["--name", "ops", "--role", "admin"]);
    let mut pin_settings = json!({
        "pin_hash": pin_hash(),
        "secret": SECRET,
        "previous_secrets": [OLD_SECRET],
    });
    if let (Value::Object(settings), Value::Object(extra)) = (&mut pin_settings, pin) {
        settings.extend(extra);
    }
    let config = top(Config::new().with_admin().admin_key(ADMIN_API_KEY))
        .upstream("app", Upstream::to(upstream))
        .plugin(
            "keys",
            "api_key",
            json!({ "keys_file": keys, "admin_key": PLUGIN_ADMIN_KEY }),
        )
        .plugin("pin", "pin_gate", pin_settings)
        .plugin(
            "who",
            "headers",
            json!({
                "request": {
                    "set": {
                        "X-Webauth-User": "{identity.subject}",
                        "X-Role": "{identity.role}",
                    }
                }
            }),
        )
        .route(
            Route::new("api", "app", "user")
                .path_prefix("/echo/api")
                .plugins(&["keys", "who"]),
        )
        .route(
            Route::new("ops", "app", "admin")
                .path_prefix("/echo/ops")
                .plugins(&["keys", "who"]),
        )
        .route(
            Route::public("open", "app")
                .path_prefix("/echo/open")
                .plugins(&["keys", "who"]),
        )
        .route(
            Route::new("app", "app", "user")
                .path_prefix("/")
                .plugins(&["pin", "keys", "who"]),
        );
    let gw = Gateway::start(config);
    Setup {
        gw,
        keys,
        user_key,
        admin_key,
        _keys_dir: keys_dir,
    }
}

/// The shipped `conf/open-webui.yaml` (its text in `shipped`) pointed at `upstream`, with
/// its keys file at `keys`; the harness picks the listener and admin addresses.
pub(crate) fn shipped_open_webui(shipped: &str, upstream: SocketAddr, keys: &Path) -> Config {
    for from in [
        "127.0.0.1:8080",
        "127.0.0.1:9091",
        "127.0.0.1:3000",
        "/var/lib/gatewarden/keys.yaml",
    ] {
        assert!(
            shipped.contains(from),
            "conf/open-webui.yaml no longer has {from}"
        );
    }
    let mut file: Value = serde_yaml_ng::from_str(shipped).unwrap();
    file["upstreams"]["open_webui"]["backends"] = json!([upstream.to_string()]);
    file["plugins"]["scripts"]["keys_file"] = json!(keys);
    Config::from_yaml(shipped)
        .set("upstreams", file["upstreams"].clone())
        .set("plugins", file["plugins"].clone())
}

// ---------------------------------------------------------------- the keys file and CLI

#[test]
fn key_new_prints_the_key_once_and_stores_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    let (out, stdout, stderr) = key_cmd(
        "new",
        &file,
        &["--name", "laptop", "--subject", "alice@example.com"],
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let key = stdout.trim();
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout is the key alone: {stdout}"
    );
    assert!(is_key(key), "not gw_ + 43 base62: {key:?}");
    assert!(!stderr.contains(key), "the key is shown once: {stderr}");
    let other = key_new(&file, &["--name", "ops", "--role", "admin"]);
    assert_ne!(key, other);

    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains(key) && !text.contains(&other),
        "plaintext stored"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the keys file must be private");
    }
    let rec = record_of(&file, key);
    let mut fields: Vec<&str> = rec
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "created_at",
            "disabled",
            "expires_at",
            "hash",
            "id",
            "name",
            "prefix",
            "role",
            "subject"
        ]
    );
    let hash = rec["hash"].as_str().unwrap();
    let hex = hash.strip_prefix("sha256:").expect("sha256: hash");
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
    assert_eq!(rec["name"], "laptop");
    assert_eq!(rec["role"], "user");
    assert_eq!(rec["subject"], "alice@example.com");
    assert_eq!(rec["disabled"], false);
    assert!(rec["expires_at"].is_null());
    assert_eq!(
        record_of(&file, &other)["subject"],
        "ops",
        "the subject defaults to the name"
    );

    // `key list`: every column, never a hash or a plaintext.
    let (out, list, _) = key_cmd("list", &file, &[]);
    assert!(out.status.success());
    let header = list.lines().next().unwrap();
    for column in [
        "ID",
        "NAME",
        "PREFIX",
        "ROLE",
        "SUBJECT",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "STATUS",
    ] {
        assert!(header.contains(column), "no {column} column: {header}");
    }
    let id = rec["id"].as_str().unwrap();
    let row = list_row(&file, id);
    for value in ["laptop", &key[..9], "user", "alice@example.com", "active"] {
        assert!(row.contains(value), "{value} missing from {row}");
    }
    for secret in [key, other.as_str(), hex, "sha256"] {
        assert!(!list.contains(secret), "key list shows {secret}:\n{list}");
    }
}

#[test]
fn key_revoke_works_by_id_and_prefix_but_never_on_the_last_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    let a = key_new(&file, &["--name", "a"]);
    let b = key_new(&file, &["--name", "b"]);
    let admin = key_new(&file, &["--name", "root", "--role", "admin"]);
    let (id_a, id_admin) = (
        record_of(&file, &a)["id"].as_str().unwrap().to_string(),
        record_of(&file, &admin)["id"].as_str().unwrap().to_string(),
    );

    let (out, stdout, stderr) = key_cmd("revoke", &file, &[&id_a]);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(list_row(&file, &id_a).ends_with("revoked"));
    let prefix_b = record_of(&file, &b)["prefix"].as_str().unwrap().to_string();
    let (out, stdout, stderr) = key_cmd("revoke", &file, &[&prefix_b]);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(record_of(&file, &b)["disabled"], true);

    let before = std::fs::read(&file).unwrap();
    let (out, _, stderr) = key_cmd("revoke", &file, &[&id_admin]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("last active admin key"), "{stderr}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "a refused revoke changed the file"
    );
    assert!(list_row(&file, &id_admin).ends_with("active"));

    let (out, _, stderr) = key_cmd("revoke", &file, &["gw_nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

#[test]
fn hash_pin_reads_stdin_and_prints_an_argon2id_hash() {
    let hash = pin_hash();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(PIN));
    let again = run_with_stdin(&["hash-pin"], &format!("{PIN}\n"));
    let again = String::from_utf8_lossy(&again.stdout);
    assert_ne!(again.trim(), hash, "each hash has its own salt");
    let empty = run_with_stdin(&["hash-pin"], "\n");
    assert_eq!(empty.status.code(), Some(1), "an empty PIN is refused");
    // That the hash really verifies the PIN is proven by every login test below.
}

// ---------------------------------------------------------------- api_key and access

#[test]
fn api_keys_from_bearer_or_x_api_key_pass_and_never_reach_the_upstream() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let key = &s.user_key;
    for header in [
        format!("Authorization: Bearer {key}"),
        format!("X-API-Key: {key}"),
    ] {
        let resp = get(s.gw.addr, "/echo/api/x", &[&header]);
        assert_eq!(resp.status, 200, "{header}: {resp:?}");
        let json = resp.json();
        assert!(echoed(&json, "authorization").is_empty(), "{json}");
        assert!(echoed(&json, "x-api-key").is_empty(), "{json}");
        assert!(!json.to_string().contains(key.as_str()), "{json}");
        assert_eq!(echoed(&json, "x-webauth-user"), ["alice@example.com"]);
    }
    // A key in the query string is not a credential (it would end up in logs).
    assert_401(&get(s.gw.addr, &format!("/echo/api/x?api_key={key}"), &[]));
    // Other Authorization schemes pass through untouched to an upstream that wants them.
    let resp = get(
        s.gw.addr,
        "/echo/open",
        &["Authorization: Basic dXNlcjpwYXNz"],
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        echoed(&resp.json(), "authorization"),
        ["Basic dXNlcjpwYXNz"]
    );
}

#[test]
fn wrong_revoked_or_expired_keys_get_401_never_anonymous_access() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let key = &s.user_key;
    // Right prefix, wrong rest.
    let last = key.chars().last().unwrap();
    let wrong = format!("{}{}", &key[..45], if last == 'A' { 'B' } else { 'A' });
    for path in ["/echo/api", "/echo/open", "/echo/page"] {
        let resp = get(s.gw.addr, path, &[&format!("X-API-Key: {wrong}")]);
        assert_401(&resp);
        assert_eq!(error_of(&resp), "invalid API key", "{path}");
        assert!(resp
            .header("www-authenticate")
            .unwrap()
            .contains("invalid_token"));
    }
    assert_401(&get(
        s.gw.addr,
        "/echo/open",
        &["Authorization: Bearer gw_tooshort"],
    ));

    // Revoked while the gateway runs: refused within the pickup time.
    let (out, _, stderr) = key_cmd("revoke", &s.keys, &[&key[..9]]);
    assert!(out.status.success(), "{stderr}");
    poll_until("the revoked key is refused", PICKUP, || {
        let resp = get(s.gw.addr, "/echo/api", &[&format!("X-API-Key: {key}")]);
        resp.status == 401 && error_of(&resp) == "API key revoked"
    });

    // An expiring key next to one that does not expire.
    let brief = key_new(&s.keys, &["--name", "brief", "--expires", "1s"]);
    let lasting = key_new(&s.keys, &["--name", "lasting"]);
    poll_until("the new key is picked up", PICKUP, || {
        get(s.gw.addr, "/echo/api", &[&format!("X-API-Key: {lasting}")]).status == 200
    });
    poll_until("the 1s key is refused as expired", PICKUP, || {
        let resp = get(s.gw.addr, "/echo/api", &[&format!("X-API-Key: {brief}")]);
        resp.status == 401 && error_of(&resp) == "API key expired"
    });
    let id = record_of(&s.keys, &brief)["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(list_row(&s.keys, &id).ends_with("expired"));
}

#[test]
fn roles_decide_admin_routes_user_keys_get_403() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let resp = get(
        s.gw.addr,
        "/echo/ops/x",
        &[&format!("Authorization: Bearer {}", s.user_key)],
    );
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.json()["status"], 403);

    let resp = get(
        s.gw.addr,
        "/echo/ops/x",
        &[&format!("X-API-Key: {}", s.admin_key)],
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echoed(&resp.json(), "x-role"), ["admin"]);

    // The plugin's single `admin_key`, not in the keys file.
    let resp = get(
        s.gw.addr,
        "/echo/ops/x",
        &[&format!("Authorization: Bearer {PLUGIN_ADMIN_KEY}")],
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let json = resp.json();
    assert_eq!(echoed(&json, "x-role"), ["admin"]);
    assert!(echoed(&json, "authorization").is_empty());

    // No credential at all on an admin route: 401, not 403.
    assert_401(&get(s.gw.addr, "/echo/ops/x", &[]));
}

#[test]
fn keys_added_and_revoked_while_running_apply_without_restart_and_record_last_use() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let fresh = key_new(
        &s.keys,
        &["--name", "ci", "--subject", "ci-bot", "--role", "admin"],
    );
    let header = format!("X-API-Key: {fresh}");
    let took = poll_until("a key created while running works", PICKUP, || {
        get(s.gw.addr, "/echo/ops", &[&header]).status == 200
    });
    assert!(took < PICKUP);
    let resp = get(s.gw.addr, "/echo/ops", &[&header]);
    assert_eq!(echoed(&resp.json(), "x-webauth-user"), ["ci-bot"]);

    let id = record_of(&s.keys, &fresh)["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(last_used(&list_row(&s.keys, &id)), None);
    // Running gateways write last use out every few seconds while keys are used.
    poll_until(
        "key list shows the last use",
        Duration::from_secs(15),
        || last_used(&list_row(&s.keys, &id)).is_some(),
    );
    let shown = last_used(&list_row(&s.keys, &id)).unwrap();
    let now = chrono::Utc::now();
    assert!(
        [now, now - chrono::Duration::minutes(1)]
            .iter()
            .any(|t| t.format("%Y-%m-%d %H:%M").to_string() == shown),
        "last use {shown} is not now"
    );
    assert!(
        !std::fs::read_to_string(&s.keys)
            .unwrap()
            .contains("last_used"),
        "serving requests must not rewrite the keys file"
    );

    let (out, _, stderr) = key_cmd("revoke", &s.keys, &[&id]);
    assert!(out.status.success(), "{stderr}");
    poll_until("a key revoked while running is refused", PICKUP, || {
        get(s.gw.addr, "/echo/ops", &[&header]).status == 401
    });
}

#[test]
fn last_use_is_written_out_when_the_gateway_stops() {
    let ups = Upstreams::start(1);
    let s = setup_with(ups.addr(0), json!({}), |config| {
        config
            .server("grace_period_seconds", 0)
            .server("graceful_shutdown_timeout_seconds", 1)
    });
    let resp = get(
        s.gw.addr,
        "/echo/api",
        &[&format!("X-API-Key: {}", s.user_key)],
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let id = record_of(&s.keys, &s.user_key)["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(last_used(&list_row(&s.keys, &id)), None);
    // The stop writes it out at once (the periodic flush may also get there first).
    s.gw.signal("TERM");
    poll_until("key list shows the last use after a stop", PICKUP, || {
        last_used(&list_row(&s.keys, &id)).is_some()
    });
    let admin_id = record_of(&s.keys, &s.admin_key)["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        last_used(&list_row(&s.keys, &admin_id)),
        None,
        "an unused key has no last use"
    );
}

#[test]
fn requests_without_credentials_get_401_or_a_login_redirect_for_browsers() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    let html = "Accept: text/html,application/xhtml+xml,*/*;q=0.8";
    // API clients.
    assert_401(&get(addr, "/echo/api/x", &[]));
    assert_401(&get(addr, "/echo/page", &["Accept: application/json"]));
    // A browser navigation on a route with a login page.
    assert_login_redirect(
        &get(addr, "/echo/page?x=1&y=a%20b", &[html]),
        "/echo/page%3Fx%3D1%26y%3Da%2520b",
    );
    // ...but not on a route without one, nor for a POST.
    assert_401(&get(addr, "/echo/api/x", &[html]));
    assert_401(&send(addr, "POST", "/echo/page", &[html], "x"));
    // A public route needs nothing.
    assert_eq!(get(addr, "/echo/open", &[]).status, 200);
}

#[test]
fn a_login_brings_the_browser_back_to_the_page_it_asked_for() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    let first = get(addr, "/echo/deep/page?tab=2&q=x", &["Accept: text/html"]);
    let location = first.header("location").expect("redirect").to_string();
    let page = get(addr, &location, &["Accept: text/html"]);
    assert_eq!(page.status, 200, "{page:?}");
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        html.contains(r#"name="next" value="/echo/deep/page?tab=2&amp;q=x""#),
        "{html}"
    );
    let resp = login(addr, PIN, "/echo/deep/page?tab=2&q=x", &[]);
    assert_eq!(resp.status, 303, "{resp:?}");
    assert_eq!(resp.header("location"), Some("/echo/deep/page?tab=2&q=x"));
    let cookie = cookie_pair(&resp);
    let resp = get(
        addr,
        "/echo/deep/page?tab=2&q=x",
        &[&format!("Cookie: {cookie}")],
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["query"], "tab=2&q=x");
}

#[test]
fn websocket_and_sse_go_through_the_same_access_check() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    let upgrade = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];
    let raw_ws = |extra: &[&str]| {
        let mut req = "GET /ws HTTP/1.1\r\nHost: localhost\r\n".to_string();
        for h in upgrade.iter().chain(extra) {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        raw(addr, &req).expect("upgrade request")
    };
    assert_401(&raw_ws(&[]));
    assert_401(&raw_ws(&[
        "X-API-Key: gw_wrongwrongwrongwrongwrongwrongwrongwrongwro",
    ]));
    assert_401(&get(addr, "/sse?n=1", &["Accept: text/event-stream"]));

    let sse = get(
        addr,
        "/sse?n=2&interval_ms=50",
        &[
            "Accept: text/event-stream",
            &format!("Authorization: Bearer {}", s.user_key),
        ],
    );
    assert_eq!(sse.status, 200, "{sse:?}");
    assert_eq!(
        String::from_utf8_lossy(&sse.body).matches("data: ").count(),
        2
    );

    let request = || {
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("x-api-key", s.user_key.parse().unwrap());
        request
    };
    let echoed = ups.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let (mut ws, _) = ws_connect(request()).await;
            ws.send(Message::text("with a key")).await.unwrap();
            loop {
                if let Message::Text(t) = ws.next().await.expect("stream ended").unwrap() {
                    break t.to_string();
                }
            }
        })
        .await
        .expect("websocket timed out")
    });
    assert_eq!(echoed, "with a key");
}

// ---------------------------------------------------------------- pin_gate

#[test]
fn the_login_page_is_a_plain_form_that_needs_no_javascript() {
    let ups = Upstreams::start(1);
    let s = setup_with(
        ups.addr(0),
        json!({ "login_css": "main { border-top: 4px solid #0a7 }" }),
        |config| config,
    );
    let page = get(s.gw.addr, "/.gatewarden/login", &["Accept: text/html"]);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    let html = String::from_utf8_lossy(&page.body);
    for part in [
        r#"<form method="post" action="/.gatewarden/login">"#,
        r#"name="pin""#,
        r#"type="submit""#,
        r#"name="next" value="/""#,
        r#"name="viewport""#,
        "main { border-top: 4px solid #0a7 }",
    ] {
        assert!(html.contains(part), "{part} missing from:\n{html}");
    }
    assert!(!html.contains("<script"), "the page must work without JS");
    assert!(
        !html.contains(r#"name="totp""#),
        "no code field without totp_secret"
    );
    // The page cannot be framed (clickjacking a PIN).
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
}

#[test]
fn a_wrong_pin_shows_the_page_again_and_the_right_one_sets_a_hardened_cookie() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    let wrong = login(addr, "11112222", "/echo/x", &[]);
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(wrong.header("set-cookie").is_none());
    let html = String::from_utf8_lossy(&wrong.body);
    assert!(
        html.contains("Wrong PIN") && html.contains(r#"value="/echo/x""#),
        "{html}"
    );

    // X-Forwarded-Proto from an untrusted peer does not make the connection HTTPS.
    let right = login(addr, PIN, "/echo/x", &["X-Forwarded-Proto: https"]);
    assert_eq!(right.status, 303, "{right:?}");
    assert_eq!(right.header("location"), Some("/echo/x"));
    let cookie = cookie_pair(&right);
    assert!(cookie.starts_with("gatewarden="), "{cookie}");
    let attributes = cookie_attributes(&right);
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(
            attributes.iter().any(|a| a == attr),
            "{attr}: {attributes:?}"
        );
    }
    assert!(attributes.iter().any(|a| a == "Max-Age=2592000"), "30d");
    assert!(
        !attributes.iter().any(|a| a == "Secure"),
        "plain HTTP: {attributes:?}"
    );

    // The session reaches the upstream page; the session cookie itself does not, other
    // cookies do.
    let page = get(
        addr,
        "/",
        &[
            "Accept: text/html",
            &format!("Cookie: theme=dark; {cookie}"),
        ],
    );
    assert_eq!(page.status, 200, "{page:?}");
    assert!(String::from_utf8_lossy(&page.body).contains("Gatewarden demo"));
    let echo = get(
        addr,
        "/echo/x",
        &[&format!("Cookie: theme=dark; {cookie}"), "Cookie: lang=en"],
    );
    assert_eq!(echo.status, 200, "{echo:?}");
    let json = echo.json();
    let cookies = echoed(&json, "cookie").join("; ");
    assert!(
        cookies.contains("theme=dark") && cookies.contains("lang=en"),
        "{json}"
    );
    assert!(!cookies.contains("gatewarden"), "session forwarded: {json}");
    assert_eq!(echoed(&json, "x-webauth-user"), ["pin"]);
    assert_eq!(echoed(&json, "x-role"), ["user"]);
}

#[test]
fn over_tls_the_session_cookie_is_host_prefixed_and_secure() {
    let ups = Upstreams::start(1);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(ups.addr(0)))
            .plugin(
                "pin",
                "pin_gate",
                json!({ "pin_hash": pin_hash(), "secret": SECRET }),
            )
            .route(Route::new("app", "app", "user").plugins(&["pin"]))
            .listen_tls(&cert_file, &key_file),
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let base = format!("https://{}", gw.addr);
    ups.runtime.block_on(async {
        let resp = client
            .post(format!("{base}/.gatewarden/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("pin={PIN}&next=%2Fecho"))
            .send()
            .await
            .expect("login over TLS");
        assert_eq!(resp.status(), 303);
        let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(set_cookie.starts_with("__Host-gatewarden="), "{set_cookie}");
        let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
        for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(attributes.contains(&attr), "{attr}: {set_cookie}");
        }
        assert!(
            !attributes.iter().any(|a| a.starts_with("Domain")),
            "__Host- forbids Domain"
        );
        let pair = set_cookie.split(';').next().unwrap().to_string();
        let echo: serde_json::Value = client
            .get(format!("{base}/echo"))
            .header("cookie", &pair)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echo["path"], "/echo", "{echo}");
        assert!(echoed(&echo, "cookie").is_empty(), "{echo}");
        // The plain-HTTP name is not the session on HTTPS.
        let plain = pair.replacen("__Host-", "", 1);
        let resp = client
            .get(format!("{base}/echo"))
            .header("cookie", plain)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    });
}

#[test]
fn tampered_expired_or_foreign_sessions_are_refused_and_never_reach_the_upstream() {
    let upstream = RecordingUpstream::start();
    let s = setup(upstream.addr);
    let addr = s.gw.addr;
    let good = session(addr).split_once('=').unwrap().1.to_string();
    let parts: Vec<&str> = good.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {good}");
    let payload = String::from_utf8(B64URL.decode(parts[1]).unwrap()).unwrap();
    assert!(payload.contains(r#""role":"user""#), "{payload}");
    let promoted = B64URL.encode(payload.replace(r#""role":"user""#, r#""role":"admin""#));
    let mut flipped_sig = parts[2].to_string();
    let first = if flipped_sig.starts_with('A') {
        "B"
    } else {
        "A"
    };
    flipped_sig.replace_range(0..1, first);
    let none_header = B64URL.encode(r#"{"alg":"none","typ":"JWT"}"#);

    let forged = [
        (
            "changed payload",
            format!("{}.{promoted}.{}", parts[0], parts[2]),
        ),
        (
            "changed signature",
            format!("{}.{}.{flipped_sig}", parts[0], parts[1]),
        ),
        (
            "truncated signature",
            format!("{}.{}.{}", parts[0], parts[1], &parts[2][..20]),
        ),
        ("no signature", format!("{}.{}.", parts[0], parts[1])),
        ("alg none", format!("{none_header}.{}.", parts[1])),
        ("unknown secret", mint(UNKNOWN_SECRET, "pin", "admin", 3600)),
        ("expired", mint(SECRET, "pin", "user", -5)),
        ("garbage", "not-a-token".to_string()),
    ];
    let seen_before = upstream.requests().len();
    for (what, token) in &forged {
        let cookie = format!("Cookie: gatewarden={token}");
        let api = get(addr, "/echo/x", &[&cookie, "Accept: application/json"]);
        assert_401(&api);
        let browser = get(addr, "/echo/x", &[&cookie, "Accept: text/html"]);
        assert_login_redirect(&browser, "/echo/x");
        // The bad cookie is cleared in both cases.
        for resp in [&api, &browser] {
            assert!(
                resp.header("set-cookie")
                    .is_some_and(|c| c.starts_with("gatewarden=;") && c.contains("Max-Age=0")),
                "{what}: {resp:?}"
            );
        }
        // A bad session never falls back to anonymous access, even on a route whose
        // chain would let a key through.
        assert_eq!(
            get(
                addr,
                "/echo/x",
                &[&cookie, &format!("X-API-Key: {}", s.user_key)]
            )
            .status,
            401,
            "{what}"
        );
    }
    assert_eq!(
        upstream.requests().len(),
        seen_before,
        "a forged session reached the upstream"
    );

    // A session signed with a previous secret still works (secret rotation), and the
    // upstream never sees it.
    let rotated = mint(OLD_SECRET, "carol", "user", 3600);
    let resp = get(
        addr,
        "/echo/x",
        &[&format!("Cookie: gatewarden={rotated}; keep=1")],
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = upstream.requests().last().cloned().unwrap();
    let header = |name: &str| {
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(header("x-webauth-user"), ["carol"]);
    assert_eq!(header("cookie"), ["keep=1"]);
    // And the real session, of course.
    let ok = get(addr, "/echo/x", &[&format!("Cookie: gatewarden={good}")]);
    assert_eq!(ok.status, 200);
}

#[test]
fn sessions_expire_on_the_server_after_session_ttl() {
    let ups = Upstreams::start(1);
    let s = setup_with(ups.addr(0), json!({ "session_ttl": "3s" }), |config| config);
    let addr = s.gw.addr;
    let resp = login(addr, PIN, "/", &[]);
    assert!(cookie_attributes(&resp).iter().any(|a| a == "Max-Age=3"));
    let cookie = format!("Cookie: {}", cookie_pair(&resp));
    assert_eq!(get(addr, "/echo/x", &[&cookie]).status, 200);
    // The browser would drop the cookie by itself; a client that keeps sending it must
    // be refused all the same.
    poll_until("the session expires", Duration::from_secs(8), || {
        get(addr, "/echo/x", &[&cookie]).status == 401
    });
    assert_login_redirect(
        &get(addr, "/echo/x", &[&cookie, "Accept: text/html"]),
        "/echo/x",
    );
}

#[test]
fn hostile_next_values_send_the_user_home() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    for next in [
        "//evil.example",
        "//evil.example/path",
        "/\\evil.example",
        "\\\\evil.example",
        "/%2f%2fevil.example",
        "/%2F%2Fevil.example",
        "/%5cevil.example",
        "https://evil.example",
        "http:evil.example",
        "javascript:alert(1)",
        "evil.example",
        "/a\r\nSet-Cookie: pwned=1",
        "/a%0d%0aSet-Cookie:%20pwned=1",
        "/a%0D%0ALocation:%20https://evil.example",
        "/a\tb",
    ] {
        let resp = login(addr, PIN, next, &[]);
        assert_eq!(resp.status, 303, "{next:?}: {resp:?}");
        assert_eq!(resp.header("location"), Some("/"), "next = {next:?}");
        assert!(resp.header("pwned").is_none() && !format!("{resp:?}").contains("pwned=1"));
        let page = get(
            addr,
            &format!("/.gatewarden/login?next={}", encode(next)),
            &[],
        );
        let html = String::from_utf8_lossy(&page.body);
        assert!(
            html.contains(r#"name="next" value="/""#),
            "{next:?} kept on the page"
        );
    }
    // Same-origin paths are kept as they are.
    for next in ["/chat?id=1", "/a/b#frag", "/%E2%9C%93"] {
        let resp = login(addr, PIN, next, &[]);
        assert_eq!(resp.header("location"), Some(next), "{resp:?}");
    }
}

#[test]
fn totp_codes_are_required_and_each_works_once() {
    assert_eq!(totp(TOTP_SECRET, 59), "287082", "RFC 6238 appendix B");
    let ups = Upstreams::start(1);
    let s = setup_with(
        ups.addr(0),
        json!({ "totp_secret": TOTP_BASE32 }),
        |config| config,
    );
    let addr = s.gw.addr;
    let page = get(addr, "/.gatewarden/login", &[]);
    assert!(String::from_utf8_lossy(&page.body).contains(r#"name="totp""#));

    let with_code = |pin: &str, code: &str| {
        send(
            addr,
            "POST",
            "/.gatewarden/login",
            &["Content-Type: application/x-www-form-urlencoded"],
            &format!("pin={pin}&totp={code}&next=%2F"),
        )
    };
    assert_eq!(
        login(addr, PIN, "/", &[]).status,
        401,
        "a PIN alone is not enough"
    );
    let stale = totp(TOTP_SECRET, unix_now() - 300);
    assert_eq!(with_code(PIN, &stale).status, 401, "a code from 5 min ago");
    let code = totp(TOTP_SECRET, unix_now());
    assert_eq!(
        with_code("99990000", &code).status,
        401,
        "right code, wrong PIN"
    );
    // The gateway checks the code even when the PIN is wrong (so the timing does not tell
    // which was wrong), which spends that step: use the next step's code, which the
    // one-step clock-drift window accepts.
    let next_code = totp(TOTP_SECRET, unix_now() + 30);
    let resp = with_code(PIN, &next_code);
    assert_eq!(resp.status, 303, "{resp:?}");
    assert!(cookie_pair(&resp).starts_with("gatewarden="));
    let replay = with_code(PIN, &next_code);
    assert_eq!(replay.status, 401, "a code works once: {replay:?}");
}

#[test]
fn repeated_failures_lock_out_one_client_address_until_the_ban_ends() {
    let ups = Upstreams::start(1);
    let s = setup_with(
        ups.addr(0),
        json!({ "lockout": { "max_failures": 3, "window": "1m", "ban": "3s" } }),
        // The gateway believes X-Forwarded-For from loopback, which lets one test
        // process act as several clients.
        |config| config.set("trusted_proxies", json!(["127.0.0.0/8"])),
    );
    let addr = s.gw.addr;
    let (a, b) = (
        "X-Forwarded-For: 203.0.113.7",
        "X-Forwarded-For: 203.0.113.8",
    );
    assert_eq!(login(addr, "00000001", "/", &[a]).status, 401);
    assert_eq!(login(addr, "00000002", "/", &[a]).status, 401);
    // The third failure within the window starts the ban.
    let banned = login(addr, "00000003", "/", &[a]);
    assert_eq!(banned.status, 429, "{banned:?}");
    let retry_after = |r: &RawResponse| -> u64 {
        r.header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After seconds in {r:?}"))
    };
    assert!((1..=3).contains(&retry_after(&banned)));
    // The right PIN during the ban gets the same answer, and no cookie.
    let right = login(addr, PIN, "/", &[a]);
    assert_eq!(right.status, 429, "{right:?}");
    assert!(right.header("set-cookie").is_none());
    assert!((1..=3).contains(&retry_after(&right)));
    assert_eq!(get(addr, "/.gatewarden/login", &[a]).status, 429);

    // Another address is not affected; behind a trusted proxy that says https, its
    // cookie is the secure one.
    let other = login(addr, PIN, "/", &[b, "X-Forwarded-Proto: https"]);
    assert_eq!(other.status, 303, "{other:?}");
    assert!(cookie_pair(&other).starts_with("__Host-gatewarden="));
    assert!(cookie_attributes(&other).iter().any(|a| a == "Secure"));

    poll_until("the ban ends", Duration::from_secs(8), || {
        login(addr, PIN, "/", &[a]).status != 429
    });
    assert_eq!(login(addr, PIN, "/", &[a]).status, 303);
}

#[test]
fn logout_clears_the_cookie_and_cross_origin_posts_are_refused() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    for origin in ["Origin: https://evil.example", "Origin: null"] {
        let resp = login(addr, PIN, "/", &[origin]);
        assert_eq!(resp.status, 403, "{origin}: {resp:?}");
        assert!(resp.header("set-cookie").is_none());
    }
    // The page's own origin is fine.
    assert_eq!(
        login(addr, PIN, "/", &["Origin: http://localhost"]).status,
        303
    );

    let cookie = format!("Cookie: {}", session(addr));
    assert_eq!(
        send(
            addr,
            "POST",
            "/.gatewarden/logout",
            &[&cookie, "Origin: https://evil.example"],
            ""
        )
        .status,
        403
    );
    assert_eq!(
        get(addr, "/.gatewarden/logout", &[&cookie]).status,
        405,
        "a GET (a link, an <img>) must not log out"
    );
    let out = send(addr, "POST", "/.gatewarden/logout", &[&cookie], "");
    assert_eq!(out.status, 303, "{out:?}");
    assert_eq!(out.header("location"), Some("/.gatewarden/login"));
    assert!(cookie_pair(&out) == "gatewarden=", "{out:?}");
    assert!(cookie_attributes(&out).iter().any(|a| a == "Max-Age=0"));
}

// ---------------------------------------------------------------- identity templates

#[test]
fn identity_headers_carry_subject_and_role_and_cannot_be_spoofed() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let addr = s.gw.addr;
    let spoof = [
        "x-webauth-user: mallory",
        "X-WEBAUTH-USER: eve",
        "X-Role: admin",
    ];
    let mut headers = spoof.to_vec();
    let key = format!("X-API-Key: {}", s.user_key);
    headers.push(&key);
    let resp = get(addr, "/echo/api", &headers);
    assert_eq!(resp.status, 200, "{resp:?}");
    let json = resp.json();
    assert_eq!(echoed(&json, "x-webauth-user"), ["alice@example.com"]);
    assert_eq!(echoed(&json, "x-role"), ["user"]);

    // Without an identity the header is left out, and the client's copies still go.
    let resp = get(addr, "/echo/open", &spoof);
    assert_eq!(resp.status, 200);
    let json = resp.json();
    assert!(echoed(&json, "x-webauth-user").is_empty(), "{json}");
    assert!(echoed(&json, "x-role").is_empty(), "{json}");
}

// ---------------------------------------------------------------- admin API

#[test]
fn the_admin_api_lists_creates_and_revokes_keys() {
    let ups = Upstreams::start(1);
    let s = setup(ups.addr(0));
    let admin = s.gw.admin;
    let auth = format!("Authorization: Bearer {ADMIN_API_KEY}");
    for headers in [
        vec![],
        vec!["Authorization: Bearer wrong-admin-key-0123456789"],
        vec!["Authorization: Basic YWRtaW46YWRtaW4="],
    ] {
        let resp = send(admin, "GET", "/admin/keys", &headers, "");
        assert_401(&resp);
    }
    // The admin API takes the admin listener's key, not an API key of the gateway.
    let with_api_key = send(
        admin,
        "GET",
        "/admin/keys",
        &[&format!("Authorization: Bearer {}", s.admin_key)],
        "",
    );
    assert_eq!(with_api_key.status, 401);

    let list = send(admin, "GET", "/admin/keys", &[&auth], "");
    assert_eq!(list.status, 200, "{list:?}");
    let body = String::from_utf8_lossy(&list.body).into_owned();
    assert!(!body.contains("sha256") && !body.contains("hash"), "{body}");
    let keys = list.json()["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2);
    let alice = keys.iter().find(|k| k["name"] == "alice-laptop").unwrap();
    assert_eq!(alice["subject"], "alice@example.com");
    assert_eq!(alice["role"], "user");
    assert_eq!(alice["status"], "active");
    assert!(s.user_key.starts_with(alice["prefix"].as_str().unwrap()));

    let created = send(
        admin,
        "POST",
        "/admin/keys",
        &[&auth, "Content-Type: application/json"],
        r#"{"name": "ci", "subject": "ci-bot", "expires": "1h"}"#,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let json = created.json();
    let plaintext = json["key"].as_str().unwrap().to_string();
    assert!(is_key(&plaintext), "{json}");
    assert_eq!(json["role"], "user");
    assert!(json["expires_at"].is_string(), "{json}");
    let id = json["id"].as_str().unwrap().to_string();
    // Shown once: not in the list, not in the file.
    let list = send(admin, "GET", "/admin/keys", &[&auth], "");
    assert!(!String::from_utf8_lossy(&list.body).contains(&plaintext));
    assert_eq!(list.json()["keys"].as_array().unwrap().len(), 3);
    assert!(!std::fs::read_to_string(&s.keys)
        .unwrap()
        .contains(&plaintext));
    let header = format!("X-API-Key: {plaintext}");
    poll_until("the key made through the API works", PICKUP, || {
        get(s.gw.addr, "/echo/api", &[&header]).status == 200
    });

    let revoked = send(admin, "DELETE", &format!("/admin/keys/{id}"), &[&auth], "");
    assert_eq!(revoked.status, 200, "{revoked:?}");
    assert_eq!(revoked.json()["status"], "revoked");
    poll_until("the key revoked through the API is refused", PICKUP, || {
        get(s.gw.addr, "/echo/api", &[&header]).status == 401
    });

    let admin_id = keys.iter().find(|k| k["role"] == "admin").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = std::fs::read(&s.keys).unwrap();
    let last = send(
        admin,
        "DELETE",
        &format!("/admin/keys/{admin_id}"),
        &[&auth],
        "",
    );
    assert_eq!(last.status, 409, "{last:?}");
    assert_eq!(std::fs::read(&s.keys).unwrap(), before);
    let missing = send(admin, "DELETE", "/admin/keys/k_nosuch", &[&auth], "");
    assert_eq!(missing.status, 404);
    let bad = send(admin, "POST", "/admin/keys", &[&auth], "{not json");
    assert_eq!(bad.status, 400);
}

#[test]
fn the_admin_config_endpoint_masks_every_secret() {
    let ups = Upstreams::start(1);
    let s = setup_with(
        ups.addr(0),
        json!({ "totp_secret": TOTP_BASE32 }),
        |config| config,
    );
    let resp = send(
        s.gw.admin,
        "GET",
        "/admin/config",
        &[&format!("Authorization: Bearer {ADMIN_API_KEY}")],
        "",
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    // It is the config...
    assert!(body.contains("keys.yaml"), "{body}");
    assert!(
        body.contains("pin_gate") && body.contains("/echo/ops"),
        "{body}"
    );
    // ...without a single secret, whole or in part.
    let hash = pin_hash();
    let hash_tail = hash.rsplit('$').next().unwrap();
    for secret in [
        hash,
        hash_tail,
        SECRET,
        OLD_SECRET,
        ADMIN_API_KEY,
        PLUGIN_ADMIN_KEY,
        TOTP_BASE32,
    ] {
        assert!(!body.contains(secret), "{secret} in /admin/config:\n{body}");
    }
    assert!(send(s.gw.admin, "GET", "/admin/config", &[], "").status == 401);
}

// ---------------------------------------------------------------- check

#[test]
fn check_refuses_bad_pin_gate_settings_and_names_the_plugin() {
    let hash = pin_hash();
    let argon2i = hash.replacen("$argon2id$", "$argon2i$", 1);
    let cases = [
        (
            "secret",
            json!("too-short-secret"),
            "32",
            "too-short-secret",
        ),
        (
            "pin_hash",
            json!("5e884898da28047151d0e56f8dc6292773603d0d"),
            "argon2",
            "5e884898da28047151d0e56f8dc6292773603d0d",
        ),
        ("pin_hash", json!(argon2i), "argon2id", argon2i.as_str()),
        ("pin_hsh", json!("x"), "pin_hsh", ""),
        ("lockout", json!({ "max_failures": 0 }), "max_failures", ""),
        (
            "totp_secret",
            json!("not base32!"),
            "totp_secret",
            "not base32!",
        ),
    ];
    for (key, value, reason, secret) in cases {
        let setting = format!("{key}: {value}");
        let mut block = json!({ "pin_hash": hash, "secret": SECRET });
        block[key] = value;
        let yaml = Config::new()
            .listen("127.0.0.1:1".parse().unwrap())
            .upstream("app", Upstream::named("127.0.0.1:9"))
            .plugin("pin", "pin_gate", block)
            .route(Route::new("app", "app", "user").plugins(&["pin"]))
            .to_yaml();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("g.yaml"), &yaml).unwrap();
        let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{setting}: {stdout}{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("plugins.pin (type: pin_gate)"))
            .unwrap_or_else(|| panic!("{setting}: plugin not named in:\n{stderr}"));
        assert!(line.contains(reason), "{setting}: {line}");
        assert!(
            secret.is_empty() || !(stdout.contains(secret) || stderr.contains(secret)),
            "{setting}: the value was printed:\n{stderr}"
        );
    }

    // An api_key plugin whose keys file does not exist says how to make one.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("g.yaml"),
        Config::new()
            .upstream("app", Upstream::named("127.0.0.1:9"))
            .plugin(
                "keys",
                "api_key",
                json!({ "keys_file": "missing-keys.yaml" }),
            )
            .route(Route::new("app", "app", "user").plugins(&["keys"]))
            .to_yaml(),
    )
    .unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("plugins.keys (type: api_key)") && stderr.contains("key new"),
        "{stderr}"
    );
}

/// `conf/open-webui.yaml` signs callers in to Open WebUI by their subject. Its comments
/// and the README tell how to make a key for the PIN's account, and a key made exactly
/// so reaches Open WebUI as the same account as the PIN login.
#[test]
fn open_webui_keys_made_as_documented_sign_in_as_the_pins_account() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/open-webui.yaml");
    let shipped = std::fs::read_to_string(&conf).unwrap();
    let parsed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&shipped).unwrap();
    let account = parsed["plugins"]["pin"]["subject"]
        .as_str()
        .expect("the pin plugin's subject")
        .to_string();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let documented = |text: &str| {
        text.lines()
            .filter_map(|l| l.split_once("gatewarden key new "))
            .map(|(_, args)| args.trim().to_string())
            .find(|args| args.contains(&format!("--subject {account}")))
    };
    assert!(
        documented(&readme).is_some(),
        "the README shows no `gatewarden key new ... --subject {account}`"
    );
    let args = documented(&shipped).unwrap_or_else(|| {
        panic!("conf/open-webui.yaml shows no `gatewarden key new ... --subject {account}`")
    });

    let open_webui = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    // The documented command, with the keys file in the test's directory.
    let args: Vec<&str> = args.split_whitespace().collect();
    let file_at = args.iter().position(|a| *a == "--file").expect("--file");
    let rest: Vec<&str> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != file_at && *i != file_at + 1)
        .map(|(_, a)| *a)
        .collect();
    let key = key_new(&keys, &rest);

    let gw = Gateway::start_with(
        shipped_open_webui(&shipped, open_webui.addr, &keys),
        &[
            ("GATEWARDEN_PIN_HASH", pin_hash()),
            ("GATEWARDEN_SESSION_SECRET", SECRET),
        ],
    );
    let session = cookie_pair(&login(gw.addr, PIN, "/", &[]));
    for (who, credential) in [
        ("the PIN login", format!("Cookie: {session}")),
        ("the key", format!("X-API-Key: {key}")),
    ] {
        let path = format!("/api/v1/auths/{}", who.replace(' ', "-"));
        assert_eq!(get(gw.addr, &path, &[&credential]).status, 200, "{who}");
        let seen = open_webui
            .requests()
            .into_iter()
            .find(|r| r.target() == path)
            .unwrap_or_else(|| panic!("{who}: the request did not reach Open WebUI"));
        let email = seen
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-trusted-user-email"))
            .map(|(_, v)| v.as_str());
        assert_eq!(
            email,
            Some(account.as_str()),
            "{who} signs in as another account"
        );
    }
}
