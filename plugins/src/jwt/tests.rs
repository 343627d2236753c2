use super::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::RequestId;
use crate::{Ctx, Identity, RequestHeader, Role, Verdict};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::AtomicUsize;

/// The algorithms of each key held, by `kid`.
fn describe(p: &Jwt) -> HashMap<String, Vec<Algorithm>> {
    let Keys::Live(r) = &p.keys else {
        panic!("not a live key set")
    };
    r.store
        .keys
        .load()
        .keys
        .iter()
        .map(|k| {
            (
                k.kid.clone().unwrap_or_default(),
                k.validation.algorithms.clone(),
            )
        })
        .collect()
}

const ISS: &str = "https://idp.test/";
const AUD: &str = "gateway";
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(data(name)).unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims() -> Value {
    json!({ "iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300, "iat": now() })
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, key).unwrap()
}

fn rsa1() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read("rsa1.key.pem")).unwrap()
}

fn rsa2() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read("rsa2.key.pem")).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A hand-made token: any header, any payload, any signature bytes.
fn forge(header: Value, payload: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        b64(signature)
    )
}

fn hmac(alg: Algorithm, secret: &[u8], header: Value, payload: &Value) -> String {
    let unsigned = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let sig =
        jsonwebtoken::crypto::sign(unsigned.as_bytes(), &EncodingKey::from_secret(secret), alg)
            .unwrap();
    format!("{unsigned}.{sig}")
}

fn config(yaml: &str) -> JwtConfig {
    serde_yaml_ng::from_str(yaml).unwrap()
}

/// Reads and builds; settings refused when read (an unknown algorithm) or when built
/// (a key that does not fit) are both errors.
fn build(yaml: &str) -> Result<Jwt, String> {
    let env = BuildEnv {
        base_dir: data(""),
        ..BuildEnv::default()
    };
    let config: JwtConfig = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
    Jwt::new(config, &env)
}

fn rsa_plugin(extra: &str) -> Jwt {
    build(&format!(
        "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: rsa1.pub.pem, algorithms: [RS256, PS256] {extra} }}"
    ))
    .unwrap()
}

fn ctx() -> Ctx {
    Ctx::new(
        "127.0.0.1".parse().unwrap(),
        RequestId::from_random(1),
        false,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Runs the request hook with `Authorization: <auth>`; Ok(identity) or Err((status, error)).
fn run_auth(p: &Jwt, auth: &str) -> (Result<Option<Identity>, (u16, String)>, Ctx, RequestHeader) {
    let mut req = RequestHeader::build("GET", b"/", None).unwrap();
    req.append_header("Authorization", auth).unwrap();
    let mut c = ctx();
    let verdict = runtime().block_on(p.on_request(&mut req, &mut c).resolve());
    let out = match verdict {
        Verdict::Continue => Ok(c.identity.clone()),
        Verdict::Reply(r) => {
            assert_eq!(
                r.headers
                    .iter()
                    .find(|(n, _)| n == http::header::WWW_AUTHENTICATE)
                    .map(|(_, v)| v.to_str().unwrap()),
                Some("Bearer error=\"invalid_token\"")
            );
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            Err((r.status, body["error"].as_str().unwrap().to_string()))
        }
    };
    (out, c, req)
}

fn run(p: &Jwt, token: &str) -> Result<Option<Identity>, (u16, String)> {
    run_auth(p, &format!("Bearer {token}")).0
}

fn refused(p: &Jwt, token: &str) -> String {
    let (out, c, _) = run_auth(p, &format!("Bearer {token}"));
    let (status, reason) = out.expect_err("token must be refused");
    assert_eq!(status, 401);
    assert!(c.identity.is_none());
    assert!(c.auth_failure.is_some());
    reason
}

#[test]
fn good_tokens_identify_the_subject() {
    let p = rsa_plugin("");
    let id = run(&p, &sign(Algorithm::RS256, None, &rsa1(), &claims()))
        .unwrap()
        .unwrap();
    assert_eq!(
        (&*id.subject, id.role, id.method),
        ("alice", Role::User, "jwt")
    );
    // PS256 with the same RSA key, a `kid` the configured key ignores, `aud` as a list.
    let listed = with(claims(), json!({ "aud": ["other", AUD] }));
    let id = run(&p, &sign(Algorithm::PS256, Some("x"), &rsa1(), &listed))
        .unwrap()
        .unwrap();
    assert_eq!(&*id.subject, "alice");
}

#[test]
fn other_bearers_and_schemes_are_left_alone() {
    let p = rsa_plugin("");
    for auth in [
        "Bearer gw_abc.def.ghi",
        "Bearer opaque-token",
        "Basic dXNlcjpwYXNz",
    ] {
        let (out, c, _) = run_auth(&p, auth);
        assert_eq!(out.unwrap(), None, "{auth}");
        assert!(c.auth_failure.is_none());
    }
}

#[test]
fn alg_none_is_refused_in_every_spelling() {
    let p = rsa_plugin("");
    for alg in ["none", "None", "NONE", "nOnE"] {
        let t = forge(json!({ "alg": alg, "typ": "JWT" }), &claims(), b"");
        assert_eq!(refused(&p, &t), Refusal::Malformed.reason(), "{alg}");
        // A none token with a signature borrowed from a real one.
        let real = sign(Algorithm::RS256, None, &rsa1(), &claims());
        let sig = real.rsplit('.').next().unwrap();
        refused(&p, &format!("{}{sig}", t));
    }
    // A none token never even reaches an HS plugin's key.
    let hs = build(&format!(
        "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{SECRET}', algorithms: [HS256] }}"
    ))
    .unwrap();
    refused(&hs, &forge(json!({ "alg": "none" }), &claims(), b""));
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic confusion: the attacker knows the public key and uses its PEM
    // bytes as an HMAC secret.
    let pem = read("rsa1.pub.pem");
    let token = hmac(
        Algorithm::HS256,
        &pem,
        json!({ "alg": "HS256", "typ": "JWT" }),
        &claims(),
    );
    assert_eq!(
        refused(&rsa_plugin(""), &token),
        Refusal::AlgorithmNotAllowed.reason()
    );
    // Even a config that lists HS256 next to a public key cannot be built.
    let err = build(&format!(
        "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: rsa1.pub.pem, algorithms: [RS256, HS256] }}"
    ))
    .err()
    .unwrap();
    assert!(err.contains("HS256") && err.contains("RSA"), "{err}");
    // The key itself never verifies HMAC, whatever the Validation says.
    let key = DecodingKey::from_rsa_pem(&pem).unwrap();
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[AUD]);
    assert!(jsonwebtoken::decode::<Value>(&token, &key, &v).is_err());
}

#[test]
fn algorithms_outside_the_list_or_the_key_type_are_refused() {
    let p = rsa_plugin("");
    // RS512 is an RSA algorithm but not listed.
    assert_eq!(
        refused(&p, &sign(Algorithm::RS512, None, &rsa1(), &claims())),
        Refusal::AlgorithmNotAllowed.reason()
    );
    // Listed but signed by another RSA key.
    assert_eq!(
        refused(&p, &sign(Algorithm::RS256, None, &rsa2(), &claims())),
        Refusal::Signature.reason()
    );
    // An EC token against the RSA key.
    let ec = EncodingKey::from_ec_pem(&read("ec256.key.pem")).unwrap();
    assert_eq!(
        refused(&p, &sign(Algorithm::ES256, None, &ec, &claims())),
        Refusal::AlgorithmNotAllowed.reason()
    );
    // A critical header we do not understand.
    let mut h = Header::new(Algorithm::RS256);
    h.crit = Some(vec!["exp".into()]);
    let t = encode(&h, &claims(), &rsa1()).unwrap();
    assert_eq!(refused(&p, &t), Refusal::CriticalHeader.reason());
}

#[test]
fn tampered_tokens_are_refused() {
    let p = rsa_plugin("");
    let t = sign(Algorithm::RS256, None, &rsa1(), &claims());
    let parts: Vec<&str> = t.split('.').collect();
    let admin = b64(with(claims(), json!({ "sub": "root" }))
        .to_string()
        .as_bytes());
    assert_eq!(
        refused(&p, &format!("{}.{admin}.{}", parts[0], parts[2])),
        Refusal::Signature.reason()
    );
    refused(&p, &format!("{}.{}.", parts[0], parts[1]));
    refused(&p, "a.b.c");
    refused(
        &p,
        &format!("{}.{}.{}", parts[0], parts[1], "A".repeat(MAX_TOKEN_LEN)),
    );
}

#[test]
fn embedded_keys_in_the_header_are_ignored() {
    // The attacker signs with their own key and ships its public half in `jwk`.
    let attacker = rsa2();
    let jwk = Jwk::from_encoding_key(&attacker, Algorithm::RS256).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.jwk = Some(jwk);
    h.jku = Some("https://evil.example/jwks".into());
    let t = encode(&h, &claims(), &attacker).unwrap();
    assert_eq!(refused(&rsa_plugin(""), &t), Refusal::Signature.reason());
}

#[test]
fn issuer_audience_and_time_are_checked() {
    let p = rsa_plugin("");
    let t = |c: Value| sign(Algorithm::RS256, None, &rsa1(), &c);
    let cases = [
        (json!({ "iss": "https://evil.test/" }), Refusal::Issuer),
        (
            json!({ "iss": [ISS, "https://evil.test/"] }),
            Refusal::Issuer,
        ),
        (json!({ "iss": null }), Refusal::MissingClaim),
        (json!({ "aud": "other" }), Refusal::Audience),
        (json!({ "aud": ["a", "b"] }), Refusal::Audience),
        (json!({ "aud": null }), Refusal::MissingClaim),
        (json!({ "exp": null }), Refusal::MissingClaim),
        (json!({ "exp": now() - 60 }), Refusal::Expired),
        (json!({ "exp": "9999999999" }), Refusal::MissingClaim),
        (json!({ "nbf": now() + 60 }), Refusal::NotYetValid),
        (json!({ "sub": null }), Refusal::Subject),
        (json!({ "sub": 42 }), Refusal::Subject),
        (json!({ "sub": "" }), Refusal::Subject),
        (json!({ "sub": "a\r\nX-Injected: 1" }), Refusal::Subject),
    ];
    for (change, want) in cases {
        assert_eq!(
            refused(&p, &t(with(claims(), change.clone()))),
            want.reason(),
            "{change}"
        );
    }
    // Within the leeway both ways.
    let skewed = with(claims(), json!({ "exp": now() - 20, "nbf": now() + 20 }));
    assert!(run(&p, &t(skewed)).is_ok());
    // A zero leeway is exact.
    let strict = rsa_plugin(", leeway: 0s");
    refused(&strict, &t(with(claims(), json!({ "exp": now() - 2 }))));
}

#[test]
fn subject_and_admin_come_from_configured_claims() {
    let p = rsa_plugin(
        ", subject_claim: email, role_claim: realm_access.roles, admin_values: [gw-admin, root]",
    );
    let t = |c: Value| sign(Algorithm::RS256, None, &rsa1(), &with(claims(), c));
    let id = run(
        &p,
        &t(json!({ "email": "a@b.c", "realm_access": { "roles": ["x", "gw-admin"] } })),
    )
    .unwrap()
    .unwrap();
    assert_eq!((&*id.subject, id.role), ("a@b.c", Role::Admin));
    let id = run(
        &p,
        &t(json!({ "email": "u@b.c", "realm_access": { "roles": ["x"] } })),
    )
    .unwrap()
    .unwrap();
    assert_eq!(id.role, Role::User);
    // Without the subject claim: refused, even though `sub` is there.
    refused(&p, &t(json!({})));
    // A string role claim, and a literal claim name with dots.
    let p = rsa_plugin(", role_claim: 'https://x.test/role', admin_values: [admin]");
    let id = run(&p, &t(json!({ "https://x.test/role": "admin" })))
        .unwrap()
        .unwrap();
    assert_eq!(id.role, Role::Admin);
    let id = run(&p, &t(json!({ "https://x.test/role": ["user"] })))
        .unwrap()
        .unwrap();
    assert_eq!(id.role, Role::User);
}

#[test]
fn identity_is_kept_and_the_header_stripped_on_request() {
    let p = rsa_plugin(", strip: true");
    let token = sign(Algorithm::RS256, None, &rsa1(), &claims());
    let (out, _, req) = run_auth(&p, &format!("Bearer {token}"));
    assert!(out.unwrap().is_some());
    assert!(req.headers.get("authorization").is_none());
    let (_, _, req) = run_auth(&rsa_plugin(""), &format!("Bearer {token}"));
    assert!(req.headers.get("authorization").is_some());
}

#[test]
fn every_key_type_verifies_its_own_algorithms() {
    let cases: [(&str, &str, &str, Algorithm); 4] = [
        ("ec256.pub.pem", "ec256.key.pem", "ES256", Algorithm::ES256),
        ("ec384.pub.pem", "ec384.key.pem", "ES384", Algorithm::ES384),
        (
            "ed25519.pub.pem",
            "ed25519.key.pem",
            "EdDSA",
            Algorithm::EdDSA,
        ),
        (
            "rsa1.pkcs1.pub.pem",
            "rsa1.key.pem",
            "RS384",
            Algorithm::RS384,
        ),
    ];
    for (public, private, name, alg) in cases {
        let p = build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: {public}, algorithms: [{name}] }}"
        ))
        .unwrap();
        let pem = read(private);
        let key = match alg.family() {
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        assert!(
            run(&p, &sign(alg, None, &key, &claims()))
                .unwrap()
                .is_some(),
            "{name}"
        );
    }
    let hs = build(&format!(
        "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{SECRET}', algorithms: [HS256, HS512] }}"
    ))
    .unwrap();
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    assert!(run(&hs, &sign(Algorithm::HS512, None, &key, &claims())).is_ok());
    let wrong = EncodingKey::from_secret(b"another-secret-that-is-long-enough!!");
    refused(&hs, &sign(Algorithm::HS256, None, &wrong, &claims()));
    // HS384 is not listed.
    refused(&hs, &sign(Algorithm::HS384, None, &key, &claims()));
}

#[test]
fn settings_that_do_not_fit_are_config_errors() {
    let base = format!("issuer: '{ISS}', audiences: [{AUD}]");
    let err = |rest: &str| {
        build(&format!("{{ {base}, {rest} }}"))
            .err()
            .unwrap_or_else(|| panic!("{rest} must not build"))
    };
    assert!(err(&format!("hs_secret: '{SECRET}', algorithms: [RS256]")).contains("RS256"));
    assert!(err("hs_secret: short, algorithms: [HS256]").contains("32"));
    assert!(err("public_key_file: ec256.pub.pem, algorithms: [ES384]").contains("P-256"));
    assert!(err("public_key_file: ec256.pub.pem, algorithms: [RS256]").contains("ES256"));
    assert!(err("public_key_file: ed25519.pub.pem, algorithms: [ES256]").contains("Ed25519"));
    assert!(err("public_key_file: rsa1.key.pem, algorithms: [RS256]").contains("private key"));
    assert!(err("public_key_file: nope.pem, algorithms: [RS256]").contains("nope.pem"));
    assert!(err("public_key_file: README.md, algorithms: [RS256]").contains("PEM"));
    assert!(err("jwks_url: 'https://idp.test/jwks', algorithms: [HS256]").contains("hs_secret"));
    assert!(err("jwks_url: 'http://idp.test/jwks', algorithms: [RS256]").contains("https"));
    assert!(err("jwks_url: 'ftp://idp.test/jwks', algorithms: [RS256]").contains("https"));
    assert!(err(&format!(
        "hs_secret: '{SECRET}', public_key_file: rsa1.pub.pem, algorithms: [RS256]"
    ))
    .contains("exactly one"));
    assert!(err("algorithms: [RS256]").contains("exactly one"));
    assert!(err("public_key_file: rsa1.pub.pem, algorithms: []").contains("at least one"));
    assert!(err("public_key_file: rsa1.pub.pem, algorithms: [none]").contains("none"));
    assert!(err("public_key_file: rsa1.pub.pem, algorithms: [RS1024]").contains("RS1024"));
    assert!(
        err("public_key_file: rsa1.pub.pem, algorithms: [RS256], leeway: 1h").contains("leeway")
    );
    assert!(
        err("public_key_file: rsa1.pub.pem, algorithms: [RS256], role_claim: groups")
            .contains("admin_values")
    );
    assert!(
        err("public_key_file: rsa1.pub.pem, algorithms: [RS256], admin_values: [a]")
            .contains("role_claim")
    );
    let no_aud = build(&format!(
        "{{ issuer: '{ISS}', audiences: [], hs_secret: '{SECRET}', algorithms: [HS256] }}"
    ));
    assert!(no_aud.err().unwrap().contains("audiences"));
    // Unknown fields and a missing issuer are caught by serde.
    assert!(serde_yaml_ng::from_str::<JwtConfig>(&format!(
        "{{ {base}, hs_secret: '{SECRET}', algorithms: [HS256], isuer: x }}"
    ))
    .is_err());
    assert!(serde_yaml_ng::from_str::<JwtConfig>(&format!(
        "{{ audiences: [a], hs_secret: '{SECRET}', algorithms: [HS256] }}"
    ))
    .is_err());
}

#[test]
fn the_secret_never_appears_in_errors() {
    let secret = "a-secret-of-unusual-shape-1234567890";
    let errors = [
        build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{secret}', algorithms: [RS256] }}"
        ))
        .err()
        .unwrap(),
        build(&format!(
            "{{ issuer: '{ISS}', audiences: [{AUD}], hs_secret: '{}', algorithms: [HS256] }}",
            &secret[..10]
        ))
        .err()
        .unwrap(),
        serde_yaml_ng::from_str::<JwtConfig>(&format!(
            "{{ issuer: x, audiences: [a], hs_secret: [{secret}], algorithms: [HS256] }}"
        ))
        .err()
        .unwrap()
        .to_string(),
    ];
    for e in errors {
        assert!(!e.contains(&secret[..10]), "{e}");
    }
    let cfg = config(&format!(
        "{{ issuer: x, audiences: [a], hs_secret: {secret}, algorithms: [HS256] }}"
    ));
    assert!(!format!("{:?}", cfg.hs_secret).contains(&secret[..10]));
}

/// A JWKS server on loopback whose document can be swapped, counting fetches.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    fn start(body: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let body = Arc::new(Mutex::new(body.to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (b, f) = (body.clone(), fetches.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
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
        JwksServer { url, body, fetches }
    }

    fn set(&self, body: Value) {
        *self.body.lock().unwrap() = body.to_string();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    serde_json::to_value(jwk).unwrap()
}

/// A JWKS plugin, started as a config about to serve starts it.
fn jwks_plugin(url: &str, extra: &str) -> Jwt {
    let p = built_jwks_plugin(url, extra);
    p.start().unwrap();
    p
}

fn built_jwks_plugin(url: &str, extra: &str) -> Jwt {
    build(&format!(
        "{{ issuer: '{ISS}', audiences: [{AUD}], jwks_url: '{url}', algorithms: [RS256, ES256, EdDSA], jwks_cooldown: 1s {extra} }}"
    ))
    .unwrap()
}

#[test]
fn building_fetches_nothing_starting_fetches_once() {
    let server = JwksServer::start(json!({ "keys": [jwk(&rsa1(), Algorithm::RS256, "k1")] }));
    let p = built_jwks_plugin(&server.url, ", jwks_refresh: 1h");
    assert_eq!(server.fetches(), 0, "a build touched the network");
    p.start().unwrap();
    p.start().unwrap();
    assert_eq!(server.fetches(), 1);
    let token = sign(Algorithm::RS256, Some("k1"), &rsa1(), &claims());
    assert!(run(&p, &token).is_ok());
}

#[test]
fn jwks_keys_are_chosen_by_kid_and_type() {
    let ec = EncodingKey::from_ec_pem(&read("ec256.key.pem")).unwrap();
    let ed_public = DecodingKey::from_ed_pem(&read("ed25519.pub.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&read("ed25519.key.pem")).unwrap();
    let server = JwksServer::start(json!({ "keys": [
        jwk(&rsa1(), Algorithm::RS256, "r1"),
        jwk(&ec, Algorithm::ES256, "e1"),
        { "kty": "OKP", "crv": "Ed25519", "x": b64(ed_public.as_bytes()), "kid": "d1" },
        // Never used: a symmetric key, an encryption key, an unknown type.
        { "kty": "oct", "k": b64(SECRET.as_bytes()), "kid": "s1" },
        with(jwk(&rsa2(), Algorithm::RS256, "enc"), json!({ "use": "enc" })),
        { "kty": "XYZ", "kid": "odd" },
    ]}));
    let p = jwks_plugin(&server.url, "");
    let kinds = describe(&p);
    assert_eq!(kinds.len(), 3, "{:?}", kinds.keys());
    assert_eq!(kinds["r1"], vec![Algorithm::RS256]);
    assert_eq!(kinds["e1"], vec![Algorithm::ES256]);
    assert_eq!(kinds["d1"], vec![Algorithm::EdDSA]);

    assert!(run(&p, &sign(Algorithm::RS256, Some("r1"), &rsa1(), &claims())).is_ok());
    assert!(run(&p, &sign(Algorithm::ES256, Some("e1"), &ec, &claims())).is_ok());
    assert!(run(&p, &sign(Algorithm::EdDSA, Some("d1"), &ed, &claims())).is_ok());
    // Without a kid, every fitting key is tried.
    assert!(run(&p, &sign(Algorithm::ES256, None, &ec, &claims())).is_ok());
    // An ES256 token naming the RSA key's kid.
    assert_eq!(
        refused(&p, &sign(Algorithm::ES256, Some("r1"), &ec, &claims())),
        Refusal::KeyMismatch.reason()
    );
    // HMAC with the published symmetric key, or with the RSA JWK: not allowed.
    let hs = hmac(
        Algorithm::HS256,
        SECRET.as_bytes(),
        json!({ "alg": "HS256", "kid": "s1" }),
        &claims(),
    );
    assert_eq!(refused(&p, &hs), Refusal::AlgorithmNotAllowed.reason());
    // The encryption key is not a signing key.
    let enc = sign(Algorithm::RS256, Some("enc"), &rsa2(), &claims());
    assert_eq!(refused(&p, &enc), Refusal::UnknownKey.reason());
}

#[test]
fn an_unknown_kid_refreshes_once_per_cooldown() {
    let server = JwksServer::start(json!({ "keys": [jwk(&rsa1(), Algorithm::RS256, "k1")] }));
    let p = jwks_plugin(&server.url, ", jwks_refresh: 1h");
    assert_eq!(server.fetches(), 1, "fetched when started");
    let old = sign(Algorithm::RS256, Some("k1"), &rsa1(), &claims());
    let new = sign(Algorithm::RS256, Some("k2"), &rsa2(), &claims());
    assert!(run(&p, &old).is_ok());

    // A made-up kid costs one fetch, then the cooldown holds.
    assert_eq!(refused(&p, &new), Refusal::UnknownKey.reason());
    assert_eq!(server.fetches(), 2);
    // The provider rotates in k2, but within the cooldown nothing is fetched.
    server.set(json!({ "keys": [jwk(&rsa2(), Algorithm::RS256, "k2")] }));
    for _ in 0..5 {
        refused(&p, &new);
    }
    assert_eq!(server.fetches(), 2);
    // After the cooldown, the first k2 token waits for the refresh and passes.
    std::thread::sleep(Duration::from_millis(1100));
    let id = run(&p, &new).unwrap().unwrap();
    assert_eq!(&*id.subject, "alice");
    assert_eq!(server.fetches(), 3);
    // k1 was rotated out.
    assert_eq!(refused(&p, &old), Refusal::UnknownKey.reason());
}

#[test]
fn a_provider_down_at_start_is_not_fatal_and_retried() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/jwks");
    let p = jwks_plugin(&url, "");
    let token = sign(Algorithm::RS256, Some("k1"), &rsa1(), &claims());
    let (out, c, _) = run_auth(&p, &format!("Bearer {token}"));
    assert_eq!(out.unwrap_err().1, Refusal::NoKeys.reason());
    assert_eq!(c.auth_failure, Some("jwt_keys_unavailable"));

    // The provider comes up on that port; the refresher's retry finds it.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let body = json!({ "keys": [jwk(&rsa1(), Algorithm::RS256, "k1")] }).to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let start = Instant::now();
    while run(&p, &token).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "keys never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_changed_key_file_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.pem");
    std::fs::write(&path, read("rsa1.pub.pem")).unwrap();
    let p = build(&format!(
        "{{ issuer: '{ISS}', audiences: [{AUD}], public_key_file: '{}', algorithms: [RS256] }}",
        path.display()
    ))
    .unwrap();
    let t1 = sign(Algorithm::RS256, None, &rsa1(), &claims());
    let t2 = sign(Algorithm::RS256, None, &rsa2(), &claims());
    assert!(run(&p, &t1).is_ok());
    std::fs::write(&path, read("rsa2.pub.pem")).unwrap();
    let start = Instant::now();
    while run(&p, &t2).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "key file not reread"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    refused(&p, &t1);
    // A broken file keeps the key in force.
    std::fs::write(&path, "garbage").unwrap();
    std::thread::sleep(FILE_POLL * 2);
    assert!(run(&p, &t2).is_ok());
}
