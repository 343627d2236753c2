//! The JSON Schema of the config file, made from the same types the loader reads it
//! with, so that editors complete and check a config as the gateway will.
//!
//! `${env:...}` and `${file:...}` references are checked as the strings they are
//! written as; a number given through one (a port, say) is a string to the schema.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Value};

use super::file::*;
use super::units::Size;

/// A section's schema, inline.
fn section<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> Value {
    generator.subschema_for::<T>().to_value()
}

/// `schema` or `null` (a key written with nothing after it).
fn or_null(schema: Value) -> Value {
    json!({ "anyOf": [schema, { "type": "null" }] })
}

/// The schema of a whole config file (draft 2020-12).
pub fn schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let g = &mut generator;
    let plugins: Vec<Value> = gatewarden_plugins::registry::schemas(g)
        .into_iter()
        .map(|(type_name, settings)| plugin_schema(type_name, settings.to_value()))
        .collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://gatewarden.dev/schema/gatewarden.schema.json",
        "title": "Gatewarden configuration",
        "description": "The YAML file `gatewarden check` and `gatewarden run` read.",
        "type": ["object", "null"],
        "additionalProperties": false,
        "properties": {
            "server": or_null(section::<ServerSection>(g)),
            "listeners": or_null(json!({ "type": "array", "items": section::<ListenerSection>(g) })),
            "admin": or_null(section::<AdminSection>(g)),
            "trusted_proxies": or_null(json!({
                "type": "array",
                "items": { "type": "string" },
                "description": "Peers (addresses or CIDR networks) whose X-Forwarded-For and X-Forwarded-Proto are believed.",
            })),
            "health_path": {
                "type": ["string", "null"],
                "pattern": "^/",
                "description": "Answered on every listener without authentication (default /healthz); null turns it off.",
            },
            "max_request_body": or_null(section::<Size>(g)),
            "redis": or_null(section::<RedisSection>(g)),
            "upstreams": or_null(json!({
                "type": "object",
                "additionalProperties": section::<UpstreamSection>(g),
            })),
            "plugins": or_null(json!({
                "type": "object",
                "description": "Named plugin instances; routes and global_plugins name them.",
                "additionalProperties": { "oneOf": plugins },
            })),
            "global_plugins": or_null(json!({ "type": "array", "items": { "type": "string" } })),
            "routes": or_null(json!({ "type": "array", "items": section::<RouteSection>(g) })),
            "access_log": {
                "anyOf": [{ "type": "string" }, { "const": false }, { "type": "null" }],
                "description": "off, stdout, or a file path: one JSON line per request.",
            },
            "tracing": or_null(section::<TracingSection>(g)),
        },
    })
}

/// A plugin entry: `type: NAME` and the type's settings beside it.
fn plugin_schema(type_name: &str, mut settings: Value) -> Value {
    if let Value::Object(map) = &mut settings {
        map.insert("title".into(), type_name.into());
        let properties = map.entry("properties").or_insert_with(|| json!({}));
        if let Value::Object(properties) = properties {
            properties.insert("type".into(), json!({ "const": type_name }));
        }
        let required = map.entry("required").or_insert_with(|| json!([]));
        if let Value::Array(required) = required {
            required.push("type".into());
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_top_level_key_and_plugin_type_has_a_schema() {
        let schema = schema();
        let properties = schema["properties"].as_object().unwrap();
        for key in TOP_LEVEL_KEYS {
            assert!(properties.contains_key(*key), "{key}");
        }
        assert_eq!(properties.len(), TOP_LEVEL_KEYS.len());
        let plugins = schema["properties"]["plugins"]["anyOf"][0]["additionalProperties"]["oneOf"]
            .as_array()
            .unwrap();
        let types: Vec<&str> = plugins
            .iter()
            .map(|p| p["properties"]["type"]["const"].as_str().unwrap())
            .collect();
        assert_eq!(types, gatewarden_plugins::PLUGIN_TYPES);
        for p in plugins {
            assert_eq!(p["additionalProperties"], false, "{}", p["title"]);
        }
    }
}
