//! `admin:`: the internal listener, its key, and the login whose sessions the console
//! accepts.

use std::collections::BTreeMap;
use std::sync::Arc;

use gatewarden_plugins::session::SessionKeys;
use gatewarden_plugins::Plugin;
use serde_yaml_ng::Value;

use super::{socket_addr, Admin, Errors};
use crate::config::file::{AdminSection, ConsoleSection};

/// The login plugin whose sessions open the console, named by `admin.console.login`.
#[derive(Clone)]
pub struct ConsoleLogin {
    /// The plugin's name under `plugins:`.
    pub name: String,
    plugin: Arc<dyn Plugin>,
    /// Where its login page is, for the console's sign-in to link to.
    pub url: Option<String>,
}

impl ConsoleLogin {
    /// The sessions to check; present by construction.
    pub fn sessions(&self) -> Option<&SessionKeys> {
        self.plugin.login_sessions()
    }
}

/// The `admin:` section as read, before the plugins it names are built.
#[derive(Default)]
pub(super) struct Parsed {
    pub admin: Option<Admin>,
    pub console: Option<ConsoleSection>,
    /// The section as `/admin/config` shows it (the key masked).
    pub shown: Option<serde_json::Value>,
}

pub(super) fn parse(value: Value, errors: &mut Errors) -> Parsed {
    if value.is_null() {
        return Parsed::default();
    }
    let Some(section) = errors.parse::<AdminSection>("admin", value) else {
        return Parsed::default();
    };
    let shown = serde_json::to_value(&section).ok();
    let api_key = section.api_key.map(|k| k.expose().to_string());
    if api_key.as_ref().is_some_and(|k| k.len() < 16) {
        errors.push(
            "admin.api_key",
            "the admin API key must be at least 16 characters",
        );
    }
    if let Some(url) = section
        .console
        .as_ref()
        .and_then(|c| c.login_url.as_deref())
    {
        if !is_web_url(url) {
            errors.push(
                "admin.console.login_url",
                format!("{url:?} is not an http:// or https:// URL with a host"),
            );
        }
    }
    Parsed {
        admin: socket_addr(&section.address, "admin.address", errors)
            .map(|address| Admin { address, api_key }),
        console: section.console,
        shown,
    }
}

fn is_web_url(text: &str) -> bool {
    text.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
    })
}

/// Resolves `admin.console.login` among the built plugins. A name that is not declared,
/// or a plugin that keeps no login sessions, is an error; a declared plugin that failed
/// to build has its own.
pub(super) fn console_login(
    section: Option<ConsoleSection>,
    declared: &std::collections::BTreeSet<String>,
    plugins: &BTreeMap<String, Arc<dyn Plugin>>,
    errors: &mut Errors,
) -> Option<ConsoleLogin> {
    let section = section?;
    const PATH: &str = "admin.console.login";
    if !declared.contains(&section.login) {
        errors.push(
            PATH,
            format!("no plugin named {:?} under `plugins:`", section.login),
        );
        return None;
    }
    let plugin = plugins.get(&section.login)?.clone();
    if plugin.login_sessions().is_none() {
        let with_sessions: Vec<&str> = plugins
            .iter()
            .filter(|(_, p)| p.login_sessions().is_some())
            .map(|(name, _)| name.as_str())
            .collect();
        let hint = if with_sessions.is_empty() {
            "no plugin here has one".to_string()
        } else {
            format!("these do: {}", with_sessions.join(", "))
        };
        errors.push(
            PATH,
            format!(
                "plugin {:?} (type {}) has no login page with sessions; {hint}",
                section.login,
                plugin.type_name()
            ),
        );
        return None;
    }
    Some(ConsoleLogin {
        name: section.login,
        plugin,
        url: section.login_url,
    })
}
