use super::*;
use crate::jwt::Jwt;
use hmac::Mac;
use serde_json::Value;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn state(expires: u64) -> LoginState {
    LoginState {
        s: "st".into(),
        n: "no".into(),
        v: "ve".into(),
        r: "/chat".into(),
        u: "https://gw.test/.gatewarden/oidc/callback".into(),
        e: expires,
    }
}

#[test]
fn pkce_matches_rfc_7636_appendix_b() {
    assert_eq!(
        pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
    let v = random_token();
    assert_eq!(v.len(), 43);
    assert!(v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_ne!(v, random_token());
}

#[test]
fn login_state_round_trips_and_resists_tampering() {
    let key = state_mac(SECRET).unwrap();
    let now = 1_000;
    let sealed = seal(&key, &state(now + 600));
    assert_eq!(open(&key, &sealed, now).unwrap(), state(now + 600));
    // Expired.
    assert_eq!(open(&key, &sealed, now + 600), Err("expired"));
    // Another secret.
    let other = state_mac("another-secret-that-is-long-enough!!").unwrap();
    assert_eq!(open(&other, &sealed, now), Err("bad signature"));
    // A changed payload under the old signature: a state of the attacker's choosing.
    let (_, tag) = sealed.split_once('.').unwrap();
    let mut forged = state(now + 600);
    forged.v = "attacker".into();
    let payload = b64(&serde_json::to_vec(&forged).unwrap());
    assert_eq!(
        open(&key, &format!("{payload}.{tag}"), now),
        Err("bad signature")
    );
    // Truncated, empty, no signature.
    assert!(open(&key, &sealed[..sealed.len() - 2], now).is_err());
    assert!(open(&key, "", now).is_err());
    assert!(open(&key, sealed.split('.').next().unwrap(), now).is_err());
    // Signed with the secret itself (as a session is): refused, the keys differ.
    let raw = <HmacSha256 as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    assert_eq!(
        open(&key, &seal(&raw, &state(now + 600)), now),
        Err("bad signature")
    );
}

#[test]
fn the_authorization_url_carries_every_parameter() {
    let s = state(1);
    let url = authorization_url(
        "https://idp.test/authorize",
        "gate way",
        &s.u,
        "openid email",
        &s,
    );
    assert!(
        url.starts_with("https://idp.test/authorize?response_type=code&"),
        "{url}"
    );
    for part in [
        "client_id=gate%20way",
        "redirect_uri=https%3A//gw.test/.gatewarden/oidc/callback",
        "scope=openid%20email",
        "state=st",
        "nonce=no",
        &format!("code_challenge={}", pkce_challenge("ve")),
        "code_challenge_method=S256",
    ] {
        assert!(url.contains(part), "{part} missing in {url}");
    }
    // An endpoint that already has a query keeps it.
    let url = authorization_url("https://idp.test/auth?tenant=1", "c", &s.u, "openid", &s);
    assert!(url.starts_with("https://idp.test/auth?tenant=1&response_type=code"));
}

#[test]
fn redirect_uris_come_from_the_request_or_the_setting() {
    let mut req = RequestHeader::build("GET", b"/.gatewarden/login", None).unwrap();
    req.insert_header("Host", "gw.test:8443").unwrap();
    assert_eq!(
        origin_url(&req, true, CALLBACK_PATH).unwrap(),
        "https://gw.test:8443/.gatewarden/oidc/callback"
    );
    assert_eq!(
        origin_url(&req, false, "/").unwrap(),
        "http://gw.test:8443/"
    );
    for bad in ["evil.test/x", "user@evil.test", "a b"] {
        req.insert_header("Host", bad).unwrap();
        assert!(origin_url(&req, true, CALLBACK_PATH).is_none(), "{bad}");
    }
    let p = plugin(", redirect_url: 'https://public.test/.gatewarden/oidc/callback'");
    assert_eq!(
        p.redirect_uri(&req, false).unwrap(),
        "https://public.test/.gatewarden/oidc/callback"
    );
}

fn config(extra: &str) -> Result<Oidc, String> {
    let yaml = format!(
        "{{ issuer: 'https://idp.test/', client_id: gw, client_secret: s3cr3t, secret: '{SECRET}' {extra} }}"
    );
    let config: OidcConfig = serde_yaml_ng::from_str(&yaml).map_err(|e| e.to_string())?;
    Oidc::new(config, &BuildEnv::default())
}

fn plugin(extra: &str) -> Oidc {
    config(extra).unwrap()
}

#[test]
fn settings_are_validated() {
    assert!(config("").is_ok());
    let err = |yaml: &str| {
        let config: OidcConfig = serde_yaml_ng::from_str(yaml).unwrap();
        Oidc::new(config, &BuildEnv::default()).err().unwrap()
    };
    let base = "client_id: gw, client_secret: s, secret: '0123456789abcdef0123456789abcdef'";
    assert!(err(&format!("{{ issuer: 'http://idp.test/', {base} }}")).contains("https"));
    assert!(Oidc::new(
        serde_yaml_ng::from_str(&format!("{{ issuer: 'http://127.0.0.1:9/', {base} }}")).unwrap(),
        &BuildEnv::default()
    )
    .is_ok());
    let short =
        err("{ issuer: 'https://idp.test/', client_id: gw, client_secret: s, secret: short }");
    assert!(short.contains("32"), "{short}");
    for (extra, want) in [
        (", algorithms: [HS256]", "HS256"),
        (", algorithms: [none]", "none"),
        (", role_claim: groups", "admin_values"),
        (", redirect_url: 'https://gw.test/callback'", "redirect_url"),
        (", scopes: ['a b']", "scopes"),
        (", leeway: 1h", "leeway"),
    ] {
        let e = config(extra).err().unwrap();
        assert!(e.contains(want), "{extra}: {e}");
    }
    // A secret never shows up in an error.
    let e = config(", client_secret: s3cr3t, algorithms: [XX]");
    assert!(e.is_err_and(|e| !e.contains("s3cr3t") && !e.contains(SECRET)));
}

#[test]
fn states_are_single_use() {
    let p = plugin("");
    let exp = session::now_secs() + 60;
    assert!(p.first_use("a", exp));
    assert!(!p.first_use("a", exp));
    assert!(p.first_use("b", exp));
}

#[test]
fn discovery_documents_are_checked() {
    let p = plugin("");
    let doc = |issuer: &str, token: &str, methods: Option<Vec<&str>>| DiscoveryDocument {
        issuer: issuer.into(),
        authorization_endpoint: "https://idp.test/authorize".into(),
        token_endpoint: token.into(),
        // Loopback, so the verifier's first JWKS fetch fails at once, off the network.
        jwks_uri: "https://127.0.0.1:9/jwks".into(),
        end_session_endpoint: None,
        token_endpoint_auth_methods_supported: methods
            .map(|m| m.into_iter().map(str::to_string).collect()),
        code_challenge_methods_supported: None,
    };
    let wrong =
        p.discovery
            .provider_from(doc("https://evil.test/", "https://idp.test/token", None));
    assert!(wrong.err().unwrap().contains("issuer"));
    let plain = p
        .discovery
        .provider_from(doc("https://idp.test/", "http://idp.test/token", None));
    assert!(plain.err().unwrap().contains("token_endpoint"));
    let post = p.discovery.provider_from(doc(
        "https://idp.test/",
        "https://idp.test/token",
        Some(vec!["private_key_jwt", "client_secret_post"]),
    ));
    assert_eq!(post.ok().unwrap().client_auth, ClientAuth::Post);
    let none = p.discovery.provider_from(doc(
        "https://idp.test/",
        "https://idp.test/token",
        Some(vec!["private_key_jwt"]),
    ));
    assert!(none.is_err());
}

#[test]
fn provider_errors_are_4xx_and_clear_the_state() {
    let p = plugin("");
    let mut ctx = Ctx::new(
        "127.0.0.1".parse().unwrap(),
        crate::RequestId::from_random(1),
        false,
    );
    let req = RequestHeader::build(
        "GET",
        b"/.gatewarden/oidc/callback?error=access_denied&error_description=User%20said%20no%3Cscript%3E&state=x",
        None,
    )
    .unwrap();
    let reply = p.check_callback(&req, &mut ctx).err().unwrap();
    assert_eq!(reply.status, 403);
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(body["error"].as_str().unwrap().contains("access_denied"));
    assert!(reply
        .headers
        .iter()
        .any(|(n, v)| n == http::header::SET_COOKIE
            && v.to_str().unwrap().starts_with("gatewarden_oidc=;")));
    // Without the state cookie.
    let req =
        RequestHeader::build("GET", b"/.gatewarden/oidc/callback?code=c&state=s", None).unwrap();
    assert_eq!(p.check_callback(&req, &mut ctx).err().unwrap().status, 400);
}

#[test]
fn callbacks_need_the_matching_state_cookie() {
    let p = plugin("");
    let mut ctx = Ctx::new(
        "127.0.0.1".parse().unwrap(),
        crate::RequestId::from_random(1),
        false,
    );
    let mut st = state(session::now_secs() + 60);
    st.s = "good".into();
    let sealed = seal(&p.state_mac, &st);
    let callback = |query: &str, cookie: &str| {
        let mut req = RequestHeader::build(
            "GET",
            format!("/.gatewarden/oidc/callback?{query}").as_bytes(),
            None,
        )
        .unwrap();
        req.insert_header("Cookie", format!("gatewarden_oidc={cookie}"))
            .unwrap();
        req
    };
    let mut ctx2 = Ctx::new(
        "127.0.0.1".parse().unwrap(),
        crate::RequestId::from_random(2),
        false,
    );
    // Another state than the cookie's.
    assert_eq!(
        p.check_callback(&callback("code=c&state=other", &sealed), &mut ctx)
            .err()
            .unwrap()
            .status,
        400
    );
    // A forged cookie.
    assert_eq!(
        p.check_callback(&callback("code=c&state=good", "e30.AAAA"), &mut ctx)
            .err()
            .unwrap()
            .status,
        400
    );
    // A mix-up: another issuer.
    assert_eq!(
        p.check_callback(
            &callback("code=c&state=good&iss=https%3A%2F%2Fevil.test%2F", &sealed),
            &mut ctx
        )
        .err()
        .unwrap()
        .status,
        400
    );
    // The right one, once.
    let (login, code) = p
        .check_callback(
            &callback("code=c&state=good&iss=https%3A%2F%2Fidp.test%2F", &sealed),
            &mut ctx2,
        )
        .ok()
        .unwrap();
    assert_eq!((login.v.as_str(), code.as_str()), ("ve", "c"));
    assert_eq!(
        p.check_callback(&callback("code=c&state=good", &sealed), &mut ctx2)
            .err()
            .unwrap()
            .status,
        400
    );
}

/// An ID token verifier as discovery builds it, with the RSA test key instead of
/// a JWKS.
fn id_tokens() -> Jwt {
    let yaml = "{ issuer: 'https://idp.test/', audiences: [gw], public_key_file: rsa1.pub.pem, algorithms: [RS256], role_claim: groups, admin_values: [admins] }";
    let env = BuildEnv {
        base_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data"),
        ..BuildEnv::default()
    };
    Jwt::new(serde_yaml_ng::from_str(yaml).unwrap(), &env).unwrap()
}

fn test_key(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

fn id_claims(changes: Value) -> Value {
    let now = session::now_secs();
    let mut claims = serde_json::json!({
        "iss": "https://idp.test/", "aud": "gw", "sub": "alice", "nonce": "n-1",
        "groups": ["admins"], "iat": now, "exp": now + 300,
    });
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn rs256(claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&test_key("rsa1.key.pem")).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        &key,
    )
    .unwrap()
}

fn accepted(token: &str) -> Result<crate::Identity, String> {
    let jwt = id_tokens();
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(accept_id_token(&jwt, "gw", token, "n-1"))
}

#[test]
fn id_tokens_are_verified_with_nonce_and_azp() {
    let id = accepted(&rs256(&id_claims(serde_json::json!({})))).unwrap();
    assert_eq!((&*id.subject, id.role), ("alice", crate::Role::Admin));
    use serde_json::json;
    for (change, want) in [
        (json!({ "nonce": "n-2" }), "nonce"),
        (json!({ "nonce": null }), "nonce"),
        (json!({ "azp": "other-client" }), "azp"),
        (json!({ "iss": "https://evil.test/" }), "issuer"),
        (json!({ "aud": "other-client" }), "audience"),
        (json!({ "exp": session::now_secs() - 120 }), "expired"),
    ] {
        let err = accepted(&rs256(&id_claims(change.clone()))).err().unwrap();
        assert!(err.contains(want), "{change}: {err}");
    }
    // `alg: none`, and HS256 keyed with the provider's public key.
    let claims = id_claims(json!({}));
    let part = |v: &Value| b64(v.to_string().as_bytes());
    let none = format!("{}.{}.", part(&json!({ "alg": "none" })), part(&claims));
    assert!(accepted(&none).is_err());
    let unsigned = format!("{}.{}", part(&json!({ "alg": "HS256" })), part(&claims));
    let sig = jsonwebtoken::crypto::sign(
        unsigned.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(&test_key("rsa1.pub.pem")),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    let err = accepted(&format!("{unsigned}.{sig}")).err().unwrap();
    assert!(err.contains("algorithm"), "{err}");
}

#[test]
fn client_secrets_are_form_encoded_for_basic_auth() {
    assert_eq!(form_encode("a b:c/d%é"), "a+b%3Ac%2Fd%25%C3%A9");
    assert_eq!(printable("bad\r\nheader\u{1}<x>"), "badheader<x>");
}
