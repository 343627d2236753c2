//! Maps a YAML `type:` to the code that builds that plugin.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Plugin, PluginType};

/// What a plugin may need from its surroundings at build time.
#[derive(Debug, Clone, Default)]
pub struct BuildEnv {
    /// Directory that relative file paths in plugin settings are resolved against.
    pub base_dir: PathBuf,
    /// The plugin's name under `plugins:`; names its shared state (Redis keys).
    pub name: String,
    /// The top-level `redis:` connection, when configured.
    pub redis: Option<Arc<crate::redis_store::RedisHandle>>,
}

/// Why a plugin could not be built; shown to the user with the plugin's config path.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("unknown plugin type {0:?}; known types: {known}", known = PLUGIN_TYPES.join(", "))]
    UnknownType(String),
    #[error("{0}")]
    Settings(String),
}

type Constructor = fn(serde_yaml_ng::Value, &BuildEnv) -> Result<Arc<dyn Plugin>, String>;
type Shower = fn(serde_yaml_ng::Value) -> Result<serde_json::Value, String>;

/// Parses `settings` into `T`'s config. An error names the setting it is about
/// (`lockout.window: ...`), whether serde or a setting's own type found it.
fn parse<T: PluginType>(settings: serde_yaml_ng::Value) -> Result<T::Config, String> {
    serde_path_to_error::deserialize(settings).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// Parses `settings` into `T`'s config and builds it.
fn construct<T: PluginType>(
    settings: serde_yaml_ng::Value,
    env: &BuildEnv,
) -> Result<Arc<dyn Plugin>, String> {
    Ok(Arc::new(T::build(parse::<T>(settings)?, env)?))
}

/// `settings` parsed into `T`'s config and serialized back: defaults filled in, secrets
/// masked by their type.
fn show<T: PluginType>(settings: serde_yaml_ng::Value) -> Result<serde_json::Value, String> {
    serde_json::to_value(parse::<T>(settings)?).map_err(|e| e.to_string())
}

/// The plugin types this build knows: one line each.
macro_rules! registry {
    ($($plugin:ty,)*) => {
        const REGISTRY: &[(&str, Constructor, Shower)] =
            &[$((<$plugin>::TYPE, construct::<$plugin>, show::<$plugin>)),*];

        /// Every plugin type this build knows, in registry order.
        pub const PLUGIN_TYPES: &[&str] = &[$(<$plugin>::TYPE),*];
    };
}

registry! {
    crate::headers::Headers,
    crate::ip_filter::IpFilter,
    crate::origin::Origin,
    crate::cors::Cors,
    crate::api_key::ApiKey,
    crate::pin_gate::PinGate,
    crate::upstream_auth::UpstreamAuth,
    crate::css_inject::CssInject,
    crate::jwt::Jwt,
    crate::oidc::Oidc,
    crate::rate_limit::RateLimit,
    crate::llm_budget::LlmBudget,
    crate::audit::Audit,
    crate::basic_auth::BasicAuth,
}

/// Builds a plugin of type `type_name` from its settings (the YAML block without `type`).
pub fn build(
    type_name: &str,
    settings: serde_yaml_ng::Value,
    env: &BuildEnv,
) -> Result<Arc<dyn Plugin>, BuildError> {
    let (_, constructor, _) = REGISTRY
        .iter()
        .find(|(name, _, _)| *name == type_name)
        .ok_or_else(|| BuildError::UnknownType(type_name.to_string()))?;
    constructor(settings, env).map_err(BuildError::Settings)
}

/// A plugin's settings as `GET /admin/config` shows them: parsed into the type's config
/// and serialized back, so that every secret setting (a
/// [`Secret`](crate::secret::Secret)) shows as `********`.
pub fn shown(
    type_name: &str,
    settings: serde_yaml_ng::Value,
) -> Result<serde_json::Value, BuildError> {
    let (_, _, show) = REGISTRY
        .iter()
        .find(|(name, _, _)| *name == type_name)
        .ok_or_else(|| BuildError::UnknownType(type_name.to_string()))?;
    show(settings).map_err(BuildError::Settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_settings_mask_every_secret_by_type() {
        let cases = [
            ("pin_gate", "{ pin_hash: '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g', secret: s3cret-s3cret-s3cret-s3cret-s3cret-x, previous_secrets: [old-old-old-old-old-old-old-old-old], totp_secret: JBSWY3DPEHPK3PXP }"),
            ("api_key", "{ admin_key: the-admin-key-0123456789 }"),
            ("upstream_auth", "{ value: 'Bearer sk-live-secret' }"),
            ("jwt", "{ issuer: i, audiences: [a], hs_secret: hs-secret-hs-secret-hs-secret-hs, algorithms: [HS256] }"),
            ("oidc", "{ issuer: 'https://idp.example/', client_id: c, client_secret: client-secret-xyz, secret: session-secret-session-secret-abc, previous_secrets: [old-old-old-old-old-old-old-old-old] }"),
        ];
        for (type_name, yaml) in cases {
            let settings: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).unwrap();
            let shown = shown(type_name, settings).unwrap().to_string();
            for secret in [
                "c2FsdHNhbHQ",
                "s3cret",
                "old-old",
                "JBSWY3",
                "the-admin-key",
                "sk-live",
                "hs-secret",
                "client-secret-xyz",
                "session-secret",
            ] {
                assert!(!shown.contains(secret), "{type_name}: {secret} in {shown}");
            }
            assert!(shown.contains("********"), "{type_name}: {shown}");
        }
    }

    #[test]
    fn unknown_types_and_fields_are_named() {
        let env = BuildEnv::default();
        let err = build("nope", serde_yaml_ng::Value::Null, &env)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nope") && err.contains("headers"));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str("{ alow: [10.0.0.0/8] }").unwrap();
        let err = build("ip_filter", v, &env).err().unwrap().to_string();
        assert!(err.contains("alow"), "{err}");
    }
}
