//! Secret settings: a type that keeps its value out of everything that prints a config.
//!
//! A [`Secret`] accepts any scalar (a numeric secret is still a secret), and never shows
//! its value: not in `Debug`, not in an error, and serialized it is `********`, which is
//! how `GET /admin/config` shows it. Whether a setting is secret is a matter of its
//! type, so nothing keeps a list of secret names.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a secret prints.
pub const MASK: &str = "********";

/// A secret setting.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the code that uses it; never for logs or errors.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": ["string", "number"],
            "description": "A secret; best given as ${env:NAME} or ${file:/path}. Shown as ******** everywhere.",
        })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_yaml_ng::Value::deserialize(d)? {
            serde_yaml_ng::Value::String(s) => Ok(Secret(s)),
            serde_yaml_ng::Value::Number(n) => Ok(Secret(n.to_string())),
            _ => Err(serde::de::Error::custom("a secret must be a string")),
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(MASK)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({MASK})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows() {
        let s: Secret = serde_yaml_ng::from_str("hunter2-the-secret").unwrap();
        assert_eq!(s.expose(), "hunter2-the-secret");
        assert_eq!(format!("{s:?}"), "Secret(********)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"********\"");
        let n: Secret = serde_yaml_ng::from_str("12345678").unwrap();
        assert_eq!(n.expose(), "12345678");
        let err = serde_yaml_ng::from_str::<Secret>("[a]")
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains('a') || err.contains("secret"), "{err}");
    }
}
