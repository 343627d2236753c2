//! The hostile-input catalogue: one gateway with a realistic full chain (API keys, PIN
//! login sessions, bearer JWTs, origin checks, identity headers, a per-IP rate limit,
//! audit and access logs, user and admin routes) in front of a recording upstream, and a
//! table of attacks read top to bottom. Every case states the exact status the client
//! gets and whether the request may reach the upstream; cases that pass state what the
//! upstream may and may not see. After the catalogue, the audit log, the access log and
//! `/metrics` are searched for every secret the cases used.
//!
//! The decisions this suite pins down (README, "Hostile input"):
//! - route matching ignores ASCII case and `;parameters`, so `/ADMIN` and `/admin;x`
//!   get the `/admin` route's access check whatever the upstream makes of them;
//! - `X-HTTP-Method-Override`, `X-HTTP-Method` and `X-Method-Override` never reach an
//!   upstream: the method the gateway checked is the method the upstream acts on;
//! - a request with both `Content-Length` and `Transfer-Encoding` is refused (400);
//! - two different session cookies in one request are refused (401);
//! - headers the gateway sets are also removed in their `_` spelling, which CGI, WSGI,
//!   PHP and Rack merge with the `-` one, and every `X-Forwarded-*` from an untrusted
//!   peer goes, not only the ones the gateway sets;
//! - credentials are never read from query strings;
//! - a client has `client_header_timeout_seconds` (60 s unless set) from its first byte
//!   for its first request head (slowloris).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use serde_json::json;

use crate::harness::*;
use crate::identity::{encode, key_new, mint, pin_hash, PIN, SECRET, UNKNOWN_SECRET};
use crate::jwt::{b64, claims, hs256, jwk, key_data, now, rsa, token, with, JwksServer, AUD, ISS};

const ADMIN_API_KEY: &str = "hostile-admin-api-key-0123456789";
/// Signs the service JWTs of the `/services` route (HS256).
const HS_SECRET: &str = "hostile-hs256-secret-0123456789abcdef";
/// What `upstream_auth` sends on the `/llm` route.
const UPSTREAM_KEY: &str = "sk-gateway-held-upstream-key-42";

/// The pipeline each guarded route runs: a PIN session or an API key, the origin check,
/// and the identity headers.
const GUARDED: &[&str] = &["pin", "keys", "same_origin", "who"];

/// The gateway under attack: `keys` is its keys file, `jwks_url` where the `sso`
/// plugin fetches its keys. The access log and the audit log go to the gateway's temp
/// dir (its working directory).
fn config(upstream: SocketAddr, keys: &Path, jwks_url: &str) -> Config {
    let route = |name: &str, access: &str| Route::new(name, "app", access);
    Config::new()
        .admin_key(ADMIN_API_KEY)
        .set("access_log", "access.jsonl")
        .set("max_request_body", "64KiB")
        .upstream("app", Upstream::to(upstream).with("read_timeout", "10s"))
        .plugin(
            "per_ip",
            "rate_limit",
            json!({ "key": "client_ip", "rate": "1000/s", "burst": 2000 }),
        )
        .plugin(
            "audit",
            "audit",
            json!({ "file": "audit.jsonl", "methods": "all" }),
        )
        .plugin("keys", "api_key", json!({ "keys_file": keys }))
        .plugin(
            "pin",
            "pin_gate",
            json!({ "pin_hash": pin_hash(), "secret": SECRET }),
        )
        .plugin("same_origin", "origin", json!({}))
        .plugin(
            "sso",
            "jwt",
            json!({
                "issuer": ISS,
                "audiences": [AUD],
                "jwks_url": jwks_url,
                "algorithms": ["RS256"],
                "role_claim": "groups",
                "admin_values": ["gw-admins"],
                "jwks_cooldown": "60s",
            }),
        )
        .plugin(
            "service_jwt",
            "jwt",
            json!({
                "issuer": ISS,
                "audiences": [AUD],
                "hs_secret": HS_SECRET,
                "algorithms": ["HS256"],
                "role_claim": "groups",
                "admin_values": ["gw-admins"],
            }),
        )
        .plugin(
            "llm_key",
            "upstream_auth",
            json!({ "header": "X-Upstream-Key", "value": UPSTREAM_KEY }),
        )
        .plugin(
            "who",
            "headers",
            json!({
                "request": {
                    "set": {
                        "X-Webauth-User": "{identity.subject}",
                        "X-Trusted-User-Email": "{identity.subject}",
                        "Remote-User": "{identity.subject}",
                        "X-Gatewarden-Role": "{identity.role}",
                    }
                }
            }),
        )
        .set("global_plugins", json!(["per_ip", "audit"]))
        .route(
            route("internal", "admin")
                .hosts(&["admin.internal"])
                .path_prefix("/")
                .plugins(GUARDED),
        )
        .route(
            route("items_write", "admin")
                .path_prefix("/items")
                .methods(&["DELETE", "PUT"])
                .plugins(GUARDED),
        )
        .route(
            route("exports", "admin")
                .path_prefix("/exports")
                .methods(&["GET"])
                .plugins(GUARDED),
        )
        .route(
            route("services", "user")
                .path_prefix("/services")
                .plugins(&["keys", "service_jwt", "who"]),
        )
        .route(
            route("keys_only", "user")
                .path_prefix("/keys-only")
                .plugins(&["keys", "who"]),
        )
        .route(route("llm", "user").path_prefix("/llm").plugins(&[
            "pin",
            "keys",
            "same_origin",
            "llm_key",
        ]))
        .route(
            route("admin", "admin")
                .path_prefix("/admin")
                .plugins(GUARDED),
        )
        .route(
            route("reports_read", "user")
                .path_prefix("/reports")
                .methods(&["GET", "HEAD"])
                .plugins(GUARDED),
        )
        .route(
            route("reports_write", "admin")
                .path_prefix("/reports")
                .plugins(GUARDED),
        )
        .route(
            route("sso", "user")
                .path_prefix("/sso")
                .plugins(&["sso", "who"]),
        )
        .route(
            route("public", "public")
                .path_prefix("/public")
                .plugins(&["who"]),
        )
        .route(route("app", "user").path_prefix("/").plugins(GUARDED))
}

/// Whether a case may reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Nothing of the request reaches the upstream.
    No,
    /// The whole request reaches the upstream.
    Yes,
    /// The head may reach the upstream (bodies stream), but the request never completes
    /// there: the gateway cuts it.
    Cut,
}

/// What the upstream saw, checked for cases that reach it.
type UpstreamCheck = Box<dyn Fn(&Recorded) -> Result<(), String>>;

struct Case {
    category: &'static str,
    name: String,
    request: Vec<u8>,
    /// The exact status; 0 means the gateway closes the connection without an answer.
    status: u16,
    reach: Reach,
    /// The exact `Location` of a redirect.
    location: Option<String>,
    upstream: Option<UpstreamCheck>,
}

impl Case {
    fn new(category: &'static str, name: impl Into<String>, request: Vec<u8>) -> Case {
        Case {
            category,
            name: name.into(),
            request,
            status: 0,
            reach: Reach::No,
            location: None,
            upstream: None,
        }
    }

    fn expect(mut self, status: u16, reach: Reach) -> Case {
        self.status = status;
        self.reach = reach;
        self
    }

    fn location(mut self, location: &str) -> Case {
        self.location = Some(location.to_string());
        self
    }

    fn upstream(mut self, check: impl Fn(&Recorded) -> Result<(), String> + 'static) -> Case {
        self.upstream = Some(Box::new(check));
        self
    }
}

/// `METHOD target HTTP/1.1` with `Host: localhost`, `Connection: close`, the header
/// lines given and, when `body` is not empty or the method usually has one, a
/// `Content-Length`.
fn req(method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Tags a request with `X-Case: id` right after its request line, so the upstream's
/// records can be matched to cases.
fn tagged(request: &[u8], id: usize) -> Vec<u8> {
    let end = request
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(request.len(), |p| p + 2);
    let mut out = request[..end].to_vec();
    out.extend_from_slice(format!("X-Case: {id}\r\n").as_bytes());
    out.extend_from_slice(&request[end..]);
    out
}

/// One exchange over a fresh connection: write everything (a gateway that refuses
/// early may stop reading, so write errors are not failures), read until the gateway
/// closes. Returns the status line's code (0 when nothing came back), the headers of
/// the first response, and how many responses arrived.
struct Exchange {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    responses: usize,
}

impl Exchange {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn exchange(addr: SocketAddr, request: &[u8]) -> Exchange {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to gateway");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // Requests without `Connection: close` (upgrades) leave the connection
                // open: stop at the end of the first response.
                if first_response_complete(&got) {
                    break;
                }
            }
            // A reset after the answer (the gateway closed with unread input) still
            // leaves the answer in `got`.
            Err(_) => break,
        }
    }
    parse_exchange(&got)
}

fn first_response_complete(got: &[u8]) -> bool {
    let Some(head_end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => got.len() >= head_end + 4 + n,
        None if head.contains("transfer-encoding: chunked") => got.ends_with(b"0\r\n\r\n"),
        None => false,
    }
}

fn parse_exchange(got: &[u8]) -> Exchange {
    let text = String::from_utf8_lossy(got);
    let responses = text.matches("HTTP/1.1 ").count() + text.matches("HTTP/1.0 ").count();
    let Some(head_end) = text.find("\r\n\r\n") else {
        return Exchange {
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
            responses,
        };
    };
    let mut lines = text[..head_end].split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Exchange {
        status,
        headers,
        body: got[head_end + 4..].to_vec(),
        responses,
    }
}

/// Every value of header `name` the upstream received.
fn seen(rec: &Recorded, name: &str) -> Vec<String> {
    rec.headers
        .iter()
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// A check that the upstream got header `name` exactly once, with `value`.
fn only(name: &'static str, value: &str) -> impl Fn(&Recorded) -> Result<(), String> {
    let value = value.to_string();
    move |rec| {
        let got = seen(rec, name);
        if got == [value.clone()] {
            Ok(())
        } else {
            Err(format!(
                "{name}: expected [{value:?}], upstream saw {got:?}"
            ))
        }
    }
}

/// A check that none of `names` reached the upstream, in any spelling.
fn none_of(names: &'static [&'static str]) -> impl Fn(&Recorded) -> Result<(), String> {
    move |rec| {
        let leaked: Vec<_> = rec
            .headers
            .iter()
            .filter(|(n, _)| names.iter().any(|x| n.trim().eq_ignore_ascii_case(x)))
            .collect();
        if leaked.is_empty() {
            Ok(())
        } else {
            Err(format!("reached the upstream: {leaked:?}"))
        }
    }
}

/// `name` with every `_` read as `-`, lowercase: how CGI, WSGI, PHP and Rack see it.
fn cgi_name(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('_', "-")
}

/// A check that no header the upstream got reads as `name` once `_` is taken for `-`.
fn no_spelling_of(name: &'static str) -> impl Fn(&Recorded) -> Result<(), String> {
    move |rec| {
        let leaked: Vec<_> = rec
            .headers
            .iter()
            .filter(|(n, _)| cgi_name(n) == name)
            .collect();
        if leaked.is_empty() {
            Ok(())
        } else {
            Err(format!("reached the upstream: {leaked:?}"))
        }
    }
}

/// A check that `name` reached the upstream in its own spelling only: no other
/// spelling that CGI-style servers merge with it.
fn no_spelling_except(name: &'static str) -> impl Fn(&Recorded) -> Result<(), String> {
    move |rec| {
        let others: Vec<_> = rec
            .headers
            .iter()
            .filter(|(n, _)| cgi_name(n) == name && !n.trim().eq_ignore_ascii_case(name))
            .collect();
        if others.is_empty() {
            Ok(())
        } else {
            Err(format!("other spellings reached the upstream: {others:?}"))
        }
    }
}

fn all(checks: Vec<UpstreamCheck>) -> impl Fn(&Recorded) -> Result<(), String> {
    move |rec| checks.iter().try_for_each(|c| c(rec))
}

/// The gateway under attack and everything the attacks use.
struct Target {
    gw: Gateway,
    upstream: RecordingUpstream,
    _jwks: JwksServer,
    _keys_dir: tempfile::TempDir,
    user_key: String,
    admin_key: String,
    /// `name=value` of a real session cookie from a PIN login.
    session: String,
    /// A valid RS256 JWT, role user, subject alice.
    jwt: String,
}

impl Target {
    fn start() -> Target {
        let upstream = RecordingUpstream::start();
        let jwks = JwksServer::start(vec![jwk(&rsa(1), "k1")]);
        let keys_dir = tempfile::tempdir().unwrap();
        let keys = keys_dir.path().join("keys.yaml");
        let user_key = key_new(
            &keys,
            &["--name", "alice-laptop", "--subject", "alice@example.com"],
        );
        let admin_key = key_new(
            &keys,
            &["--name", "ops", "--role", "admin", "--subject", "ops"],
        );
        let gw = Gateway::start(config(upstream.addr, &keys, &jwks.url()));
        let login = exchange(
            gw.addr,
            &req(
                "POST",
                "/.gatewarden/login",
                &["Content-Type: application/x-www-form-urlencoded"],
                format!("pin={PIN}&next=%2F").as_bytes(),
            ),
        );
        assert_eq!(login.status, 303, "login: {:?}", login.headers);
        let session = login
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .expect("session cookie")
            .to_string();
        let jwt = token("k1", &rsa(1), &claims("alice"));
        Target {
            gw,
            upstream,
            _jwks: jwks,
            _keys_dir: keys_dir,
            user_key,
            admin_key,
            session,
            jwt,
        }
    }

    fn dir(&self) -> PathBuf {
        self.gw.dir.path().to_path_buf()
    }
}

/// The session cookie's value with its payload, signature or header changed.
struct Forgeries {
    promoted: String,
    flipped_signature: String,
    alg_none: String,
    alg_none_with_signature: String,
}

fn forge(token: &str) -> Forgeries {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {token}");
    let payload = String::from_utf8(B64URL.decode(parts[1]).unwrap()).unwrap();
    assert!(payload.contains(r#""role":"user""#), "{payload}");
    let promoted_payload = B64URL.encode(payload.replace(r#""role":"user""#, r#""role":"admin""#));
    let mut sig = parts[2].to_string();
    let flip = if sig.starts_with('A') { "B" } else { "A" };
    sig.replace_range(0..1, flip);
    let none = B64URL.encode(r#"{"alg":"none","typ":"JWT"}"#);
    Forgeries {
        promoted: format!("{}.{promoted_payload}.{}", parts[0], parts[2]),
        flipped_signature: format!("{}.{}.{sig}", parts[0], parts[1]),
        alg_none: format!("{none}.{promoted_payload}."),
        alg_none_with_signature: format!("{none}.{}.{}", parts[1], parts[2]),
    }
}

fn catalogue(t: &Target) -> Vec<Case> {
    let user = format!("X-API-Key: {}", t.user_key);
    let admin = format!("X-API-Key: {}", t.admin_key);
    let bearer_user = format!("Authorization: Bearer {}", t.user_key);
    let cookie = format!("Cookie: {}", t.session);
    let session_value = t.session.split_once('=').unwrap().1.to_string();
    let forged = forge(&session_value);
    let json = "Accept: application/json";
    let html = "Accept: text/html";
    let mut cases = Vec::new();
    let mut add = |c: Case| cases.push(c);

    // ------------------------------------------------------------------ baselines
    // The refusals below mean something only if the same routes serve real callers.
    const BASE: &str = "baseline";
    add(Case::new(
        BASE,
        "user key on a user route",
        req("GET", "/app/x", &[&user], b""),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(only("x-webauth-user", "alice@example.com")),
        Box::new(only("x-gatewarden-role", "user")),
        Box::new(none_of(&["x-api-key"])),
    ])));
    add(Case::new(
        BASE,
        "admin key on the admin route",
        req("GET", "/admin/x", &[&admin], b""),
    )
    .expect(200, Reach::Yes)
    .upstream(only("x-gatewarden-role", "admin")));
    add(Case::new(
        BASE,
        "PIN session on a user route",
        req("GET", "/app/x", &[&cookie], b""),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(only("x-webauth-user", "pin")),
        Box::new(none_of(&["cookie"])),
    ])));
    add(Case::new(
        BASE,
        "valid JWT on the sso route",
        req(
            "GET",
            "/sso/x",
            &[&format!("Authorization: Bearer {}", t.jwt)],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(only("x-webauth-user", "alice")));
    add(Case::new(
        BASE,
        "user key on the admin route",
        req("GET", "/admin/x", &[&user], b""),
    )
    .expect(403, Reach::No));
    add(
        Case::new(BASE, "no credentials", req("GET", "/app/x", &[json], b""))
            .expect(401, Reach::No),
    );
    add(Case::new(
        BASE,
        "no credentials, browser navigation",
        req("GET", "/app/x?a=1", &[html], b""),
    )
    .expect(302, Reach::No)
    .location("/.gatewarden/login?next=/app/x%3Fa%3D1"));

    // ------------------------------------------------------------------ sessions
    const SESSION: &str = "session cookie";
    let bad_sessions: Vec<(&str, String)> = vec![
        ("payload changed to role admin", forged.promoted.clone()),
        ("signature changed", forged.flipped_signature.clone()),
        ("alg none, no signature", forged.alg_none.clone()),
        (
            "alg none, old signature kept",
            forged.alg_none_with_signature.clone(),
        ),
        ("expired", mint(SECRET, "pin", "user", -5)),
        (
            "signed with another secret",
            mint(UNKNOWN_SECRET, "pin", "admin", 3600),
        ),
        ("not a token", "garbage".to_string()),
        ("empty", String::new()),
        ("200 KiB of junk", "A".repeat(200 * 1024)),
    ];
    for (what, value) in &bad_sessions {
        add(Case::new(
            SESSION,
            *what,
            req(
                "GET",
                "/admin/x",
                &[&format!("Cookie: gatewarden={value}"), json],
                b"",
            ),
        )
        .expect(401, Reach::No));
    }
    add(Case::new(
        SESSION,
        "tampered, browser navigation: back to the login page",
        req(
            "GET",
            "/app/x",
            &[&format!("Cookie: gatewarden={}", forged.promoted), html],
            b"",
        ),
    )
    .expect(302, Reach::No)
    .location("/.gatewarden/login?next=/app/x"));
    add(Case::new(
        SESSION,
        "tampered cookie plus a valid API key: never falls through",
        req(
            "GET",
            "/app/x",
            &[&format!("Cookie: gatewarden={}", forged.promoted), &user],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        SESSION,
        "duplicate cookie: forged first, real second",
        req(
            "GET",
            "/admin/x",
            &[
                &format!(
                    "Cookie: gatewarden={}; gatewarden={session_value}",
                    forged.promoted
                ),
                json,
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        SESSION,
        "duplicate cookie: real first, forged second",
        req(
            "GET",
            "/app/x",
            &[
                &format!(
                    "Cookie: gatewarden={session_value}; gatewarden={}",
                    forged.promoted
                ),
                json,
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        SESSION,
        "duplicate cookie in two Cookie headers",
        req(
            "GET",
            "/app/x",
            &[
                &cookie,
                &format!(
                    "Cookie: gatewarden={}",
                    mint(UNKNOWN_SECRET, "eve", "admin", 3600)
                ),
                json,
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        SESSION,
        "the same real cookie twice is still one session",
        req(
            "GET",
            "/app/x",
            &[&format!(
                "Cookie: gatewarden={session_value}; other=1; gatewarden={session_value}"
            )],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(only("cookie", "other=1")));
    add(Case::new(
        SESSION,
        "cookie name in another case is not the session",
        req(
            "GET",
            "/app/x",
            &[&format!("Cookie: GATEWARDEN={session_value}"), json],
            b"",
        ),
    )
    .expect(401, Reach::No));

    // ------------------------------------------------------------------ JWTs
    const JWT: &str = "bearer JWT";
    let public_pem = key_data("rsa1.pub.pem");
    let good_parts: Vec<&str> = t.jwt.split('.').collect();
    let bad_jwts: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(claims("alice").to_string().as_bytes())
            ),
        ),
        (
            "HS256 keyed with the RSA public key",
            hs256(
                &public_pem,
                json!({ "alg": "HS256", "typ": "JWT", "kid": "k1" }),
                &claims("alice"),
            ),
        ),
        (
            "wrong issuer",
            token(
                "k1",
                &rsa(1),
                &with(claims("alice"), json!({ "iss": "https://evil.example/" })),
            ),
        ),
        (
            "wrong audience",
            token(
                "k1",
                &rsa(1),
                &with(claims("alice"), json!({ "aud": "another-app" })),
            ),
        ),
        (
            "expired",
            token(
                "k1",
                &rsa(1),
                &with(claims("alice"), json!({ "exp": now() - 120 })),
            ),
        ),
        ("unknown kid", token("k9", &rsa(2), &claims("alice"))),
        (
            "another key under the right kid",
            token("k1", &rsa(2), &claims("alice")),
        ),
        (
            "payload swapped after signing",
            format!(
                "{}.{}.{}",
                good_parts[0],
                b64(with(claims("alice"), json!({ "groups": ["gw-admins"] }))
                    .to_string()
                    .as_bytes()),
                good_parts[2]
            ),
        ),
    ];
    for (what, jwt) in &bad_jwts {
        add(Case::new(
            JWT,
            *what,
            req(
                "GET",
                "/sso/x",
                &[&format!("Authorization: Bearer {jwt}")],
                b"",
            ),
        )
        .expect(401, Reach::No));
    }

    // ------------------------------------------------------------------ open redirects
    // The right PIN, and a `next` that would leave the site: the user lands on `/`.
    const REDIRECT: &str = "login next";
    for next in [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example/",
        "/%2f%2fevil.example",
        "/%2F%5Cevil.example",
        "%2F%2Fevil.example",
        "javascript:alert(1)",
        "/\t/evil.example",
        "/%0d%0aSet-Cookie:%20x=1",
    ] {
        let body = format!("pin={PIN}&next={}", encode(next));
        add(Case::new(
            REDIRECT,
            format!("next={next:?}"),
            req(
                "POST",
                "/.gatewarden/login",
                &["Content-Type: application/x-www-form-urlencoded"],
                body.as_bytes(),
            ),
        )
        .expect(303, Reach::No)
        .location("/"));
    }
    add(Case::new(
        REDIRECT,
        "a same-origin next is kept",
        req(
            "POST",
            "/.gatewarden/login",
            &["Content-Type: application/x-www-form-urlencoded"],
            format!("pin={PIN}&next={}", encode("/app/page?x=1")).as_bytes(),
        ),
    )
    .expect(303, Reach::No)
    .location("/app/page?x=1"));

    // ------------------------------------------------------------------ spoofed headers
    const SPOOF: &str = "spoofed headers";
    add(Case::new(
        SPOOF,
        "X-Forwarded-For",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Forwarded-For: 203.0.113.7",
                "x-forwarded-for: 10.0.0.1",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(only("x-forwarded-for", "127.0.0.1")),
        Box::new(only("x-real-ip", "127.0.0.1")),
    ])));
    add(Case::new(
        SPOOF,
        "X-Forwarded-Host and -Proto",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Forwarded-Host: evil.example",
                "X-Forwarded-Proto: https",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(only("x-forwarded-host", "localhost")),
        Box::new(only("x-forwarded-proto", "http")),
    ])));
    add(Case::new(
        SPOOF,
        "other X-Forwarded-* (Port, Prefix, Scheme, Ssl, Server)",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Forwarded-Port: 8443",
                "X-Forwarded-Prefix: //evil.example",
                "X-Forwarded-Scheme: https",
                "X-Forwarded-Ssl: on",
                "X-Forwarded-Server: evil.example",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(none_of(&[
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "x-forwarded-server",
    ])));
    add(Case::new(
        SPOOF,
        "X-Real-IP",
        req("GET", "/app/x", &[&user, "X-Real-IP: 203.0.113.7"], b""),
    )
    .expect(200, Reach::Yes)
    .upstream(only("x-real-ip", "127.0.0.1")));
    add(Case::new(
        SPOOF,
        "X-Original-URL and X-Rewrite-URL",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Original-URL: /admin/keys",
                "X-Rewrite-URL: /admin/keys",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(none_of(&["x-original-url", "x-rewrite-url"])));
    add(Case::new(
        SPOOF,
        "Forwarded",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "Forwarded: for=203.0.113.7;host=evil.example;proto=https",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(none_of(&["forwarded"])));
    add(Case::new(
        SPOOF,
        "X-Request-Id is the gateway's",
        req(
            "GET",
            "/app/x",
            &[&user, "X-Request-Id: attacker-chosen"],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(|rec| {
        let ids = seen(rec, "x-request-id");
        match ids.as_slice() {
            [id] if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(()),
            _ => Err(format!("x-request-id: {ids:?}")),
        }
    }));
    add(Case::new(
        SPOOF,
        "identity headers in every case and duplicated",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Webauth-User: root",
                "x-webauth-user: root",
                "X-WEBAUTH-USER: root",
                "X-Trusted-User-Email: ceo@example.com",
                "x-trusted-user-email: ceo@example.com",
                "Remote-User: root",
                "REMOTE-USER: root",
                "X-Gatewarden-Role: admin",
                "x-gatewarden-role: admin",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(only("x-webauth-user", "alice@example.com")),
        Box::new(only("x-trusted-user-email", "alice@example.com")),
        Box::new(only("remote-user", "alice@example.com")),
        Box::new(only("x-gatewarden-role", "user")),
    ])));
    add(Case::new(
        SPOOF,
        "identity headers with underscores (CGI/WSGI/PHP read them as dashes)",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X_Webauth_User: root",
                "Remote_User: root",
                "X_Trusted_User_Email: ceo@example.com",
                "X_Forwarded_For: 203.0.113.7",
                "X_Real_IP: 203.0.113.7",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(none_of(&[
            "x_webauth_user",
            "remote_user",
            "x_trusted_user_email",
            "x_forwarded_for",
            "x_real_ip",
        ])),
        Box::new(only("x-webauth-user", "alice@example.com")),
    ])));
    add(Case::new(
        SPOOF,
        "identity headers on a public route without identity",
        req(
            "GET",
            "/public/x",
            &[
                "X-Webauth-User: root",
                "Remote-User: root",
                "X-Gatewarden-Role: admin",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(none_of(&[
        "x-webauth-user",
        "remote-user",
        "x-gatewarden-role",
    ])));
    add(Case::new(
        SPOOF,
        "identity header without credentials",
        req(
            "GET",
            "/admin/x",
            &["X-Webauth-User: ops", "X-Gatewarden-Role: admin", json],
            b"",
        ),
    )
    .expect(401, Reach::No));

    // ------------------------------------------------------------------ paths
    const PATH: &str = "path tricks";
    for (target, status) in [
        ("/%2e%2e/admin/x", 400),
        ("/app/..%2fadmin/x", 400),
        ("/app/..%2Fadmin/x", 400),
        ("/app/..%5cadmin/x", 400),
        ("/app\\..\\admin/x", 400),
        ("/app/..;/admin/x", 400),
        ("/admin%00/x", 400),
        ("/admin\x00/x", 400),
        ("/app/%e0%80%af", 200),
    ] {
        let reach = if status == 200 { Reach::Yes } else { Reach::No };
        add(Case::new(
            PATH,
            format!("{target:?}, user key"),
            req("GET", target, &[&user], b""),
        )
        .expect(status, reach));
    }
    // A user key must get the admin route's 403 however `/admin` is spelled.
    for target in [
        "/app/%2e%2e/admin/x",
        "/app/./../admin/x",
        "//admin/x",
        "/admin;x=1/keys",
        "/admin;/keys",
        "/ADMIN/x",
        "/Admin/x",
        "/%41dmin/x",
        "/%61dmin/x",
        "http://localhost/admin/x",
    ] {
        add(Case::new(
            PATH,
            format!("{target:?}, user key: the admin route"),
            req("GET", target, &[&user], b""),
        )
        .expect(403, Reach::No));
    }
    add(Case::new(
        PATH,
        "/ADMIN/x with the admin key: passes, as sent",
        req("GET", "/ADMIN/x", &[&admin], b""),
    )
    .expect(200, Reach::Yes)
    .upstream(|rec| {
        (rec.target() == "/ADMIN/x")
            .then_some(())
            .ok_or(format!("target {}", rec.target()))
    }));

    // ------------------------------------------------------------------ smuggling
    // The smuggled request would carry a valid key to `/smuggled`; the end of the
    // catalogue checks that the upstream never saw such a request.
    const SMUGGLE: &str = "request smuggling";
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: localhost\r\n{user}\r\n\r\n");
    let head = |extra: &str| {
        format!("POST /app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\n{extra}\r\n").into_bytes()
    };
    let with_body = |head: Vec<u8>, body: &str| {
        let mut r = head;
        r.extend_from_slice(body.as_bytes());
        r
    };
    add(Case::new(
        SMUGGLE,
        "Content-Length and Transfer-Encoding (CL.TE)",
        with_body(
            head("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n"),
            &format!("0\r\n\r\n{smuggled}"),
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "Transfer-Encoding and Content-Length (TE.CL)",
        with_body(
            head("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"),
            &format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()),
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "two different Content-Lengths",
        with_body(
            head("Content-Length: 0\r\nContent-Length: 44\r\n"),
            &smuggled,
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "a Content-Length list",
        with_body(head("Content-Length: 0, 44\r\n"), &smuggled),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "obs-fold continuation line",
        with_body(
            head("Content-Length: 0\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n"),
            "",
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "space before the colon",
        with_body(
            head("Transfer-Encoding : chunked\r\nContent-Length: 0\r\n"),
            &smuggled,
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "Transfer-Encoding not ending in chunked",
        with_body(
            head("Transfer-Encoding: chunked, identity\r\n"),
            &format!("0\r\n\r\n{smuggled}"),
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "Transfer-Encoding: xchunked",
        with_body(
            head("Transfer-Encoding: xchunked\r\n"),
            &format!("0\r\n\r\n{smuggled}"),
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(SMUGGLE, "Transfer-Encoding in HTTP/1.0", format!("POST /app/x HTTP/1.0\r\nHost: localhost\r\n{user}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}").into_bytes())
        .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "invalid chunk size",
        with_body(
            head("Transfer-Encoding: chunked\r\nConnection: close\r\n"),
            &format!("zz\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
    )
    .expect(400, Reach::Cut));
    add(Case::new(
        SMUGGLE,
        "chunk size that overflows",
        with_body(
            head("Transfer-Encoding: chunked\r\nConnection: close\r\n"),
            &format!("10000000000000000005\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
    )
    .expect(400, Reach::Cut));
    add(Case::new(
        SMUGGLE,
        "negative Content-Length",
        with_body(head("Content-Length: -1\r\n"), &smuggled),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SMUGGLE,
        "NUL in a header value",
        with_body(head("X-Evil: a\x00b\r\nContent-Length: 0\r\n"), ""),
    )
    .expect(400, Reach::No));

    // ------------------------------------------------------------------ authority
    const AUTHORITY: &str = "host and authority";
    add(Case::new(
        AUTHORITY,
        "absolute-form URL naming another host than Host",
        format!("GET http://evil.example/app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .expect(400, Reach::No));
    add(Case::new(
        AUTHORITY,
        "two different Host headers",
        format!("GET /app/x HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n{user}\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .expect(400, Reach::No));
    add(Case::new(
        AUTHORITY,
        "an HTTP/0.9 request line",
        b"GET /app/x\r\n\r\n".to_vec(),
    )
    .expect(400, Reach::No));
    add(Case::new(
        AUTHORITY,
        "CONNECT to tunnel elsewhere",
        format!("CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n{user}\r\n\r\n")
            .into_bytes(),
    )
    .expect(405, Reach::No));

    // ------------------------------------------------------------------ sizes
    const SIZE: &str = "oversized input";
    add(Case::new(
        SIZE,
        "declared body over max_request_body",
        with_body(head("Content-Length: 70000\r\nConnection: close\r\n"), ""),
    )
    .expect(413, Reach::No));
    let mut chunked = head("Transfer-Encoding: chunked\r\nConnection: close\r\n");
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 4096, "b".repeat(4096)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    add(Case::new(SIZE, "chunked body over max_request_body", chunked).expect(413, Reach::Cut));
    add(Case::new(
        SIZE,
        "login form over 16 KiB",
        req(
            "POST",
            "/.gatewarden/login",
            &["Content-Type: application/x-www-form-urlencoded"],
            format!("pin={PIN}&x={}", "a".repeat(20 * 1024)).as_bytes(),
        ),
    )
    .expect(413, Reach::No));
    // Cookies other than the session are the upstream's business; only the 1 MiB head
    // limit applies to them.
    add(Case::new(
        SIZE,
        "a 200 KiB cookie of the upstream's with a valid key",
        req(
            "GET",
            "/app/x",
            &[&user, &format!("Cookie: big={}", "c".repeat(200 * 1024))],
            b"",
        ),
    )
    .expect(200, Reach::Yes));
    add(Case::new(
        SIZE,
        "request head over 1 MiB",
        req(
            "GET",
            "/app/x",
            &[&user, &format!("X-Big: {}", "a".repeat(1100 * 1024))],
            b"",
        ),
    )
    .expect(400, Reach::No));
    let many: Vec<String> = (0..300).map(|i| format!("X-H{i}: v")).collect();
    let mut many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    many_refs.push(&user);
    add(Case::new(
        SIZE,
        "300 header lines",
        req("GET", "/app/x", &many_refs, b""),
    )
    .expect(400, Reach::No));
    add(Case::new(
        SIZE,
        "a 32 KiB URL without credentials",
        req(
            "GET",
            &format!("/app/{}", "a".repeat(32 * 1024)),
            &[json],
            b"",
        ),
    )
    .expect(401, Reach::No));
    // The `http` crate's URI limit (65534 bytes), before any gateway code runs.
    add(Case::new(
        SIZE,
        "a URL over 64 KiB",
        req(
            "GET",
            &format!("/app/{}", "a".repeat(64 * 1024)),
            &[&user],
            b"",
        ),
    )
    .expect(400, Reach::No));

    // ------------------------------------------------------------------ websocket
    const WS: &str = "websocket";
    let upgrade = |extra: &[&str]| {
        let mut r = String::from("GET /app/ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        for h in extra {
            r.push_str(h);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    };
    add(Case::new(
        WS,
        "upgrade from a foreign Origin with a valid session",
        upgrade(&["Origin: https://evil.example", &cookie]),
    )
    .expect(403, Reach::No));
    add(Case::new(
        WS,
        "upgrade from Origin null",
        upgrade(&["Origin: null", &cookie]),
    )
    .expect(403, Reach::No));
    add(Case::new(
        WS,
        "upgrade marked Sec-Fetch-Site: cross-site",
        upgrade(&["Sec-Fetch-Site: cross-site", &cookie]),
    )
    .expect(403, Reach::No));
    add(Case::new(
        WS,
        "upgrade from a look-alike origin",
        upgrade(&["Origin: http://localhost.evil.example", &cookie]),
    )
    .expect(403, Reach::No));
    add(Case::new(
        WS,
        "upgrade without credentials",
        upgrade(&["Origin: http://localhost"]),
    )
    .expect(401, Reach::No));
    // The upstream here speaks plain HTTP: it answers 200, which is passed on.
    add(Case::new(
        WS,
        "same-origin upgrade with a session reaches the upstream",
        upgrade(&["Origin: http://localhost", &cookie]),
    )
    .expect(200, Reach::Yes)
    .upstream(only("upgrade", "websocket")));

    // ------------------------------------------------------------------ query credentials
    const QUERY: &str = "credentials in the query";
    for (target, with) in [
        (format!("/app/x?api_key={}", t.user_key), "api_key"),
        (format!("/app/x?key={}", t.admin_key), "key"),
        (format!("/admin/x?x-api-key={}", t.admin_key), "x-api-key"),
        (format!("/sso/x?access_token={}", t.jwt), "access_token"),
        (format!("/sso/x?token={}", t.jwt), "token"),
        (format!("/app/x?gatewarden={session_value}"), "session"),
    ] {
        add(Case::new(
            QUERY,
            format!("?{with}= does not authenticate"),
            req("GET", &target, &[json], b""),
        )
        .expect(401, Reach::No));
    }

    // ------------------------------------------------------------------ method override
    // `/reports` answers GET to users; anything else there needs an admin. An override
    // header must not turn a checked GET into an unchecked DELETE upstream.
    const OVERRIDE: &str = "method override";
    for header in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "x-http-method-override",
    ] {
        add(Case::new(
            OVERRIDE,
            format!("GET with {header}: DELETE reaches the upstream as a plain GET"),
            req(
                "GET",
                "/reports/1",
                &[&user, &format!("{header}: DELETE")],
                b"",
            ),
        )
        .expect(200, Reach::Yes)
        .upstream(|rec| {
            if !rec.request_line.starts_with("GET ") {
                return Err(format!("request line {}", rec.request_line));
            }
            none_of(&[
                "x-http-method-override",
                "x-http-method",
                "x-method-override",
            ])(rec)
        }));
    }
    add(Case::new(
        OVERRIDE,
        "DELETE itself needs an admin",
        req("DELETE", "/reports/1", &[&user], b""),
    )
    .expect(403, Reach::No));
    add(Case::new(
        OVERRIDE,
        "cross-site GET with an override to POST passes as a GET only",
        req(
            "GET",
            "/app/x",
            &[
                &bearer_user,
                "Origin: https://evil.example",
                "X-HTTP-Method-Override: POST",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(none_of(&["x-http-method-override"])));
    add(Case::new(
        OVERRIDE,
        "cross-site POST is refused whatever it claims to be",
        req(
            "POST",
            "/app/x",
            &[
                &cookie,
                "Origin: https://evil.example",
                "X-HTTP-Method-Override: GET",
            ],
            b"",
        ),
    )
    .expect(403, Reach::No));

    // ------------------------------------------------------------------ two credentials
    // Every credential the chain's identity plugins understand is checked: a wrong one
    // is 401 whatever else the request carries, two that name different callers are
    // 401, a credential header sent twice is 401, and none of them reaches the upstream.
    const TWO: &str = "two credentials";
    let mut wrong_key = t.user_key.clone();
    let last = wrong_key.pop().unwrap();
    wrong_key.push(if last == 'A' { 'B' } else { 'A' });
    let bearer_admin = format!("Authorization: Bearer {}", t.admin_key);
    let service = |sub: &str, admin: bool| {
        let claims = if admin {
            with(claims(sub), json!({ "groups": ["gw-admins"] }))
        } else {
            claims(sub)
        };
        hs256(
            HS_SECRET.as_bytes(),
            json!({ "alg": "HS256", "typ": "JWT" }),
            &claims,
        )
    };
    let forged_service_admin = hs256(
        b"not-the-service-secret-0123456789abcdef",
        json!({ "alg": "HS256", "typ": "JWT" }),
        &with(claims("mallory"), json!({ "groups": ["gw-admins"] })),
    );
    add(Case::new(
        TWO,
        "baseline: a service JWT on the services route",
        req(
            "GET",
            "/services/x",
            &[&format!("Authorization: Bearer {}", service("svc", false))],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(only("x-webauth-user", "svc")));
    add(Case::new(
        TWO,
        "baseline: the same key in X-API-Key and Authorization",
        req("GET", "/app/x", &[&user, &bearer_user], b""),
    )
    .expect(200, Reach::Yes)
    .upstream(none_of(&["x-api-key", "authorization"])));
    add(Case::new(
        TWO,
        "valid X-API-Key, wrong key in Authorization",
        req(
            "GET",
            "/app/x",
            &[&user, &format!("Authorization: Bearer {wrong_key}")],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "wrong X-API-Key, valid key in Authorization",
        req(
            "GET",
            "/app/x",
            &[&format!("X-API-Key: {wrong_key}"), &bearer_user],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "X-API-Key twice: valid, then wrong",
        req(
            "GET",
            "/app/x",
            &[&user, &format!("X-API-Key: {wrong_key}")],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "X-API-Key twice, the same valid key",
        req("GET", "/app/x", &[&user, &user], b""),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a user's X-API-Key and the admin key in Authorization",
        req("GET", "/app/x", &[&user, &bearer_admin], b""),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a user's X-API-Key and the admin key in Authorization, tab after Bearer",
        req(
            "GET",
            "/app/x",
            &[&user, &format!("Authorization: Bearer\t{}", t.admin_key)],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "Authorization twice: a user key, then the admin key",
        req("GET", "/admin/x", &[&bearer_user, &bearer_admin], b""),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "Authorization twice: a valid user JWT, then a forged admin JWT",
        req(
            "GET",
            "/sso/x",
            &[
                &format!("Authorization: Bearer {}", t.jwt),
                &format!("Authorization: Bearer {}", forged.alg_none),
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "Authorization twice: a valid service JWT, then a forged admin one",
        req(
            "GET",
            "/services/x",
            &[
                &format!("Authorization: Bearer {}", service("svc", false)),
                &format!("Authorization: Bearer {forged_service_admin}"),
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a valid X-API-Key and a forged admin service JWT",
        req(
            "GET",
            "/services/x",
            &[
                &user,
                &format!("Authorization: Bearer {forged_service_admin}"),
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a valid X-API-Key and a valid service JWT for someone else",
        req(
            "GET",
            "/services/x",
            &[
                &user,
                &format!("Authorization: Bearer {}", service("bob", true)),
            ],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "two bearer JWTs in one Authorization value",
        req(
            "GET",
            "/services/x",
            &[&format!(
                "Authorization: Bearer {}, Bearer {forged_service_admin}",
                service("svc", false)
            )],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a valid session and a wrong X-API-Key",
        req(
            "GET",
            "/app/x",
            &[&cookie, &format!("X-API-Key: {wrong_key}")],
            b"",
        ),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a user session and the admin key on the admin route",
        req("GET", "/admin/x", &[&cookie, &admin], b""),
    )
    .expect(401, Reach::No));
    add(Case::new(
        TWO,
        "a valid X-API-Key and the admin key under X_API_Key and X-Api_Key",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                &format!("X_API_Key: {}", t.admin_key),
                &format!("X-Api_Key: {}", t.admin_key),
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(no_spelling_of("x-api-key")),
        Box::new(only("x-gatewarden-role", "user")),
    ])));

    // ------------------------------------------------------------------ gateway cookies
    // The gateway's own session cookie never reaches an upstream, on any route; the
    // client's other cookies do.
    const COOKIES: &str = "gateway cookies";
    let with_other = format!("Cookie: theme=dark; {}; lang=en", t.session);
    for (what, target, extra) in [
        ("a public route", "/public/x", None),
        ("an api_key-only route", "/keys-only/x", Some(user.as_str())),
        ("a JWT route", "/sso/x", None),
        ("a user route, identified by the session", "/app/x", None),
    ] {
        let mut headers = vec![with_other.as_str()];
        let jwt_header = format!("Authorization: Bearer {}", t.jwt);
        match (extra, target) {
            (Some(h), _) => headers.push(h),
            (None, "/sso/x") => headers.push(&jwt_header),
            _ => {}
        }
        add(Case::new(
            COOKIES,
            format!("session cookie among others on {what}"),
            req("GET", target, &headers, b""),
        )
        .expect(200, Reach::Yes)
        .upstream(only("cookie", "theme=dark; lang=en")));
    }
    add(Case::new(
        COOKIES,
        "the session under its HTTPS name on plain HTTP, on a public route",
        req(
            "GET",
            "/public/x",
            &[&format!("Cookie: __Host-{}; theme=dark", t.session)],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(only("cookie", "theme=dark")));
    add(Case::new(
        COOKIES,
        "the session cookie with spaces around its name, on a public route",
        req(
            "GET",
            "/public/x",
            &[&format!(
                "Cookie: theme=dark;  {} ",
                t.session.replacen('=', " = ", 1)
            )],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(only("cookie", "theme=dark")));

    // ------------------------------------------------------------------ method case
    // Methods are case-sensitive tokens, but upstream frameworks upper-case them: a
    // method spelled in lower case must never miss the route that names it.
    const METHOD: &str = "method case";
    add(Case::new(
        METHOD,
        "baseline: DELETE with a user key on the admin-only DELETE route",
        req("DELETE", "/items/1", &[&user], b""),
    )
    .expect(403, Reach::No));
    add(Case::new(
        METHOD,
        "baseline: GET with a user key falls to the user route",
        req("GET", "/items/1", &[&user], b""),
    )
    .expect(200, Reach::Yes));
    // Frameworks answer HEAD with the GET handler: a route for GET takes HEAD too.
    add(Case::new(
        METHOD,
        "HEAD with a user key on the admin-only GET route",
        req("HEAD", "/exports/x", &[&user], b""),
    )
    .expect(403, Reach::No));
    add(Case::new(
        METHOD,
        "baseline: POST with a user key falls past the GET route",
        req("POST", "/exports/x", &[&user], b""),
    )
    .expect(200, Reach::Yes));
    for method in ["delete", "Delete", "pUT", "put", "post", "get"] {
        add(Case::new(
            METHOD,
            format!("{method} with a user key"),
            req(method, "/items/1", &[&user], b""),
        )
        .expect(400, Reach::No));
    }

    // ------------------------------------------------------------------ host names
    // One normalised host name is matched: the `admin.internal` route (admin only)
    // must catch every spelling of it, and a Host that cannot be read is 400.
    const HOST: &str = "host names";
    let with_host = |host: &str, target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{user}\r\nConnection: close\r\n\r\n")
            .into_bytes()
    };
    for host in [
        "admin.internal",
        "admin.internal.",
        "ADMIN.Internal",
        "admin.internal:8080",
        "admin.internal.:8080",
    ] {
        add(Case::new(
            HOST,
            format!("Host: {host}, user key: the admin route"),
            with_host(host, "/app/x"),
        )
        .expect(403, Reach::No));
    }
    add(Case::new(
        HOST,
        "absolute-form target naming admin.internal: the admin route",
        with_host("admin.internal", "http://admin.internal/app/x"),
    )
    .expect(403, Reach::No));
    for host in [
        "admin.internal:abc",
        "admin.internal:",
        "admin.internal:99999",
        "admin.internal:8080:80",
        "admin.internal..",
        ".admin.internal",
        "admin..internal",
        "admin.internal%2e",
        "admin.internal\\",
        "[::1",
        "[not-an-address]",
        "",
    ] {
        add(Case::new(
            HOST,
            format!("malformed Host {host:?}"),
            with_host(host, "/app/x"),
        )
        .expect(400, Reach::No));
    }
    add(Case::new(
        HOST,
        "HTTP/1.1 without Host",
        format!("GET /app/x HTTP/1.1\r\n{user}\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .expect(400, Reach::No));
    add(Case::new(
        HOST,
        "HTTP/1.1 absolute-form naming admin.internal, without Host",
        format!("GET http://admin.internal/app/x HTTP/1.1\r\n{user}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
    )
    .expect(400, Reach::No));
    add(Case::new(
        HOST,
        "baseline: HTTP/1.0 without Host",
        format!("GET /app/x HTTP/1.0\r\n{user}\r\n\r\n").into_bytes(),
    )
    .expect(200, Reach::Yes));
    add(Case::new(
        HOST,
        "baseline: an IPv6 literal with port",
        with_host("[::1]:8080", "/app/x"),
    )
    .expect(200, Reach::Yes)
    .upstream(only("host", "[::1]:8080")));
    add(Case::new(
        HOST,
        "the upstream gets the normalised host",
        with_host("LocalHost.:8080", "/app/x"),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(only("host", "localhost:8080")),
        Box::new(only("x-forwarded-host", "localhost:8080")),
    ])));
    add(Case::new(
        HOST,
        "an absolute-form target goes upstream in origin form",
        with_host("localhost", "http://localhost/app/x?q=1"),
    )
    .expect(200, Reach::Yes)
    .upstream(|rec| {
        (rec.target() == "/app/x?q=1")
            .then_some(())
            .ok_or(format!("target {}", rec.target()))
    }));

    // ------------------------------------------------------------------ upgrade bodies
    // An Upgrade header changes nothing about the body limit, and an upgrade request
    // that carries a body is refused.
    const UPGRADE: &str = "upgrade with a body";
    let big = vec![b'a'; 200 * 1024];
    add(Case::new(
        UPGRADE,
        "Content-Length over the limit with Upgrade: foo",
        req(
            "POST",
            "/app/x",
            &[&user, "Connection: Upgrade", "Upgrade: foo"],
            &big,
        ),
    )
    .expect(413, Reach::No));
    add(Case::new(
        UPGRADE,
        "Content-Length over the limit with Upgrade: websocket",
        req(
            "POST",
            "/app/x",
            &[&user, "Connection: Upgrade", "Upgrade: websocket"],
            &big,
        ),
    )
    .expect(413, Reach::No));
    let mut chunked_upgrade = format!(
        "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..5 {
        chunked_upgrade.extend_from_slice(b"10000\r\n");
        chunked_upgrade.extend_from_slice(&[b'a'; 0x10000]);
        chunked_upgrade.extend_from_slice(b"\r\n");
    }
    chunked_upgrade.extend_from_slice(b"0\r\n\r\n");
    add(Case::new(
        UPGRADE,
        "a chunked body over the limit with Upgrade: websocket",
        chunked_upgrade,
    )
    .expect(400, Reach::No));
    add(Case::new(
        UPGRADE,
        "a small body with Upgrade: websocket",
        req(
            "POST",
            "/app/x",
            &[&user, "Connection: Upgrade", "Upgrade: websocket"],
            b"0123456789",
        ),
    )
    .expect(400, Reach::No));

    // ------------------------------------------------------------------ header spellings
    // CGI, WSGI, PHP and Rack read `_` as `-`, in any mix: every spelling of a header
    // the gateway sets is the gateway's.
    const SPELLING: &str = "header spellings";
    add(Case::new(
        SPELLING,
        "the upstream_auth header in `_` spellings",
        req(
            "GET",
            "/llm/v1/models",
            &[
                &user,
                "X_Upstream_Key: client-picked",
                "X-Upstream_Key: client-picked",
                "x_upstream-key: client-picked",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(no_spelling_except("x-upstream-key")),
        Box::new(only("x-upstream-key", UPSTREAM_KEY)),
    ])));
    add(Case::new(
        SPELLING,
        "an identity header in a mixed spelling",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Webauth_User: admin",
                "X_Trusted-User_Email: admin",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(no_spelling_except("x-webauth-user")),
        Box::new(no_spelling_except("x-trusted-user-email")),
        Box::new(only("x-webauth-user", "alice@example.com")),
    ])));
    add(Case::new(
        SPELLING,
        "forwarding headers in mixed spellings",
        req(
            "GET",
            "/app/x",
            &[
                &user,
                "X-Forwarded_For: 6.6.6.6",
                "X_Forwarded-Host: evil.example",
                "X-Real_IP: 6.6.6.6",
                "X-Forwarded_Prefix: /evil",
            ],
            b"",
        ),
    )
    .expect(200, Reach::Yes)
    .upstream(all(vec![
        Box::new(no_spelling_except("x-forwarded-for")),
        Box::new(no_spelling_except("x-forwarded-host")),
        Box::new(no_spelling_except("x-real-ip")),
        Box::new(no_spelling_of("x-forwarded-prefix")),
        Box::new(only("x-real-ip", "127.0.0.1")),
    ])));

    // ------------------------------------------------------------------ two origins
    const ORIGINS: &str = "two origins";
    add(Case::new(
        ORIGINS,
        "Origin twice: the site's own, then a foreign one",
        req(
            "POST",
            "/app/x",
            &[
                &cookie,
                "Origin: http://localhost",
                "Origin: https://evil.example",
            ],
            b"x",
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        ORIGINS,
        "Sec-Fetch-Site twice: same-origin, then cross-site",
        req(
            "POST",
            "/app/x",
            &[
                &cookie,
                "Sec-Fetch-Site: same-origin",
                "Sec-Fetch-Site: cross-site",
            ],
            b"x",
        ),
    )
    .expect(400, Reach::No));
    add(Case::new(
        ORIGINS,
        "a logout with two Origins",
        req(
            "POST",
            "/.gatewarden/logout",
            &[
                &cookie,
                "Origin: http://localhost",
                "Origin: https://evil.example",
            ],
            b"",
        ),
    )
    .expect(400, Reach::No));

    // ------------------------------------------------------------------ framing
    const FRAMING: &str = "body framing";
    for (what, length) in [
        ("leading zero", "05"),
        ("plus sign", "+5"),
        ("a list of the same value", "5, 5"),
        ("hex", "0x5"),
    ] {
        add(Case::new(
            FRAMING,
            format!("Content-Length with a {what}: {length:?}"),
            format!(
                "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\nhello"
            )
            .into_bytes(),
        )
        .expect(400, Reach::No));
    }
    add(Case::new(
        FRAMING,
        "Content-Length twice with the same value",
        format!(
            "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        .into_bytes(),
    )
    .expect(400, Reach::No));
    for coding in ["gzip, chunked", "chunked, chunked", "identity, chunked"] {
        add(Case::new(
            FRAMING,
            format!("Transfer-Encoding: {coding}"),
            format!(
                "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
        )
        .expect(501, Reach::No));
    }
    add(Case::new(
        FRAMING,
        "baseline: Transfer-Encoding: Chunked",
        format!(
            "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{user}\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .into_bytes(),
    )
    .expect(200, Reach::Yes));

    // ------------------------------------------------------------------ segment edges
    // Windows, IIS and some frameworks drop a segment's trailing dots and spaces, and
    // some servlet containers decode `%3B` before removing `;parameters`: such paths
    // would name another resource upstream than the one matched here.
    const EDGES: &str = "segment edges";
    for target in [
        "/admin%2e/x",
        "/admin%2E/x",
        "/admin./x",
        "/admin../x",
        "/admin%20/x",
        "/admin%2e%2e/x",
        "/admin.;x/keys",
        "/admin%3b/x",
        "/admin%3Bx=1/keys",
        "/app/admin.",
    ] {
        add(Case::new(
            EDGES,
            format!("{target:?}, user key"),
            req("GET", target, &[&user], b""),
        )
        .expect(400, Reach::No));
    }
    for target in [
        "/app/file.txt",
        "/app/a%20b/c",
        "/app/v1.2/x",
        "/app/.well-known/x",
    ] {
        add(Case::new(
            EDGES,
            format!("baseline: {target:?}, user key"),
            req("GET", target, &[&user], b""),
        )
        .expect(200, Reach::Yes));
    }

    cases
}

#[test]
fn the_hostile_input_catalogue() {
    let t = Target::start();
    let cases = catalogue(&t);
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    let mut categories: Vec<&str> = Vec::new();
    for (id, case) in cases.iter().enumerate() {
        if !categories.contains(&case.category) {
            categories.push(case.category);
        }
        let started = Instant::now();
        let resp = exchange(t.gw.addr, &tagged(&case.request, id));
        let label = format!("#{id} [{}] {}", case.category, case.name);
        if started.elapsed() > Duration::from_secs(1) {
            eprintln!("{label}: answered in {:?}", started.elapsed());
        }
        if resp.status != case.status {
            failures.push(format!(
                "{label}: status {} (expected {}); {:?} {}",
                resp.status,
                case.status,
                resp.headers,
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
            ));
        }
        if resp.responses > 1 {
            failures.push(format!(
                "{label}: {} responses on one connection",
                resp.responses
            ));
        }
        if let Some(location) = &case.location {
            if resp.header("location") != Some(location.as_str()) {
                failures.push(format!(
                    "{label}: Location {:?} (expected {location:?})",
                    resp.header("location")
                ));
            }
        }
        if resp.status >= 400 && resp.status != 0 && !resp.body.is_empty() {
            // The gateway's own refusals are JSON; Pingora's parser errors have no body.
            if resp.header("content-type") != Some("application/json") {
                failures.push(format!("{label}: refusal is not JSON: {:?}", resp.headers));
            }
        }
        // Wait for a cut request's upstream side to finish, so its record is final.
        let records = |tag: &str| -> Vec<Recorded> {
            t.upstream
                .requests()
                .into_iter()
                .filter(|r| seen(r, "x-case").iter().any(|v| v == tag))
                .collect()
        };
        let tag = id.to_string();
        if case.reach == Reach::Cut {
            let deadline = Instant::now() + Duration::from_secs(5);
            while records(&tag).iter().any(|r| !r.ended) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let reached = records(&tag);
        match case.reach {
            Reach::No if !reached.is_empty() => failures.push(format!(
                "{label}: reached the upstream: {:?}",
                reached[0].request_line
            )),
            Reach::Yes if reached.len() != 1 || !reached[0].complete => failures.push(format!(
                "{label}: expected one complete request upstream, got {:?}",
                reached
                    .iter()
                    .map(|r| (&r.request_line, r.complete))
                    .collect::<Vec<_>>()
            )),
            Reach::Cut if reached.iter().any(|r| r.complete) => {
                failures.push(format!("{label}: a cut request completed upstream"))
            }
            _ => {}
        }
        if let (Some(check), Some(rec)) = (&case.upstream, reached.first()) {
            if let Err(e) = check(rec) {
                failures.push(format!("{label}: {e}"));
            }
        }
    }
    // Smuggled requests would arrive after their carrier; give them time to show up.
    std::thread::sleep(Duration::from_millis(300));
    let smuggled: Vec<String> = t
        .upstream
        .requests()
        .iter()
        .filter(|r| r.target().contains("smuggled"))
        .map(|r| r.request_line.clone())
        .collect();
    if !smuggled.is_empty() {
        failures.push(format!(
            "smuggled requests reached the upstream: {smuggled:?}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} hostile cases passed, in {} categories: {}",
        cases.len(),
        categories.len(),
        categories.join(", ")
    );

    // Nothing any case sent as a secret was written down by the gateway.
    secrets_stay_out_of_logs_and_metrics(&t);
}

/// The audit log, the access log, the process output and `/metrics` hold none of the
/// secrets the catalogue used.
fn secrets_stay_out_of_logs_and_metrics(t: &Target) {
    let session_value = t.session.split_once('=').unwrap().1.to_string();
    let secrets: Vec<(&str, String)> = vec![
        ("user API key", t.user_key.clone()),
        ("admin API key", t.admin_key.clone()),
        ("admin API key (listener)", ADMIN_API_KEY.to_string()),
        ("PIN", PIN.to_string()),
        ("session secret", SECRET.to_string()),
        ("session cookie", session_value.clone()),
        (
            "session signature",
            session_value.rsplit('.').next().unwrap().to_string(),
        ),
        ("JWT", t.jwt.clone()),
        (
            "JWT signature",
            t.jwt.rsplit('.').next().unwrap().to_string(),
        ),
        ("forged session secret", UNKNOWN_SECRET.to_string()),
        ("service JWT secret", HS_SECRET.to_string()),
        ("upstream key", UPSTREAM_KEY.to_string()),
    ];
    let dir = t.dir();
    let audit = dir.join("audit.jsonl");
    let access = dir.join("access.jsonl");
    // Lines are written off the request path: wait until the last requests are in.
    poll_until("the logs to be written", Duration::from_secs(10), || {
        std::fs::read_to_string(&access).is_ok_and(|s| s.lines().count() >= 60)
            && std::fs::read_to_string(&audit).is_ok_and(|s| s.lines().count() >= 40)
    });
    let metrics = String::from_utf8_lossy(&get(t.gw.admin, "/metrics", &[]).body).into_owned();
    let sources = [
        ("audit log", std::fs::read_to_string(&audit).unwrap()),
        ("access log", std::fs::read_to_string(&access).unwrap()),
        ("metrics", metrics),
        ("process output", t.gw.output()),
    ];
    let mut leaks = Vec::new();
    for (source, text) in &sources {
        for (what, secret) in &secrets {
            if text.contains(secret.as_str()) {
                leaks.push(format!("{what} in the {source}"));
            }
        }
        // No query string made it into a log line either.
        if source.ends_with("log") && text.contains("api_key=") {
            leaks.push(format!("a query string in the {source}"));
        }
    }
    assert!(leaks.is_empty(), "secrets written down: {leaks:?}");
}

/// Slowloris. A client has `server.client_header_timeout_seconds` (60 s unless set; 3 s
/// here) from its first byte to send its request head (the gateway's deadline; Pingora
/// alone times out each read, so a trickle never ended), and a client silent that long
/// in the middle of its body gets 408 (`client_body_timeout_seconds`). Slow clients
/// cost a task each, not a thread: while a hundred trickle, others are served as usual.
#[test]
fn slow_clients_are_cut_off_and_do_not_starve_others() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let ups = Upstreams::start(1);
    let gw = Gateway::start(
        public(ups.addr(0))
            .server("client_header_timeout_seconds", 3)
            .server("client_body_timeout_seconds", 3),
    );
    let connect = || {
        let s = TcpStream::connect_timeout(&gw.addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let started = Instant::now();
    let mut silent_head = connect();
    silent_head
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .unwrap();
    let mut silent_body = connect();
    silent_body
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nonly ten b",
        )
        .unwrap();

    // A hundred clients sending a byte of their head every quarter second: the head
    // would take 50 s.
    let tricklers: Vec<TcpStream> = (0..100).map(|_| connect()).collect();
    let watchers: Vec<TcpStream> = tricklers.iter().map(|t| t.try_clone().unwrap()).collect();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let trickling = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut head = b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".to_vec();
            head.resize(200, b'a');
            let mut tricklers = tricklers;
            for at in 0..head.len() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                for t in &mut tricklers {
                    let _ = t.write_all(&head[at..at + 1]);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    // Everyone else is served as usual meanwhile.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get(gw.addr, "/echo", &[]).status, 200);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a request took {:?} with slow clients around",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Silent in the headers: the connection is closed, with no answer.
    let mut got = Vec::new();
    let _ = silent_head.read_to_end(&mut got);
    let cut_after = started.elapsed();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(15)).contains(&cut_after),
        "a silent head was cut after {cut_after:?}"
    );
    // Trickling the headers: closed at the head deadline, though bytes kept coming.
    let mut open: Vec<TcpStream> = watchers;
    while !open.is_empty() && started.elapsed() < Duration::from_secs(15) {
        open.retain_mut(|w| {
            w.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut byte = [0u8; 1];
            match w.read(&mut byte) {
                Ok(0) => false,
                Ok(_) => panic!("a trickling client got an answer"),
                Err(e) => matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        });
    }
    assert!(
        open.is_empty(),
        "{} trickling clients still connected after {:?}",
        open.len(),
        started.elapsed()
    );
    assert!(
        !trickling.is_finished(),
        "the tricklers ran out of head to send"
    );
    // Silent in the body: 408.
    let mut got = Vec::new();
    let _ = silent_body.read_to_end(&mut got);
    let resp = parse_exchange(&got);
    assert_eq!(resp.status, 408, "{}", String::from_utf8_lossy(&got));
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert!(started.elapsed() < Duration::from_secs(15));
    stop.store(true, Ordering::Relaxed);
    trickling.join().unwrap();
    assert_eq!(get(gw.addr, "/echo", &[]).status, 200);
}

/// A gateway behind a trusted proxy on loopback (so `X-Forwarded-For` names the
/// client) with a `pin` plugin that locks an address out after `max_failures` wrong
/// PINs; the caller adds the routes.
fn behind_a_proxy(upstream: SocketAddr, max_failures: usize) -> Config {
    Config::new()
        .with_admin()
        .set("trusted_proxies", json!(["127.0.0.1/32"]))
        .upstream("app", Upstream::to(upstream))
        .plugin(
            "pin",
            "pin_gate",
            json!({
                "pin_hash": pin_hash(),
                "secret": SECRET,
                "lockout": { "max_failures": max_failures, "window": "10m", "ban": "15m" },
            }),
        )
}

/// A login form is open to anyone, and each PIN check costs an argon2id hash (about
/// 19 MiB and tens of milliseconds). Two attacks on that, both answered here:
/// - forty guesses at once from one address, the right PIN among them: every attempt
///   is charged to the lockout before any PIN is checked, so no more than
///   `max_failures` are ever checked; forty wrong ones leave the address locked out
///   even for the right PIN (a right PIN among the checked ones is a login within
///   `max_failures` tries, which the lockout allows);
/// - two hundred logins at once from two hundred addresses (behind a trusted proxy, so
///   no lockout holds them back): the checks queue for a few workers, the rest are
///   refused with 503, and the gateway's resident memory stays bounded.
#[test]
fn a_login_burst_neither_beats_the_lockout_nor_takes_the_memory() {
    use std::sync::{Arc, Barrier};
    const MAX_FAILURES: usize = 5;
    let upstream = RecordingUpstream::start();
    let gw = Gateway::start(
        behind_a_proxy(upstream.addr, MAX_FAILURES).route(
            Route::new("app", "app", "user")
                .path_prefix("/")
                .plugins(&["pin"]),
        ),
    );
    let login = |pin: &str, client: &str| {
        req(
            "POST",
            "/.gatewarden/login",
            &[
                "Content-Type: application/x-www-form-urlencoded",
                &format!("X-Forwarded-For: {client}"),
            ],
            format!("pin={}&next=%2F", encode(pin)).as_bytes(),
        )
    };
    // All at once: each thread sends when every one is ready.
    let burst = |requests: Vec<Vec<u8>>| -> Vec<u16> {
        let start = Arc::new(Barrier::new(requests.len()));
        let addr = gw.addr;
        let threads: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    exchange(addr, &request).status
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };
    let count = |statuses: &[u16], status: u16| statuses.iter().filter(|s| **s == status).count();

    let guesses: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let pin = if i == 20 { PIN } else { "00000000" };
            login(pin, "198.51.100.7")
        })
        .collect();
    let statuses = burst(guesses);
    let checked = count(&statuses, 401) + count(&statuses, 303);
    assert!(
        statuses.iter().all(|s| [401, 429, 303].contains(s)),
        "{statuses:?}"
    );
    assert!(
        checked <= MAX_FAILURES,
        "{checked} PINs checked in a burst of 40 (max_failures {MAX_FAILURES}): {statuses:?}"
    );
    assert!(count(&statuses, 429) >= 40 - MAX_FAILURES, "{statuses:?}");
    // The right PIN may be one of the few checked. As the attempt that would have
    // started the ban it is no failure, lifts that ban and forgives the others: the
    // address is then not locked out (its owner got in within `max_failures` tries).
    // Otherwise the address is locked out, even for the right PIN.
    let after = exchange(gw.addr, &login(PIN, "198.51.100.7"));
    let right_pin_lifted_its_ban = count(&statuses, 303) == 1 && after.status == 303;
    if !right_pin_lifted_its_ban {
        assert_eq!(
            after.status, 429,
            "the right PIN after the burst: {statuses:?}"
        );
        assert!(after.header("retry-after").is_some());
    }
    // Forty wrong guesses at once from another address: locked out, whatever the order.
    let wrong: Vec<Vec<u8>> = (0..40).map(|_| login("00000000", "198.51.100.8")).collect();
    let statuses = burst(wrong);
    assert!(
        statuses.iter().all(|s| [401, 429].contains(s)) && count(&statuses, 401) < MAX_FAILURES,
        "{statuses:?}"
    );
    let after = exchange(gw.addr, &login(PIN, "198.51.100.8"));
    assert_eq!(
        after.status, 429,
        "the right PIN after the burst: {statuses:?}"
    );
    assert!(after.header("retry-after").is_some());

    let crowd: Vec<Vec<u8>> = (0..200)
        .map(|i| login("00000000", &format!("203.0.113.{i}")))
        .collect();
    let crowd_statuses = burst(crowd);
    assert!(
        crowd_statuses.iter().all(|s| [401, 429, 503].contains(s)),
        "{crowd_statuses:?}"
    );
    assert!(count(&crowd_statuses, 401) > 0, "{crowd_statuses:?}");
    let peak = peak_rss_bytes(gw.pid());
    eprintln!(
        "login burst: {} checked, {} busy; peak resident memory {} MiB",
        count(&crowd_statuses, 401),
        count(&crowd_statuses, 503),
        peak >> 20
    );
    assert!(
        peak < 150 << 20,
        "the gateway's peak resident memory reached {} MiB",
        peak >> 20
    );
    // Still serving: the health check and a fresh login from a new address.
    assert_eq!(get(gw.addr, "/healthz", &[]).status, 200);
    assert_eq!(exchange(gw.addr, &login(PIN, "192.0.2.200")).status, 303);
}

/// Clients over IPv6 and through dual-stack listeners meet the same rules as IPv4 ones:
/// an IPv4-mapped address (`::ffff:203.0.113.5`, how a dual-stack listener sees an
/// IPv4 client) is its IPv4 address for `ip_filter`, and the PIN lockout and rate
/// limits count an IPv6 client by its /64, so rotating addresses skips neither.
#[test]
fn mapped_and_rotating_ipv6_clients_meet_the_same_limits() {
    let upstream = RecordingUpstream::start();
    let gw = Gateway::start(
        behind_a_proxy(upstream.addr, 2)
            .plugin(
                "no_docs_net",
                "ip_filter",
                json!({ "deny": ["203.0.113.0/24"] }),
            )
            .plugin(
                "per_ip",
                "rate_limit",
                json!({ "key": "client_ip", "rate": "1/h", "burst": 2 }),
            )
            .route(
                Route::public("filtered", "app")
                    .path_prefix("/filtered")
                    .plugins(&["no_docs_net"]),
            )
            .route(
                Route::public("limited", "app")
                    .path_prefix("/limited")
                    .plugins(&["per_ip"]),
            )
            .route(
                Route::new("app", "app", "user")
                    .path_prefix("/")
                    .plugins(&["pin"]),
            ),
    );
    let from = |client: &str, method: &str, target: &str, body: &[u8]| {
        let mut headers = vec![format!("X-Forwarded-For: {client}")];
        if method == "POST" {
            headers.push("Content-Type: application/x-www-form-urlencoded".into());
        }
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        exchange(gw.addr, &req(method, target, &headers, body)).status
    };
    assert_eq!(from("198.51.100.1", "GET", "/filtered/x", b""), 200);
    assert_eq!(from("203.0.113.5", "GET", "/filtered/x", b""), 403);
    assert_eq!(from("::ffff:203.0.113.5", "GET", "/filtered/x", b""), 403);

    let wrong = b"pin=00000000&next=%2F";
    assert_eq!(
        from("2001:db8:1:2::a", "POST", "/.gatewarden/login", wrong),
        401
    );
    // The second failure of the /64 starts its ban.
    assert_eq!(
        from("2001:db8:1:2::b", "POST", "/.gatewarden/login", wrong),
        429
    );
    let right = format!("pin={PIN}&next=%2F");
    assert_eq!(
        from(
            "2001:db8:1:2:ffff::c",
            "POST",
            "/.gatewarden/login",
            right.as_bytes()
        ),
        429
    );
    // Another network is not held back.
    assert_eq!(
        from(
            "2001:db8:9:9::c",
            "POST",
            "/.gatewarden/login",
            right.as_bytes()
        ),
        303
    );

    for (i, expected) in [200, 200, 429].into_iter().enumerate() {
        let client = format!("2001:db8:5:6::{}", i + 1);
        assert_eq!(
            from(&client, "GET", "/limited/x", b""),
            expected,
            "{client}"
        );
    }
    assert_eq!(from("2001:db8:5:7::1", "GET", "/limited/x", b""), 200);
}

/// The same rules over TLS and HTTP/2, where the method and host come as `:method` and
/// `:authority` and cookies may come split over several headers.
#[test]
fn the_rules_hold_over_http2() {
    let upstream = RecordingUpstream::start();
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("keys.yaml");
    let user_key = key_new(&keys, &["--name", "u", "--subject", "alice"]);
    let (_certs, cert_file, key_file) = crate::upstreams::self_signed_files();
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .upstream("app", Upstream::to(upstream.addr))
            .plugin("keys", "api_key", json!({ "keys_file": keys }))
            .plugin(
                "pin",
                "pin_gate",
                json!({ "pin_hash": pin_hash(), "secret": SECRET }),
            )
            .route(
                Route::new("internal", "app", "admin")
                    .hosts(&["admin.internal"])
                    .path_prefix("/")
                    .plugins(&["pin", "keys"]),
            )
            .route(
                Route::new("items_write", "app", "admin")
                    .path_prefix("/items")
                    .methods(&["DELETE"])
                    .plugins(&["pin", "keys"]),
            )
            .route(Route::public("public", "app").path_prefix("/public"))
            .route(
                Route::new("app", "app", "user")
                    .path_prefix("/")
                    .plugins(&["pin", "keys"]),
            )
            .listen_tls(&cert_file, &key_file),
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve("admin.internal", gw.addr)
        .resolve("admin.internal.", gw.addr)
        .resolve("localhost", gw.addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let port = gw.addr.port();
    let session = mint(SECRET, "pin", "user", 300);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let send = |method: &str, url: String, headers: Vec<(&'static str, String)>| {
            let mut request =
                client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request.send()
        };
        let key = || ("x-api-key", user_key.clone());
        let at = |host: &str, path: &str| format!("https://{host}:{port}{path}");

        let resp = send("GET", at("localhost", "/app/x"), vec![key()])
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200, "baseline");
        for method in ["delete", "Delete"] {
            let resp = send(method, at("localhost", "/items/1"), vec![key()])
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, ":method {method}");
        }
        for host in ["admin.internal", "admin.internal."] {
            let resp = send("GET", at(host, "/app/x"), vec![key()]).await.unwrap();
            assert_eq!(resp.status(), 403, ":authority {host}");
        }
        let mut two = reqwest::header::HeaderMap::new();
        two.append("x-api-key", user_key.parse().unwrap());
        two.append("x-api-key", user_key.parse().unwrap());
        let resp = client
            .get(at("localhost", "/app/x"))
            .headers(two)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "X-API-Key twice");
        // The session cookie in a crumb of its own, as HTTP/2 clients may send it.
        let mut crumbs = reqwest::header::HeaderMap::new();
        crumbs.append("cookie", "theme=dark".parse().unwrap());
        crumbs.append("cookie", format!("gatewarden={session}").parse().unwrap());
        crumbs.append(
            "cookie",
            format!("__Host-gatewarden={session}").parse().unwrap(),
        );
        let resp = client
            .get(at("localhost", "/public/x"))
            .headers(crumbs)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    });
    let public = upstream
        .requests()
        .into_iter()
        .find(|r| r.target() == "/public/x")
        .expect("the public request upstream");
    let cookies: Vec<String> = public
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(cookies, ["theme=dark"], "{public:?}");
    assert!(
        !upstream
            .requests()
            .iter()
            .any(|r| r.target().starts_with("/items")),
        "a lower-case method reached the upstream"
    );
}
