//! The config as `GET /admin/config` shows it: as written, with every secret masked.

use serde_yaml_ng::Value;

/// Keys whose values are secrets wherever they appear.
pub const SECRET_KEYS: &[&str] = &[
    "secret",
    "previous_secrets",
    "pin_hash",
    "api_key",
    "admin_key",
    "value",
    "client_secret",
    "hs_secret",
    "totp_secret",
    "password",
    "token",
];

pub const MASK: &str = "********";

/// A JSON copy of the config text's tree (before `${...}` expansion), with secrets
/// replaced by `********`. A value that is only a `${env:..}`/`${file:..}` reference is
/// kept: it names where the secret lives, not what it is. URLs lose their passwords.
pub fn masked(root: &Value) -> serde_json::Value {
    mask(root, false)
}

fn mask(value: &Value, secret: bool) -> serde_json::Value {
    match value {
        Value::Mapping(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                    let child_secret = secret || SECRET_KEYS.contains(&key.as_str());
                    (key, mask(v, child_secret))
                })
                .collect(),
        ),
        Value::Sequence(items) => {
            serde_json::Value::Array(items.iter().map(|v| mask(v, secret)).collect())
        }
        Value::String(s) if secret && !is_reference(s) => serde_json::Value::String(MASK.into()),
        Value::String(s) => serde_json::Value::String(strip_url_password(s)),
        Value::Tagged(t) => mask(&t.value, secret),
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(_) if secret => serde_json::Value::String(MASK.into()),
        Value::Number(n) => serde_json::to_value(n).unwrap_or(serde_json::Value::Null),
    }
}

/// True for `${env:NAME}` or `${file:PATH}` alone.
fn is_reference(s: &str) -> bool {
    s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1
}

/// `redis://user:pass@host` → `redis://user:********@host`.
fn strip_url_password(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return s.to_string();
    };
    if userinfo.contains('/') {
        return s.to_string();
    }
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}"),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_references_kept() {
        let v: Value = serde_yaml_ng::from_str(
            "admin: { api_key: literal-admin-key-123456 }\nplugins:\n  p: { type: pin_gate, pin_hash: '$argon2id$x', secret: '${env:S}', previous_secrets: [old-one] }\n  u: { type: upstream_auth, value: 'Bearer sk-123' }\nredis: { url: 'redis://:hunter2@127.0.0.1:6379/0' }\nroutes: [{ name: r }]\n",
        )
        .unwrap();
        let text = masked(&v).to_string();
        for secret in [
            "literal-admin-key-123456",
            "$argon2id$x",
            "old-one",
            "sk-123",
            "hunter2",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains("${env:S}"));
        assert!(text.contains("\"name\":\"r\""));
    }
}
