//! A route's plugins in order: `global_plugins` first, then the route's own.

use std::sync::Arc;

use gatewarden_plugins::{Hooks, Plugin};

pub struct Chain {
    pub plugins: Vec<Arc<dyn Plugin>>,
    /// Each plugin's name under `plugins:`, for metrics and logs.
    pub names: Vec<Arc<str>>,
    /// The union of every plugin's hooks.
    pub hooks: Hooks,
    /// How many plugins run their request hook before the core checks access: all
    /// plugins up to and including the last identity plugin. Later plugins (rate limits
    /// per identity, upstream key injection) only ever see requests that passed.
    pub access_check_after: usize,
    /// True when an identity plugin offers a login page.
    pub has_login_page: bool,
    pub has_identity: bool,
}

impl Chain {
    pub fn new(named: Vec<(Arc<str>, Arc<dyn Plugin>)>) -> Self {
        let (names, plugins): (Vec<_>, Vec<_>) = named.into_iter().unzip();
        let hooks = plugins
            .iter()
            .fold(Hooks::default(), |acc, p| acc.union(p.hooks()));
        let last_identity = plugins.iter().rposition(|p| p.is_identity());
        Chain {
            hooks,
            access_check_after: last_identity.map_or(0, |i| i + 1),
            has_login_page: plugins.iter().any(|p| p.has_login_page()),
            has_identity: last_identity.is_some(),
            plugins,
            names,
        }
    }
}
