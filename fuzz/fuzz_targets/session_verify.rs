//! `SessionKeys::verify`: the session cookie is the only thing between a browser and
//! the apps behind a `pin_gate`.
//!
//! Properties:
//! - a session made by `issue` verifies, with the subject and role it was issued for;
//! - any edit of such a token (bytes changed, inserted, removed, segments swapped or
//!   cut) is refused, or decodes to the very same identity;
//! - a token made outside `issue` is accepted only when it is HS256 and signed with the
//!   current or a previous secret, and its claims are exactly what `issue` writes
//!   (`sub`, `amr` strings, `role` `user` or `admin`, integer `iat`, integer `exp` not in
//!   the past); `alg: none`, other HMAC sizes, RS256 with the secret as an HMAC key,
//!   wrong secrets, expired or malformed claims are all refused, and an accepted one
//!   yields exactly its `sub` and `role`;
//! - arbitrary text is never accepted.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gatewarden_plugins::session::{now_secs, SecureCookie, SessionKeys};
use gatewarden_plugins::Role;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const SECRET: &str = "fuzz-current-secret-0123456789abcdef";
const PREVIOUS: &str = "fuzz-previous-secret-0123456789abcdef";

#[derive(Arbitrary, Debug)]
enum Edit {
    Set { at: u16, byte: u8 },
    Insert { at: u16, byte: u8 },
    Remove { at: u16 },
    Truncate { at: u16 },
    Append(String),
    SwapSegments { a: u8, b: u8 },
    FlipBit { at: u16, bit: u8 },
}

#[derive(Arbitrary, Debug)]
enum JVal {
    Str(String),
    Int(u64),
    Neg(i64),
    Float(f64),
    Bool(bool),
    Null,
    List(Vec<String>),
}

impl JVal {
    fn to_json(&self) -> Value {
        match self {
            JVal::Str(s) => json!(s),
            JVal::Int(n) => json!(n),
            JVal::Neg(n) => json!(-(n.unsigned_abs().max(1) as i128) as i64),
            JVal::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            JVal::Bool(b) => json!(b),
            JVal::Null => Value::Null,
            JVal::List(v) => json!(v),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Claim {
    Missing,
    Good,
    Other(JVal),
}

#[derive(Arbitrary, Debug)]
enum Exp {
    Missing,
    /// Seconds from now.
    In(i32),
    Other(JVal),
}

#[derive(Arbitrary, Debug)]
enum Alg {
    Hs256,
    Hs384,
    Hs512,
    None,
    Rs256,
    Lower,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Key {
    Current,
    Previous,
    Wrong(String),
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Case {
    Tamper {
        subject: String,
        admin: bool,
        edits: Vec<Edit>,
    },
    Forge {
        alg: Alg,
        typ: Option<JVal>,
        kid: Option<String>,
        sub: Claim,
        sub_value: String,
        role: Claim,
        admin: bool,
        amr: Claim,
        iat: Claim,
        exp: Exp,
        extra: Vec<(String, JVal)>,
        key: Key,
        /// Signature bytes to use instead of a real one.
        signature: Option<Vec<u8>>,
    },
    Raw(String),
}

fn keys() -> SessionKeys {
    SessionKeys::new(
        SECRET,
        &[gatewarden_plugins::secret::Secret::new(PREVIOUS)],
        Duration::from_secs(3600),
        "gatewarden",
        SecureCookie::Auto,
    )
    .unwrap()
}

fn hmac_sign(alg: &str, secret: &[u8], message: &[u8]) -> Vec<u8> {
    match alg {
        "HS384" => {
            let mut m = Hmac::<sha2::Sha384>::new_from_slice(secret).unwrap();
            m.update(message);
            m.finalize().into_bytes().to_vec()
        }
        "HS512" => {
            let mut m = Hmac::<sha2::Sha512>::new_from_slice(secret).unwrap();
            m.update(message);
            m.finalize().into_bytes().to_vec()
        }
        _ => {
            let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
            m.update(message);
            m.finalize().into_bytes().to_vec()
        }
    }
}

fn apply(token: &str, edit: &Edit) -> String {
    let mut b = token.as_bytes().to_vec();
    let pos = |at: u16, len: usize| if len == 0 { 0 } else { at as usize % len };
    match edit {
        Edit::Set { at, byte } if !b.is_empty() => {
            let i = pos(*at, b.len());
            b[i] = *byte;
        }
        Edit::Insert { at, byte } => {
            let i = pos(*at, b.len() + 1);
            b.insert(i, *byte);
        }
        Edit::Remove { at } if !b.is_empty() => {
            let i = pos(*at, b.len());
            b.remove(i);
        }
        Edit::Truncate { at } => {
            let i = pos(*at, b.len() + 1);
            b.truncate(i);
        }
        Edit::Append(s) => b.extend_from_slice(s.as_bytes()),
        Edit::SwapSegments { a, b: c } => {
            let text = String::from_utf8_lossy(&b).into_owned();
            let mut parts: Vec<&str> = text.split('.').collect();
            let n = parts.len();
            parts.swap(*a as usize % n, *c as usize % n);
            b = parts.join(".").into_bytes();
        }
        Edit::FlipBit { at, bit } if !b.is_empty() => {
            let i = pos(*at, b.len());
            b[i] ^= 1 << (bit % 8);
        }
        _ => {}
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn tamper(keys: &SessionKeys, subject: &str, admin: bool, edits: &[Edit]) {
    let role = if admin { Role::Admin } else { Role::User };
    let token = keys.issue(subject, role, "pin").expect("issue");
    let issued = keys.verify(&token).expect("a fresh session must verify");
    assert_eq!(&*issued.subject, subject);
    assert_eq!(issued.role, role);
    let mut forged = token.clone();
    for edit in edits {
        forged = apply(&forged, edit);
        if let Ok(id) = keys.verify(&forged) {
            assert_eq!(
                id, issued,
                "edited token {forged:?} (from {token:?}) verified as another identity"
            );
        }
    }
}

fn claim(c: &Claim, good: Value) -> Option<Value> {
    match c {
        Claim::Missing => None,
        Claim::Good => Some(good),
        Claim::Other(v) => Some(v.to_json()),
    }
}

#[allow(clippy::too_many_arguments)]
fn forge(keys: &SessionKeys, case: &Case) {
    let Case::Forge {
        alg,
        typ,
        kid,
        sub,
        sub_value,
        role,
        admin,
        amr,
        iat,
        exp,
        extra,
        key,
        signature,
    } = case
    else {
        return;
    };
    let alg = match alg {
        Alg::Hs256 => "HS256".to_string(),
        Alg::Hs384 => "HS384".to_string(),
        Alg::Hs512 => "HS512".to_string(),
        Alg::None => "none".to_string(),
        Alg::Rs256 => "RS256".to_string(),
        Alg::Lower => "hs256".to_string(),
        Alg::Other(s) => s.clone(),
    };
    let mut header = Map::new();
    header.insert("alg".into(), json!(alg));
    if let Some(t) = typ {
        header.insert("typ".into(), t.to_json());
    }
    if let Some(k) = kid {
        header.insert("kid".into(), json!(k));
    }
    let now = now_secs();
    let role_name = if *admin { "admin" } else { "user" };
    let mut claims = Map::new();
    for (k, v) in extra {
        claims.insert(k.clone(), v.to_json());
    }
    let mut set = |name: &str, v: Option<Value>| match v {
        Some(v) => {
            claims.insert(name.to_string(), v);
        }
        None => {
            claims.remove(name);
        }
    };
    set("sub", claim(sub, json!(sub_value)));
    set("role", claim(role, json!(role_name)));
    set("amr", claim(amr, json!("pin")));
    set("iat", claim(iat, json!(now)));
    let (exp_value, near_now) = match exp {
        Exp::Missing => (None, false),
        Exp::In(d) => (
            Some(json!((now as i64 + *d as i64).max(0) as u64)),
            d.unsigned_abs() <= 2,
        ),
        Exp::Other(v) => {
            let v = v.to_json();
            let near = v.as_u64().is_some_and(|e| e.abs_diff(now) <= 2);
            (Some(v), near)
        }
    };
    set("exp", exp_value);

    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
        URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
    );
    let (secret, equivalent_key): (&[u8], bool) = match key {
        Key::Current => (SECRET.as_bytes(), true),
        Key::Previous => (PREVIOUS.as_bytes(), true),
        // HMAC pads short keys with zeros: trailing NULs make the same key.
        Key::Wrong(w) => {
            let t = w.trim_end_matches('\0');
            (w.as_bytes(), t == SECRET || t == PREVIOUS)
        }
        Key::Empty => (b"", false),
    };
    let sig = match signature {
        Some(bytes) => URL_SAFE_NO_PAD.encode(bytes),
        None if alg == "none" => String::new(),
        None => URL_SAFE_NO_PAD.encode(hmac_sign(&alg, secret, message.as_bytes())),
    };
    let token = format!("{message}.{sig}");
    let result = keys.verify(&token);

    let is_str = |name: &str| claims.get(name).is_some_and(Value::is_string);
    let is_u64 = |name: &str| claims.get(name).is_some_and(|v| v.as_u64().is_some());
    let role_ok = claims
        .get("role")
        .and_then(Value::as_str)
        .is_some_and(|r| r == "user" || r == "admin");
    let exp_ok = claims
        .get("exp")
        .and_then(Value::as_u64)
        .is_some_and(|e| e >= now);
    let genuinely_signed = signature.is_none() && equivalent_key && alg == "HS256";
    // Cases where refusing a genuinely signed, well-formed token is jsonwebtoken's
    // stricter reading rather than a bug: a `typ` that is not a string, an `aud` claim
    // (refused when no audience is configured), or an array or object in `nbf` (the
    // library reads `nbf` as a number for itself, and its JSON reader then gives up on
    // the whole claim set; RFC 7519 allows only a number there).
    let unusual = typ
        .as_ref()
        .is_some_and(|t| !matches!(t, JVal::Str(_) | JVal::Null))
        || claims.contains_key("aud")
        || claims
            .get("nbf")
            .is_some_and(|v| v.is_array() || v.is_object());
    let should_accept =
        genuinely_signed && is_str("sub") && is_str("amr") && role_ok && is_u64("iat") && exp_ok;

    match result {
        Ok(id) => {
            assert!(
                should_accept || (near_now && genuinely_signed),
                "accepted a forged session: {token:?}"
            );
            assert_eq!(
                Some(&*id.subject),
                claims.get("sub").and_then(Value::as_str)
            );
            assert_eq!(
                Some(id.role.as_str()),
                claims.get("role").and_then(Value::as_str)
            );
        }
        Err(_) => assert!(
            !should_accept || near_now || unusual,
            "refused a well-formed session: {token:?}"
        ),
    }
}

fuzz_target!(|case: Case| {
    let keys = keys();
    match &case {
        Case::Tamper {
            subject,
            admin,
            edits,
        } => tamper(&keys, subject, *admin, edits),
        Case::Forge { .. } => forge(&keys, &case),
        Case::Raw(text) => assert!(keys.verify(text).is_err(), "accepted {text:?}"),
    }
});
