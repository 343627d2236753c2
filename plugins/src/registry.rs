//! Maps a YAML `type:` to the code that builds that plugin.

use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::Plugin;

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

/// Parses a plugin's settings into its config struct; serde's message names the field.
fn settings<T: DeserializeOwned>(value: serde_yaml_ng::Value) -> Result<T, String> {
    serde_yaml_ng::from_value(value).map_err(|e| e.to_string())
}

/// One line per plugin type: its YAML `type:` and how to build it from its settings.
macro_rules! registry {
    ($($name:literal => $build:expr,)*) => {
        const REGISTRY: &[(&str, Constructor)] = &[$(($name, $build)),*];

        /// Every plugin type this build knows, in registry order.
        pub const PLUGIN_TYPES: &[&str] = &[$($name),*];
    };
}

registry! {
    "headers" => |v, _| Ok(Arc::new(crate::headers::Headers::new(settings(v)?)?)),
    "ip_filter" => |v, _| Ok(Arc::new(crate::ip_filter::IpFilter::new(settings(v)?)?)),
    "origin" => |v, _| Ok(Arc::new(crate::origin::Origin::new(settings(v)?)?)),
    "cors" => |v, _| Ok(Arc::new(crate::cors::Cors::new(settings(v)?)?)),
    "api_key" => |v, _| Ok(Arc::new(crate::api_key::ApiKey::new(settings(v)?)?)),
    "pin_gate" => |v, env| Ok(Arc::new(crate::pin_gate::PinGate::new(settings(v)?, env)?)),
    "upstream_auth" => |v, _| Ok(Arc::new(crate::upstream_auth::UpstreamAuth::new(settings(v)?)?)),
    "css_inject" => |v, env| Ok(Arc::new(crate::css_inject::CssInject::new(settings(v)?, env)?)),
    "jwt" => |v, env| Ok(Arc::new(crate::jwt::Jwt::new(settings(v)?, env)?)),
    "oidc" => |v, env| Ok(Arc::new(crate::oidc::Oidc::new(settings(v)?, env)?)),
    "rate_limit" => |v, env| Ok(Arc::new(crate::rate_limit::RateLimit::new(settings(v)?, env)?)),
    "llm_budget" => |v, env| Ok(Arc::new(crate::llm_budget::LlmBudget::new(settings(v)?, env)?)),
    "audit" => |v, _| Ok(Arc::new(crate::audit::Audit::new(settings(v)?)?)),
    "basic_auth" => |v, env| Ok(Arc::new(crate::basic_auth::BasicAuth::new(settings(v)?, env)?)),
}

/// Builds a plugin of type `type_name` from its settings (the YAML block without `type`).
pub fn build(
    type_name: &str,
    settings: serde_yaml_ng::Value,
    env: &BuildEnv,
) -> Result<Arc<dyn Plugin>, BuildError> {
    let (_, constructor) = REGISTRY
        .iter()
        .find(|(name, _)| *name == type_name)
        .ok_or_else(|| BuildError::UnknownType(type_name.to_string()))?;
    constructor(settings, env).map_err(BuildError::Settings)
}

#[cfg(test)]
mod tests {
    use super::*;

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
