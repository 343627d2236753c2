//! `plugins:`: every named instance built from its settings, or kept from the config
//! in force when its settings and Redis did not change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gatewarden_plugins::redis_store::RedisHandle;
use gatewarden_plugins::{BuildEnv, Plugin, PluginPlan};
use serde_yaml_ng::Value;

use super::{mapping, Errors, Snapshot};

/// A plugin instance with the settings it was built from, and the Redis it shares
/// state through: a reload with equal settings and the same Redis keeps the instance
/// (its counters, lockouts, in-flight slots).
#[derive(Clone)]
pub struct BuiltPlugin {
    plan: Arc<PluginPlan>,
    redis_url: Option<String>,
    pub plugin: Arc<dyn Plugin>,
}

impl BuiltPlugin {
    fn serves(&self, plan: &PluginPlan, redis_url: Option<&str>) -> bool {
        self.plan.same_as(plan) && self.redis_url.as_deref() == redis_url
    }
}

/// The plugins of a config file.
pub(super) struct Built {
    pub by_name: BTreeMap<String, Arc<dyn Plugin>>,
    pub built: BTreeMap<String, BuiltPlugin>,
    /// Every name under `plugins:`, built or not (one with errors is still declared).
    pub declared: BTreeSet<String>,
    /// Each plugin's settings as `/admin/config` shows them (secrets masked).
    pub shown: serde_json::Map<String, serde_json::Value>,
}

/// Builds the instances under `plugins:`, reusing from `previous` every one whose
/// settings and Redis did not change.
pub(super) fn build(
    section: Value,
    previous: Option<&Snapshot>,
    redis: Option<Arc<RedisHandle>>,
    redis_url: Option<&str>,
    errors: &mut Errors,
) -> Built {
    let mut env = BuildEnv {
        base_dir: std::env::current_dir().unwrap_or_default(),
        name: String::new(),
        redis,
    };
    let mut out = Built {
        by_name: BTreeMap::new(),
        built: BTreeMap::new(),
        declared: BTreeSet::new(),
        shown: serde_json::Map::new(),
    };
    let Some(map) = mapping(section, "plugins", errors) else {
        return out;
    };
    for (key, value) in map {
        let name = key.as_str().unwrap_or("?").to_string();
        let path = format!("plugins.{name}");
        out.declared.insert(name.clone());
        let Value::Mapping(mut block) = value else {
            errors.push(path, "a plugin is a mapping with a `type` key");
            continue;
        };
        let type_name = match block.remove("type") {
            Some(Value::String(t)) => t,
            _ => {
                errors.push(
                    path,
                    format!(
                        "missing `type`; one of {}",
                        gatewarden_plugins::PLUGIN_TYPES.join(", ")
                    ),
                );
                continue;
            }
        };
        let plan = match PluginPlan::parse(&type_name, Value::Mapping(block)) {
            Ok(plan) => Arc::new(plan),
            Err(e) => {
                errors.push(format!("{path} (type: {type_name})"), e.to_string());
                continue;
            }
        };
        if let serde_json::Value::Object(mut shown) = plan.shown() {
            shown.insert("type".into(), type_name.clone().into());
            out.shown.insert(name.clone(), shown.into());
        }
        if let Some(old) = previous
            .and_then(|p| p.plugins.get(&name))
            .filter(|old| old.serves(&plan, redis_url))
        {
            out.by_name.insert(name.clone(), old.plugin.clone());
            out.built.insert(name, old.clone());
            continue;
        }
        env.name = name.clone();
        match plan.build(&env) {
            Ok(p) => {
                out.by_name.insert(name.clone(), p.clone());
                out.built.insert(
                    name,
                    BuiltPlugin {
                        plan,
                        redis_url: redis_url.map(str::to_string),
                        plugin: p,
                    },
                );
            }
            Err(e) => errors.push(format!("{path} (type: {type_name})"), e.to_string()),
        }
    }
    out
}
