//! Configuration: the YAML file, `${env:}`/`${file:}` expansion, and `compile()` into
//! an immutable, validated [`Snapshot`].

pub mod compile;
mod expand;
pub mod file;
mod lines;
pub mod mask;
mod routes;
pub mod schema;
pub mod units;

use std::fmt;
use std::path::{Path, PathBuf};

pub use compile::{compile, Compiled, Snapshot};
pub use expand::expand_str;

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `routes[2].plugins[0]`; empty for the whole file.
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and compiles a config file.
pub fn load(path: &Path, generation: u64) -> Result<Compiled, ConfigErrors> {
    load_with(path, generation, None)
}

/// Reads and compiles a config file, keeping unchanged plugins of `previous`.
pub fn load_with(
    path: &Path,
    generation: u64,
    previous: Option<&Snapshot>,
) -> Result<Compiled, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError::at(
            "",
            format!("cannot read the config file: {e}"),
        )],
    })?;
    compile::compile_with(&text, generation, previous).map_err(|errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    })
}

/// The config file to use: the one given, else `conf/gatewarden.yaml`, else
/// `/etc/gatewarden/gatewarden.yaml`.
pub fn default_path(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    let local = PathBuf::from("conf/gatewarden.yaml");
    if local.exists() {
        local
    } else {
        PathBuf::from("/etc/gatewarden/gatewarden.yaml")
    }
}
