//! Maps a YAML `type:` to the code that builds that plugin.

use std::any::Any;
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

/// What the registry knows of one plugin type: how to read, compare, show and build
/// its settings. Settings travel as `dyn Any` between these so that one table holds
/// every type; each function downcasts to its own type's config.
type Settings = Box<dyn Any + Send + Sync>;
type Built = Result<Arc<dyn Plugin>, String>;

struct Entry {
    type_name: &'static str,
    parse: fn(serde_yaml_ng::Value) -> Result<Settings, String>,
    same: fn(&dyn Any, &dyn Any) -> bool,
    show: fn(&dyn Any) -> serde_json::Value,
    build: fn(&dyn Any, &BuildEnv) -> Built,
    schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

/// Parses `settings` into `T`'s config. An error names the setting it is about
/// (`lockout.window: ...`), whether serde or a setting's own type found it.
fn parse<T: PluginType>(settings: serde_yaml_ng::Value) -> Result<Settings, String> {
    let config: T::Config = serde_path_to_error::deserialize(settings).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })?;
    Ok(Box::new(config))
}

fn same<T: PluginType>(a: &dyn Any, b: &dyn Any) -> bool {
    match (a.downcast_ref::<T::Config>(), b.downcast_ref::<T::Config>()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// The config serialized back: defaults filled in, secrets masked by their type.
fn show<T: PluginType>(config: &dyn Any) -> serde_json::Value {
    config
        .downcast_ref::<T::Config>()
        .and_then(|c| serde_json::to_value(c).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn construct<T: PluginType>(config: &dyn Any, env: &BuildEnv) -> Built {
    let config = config
        .downcast_ref::<T::Config>()
        .ok_or("settings of another plugin type")?;
    Ok(Arc::new(T::build(config.clone(), env)?))
}

/// The plugin types this build knows: one line each.
macro_rules! registry {
    ($($plugin:ty,)*) => {
        const REGISTRY: &[Entry] = &[$(Entry {
            type_name: <$plugin>::TYPE,
            parse: parse::<$plugin>,
            same: same::<$plugin>,
            show: show::<$plugin>,
            build: construct::<$plugin>,
            schema: |generator| generator.subschema_for::<<$plugin as PluginType>::Config>(),
        }),*];

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

/// A plugin's settings, read and checked for their form but not built: no file, no
/// network, no thread. Two plans compare equal when their typed settings are, which is
/// how a reload knows it may keep the running instance.
pub struct PluginPlan {
    entry: &'static Entry,
    config: Settings,
}

impl PluginPlan {
    /// Reads the settings of a plugin of type `type_name` (its YAML block without `type`).
    pub fn parse(type_name: &str, settings: serde_yaml_ng::Value) -> Result<Self, BuildError> {
        let entry = REGISTRY
            .iter()
            .find(|e| e.type_name == type_name)
            .ok_or_else(|| BuildError::UnknownType(type_name.to_string()))?;
        let config = (entry.parse)(settings).map_err(BuildError::Settings)?;
        Ok(PluginPlan { entry, config })
    }

    pub fn type_name(&self) -> &'static str {
        self.entry.type_name
    }

    /// The settings as `GET /admin/config` shows them: defaults filled in, and every
    /// secret setting (a [`Secret`](crate::secret::Secret)) as `********`.
    pub fn shown(&self) -> serde_json::Value {
        (self.entry.show)(self.config.as_ref())
    }

    /// True when `other` is a plugin of the same type with equal settings.
    pub fn same_as(&self, other: &PluginPlan) -> bool {
        std::ptr::eq(self.entry, other.entry)
            && (self.entry.same)(self.config.as_ref(), other.config.as_ref())
    }

    /// Builds the plugin: reads the files its settings name and checks what only they
    /// can show. Network and threads wait for [`Plugin::start`].
    pub fn build(&self, env: &BuildEnv) -> Result<Arc<dyn Plugin>, BuildError> {
        (self.entry.build)(self.config.as_ref(), env).map_err(BuildError::Settings)
    }
}

/// The JSON Schema of each plugin type's settings (without `type`), by type name,
/// as references into `generator`'s definitions.
pub fn schemas(generator: &mut schemars::SchemaGenerator) -> Vec<(&'static str, schemars::Schema)> {
    REGISTRY
        .iter()
        .map(|e| (e.type_name, (e.schema)(generator)))
        .collect()
}

/// Reads and builds a plugin of type `type_name` from its settings.
pub fn build(
    type_name: &str,
    settings: serde_yaml_ng::Value,
    env: &BuildEnv,
) -> Result<Arc<dyn Plugin>, BuildError> {
    PluginPlan::parse(type_name, settings)?.build(env)
}

/// A plugin's settings as `GET /admin/config` shows them.
pub fn shown(
    type_name: &str,
    settings: serde_yaml_ng::Value,
) -> Result<serde_json::Value, BuildError> {
    Ok(PluginPlan::parse(type_name, settings)?.shown())
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
    fn plans_compare_by_their_typed_settings() {
        let plan = |type_name: &str, yaml: &str| {
            PluginPlan::parse(type_name, serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
        };
        let base = plan("rate_limit", "{ rate: 10/min, burst: 5 }");
        // Written differently, read the same: key order, a default spelled out, `m`.
        let same = plan("rate_limit", "{ burst: 5, key: client_ip, rate: 10/m }");
        assert!(base.same_as(&same));
        assert!(!base.same_as(&plan("rate_limit", "{ rate: 11/min, burst: 5 }")));
        // A changed secret is a change, though both show as `********`.
        let a = plan("upstream_auth", "{ value: 'Bearer one' }");
        let b = plan("upstream_auth", "{ value: 'Bearer two' }");
        assert_eq!(a.shown(), b.shown());
        assert!(!a.same_as(&b));
        assert!(!a.same_as(&base), "different types are never the same");
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
