//! From YAML text to a validated runtime [`Snapshot`], collecting every error with its
//! key path and line.

mod admin;
mod plugins;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use gatewarden_plugins::key_store::KeyStore;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

pub use admin::ConsoleLogin;
pub use plugins::BuiltPlugin;

use super::expand::expand_tree;
use super::file::*;
use super::lines::LineIndex;
use super::routes::compile_route;
use super::units::Size;
use super::ConfigError;
use crate::router::{normalize, Router};
use crate::upstream::Pool;

/// A listening socket for proxied traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: Option<(String, String)>,
}

/// The internal listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub address: SocketAddr,
    pub api_key: Option<String>,
}

/// What can change on reload: routes, pools, plugins, proxy settings.
pub struct Snapshot {
    pub generation: u64,
    pub router: Router,
    pub pools: BTreeMap<String, Arc<Pool>>,
    pub trusted_proxies: Vec<IpNet>,
    pub health_path: Option<String>,
    pub plugin_count: usize,
    pub redis_url: Option<String>,
    pub admin_api_key: Option<String>,
    /// The login whose admin sessions open the console, besides the admin key.
    pub console_login: Option<ConsoleLogin>,
    /// The config as written, secrets masked, for `GET /admin/config`.
    pub masked_config: serde_json::Value,
    /// Where the identity plugins keep their keys, for the admin keys API.
    pub key_stores: Vec<KeyStore>,
    /// The longest session a plugin issues, for how long revoking a subject holds;
    /// `None` when no plugin issues sessions.
    pub session_lifetime: Option<std::time::Duration>,
    /// The cookies the gateway's own plugins issue (sessions, login state): removed
    /// from every request sent upstream, on every route.
    pub gateway_cookies: Vec<String>,
    /// One JSON line per request, when `access_log:` is on.
    pub access_log: Option<(String, gatewarden_plugins::line_writer::LineWriter)>,
    /// Every plugin instance by name, kept for the next reload.
    pub plugins: BTreeMap<String, BuiltPlugin>,
    pub redis: Option<Arc<gatewarden_plugins::redis_store::RedisHandle>>,
    /// Spans and trace propagation, when `tracing:` is set.
    pub tracing: Option<Arc<crate::trace::Tracer>>,
}

impl Snapshot {
    /// Starts what this snapshot needs to serve: backend names looked up, first key
    /// fetches, file watches, discovery. Once this snapshot is about to serve, never for
    /// `check`. Blocks for as long as the slowest first lookup or fetch (bounded); call
    /// it off the request threads.
    pub fn start(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (name, pool) in &self.pools {
            if let Err(errors) = pool.start() {
                problems.extend(
                    errors
                        .into_iter()
                        .map(|(at, e)| format!("upstreams.{name}.{at}: {e}")),
                );
            }
        }
        if let Some((target, writer)) = &self.access_log {
            if let Err(e) = writer.start() {
                problems.push(format!("access_log {target}: {e}"));
            }
        }
        if let Some(Err(e)) = self.tracing.as_ref().map(|t| t.start()) {
            problems.push(format!("tracing: {e}"));
        }
        for (name, built) in &self.plugins {
            if let Err(e) = built.plugin.start() {
                problems.push(format!("plugins.{name}: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// A compiled config file: the reloadable snapshot, the process-level settings that
/// only a restart or upgrade changes, and warnings worth showing.
pub struct Compiled {
    pub snapshot: Snapshot,
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    pub server: ServerSection,
    /// How many shards serve each proxy listener, from `server.shards`.
    pub shards: crate::shards::Plan,
    pub warnings: Vec<String>,
}

pub const DEFAULT_MAX_BODY: u64 = 10 << 20;
/// Connect and command timeout for Redis: short, so a sick Redis costs little.
const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);
pub const DEFAULT_LISTENER: &str = "127.0.0.1:8080";
/// Largest `server.client_write_buffer_bytes`: every response being written holds one.
const MAX_CLIENT_WRITE_BUFFER: usize = 1 << 20;

/// Collects errors; every error is placed at a path and looked up in the line index.
pub(super) struct Errors<'a> {
    index: &'a LineIndex,
    pub(super) list: Vec<ConfigError>,
    /// Values whose `${...}` could not be expanded: already reported, so the errors that
    /// the unexpanded text causes later (an "address" of `${env:X}`) are noise.
    unexpanded: Vec<String>,
}

impl Errors<'_> {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        if self.unexpanded.contains(&path) {
            return;
        }
        let line = self.index.line_of(&path);
        self.list.push(ConfigError {
            path,
            line,
            message: message.into(),
        });
    }

    /// Deserializes `value` as a `T`; on failure records the error at the exact field.
    pub(super) fn parse<T: DeserializeOwned>(&mut self, path: &str, value: Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = match inner.as_str() {
                    "." | "" => path.to_string(),
                    _ if path.is_empty() => inner,
                    _ if inner.starts_with('[') => format!("{path}{inner}"),
                    _ => format!("{path}.{inner}"),
                };
                self.push(full, e.into_inner().to_string());
                None
            }
        }
    }
}

/// Compiles a config file's text. `generation` numbers this config for `/healthz`.
pub fn compile(text: &str, generation: u64) -> Result<Compiled, Vec<ConfigError>> {
    compile_with(text, generation, None)
}

/// Like [`compile`], reusing from `previous` every plugin whose settings did not
/// change, so that reloads keep rate-limit state and lockouts.
pub fn compile_with(
    text: &str,
    generation: u64,
    previous: Option<&Snapshot>,
) -> Result<Compiled, Vec<ConfigError>> {
    let index = LineIndex::new(text);
    let mut errors = Errors {
        index: &index,
        list: Vec::new(),
        unexpanded: Vec::new(),
    };
    let mut root: Value = match serde_yaml_ng::from_str(text) {
        Ok(Value::Null) => Value::Mapping(Mapping::new()),
        Ok(v) => v,
        Err(e) => {
            let line = e.location().map(|l| l.line());
            return Err(vec![ConfigError {
                path: String::new(),
                line,
                message: format!("not valid YAML: {e}"),
            }]);
        }
    };
    let as_written = root.clone();
    let mut expand_errors = Vec::new();
    expand_tree(&mut root, "", &mut expand_errors);
    for e in &expand_errors {
        errors.push(e.path.clone(), e.message.clone());
    }
    errors.unexpanded = expand_errors.into_iter().map(|e| e.path).collect();
    let Value::Mapping(mut top) = root else {
        errors.push(
            "",
            "the config file must be a mapping of keys such as listeners, upstreams, routes",
        );
        return Err(errors.list);
    };
    for key in top.keys() {
        let name = key.as_str().unwrap_or("?");
        if !TOP_LEVEL_KEYS.contains(&name) {
            errors.push(
                name,
                format!("unknown key; expected one of {}", TOP_LEVEL_KEYS.join(", ")),
            );
        }
    }
    let has_health_path = top.contains_key("health_path");
    let mut take = |key: &str| top.remove(key).unwrap_or(Value::Null);
    let mut warnings = Vec::new();

    let server = compile_server(take("server"), &mut errors);

    let listeners = compile_listeners(take("listeners"), &mut errors);
    let admin::Parsed {
        admin,
        console: console_section,
        shown: admin_shown,
    } = admin::parse(take("admin"), &mut errors);

    let shards = match crate::shards::plan(
        server.shards,
        &listeners.iter().map(|l| l.address).collect::<Vec<_>>(),
        admin.as_ref().map(|a| a.address),
        crate::shards::cpus(),
    ) {
        Ok(plan) => {
            warnings.extend(plan.warnings(server.threads.is_some()));
            plan
        }
        Err(e) => {
            errors.push("server.shards", e);
            crate::shards::Plan::off()
        }
    };

    let trusted_proxies = match take("trusted_proxies") {
        Value::Null => Vec::new(),
        v => errors
            .parse::<Vec<String>>("trusted_proxies", v)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(
                |(i, s)| match gatewarden_plugins::ip_filter::parse_cidr(s) {
                    Ok(net) => Some(net),
                    Err(e) => {
                        errors.push(format!("trusted_proxies[{i}]"), e);
                        None
                    }
                },
            )
            .collect(),
    };

    let health_path = if has_health_path {
        match take("health_path") {
            Value::Null => None,
            Value::String(p) if p.starts_with('/') && normalize(&p).is_ok_and(|n| n == p) => {
                Some(p)
            }
            _ => {
                errors.push(
                    "health_path",
                    "must be a normalised absolute path such as /healthz, or null to disable",
                );
                None
            }
        }
    } else {
        Some("/healthz".to_string())
    };

    let max_body = match take("max_request_body") {
        Value::Null => DEFAULT_MAX_BODY,
        v => errors
            .parse::<Size>("max_request_body", v)
            .map_or(DEFAULT_MAX_BODY, Size::get),
    };

    let redis_url = match take("redis") {
        Value::Null => None,
        v => errors.parse::<RedisSection>("redis", v).and_then(|r| {
            if r.url.starts_with("redis://")
                || r.url.starts_with("rediss://")
                || r.url.starts_with("valkey://")
            {
                Some(r.url)
            } else {
                errors.push(
                    "redis.url",
                    "must start with redis://, rediss:// or valkey://",
                );
                None
            }
        }),
    };

    let access_log = match take("access_log") {
        Value::Null => None,
        Value::Bool(false) => None,
        Value::String(s) if s == "off" => None,
        Value::String(s) => match previous
            .and_then(|p| p.access_log.as_ref())
            .filter(|(t, _)| *t == s)
        {
            Some(kept) => Some(kept.clone()),
            None => {
                use gatewarden_plugins::line_writer::{LineWriter, Target};
                let target = if s == "stdout" {
                    Target::Stdout
                } else {
                    Target::File(s.clone().into())
                };
                match LineWriter::new(target, 10_000) {
                    Ok(w) => Some((s, w)),
                    Err(e) => {
                        errors.push("access_log", e);
                        None
                    }
                }
            }
        },
        _ => {
            errors.push("access_log", "use off, stdout, or a file path");
            None
        }
    };

    let mut tracing_shown = None;
    let tracing = match take("tracing") {
        Value::Null => None,
        v => errors
            .parse::<TracingSection>("tracing", v)
            .and_then(|section| {
                tracing_shown = serde_json::to_value(&section).ok();
                let kept = previous.and_then(|p| p.tracing.as_ref());
                let built = crate::trace::Tracer::kept_or_built(section, kept);
                for (key, message) in built.as_ref().err().into_iter().flatten() {
                    errors.push(format!("tracing.{key}"), message.as_str());
                }
                built.ok()
            }),
    };

    // Upstreams.
    let mut pools: BTreeMap<String, Arc<Pool>> = BTreeMap::new();
    let mut declared_upstreams = BTreeSet::new();
    if let Some(map) = mapping(take("upstreams"), "upstreams", &mut errors) {
        for (key, value) in map {
            let name = key.as_str().unwrap_or("?").to_string();
            let path = format!("upstreams.{name}");
            declared_upstreams.insert(name.clone());
            let Some(section) = errors.parse::<UpstreamSection>(&path, value) else {
                continue;
            };
            // An unchanged pool is kept whole: backends ejected by health checks stay
            // out, and none is resolved or checked anew.
            let unchanged = previous
                .and_then(|p| p.pools.get(&name))
                .filter(|pool| pool.built_from(&section));
            if let Some(pool) = unchanged {
                pools.insert(name, pool.clone());
                continue;
            }
            match Pool::build(&name, &section) {
                Ok(pool) => {
                    pools.insert(name, Arc::new(pool));
                }
                Err(list) => {
                    for (sub, msg) in list {
                        errors.push(format!("{path}.{sub}"), msg);
                    }
                }
            }
        }
    }

    // Plugins.
    let redis = match (&redis_url, previous) {
        (Some(url), Some(prev)) if prev.redis_url.as_deref() == Some(url.as_str()) => {
            prev.redis.clone()
        }
        (Some(url), _) => {
            match gatewarden_plugins::redis_store::RedisHandle::new(url, REDIS_TIMEOUT) {
                Ok(h) => Some(Arc::new(h)),
                Err(e) => {
                    errors.push("redis.url", e);
                    None
                }
            }
        }
        (None, _) => None,
    };
    let plugins::Built {
        by_name: plugins,
        built,
        declared: declared_plugins,
        shown: plugins_shown,
    } = plugins::build(
        take("plugins"),
        previous,
        redis.clone(),
        redis_url.as_deref(),
        &mut errors,
    );

    let console_login =
        admin::console_login(console_section, &declared_plugins, &plugins, &mut errors);

    let global: Vec<String> = match take("global_plugins") {
        Value::Null => Vec::new(),
        v => errors.parse("global_plugins", v).unwrap_or_default(),
    };
    for (i, name) in global.iter().enumerate() {
        if !declared_plugins.contains(name) {
            errors.push(
                format!("global_plugins[{i}]"),
                format!("no plugin named {name:?} under `plugins:`"),
            );
        }
    }

    // Routes.
    let mut routes = Vec::new();
    let mut used_upstreams = HashSet::new();
    let mut used_plugins: HashSet<String> = global.iter().cloned().collect();
    let route_values = match take("routes") {
        Value::Null => Vec::new(),
        Value::Sequence(items) => items,
        _ => {
            errors.push("routes", "must be a list of routes");
            Vec::new()
        }
    };
    if route_values.is_empty() {
        errors.push(
            "routes",
            "no routes: the gateway would answer 404 to everything",
        );
    }
    let mut names = HashSet::new();
    let mut match_keys: BTreeMap<String, usize> = BTreeMap::new();
    for (i, value) in route_values.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(section) = errors.parse::<RouteSection>(&path, value) else {
            continue;
        };
        if !names.insert(section.name.clone()) {
            errors.push(
                format!("{path}.name"),
                format!("route name {:?} is used twice", section.name),
            );
        }
        used_upstreams.insert(section.upstream.clone());
        used_plugins.extend(section.plugins.iter().cloned());
        let key = format!(
            "{:?}",
            (
                &section.matcher.hosts,
                // Paths match without regard to case: `/Admin` and `/admin` are one match.
                section.matcher.path.as_deref().map(str::to_ascii_lowercase),
                section
                    .matcher
                    .path_prefix
                    .as_deref()
                    .map(str::to_ascii_lowercase),
                &section.matcher.methods
            )
        );
        if let Some(other) = match_keys.insert(key, i) {
            errors.push(
                format!("{path}.match"),
                format!("same match as routes[{other}]; one of them could never be reached"),
            );
        }
        if let Some(route) = compile_route(
            &path,
            section,
            &global,
            &plugins,
            &declared_plugins,
            &pools,
            &declared_upstreams,
            max_body,
            &mut errors,
        ) {
            routes.push(Arc::new(route));
        }
    }

    for name in declared_upstreams.difference(&used_upstreams.iter().cloned().collect()) {
        warnings.push(format!("upstreams.{name}: not used by any route"));
    }
    for name in &declared_plugins {
        if !used_plugins.contains(name) {
            warnings.push(format!("plugins.{name}: not used by any route"));
        }
    }

    if !errors.list.is_empty() {
        return Err(errors.list);
    }
    let plugin_count = plugins.len();
    let mut key_stores: Vec<KeyStore> = Vec::new();
    for store in plugins.values().filter_map(|p| p.key_store()) {
        if !key_stores.iter().any(|s| s.same_as(&store)) {
            key_stores.push(store);
        }
    }
    let session_lifetime = plugins.values().filter_map(|p| p.session_lifetime()).max();
    let mut gateway_cookies: Vec<String> =
        plugins.values().flat_map(|p| p.gateway_cookies()).collect();
    gateway_cookies.sort();
    gateway_cookies.dedup();
    Ok(Compiled {
        snapshot: Snapshot {
            generation,
            router: Router::new(routes),
            pools,
            trusted_proxies,
            health_path,
            plugin_count,
            redis_url,
            admin_api_key: admin.as_ref().and_then(|a| a.api_key.clone()),
            console_login,
            masked_config: super::mask::masked(
                &as_written,
                plugins_shown,
                [("admin", admin_shown), ("tracing", tracing_shown)],
            ),
            key_stores,
            session_lifetime,
            gateway_cookies,
            plugins: built,
            redis,
            access_log,
            tracing,
        },
        listeners,
        admin,
        server,
        shards,
        warnings,
    })
}

pub(super) fn mapping(value: Value, path: &str, errors: &mut Errors) -> Option<Mapping> {
    match value {
        Value::Null => None,
        Value::Mapping(m) => Some(m),
        _ => {
            errors.push(path, "must be a mapping of names to settings");
            None
        }
    }
}

fn socket_addr(text: &str, path: &str, errors: &mut Errors) -> Option<SocketAddr> {
    match text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(
                path,
                format!("{text:?} is not IP:PORT (such as 127.0.0.1:8080 or [::1]:8080)"),
            );
            None
        }
    }
}

/// `server:`, checked beyond its types.
fn compile_server(value: Value, errors: &mut Errors) -> ServerSection {
    let server: ServerSection = match value {
        Value::Null => ServerSection::default(),
        v => errors.parse("server", v).unwrap_or_default(),
    };
    if server.threads == Some(0) {
        errors.push("server.threads", "threads must be at least 1");
    }
    for (setting, value) in [
        (
            "server.client_header_timeout_seconds",
            server.client_header_timeout_seconds,
        ),
        (
            "server.client_body_timeout_seconds",
            server.client_body_timeout_seconds,
        ),
    ] {
        if value == Some(0) {
            errors.push(setting, "at least 1 second");
        }
    }
    if server
        .client_write_buffer_bytes
        .is_some_and(|b| b > MAX_CLIENT_WRITE_BUFFER)
    {
        errors.push(
            "server.client_write_buffer_bytes",
            format!(
                "at most {MAX_CLIENT_WRITE_BUFFER} bytes: every response being written holds one"
            ),
        );
    }
    server
}

fn compile_listeners(value: Value, errors: &mut Errors) -> Vec<Listener> {
    let sections: Vec<ListenerSection> = match value {
        Value::Null => {
            return vec![Listener {
                address: DEFAULT_LISTENER
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
                tls: None,
            }]
        }
        v => errors.parse("listeners", v).unwrap_or_default(),
    };
    let mut seen = HashSet::new();
    sections
        .into_iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let path = format!("listeners[{i}]");
            let address = socket_addr(&l.address, &format!("{path}.address"), errors)?;
            if !seen.insert(address) {
                errors.push(
                    format!("{path}.address"),
                    format!("{address} is listed twice"),
                );
            }
            let tls = l.tls.map(|t| (t.cert_file, t.key_file));
            if let Some((cert, key)) = &tls {
                if let Err(e) = pingora::listeners::tls::TlsSettings::intermediate(cert, key) {
                    errors.push(
                        format!("{path}.tls"),
                        format!("cannot load certificate {cert} and key {key}: {e}"),
                    );
                }
            }
            Some(Listener { address, tls })
        })
        .collect()
}

#[cfg(test)]
mod tests;
