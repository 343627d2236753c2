//! The config as `GET /admin/config` shows it.
//!
//! Plugins and the admin and tracing sections are shown as their typed settings
//! serialize: every secret setting is a [`Secret`], which serializes as `********`, so
//! nothing here knows which settings are secret. The other sections are shown as
//! written. URLs anywhere lose their passwords (`redis://:pw@host` shows
//! `redis://:********@host`).

use serde_yaml_ng::Value;

pub use gatewarden_plugins::secret::{Secret, MASK};

/// The config as written (`root`, before `${...}` expansion), with `plugins` and the
/// `typed` top-level sections replaced by their typed views.
pub fn masked<const N: usize>(
    root: &Value,
    plugins: serde_json::Map<String, serde_json::Value>,
    typed: [(&str, Option<serde_json::Value>); N],
) -> serde_json::Value {
    let mut shown = as_json(root);
    if let serde_json::Value::Object(top) = &mut shown {
        if top.contains_key("plugins") {
            top.insert("plugins".into(), strip_passwords(plugins.into()));
        }
        for (key, view) in typed {
            if let Some(view) = view {
                top.insert(key.into(), strip_passwords(view));
            }
        }
    }
    shown
}

fn as_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Mapping(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                    (key, as_json(v))
                })
                .collect(),
        ),
        Value::Sequence(items) => serde_json::Value::Array(items.iter().map(as_json).collect()),
        Value::String(s) => serde_json::Value::String(strip_url_password(s)),
        Value::Tagged(t) => as_json(&t.value),
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(n) => serde_json::to_value(n).unwrap_or(serde_json::Value::Null),
    }
}

fn strip_passwords(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::String(s) => serde_json::Value::String(strip_url_password(&s)),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(strip_passwords).collect())
        }
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, strip_passwords(v)))
                .collect(),
        ),
        other => other,
    }
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
    fn typed_views_replace_plugins_and_admin_and_urls_lose_passwords() {
        let v: Value = serde_yaml_ng::from_str(
            "admin: { api_key: literal-admin-key-123456 }\nplugins:\n  p: { type: pin_gate, pin_hash: '$argon2id$x', secret: '${env:S}', previous_secrets: [old-one] }\n  u: { type: upstream_auth, value: 'Bearer sk-123' }\nredis: { url: 'redis://:hunter2@127.0.0.1:6379/0' }\nroutes: [{ name: r }]\n",
        )
        .unwrap();
        let mut plugins = serde_json::Map::new();
        plugins.insert(
            "u".into(),
            serde_json::json!({ "type": "upstream_auth", "value": MASK, "jwks": "https://a:b@c/" }),
        );
        let admin = serde_json::json!({ "address": "127.0.0.1:9091", "api_key": MASK });
        let text = masked(&v, plugins, [("admin", Some(admin))]).to_string();
        for secret in [
            "literal-admin-key-123456",
            "$argon2id$x",
            "old-one",
            "sk-123",
            "hunter2",
            ":b@",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains("\"name\":\"r\""));
        assert!(text.contains("upstream_auth"));
    }
}
