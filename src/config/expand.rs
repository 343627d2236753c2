//! `${env:NAME}` and `${file:PATH}` in string values, expanded before anything else
//! reads the config, so every setting can take a secret from outside the file.

use serde_yaml_ng::Value;

use super::ConfigError;

/// Expands every string in `value` in place; `path` names where we are for errors.
pub fn expand_tree(value: &mut Value, path: &str, errors: &mut Vec<ConfigError>) {
    match value {
        Value::String(s) if s.contains("${") => match expand_str(s) {
            Ok(expanded) => *s = expanded,
            Err(msg) => errors.push(ConfigError::at(path, msg)),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_tree(item, &format!("{path}[{i}]"), errors);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = key.as_str().unwrap_or("?");
                let child = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                expand_tree(item, &child, errors);
            }
        }
        Value::Tagged(tagged) => expand_tree(&mut tagged.value, path, errors),
        _ => {}
    }
}

/// Expands the `${...}` references in one string. A file's trailing newline is dropped,
/// as secret files usually end with one.
pub fn expand_str(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let tail = &rest[start + 2..];
        let end = tail
            .find('}')
            .ok_or_else(|| format!("unclosed '${{' in {text:?}"))?;
        let reference = &tail[..end];
        if let Some(name) = reference.strip_prefix("env:") {
            let value = std::env::var(name).map_err(|_| {
                format!("environment variable {name} is not set (referenced as ${{env:{name}}})")
            })?;
            out.push_str(&value);
        } else if let Some(file) = reference.strip_prefix("file:") {
            let content = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {file} (referenced as ${{file:{file}}}): {e}"))?;
            out.push_str(
                content
                    .strip_suffix('\n')
                    .map(|c| c.strip_suffix('\r').unwrap_or(c))
                    .unwrap_or(&content),
            );
        } else {
            return Err(format!(
                "unknown reference ${{{reference}}}; use ${{env:NAME}} or ${{file:PATH}}"
            ));
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_references_expand_in_place() {
        std::env::set_var("GW_EXPAND_TEST", "s3cret");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "Bearer ${{env:GW_EXPAND_TEST}}/${{file:{}}}",
            file.display()
        );
        assert_eq!(expand_str(&text).unwrap(), "Bearer s3cret/from-file");
    }

    #[test]
    fn missing_references_are_named() {
        let err = expand_str("${env:GW_SURELY_UNSET_1234}").unwrap_err();
        assert!(err.contains("GW_SURELY_UNSET_1234"));
        let err = expand_str("${file:/nonexistent/gw}").unwrap_err();
        assert!(err.contains("/nonexistent/gw"));
        assert!(expand_str("${vault:x}").is_err());
        assert!(expand_str("${env:X").is_err());
    }

    #[test]
    fn errors_carry_the_key_path() {
        let mut v: Value =
            serde_yaml_ng::from_str("a: { b: [x, '${env:GW_SURELY_UNSET_5678}'] }").unwrap();
        let mut errors = Vec::new();
        expand_tree(&mut v, "", &mut errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "a.b[1]");
    }
}
