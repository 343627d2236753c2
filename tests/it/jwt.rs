//! The `jwt` plugin in the real binary: tokens minted here, keys served by a JWKS server
//! on loopback whose key set can be swapped, upstreams that record what reached them.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::*;

pub(crate) const ISS: &str = "https://auth.test/application/o/gateway/";
pub(crate) const AUD: &str = "gateway";

pub(crate) fn key_data(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub(crate) fn rsa(n: u8) -> EncodingKey {
    EncodingKey::from_rsa_pem(&key_data(&format!("rsa{n}.key.pem"))).unwrap()
}

pub(crate) fn jwk(key: &EncodingKey, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    serde_json::to_value(jwk).unwrap()
}

pub(crate) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

pub(crate) fn claims(sub: &str) -> Value {
    json!({ "iss": ISS, "aud": AUD, "sub": sub, "exp": now() + 300, "iat": now() })
}

pub(crate) fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

pub(crate) fn token(kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    encode(&header, claims, key).unwrap()
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Header and payload as given, signed with HMAC-SHA256 under `secret`.
pub(crate) fn hs256(secret: &[u8], header: Value, claims: &Value) -> String {
    let unsigned = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        unsigned.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{unsigned}.{sig}")
}

/// A JWKS endpoint on loopback: serves the current document, counts fetches.
pub(crate) struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    pub(crate) fn start(keys: Vec<Value>) -> JwksServer {
        Self::on(TcpListener::bind("127.0.0.1:0").unwrap(), keys)
    }

    fn on(listener: TcpListener, keys: Vec<Value>) -> JwksServer {
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(json!({ "keys": keys }).to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, f, s) = (body.clone(), fetches.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                f.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer {
            addr,
            body,
            fetches,
            stop,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn set(&self, keys: Vec<Value>) {
        *self.body.lock().unwrap() = json!({ "keys": keys }).to_string();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Routes: `/echo/admin` needs admin, `/echo` and `/rec` a user. `/echo*` goes to the demo
/// upstream, `/rec` to a recording one. Every route stamps the identity into headers.
fn config(jwks_url: &str, demo: SocketAddr, recording: SocketAddr) -> Config {
    Config::new()
        .with_admin()
        .upstream("demo", Upstream::to(demo))
        .upstream("rec", Upstream::to(recording))
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
                "jwks_cooldown": "2s",
            }),
        )
        .plugin(
            "who",
            "headers",
            json!({
                "request": {
                    "set": {
                        "X-Webauth-User": "{identity.subject}",
                        "X-Webauth-Role": "{identity.role}",
                    }
                }
            }),
        )
        .route(
            Route::new("admin", "demo", "admin")
                .path_prefix("/echo/admin")
                .plugins(&["sso", "who"]),
        )
        .route(
            Route::new("app", "demo", "user")
                .path_prefix("/echo")
                .plugins(&["sso", "who"]),
        )
        .route(
            Route::new("rec", "rec", "user")
                .path_prefix("/rec")
                .plugins(&["sso", "who"]),
        )
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Values of header `name` in a demo upstream's `/echo` answer.
fn echoed(resp: &RawResponse, name: &str) -> Vec<String> {
    resp.json()["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("not an /echo answer: {resp:?}"))
        .iter()
        .filter(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

fn assert_invalid_token(resp: &RawResponse, what: &str) {
    assert_eq!(resp.status, 401, "{what}: {resp:?}");
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\""),
        "{what}"
    );
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(resp.json()["status"], 401, "{what}");
}

#[test]
fn jwt_callers_reach_the_upstream_as_their_subject_and_forged_tokens_never_do() {
    let jwks = JwksServer::start(vec![jwk(&rsa(1), "k1")]);
    let ups = Upstreams::start(1);
    let rec = RecordingUpstream::start();
    let gw = Gateway::start(config(&jwks.url(), ups.addr(0), rec.addr));

    let good = token("k1", &rsa(1), &claims("alice"));
    let resp = get(gw.addr, "/echo/hello", &[&bearer(&good)]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echoed(&resp, "x-webauth-user"), ["alice"]);
    assert_eq!(echoed(&resp, "x-webauth-role"), ["user"]);
    // A client cannot claim to be someone else through the identity header.
    let resp = get(
        gw.addr,
        "/echo/hello",
        &[&bearer(&good), "X-Webauth-User: root"],
    );
    assert_eq!(echoed(&resp, "x-webauth-user"), ["alice"]);
    // The recording route works for a good token (so the refusals below mean something).
    assert_eq!(get(gw.addr, "/rec/ok", &[&bearer(&good)]).status, 200);
    assert_eq!(rec.requests().len(), 1);

    let public_pem = key_data("rsa1.pub.pem");
    let forged_payload = {
        let parts: Vec<&str> = good.split('.').collect();
        let admin = with(claims("alice"), json!({ "groups": ["gw-admins"] }));
        format!(
            "{}.{}.{}",
            parts[0],
            b64(admin.to_string().as_bytes()),
            parts[2]
        )
    };
    let attacks: Vec<(&str, String)> = vec![
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
                &with(claims("alice"), json!({ "iss": "https://evil.test/" })),
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
        (
            "signed by another key under the right kid",
            token("k1", &rsa(2), &claims("alice")),
        ),
        ("payload swapped after signing", forged_payload),
    ];
    for (what, bad) in &attacks {
        assert_invalid_token(&get(gw.addr, "/rec/attack", &[&bearer(bad)]), what);
    }
    // No token at all: the core's 401.
    assert_eq!(get(gw.addr, "/rec/anonymous", &[]).status, 401);
    std::thread::sleep(Duration::from_millis(200));
    let reached: Vec<String> = rec
        .requests()
        .iter()
        .map(|r| r.target().to_string())
        .collect();
    assert_eq!(
        reached,
        ["/rec/ok"],
        "refused requests reached the upstream"
    );

    let metrics = get(gw.admin, "/metrics", &[]);
    let text = String::from_utf8_lossy(&metrics.body);
    let invalid = text
        .lines()
        .find(|l| {
            l.starts_with("gatewarden_auth_failures_total")
                && l.contains("route=\"rec\"")
                && l.contains("reason=\"invalid_jwt\"")
        })
        .unwrap_or_else(|| panic!("no invalid_jwt failures counted:\n{text}"));
    assert!(
        invalid.ends_with(&format!(" {}", attacks.len())),
        "{invalid}"
    );
}

#[test]
fn admin_routes_need_an_admin_value_in_the_role_claim() {
    let jwks = JwksServer::start(vec![jwk(&rsa(1), "k1")]);
    let ups = Upstreams::start(1);
    let rec = RecordingUpstream::start();
    let gw = Gateway::start(config(&jwks.url(), ups.addr(0), rec.addr));
    let as_groups = |groups: Value| {
        token(
            "k1",
            &rsa(1),
            &with(claims("bob"), json!({ "groups": groups })),
        )
    };

    let admin = as_groups(json!(["staff", "gw-admins"]));
    let resp = get(gw.addr, "/echo/admin/x", &[&bearer(&admin)]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(echoed(&resp, "x-webauth-role"), ["admin"]);
    // A single string works too.
    let resp = get(
        gw.addr,
        "/echo/admin/x",
        &[&bearer(&as_groups(json!("gw-admins")))],
    );
    assert_eq!(resp.status, 200, "{resp:?}");

    let staff = as_groups(json!(["staff"]));
    let resp = get(gw.addr, "/echo/admin/x", &[&bearer(&staff)]);
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.json()["status"], 403);
    // The same caller is fine where a user suffices.
    assert_eq!(get(gw.addr, "/echo/x", &[&bearer(&staff)]).status, 200);
    // No groups claim at all: a user.
    let plain = token("k1", &rsa(1), &claims("carol"));
    assert_eq!(
        get(gw.addr, "/echo/admin/x", &[&bearer(&plain)]).status,
        403
    );
}

#[test]
fn a_rotated_in_key_is_accepted_after_one_rate_limited_refresh() {
    let jwks = JwksServer::start(vec![jwk(&rsa(1), "k1")]);
    let ups = Upstreams::start(1);
    let rec = RecordingUpstream::start();
    let gw = Gateway::start(config(&jwks.url(), ups.addr(0), rec.addr));
    let old = token("k1", &rsa(1), &claims("alice"));
    let new = token("k2", &rsa(2), &claims("alice"));
    assert_eq!(get(gw.addr, "/echo/x", &[&bearer(&old)]).status, 200);
    let at_start = jwks.fetches();
    assert!(
        at_start >= 1,
        "the gateway fetched the JWKS when it started"
    );

    // A kid nobody published yet: one refresh, awaited, and still refused.
    let asked = Instant::now();
    assert_invalid_token(&get(gw.addr, "/echo/x", &[&bearer(&new)]), "unknown kid");
    assert_eq!(jwks.fetches(), at_start + 1);

    // The provider rotates k2 in. Within the 2 s cooldown no fetch happens, whatever
    // the clients send.
    jwks.set(vec![jwk(&rsa(1), "k1"), jwk(&rsa(2), "k2")]);
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/echo/x", &[&bearer(&new)]).status, 401);
    }
    assert_eq!(jwks.fetches(), at_start + 1, "refreshes are rate-limited");

    // After the cooldown the next k2 token asks again and is accepted.
    poll_until("a k2 token accepted", Duration::from_secs(10), || {
        get(gw.addr, "/echo/x", &[&bearer(&new)]).status == 200
    });
    let after = asked.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "accepted within the cooldown: {after:?}"
    );
    let resp = get(gw.addr, "/echo/x", &[&bearer(&new)]);
    assert_eq!(echoed(&resp, "x-webauth-user"), ["alice"]);
    // k1 tokens still work, and the polling cost a handful of fetches, not one each.
    assert_eq!(get(gw.addr, "/echo/x", &[&bearer(&old)]).status, 200);
    assert!(
        jwks.fetches() <= at_start + 3,
        "{} fetches",
        jwks.fetches() - at_start
    );
}

#[test]
fn a_provider_that_is_down_at_start_does_not_stop_the_gateway() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/jwks");
    let ups = Upstreams::start(1);
    let rec = RecordingUpstream::start();
    let gw = Gateway::start(config(&url, ups.addr(0), rec.addr));
    let good = token("k1", &rsa(1), &claims("alice"));

    let resp = get(gw.addr, "/echo/x", &[&bearer(&good)]);
    assert_invalid_token(&resp, "no keys yet");
    assert_eq!(resp.json()["error"], "no signing keys yet");

    let _jwks = JwksServer::on(
        TcpListener::bind(("127.0.0.1", port)).expect("the reserved port is free"),
        vec![jwk(&rsa(1), "k1")],
    );
    poll_until(
        "keys fetched once the provider is up",
        Duration::from_secs(15),
        || get(gw.addr, "/echo/x", &[&bearer(&good)]).status == 200,
    );
}

#[test]
fn check_does_not_hang_on_a_jwks_url_that_never_answers() {
    // Accepts connections (the kernel does) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks", silent.local_addr().unwrap());
    let ups = Upstreams::start(1);
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&url, ups.addr(0), ups.addr(0))
        .listen("127.0.0.1:1".parse().unwrap())
        .admin_at("127.0.0.1:2".parse().unwrap())
        .to_yaml();
    let path = dir.path().join("jwt.yaml");
    std::fs::write(&path, yaml).unwrap();
    let start = Instant::now();
    let out = run_cli(&["check", "-c", path.to_str().unwrap()], dir.path());
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(took < Duration::from_secs(10), "check took {took:?}");
    drop(silent);
}
