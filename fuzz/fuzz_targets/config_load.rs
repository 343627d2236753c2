//! The config loader: YAML text in, a validated snapshot or a list of errors out.
//!
//! Properties, for every input:
//! - `compile` never panics and never loops (libFuzzer's timeout catches a hang);
//! - a refused config comes with at least one error, each with a message, and a line
//!   (when given) inside the text;
//! - compiling the same text twice gives the same answer: the same errors in the same
//!   order, or equal snapshots (routes in the same match order with the same matchers,
//!   access levels and pools; listeners, admin, trusted proxies, health path, warnings
//!   and the masked config shown by `GET /admin/config`);
//! - an accepted config binds only where it says, and to 127.0.0.1:8080 when it says
//!   nothing;
//! - the masked config never shows a string written under a secret key (`secret`,
//!   `api_key`, `pin_hash`, ...) unless it is a `${env:}`/`${file:}` reference.
//!
//! Inputs that would make the loader touch the world are skipped, not fed: `${file:}`
//! references (a fuzzer finds `/dev/zero`), log and keys files that would be created or
//! watched (`access_log`, `file`, `keys_file`), JWKS fetches and key files
//! (`jwks_url`, `public_key_file`), and backends that are not IP literals (DNS).
#![no_main]

use gatewarden::config::{compile, Compiled};
use libfuzzer_sys::fuzz_target;
use serde_yaml_ng::Value;

/// The settings this oracle knows to be secret, kept here on purpose: the gateway masks
/// by type, and this list checks it independently.
const SECRET_KEYS: &[&str] = &[
    "secret",
    "previous_secrets",
    "pin_hash",
    "api_key",
    "admin_key",
    "value",
    "client_secret",
    "hs_secret",
    "totp_secret",
];

const WORLDLY_KEYS: &[&str] = &[
    "access_log",
    "file",
    "keys_file",
    "jwks_url",
    "public_key_file",
    "cert_file",
    "key_file",
];

fn untag(v: &Value) -> &Value {
    match v {
        Value::Tagged(t) => untag(&t.value),
        v => v,
    }
}

/// True when loading `v` could read or write files, fetch, or resolve names.
fn worldly(v: &Value) -> bool {
    match untag(v) {
        Value::String(s) => s.contains("${file:"),
        Value::Sequence(items) => items.iter().any(worldly),
        Value::Mapping(map) => map.iter().any(|(k, v)| {
            let k = untag(k);
            worldly(k) || k.as_str().is_some_and(|k| WORLDLY_KEYS.contains(&k)) || worldly(v)
        }),
        _ => false,
    }
}

/// True when some backend under `upstreams:` is not an IP:port literal.
fn resolves_names(root: &Value) -> bool {
    let Some(Value::Mapping(ups)) = root.get("upstreams").map(untag) else {
        return false;
    };
    ups.values().any(|up| {
        let Some(Value::Sequence(backends)) = untag(up).get("backends").map(untag) else {
            return false;
        };
        backends.iter().any(|b| {
            let address = match untag(b) {
                Value::Mapping(_) => untag(b).get("address").map(untag),
                other => Some(other),
            };
            match address {
                Some(Value::String(s)) => s.parse::<std::net::SocketAddr>().is_err(),
                _ => false,
            }
        })
    })
}

/// Strings written under secret keys (outside references), and every other string.
fn strings(v: &Value, secret: bool, secrets: &mut Vec<String>, others: &mut Vec<String>) {
    match v {
        Value::Tagged(t) => strings(&t.value, secret, secrets, others),
        Value::String(s) if secret && !(s.starts_with("${") && s.ends_with('}')) => {
            secrets.push(s.clone())
        }
        Value::String(s) => others.push(s.clone()),
        Value::Sequence(items) => items
            .iter()
            .for_each(|i| strings(i, secret, secrets, others)),
        Value::Mapping(map) => {
            for (k, v) in map {
                strings(k, false, &mut Vec::new(), others);
                let is_secret =
                    secret || untag(k).as_str().is_some_and(|k| SECRET_KEYS.contains(&k));
                strings(v, is_secret, secrets, others);
            }
        }
        Value::Number(n) => others.push(n.to_string()),
        _ => {}
    }
}

fn json_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_strings(i, out)),
        serde_json::Value::Object(map) => map.values().for_each(|i| json_strings(i, out)),
        _ => {}
    }
}

/// What two compilations of one text must agree on.
fn summary(c: &Compiled) -> String {
    let s = &c.snapshot;
    let routes: Vec<String> = s
        .router
        .routes()
        .iter()
        .map(|r| {
            format!(
                "{} {:?} {:?} {:?} {:?} {:?} {} {} plugins={}",
                r.name,
                r.hosts,
                r.path,
                r.methods,
                r.strip_prefix,
                r.access,
                r.pool.name,
                r.max_request_body,
                r.chain.len()
            )
        })
        .collect();
    format!(
        "routes={routes:?} pools={:?} listeners={:?} admin={:?} trusted={:?} health={:?} \
         plugins={} redis={:?} key_stores={:?} sessions={:?} warnings={:?} masked={}",
        s.pools.keys().collect::<Vec<_>>(),
        c.listeners,
        c.admin,
        s.trusted_proxies,
        s.health_path,
        s.plugin_count,
        s.redis_url,
        s.key_stores,
        s.session_lifetime,
        c.warnings,
        s.masked_config,
    )
}

/// The variables the example configs name, so that the seeds from `conf/` compile.
fn set_env() {
    for (name, value) in [
        (
            "GATEWARDEN_PIN_HASH",
            "$argon2id$v=19$m=19456,t=2,p=1$YWJjZGVmZ2hpamtsbW5vcA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
        ("GATEWARDEN_SESSION_SECRET", "fuzz-session-secret-0123456789abcdef"),
        ("GATEWARDEN_OLD_SESSION_SECRET", "fuzz-old-session-secret-0123456789ab"),
        ("GATEWARDEN_ADMIN_KEY", "fuzz-admin-key-0123456789"),
        ("GATEWARDEN_JWT_SECRET", "fuzz-jwt-secret-0123456789abcdef0123"),
        ("GATEWARDEN_TOTP_SECRET", "JBSWY3DPEHPK3PXPJBSWY3DP"),
        ("LITELLM_MASTER_KEY", "sk-fuzz-litellm-master"),
        ("LLM_API_KEY", "sk-fuzz-llm-api-key"),
    ] {
        std::env::set_var(name, value);
    }
}

fuzz_target!(|data: &[u8]| {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(set_env);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Skip what would touch the world (see the top). The loader parses with the same
    // YAML library, so it sees the same tree.
    let tree: Option<Value> = serde_yaml_ng::from_str(text).ok();
    if let Some(tree) = &tree {
        if worldly(tree) || resolves_names(tree) {
            return;
        }
    }

    let first = compile(text, 7);
    let second = compile(text, 7);
    match (&first, &second) {
        (Err(a), Err(b)) => {
            assert!(!a.is_empty(), "refused without an error");
            assert_eq!(a, b, "errors differ between two compilations");
            // YAML also breaks lines at a lone CR: count every CR and LF (an upper bound).
            // The YAML parser reports an error at the end of a text without a final
            // newline on the line after the last one: allow that one too.
            let lines = text.bytes().filter(|&b| b == b'\n' || b == b'\r').count() + 2;
            for e in a {
                assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                if let Some(line) = e.line {
                    assert!(
                        (1..=lines).contains(&line),
                        "error at line {line} of a {lines}-line text: {e:?}"
                    );
                }
            }
        }
        (Ok(a), Ok(b)) => {
            assert_eq!(a.snapshot.generation, 7);
            assert_eq!(summary(a), summary(b), "two compilations differ");
            let tree = tree.expect("accepted config must parse");
            let (mut secrets, mut others) = (Vec::new(), Vec::new());
            strings(&tree, false, &mut secrets, &mut others);
            // Listens where it is told to, and on loopback when told nothing.
            if tree.get("listeners").is_none_or(|l| untag(l).is_null()) {
                assert_eq!(a.listeners.len(), 1);
                assert_eq!(a.listeners[0].address.to_string(), "127.0.0.1:8080");
                assert!(a.listeners[0].tls.is_none());
            } else {
                for l in &a.listeners {
                    assert!(
                        others
                            .iter()
                            .any(|o| o.parse::<std::net::SocketAddr>() == Ok(l.address)),
                        "listens on {}, which the config never names",
                        l.address
                    );
                }
            }
            // Secrets never reach the masked config.
            let mut shown = Vec::new();
            json_strings(&a.snapshot.masked_config, &mut shown);
            for secret in secrets
                .iter()
                .filter(|s| s.len() >= 4 && !s.contains("********"))
            {
                if others.iter().any(|o| o.contains(secret.as_str())) {
                    continue;
                }
                assert!(
                    !shown.iter().any(|s| s.contains(secret.as_str())),
                    "secret {secret:?} shown in the masked config"
                );
            }
        }
        _ => panic!("one compilation accepted, the other refused"),
    }
});
