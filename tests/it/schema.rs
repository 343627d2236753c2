//! The config's JSON Schema: up to date with the loader's types, met by every shipped
//! config, and in agreement with `gatewarden check` on what is wrong.

use std::path::{Path, PathBuf};

use crate::harness::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `check-jsonschema` on `file`: `Some(valid)`, or `None` when the validator is
/// missing (outside CI).
pub(crate) fn schema_accepts(file: &Path) -> Option<bool> {
    let validator = tool(&["check-jsonschema"])?;
    let schema = repo().join("schema/gatewarden.schema.json");
    let out = std::process::Command::new(validator)
        .arg("--schemafile")
        .arg(&schema)
        .arg(file)
        .output()
        .expect("run check-jsonschema");
    Some(out.status.success())
}

#[test]
fn the_committed_schema_is_what_gatewarden_schema_prints() {
    let out = run_cli(&["schema"], &repo());
    assert!(out.status.success(), "{out:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("schema/gatewarden.schema.json")).unwrap(),
    )
    .unwrap();
    assert!(
        printed == committed,
        "schema/gatewarden.schema.json is stale: run `gatewarden schema > schema/gatewarden.schema.json`"
    );
}

#[test]
fn every_shipped_config_names_and_meets_the_schema() {
    for entry in std::fs::read_dir(repo().join("conf")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../schema/gatewarden.schema.json\n"),
            "{} does not name the schema on its first line",
            path.display()
        );
        if let Some(valid) = schema_accepts(&path) {
            assert!(valid, "{} does not meet the schema", path.display());
        }
    }
}

/// Each sample is wrong in one way; the schema and the loader must both say so, and a
/// right one must pass both.
#[test]
fn the_schema_and_the_loader_agree_on_what_is_wrong() {
    let base = "upstreams:\n  app: { backends: ['127.0.0.1:9'] }\nroutes:\n  - { name: app, upstream: app, access: public }\n";
    let wrong = [
        ("an unknown top-level key", format!("{base}bogus: 1\n")),
        (
            "an unknown route key",
            base.replace("access: public", "access: public, acess: user"),
        ),
        (
            "an access level that does not exist",
            base.replace("access: public", "access: everyone"),
        ),
        (
            "a duration without a unit",
            base.replace(
                "backends: ['127.0.0.1:9']",
                "backends: ['127.0.0.1:9'], read_timeout: 10",
            ),
        ),
        (
            "a duration in words",
            base.replace(
                "backends: ['127.0.0.1:9']",
                "backends: ['127.0.0.1:9'], read_timeout: 5 minutes",
            ),
        ),
        (
            "an unknown balance",
            base.replace(
                "backends: ['127.0.0.1:9']",
                "backends: ['127.0.0.1:9'], balance: fastest",
            ),
        ),
        (
            "a size in parsecs",
            format!("{base}max_request_body: 10 parsecs\n"),
        ),
        (
            "a plugin without a type",
            format!("{base}plugins:\n  p: {{ rate: 1/s }}\n"),
        ),
        (
            "an unknown plugin type",
            format!("{base}plugins:\n  p: {{ type: firewall }}\n"),
        ),
        (
            "an unknown plugin setting",
            format!("{base}plugins:\n  p: {{ type: rate_limit, rate: 1/s, brust: 2 }}\n"),
        ),
        (
            "a rate without a period",
            format!("{base}plugins:\n  p: {{ type: rate_limit, rate: 20 }}\n"),
        ),
        (
            "a wrongly typed setting",
            format!("{base}plugins:\n  p: {{ type: ip_filter, allow: 10.0.0.0/8 }}\n"),
        ),
        (
            "a health check of an unknown kind",
            base.replace(
                "backends: ['127.0.0.1:9']",
                "backends: ['127.0.0.1:9'], health_check: { kind: icmp }",
            ),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let right = dir.path().join("right.yaml");
    std::fs::write(
        &right,
        format!("{base}plugins:\n  p: {{ type: rate_limit, rate: 20/s, burst: 40 }}\n"),
    )
    .unwrap();
    assert!(run_cli(&["check", "-c", "right.yaml"], dir.path())
        .status
        .success());
    if let Some(valid) = schema_accepts(&right) {
        assert!(valid, "the schema refuses a right config");
    }
    for (what, yaml) in wrong {
        let file = dir.path().join("wrong.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let checked = run_cli(&["check", "-c", "wrong.yaml"], dir.path());
        assert!(!checked.status.success(), "check accepts {what}:\n{yaml}");
        if let Some(valid) = schema_accepts(&file) {
            assert!(!valid, "the schema accepts {what}:\n{yaml}");
        }
    }
}
