//! One route of the config file: its match, access level, upstream and chain,
//! checked and compiled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gatewarden_plugins::Plugin;

use super::compile::Errors;
use super::file::*;
use crate::chain::{Chain, Link};
use crate::observe::RouteMetrics;
use crate::router::{normalize, Access, HostMatch, PathMatch, Route};
use crate::upstream::Pool;

#[allow(clippy::too_many_arguments)]
pub(super) fn compile_route(
    path: &str,
    section: RouteSection,
    global: &[String],
    plugins: &BTreeMap<String, Arc<dyn Plugin>>,
    declared_plugins: &BTreeSet<String>,
    pools: &BTreeMap<String, Arc<Pool>>,
    declared_upstreams: &BTreeSet<String>,
    default_max_body: u64,
    errors: &mut Errors,
) -> Option<Route> {
    let before = errors.list.len();
    let m = &section.matcher;
    let path_match = match (&m.path, &m.path_prefix) {
        (Some(_), Some(_)) => {
            errors.push(
                format!("{path}.match"),
                "use either `path` or `path_prefix`, not both",
            );
            None
        }
        (Some(p), None) => {
            route_path(p, &format!("{path}.match.path"), errors).map(PathMatch::Exact)
        }
        (None, prefix) => {
            let prefix = prefix.as_deref().unwrap_or("/");
            route_path(prefix, &format!("{path}.match.path_prefix"), errors).map(|p| {
                let trimmed = p.trim_end_matches('/');
                PathMatch::Prefix(if trimmed.is_empty() {
                    "/".into()
                } else {
                    trimmed.into()
                })
            })
        }
    };
    let hosts: Vec<HostMatch> = m.hosts.iter().map(|h| HostMatch::parse(h)).collect();
    let mut methods = Vec::new();
    for (i, name) in m.methods.iter().enumerate() {
        match http::Method::from_bytes(name.to_ascii_uppercase().as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => errors.push(
                format!("{path}.match.methods[{i}]"),
                format!("{name:?} is not an HTTP method"),
            ),
        }
    }
    let strip_prefix = section.strip_prefix.as_ref().and_then(|p| {
        let p = route_path(p, &format!("{path}.strip_prefix"), errors)?;
        let p = p.trim_end_matches('/').to_string();
        (!p.is_empty()).then_some(p)
    });
    let access = match section.access.as_deref().unwrap_or("user") {
        "public" => Some(Access::Public),
        "user" => Some(Access::User),
        "admin" => Some(Access::Admin),
        other => {
            errors.push(
                format!("{path}.access"),
                format!("unknown access {other:?}; use public, user or admin"),
            );
            None
        }
    };
    let pool = match pools.get(&section.upstream) {
        Some(p) => Some(p.clone()),
        None => {
            if !declared_upstreams.contains(&section.upstream) {
                errors.push(
                    format!("{path}.upstream"),
                    format!(
                        "no upstream named {:?} under `upstreams:`",
                        section.upstream
                    ),
                );
            }
            None
        }
    };
    let mut chain = Vec::new();
    // A plugin that is declared but failed to build (reported under `plugins:`) may be
    // the route's identity plugin: whether the chain has one is then unknown.
    let mut unbuilt = false;
    for name in global {
        match plugins.get(name) {
            Some(p) => chain.push(Link {
                name: Arc::from(name.as_str()),
                plugin: p.clone(),
            }),
            None => unbuilt = true,
        }
    }
    for (i, name) in section.plugins.iter().enumerate() {
        match plugins.get(name) {
            Some(p) => chain.push(Link {
                name: Arc::from(name.as_str()),
                plugin: p.clone(),
            }),
            None if declared_plugins.contains(name) => unbuilt = true,
            None => errors.push(
                format!("{path}.plugins[{i}]"),
                format!("no plugin named {name:?} under `plugins:`"),
            ),
        }
    }
    let max_request_body = section
        .max_request_body
        .map_or(default_max_body, |size| size.get());
    let chain = Chain::new(chain);
    if let Some(access) = access {
        if access != Access::Public
            && !chain.has_identity()
            && !unbuilt
            && errors.list.len() == before
        {
            errors.push(
                format!("{path}.access"),
                format!(
                    "route {:?} needs `access: {}` but has no identity plugin (one that recognises callers: keys, a login, tokens) in its chain; add one, or set `access: public` deliberately",
                    section.name,
                    if access == Access::Admin { "admin" } else { "user" }
                ),
            );
        }
    }
    if errors.list.len() != before {
        return None;
    }
    let name: Arc<str> = Arc::from(section.name.as_str());
    Some(Route {
        metrics: RouteMetrics::new(&name),
        name,
        hosts,
        path: path_match?,
        methods,
        strip_prefix,
        access: access?,
        pool: pool?,
        chain,
        max_request_body,
    })
}

/// A path in a route must already be normal: what the user wrote is what matches.
fn route_path(p: &str, path: &str, errors: &mut Errors) -> Option<String> {
    match normalize(p) {
        Ok(n) if n == p => Some(p.to_string()),
        Ok(n) => {
            errors.push(path, format!("{p:?} is not normalised; write {n:?}"));
            None
        }
        Err(e) => {
            errors.push(path, format!("{p:?}: {e}"));
            None
        }
    }
}
