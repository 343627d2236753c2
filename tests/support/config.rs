//! Gateway configs built as typed values and written out as YAML, so a test says what
//! it configures (`Route::public("app", "app")`) rather than splicing addresses into
//! text. The harness fills in the listener and admin addresses it picked.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{json, Map, Value};

/// A whole config file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    listen: Option<SocketAddr>,
    /// Certificate and key files of the proxy listener, when it speaks TLS.
    tls: Option<(String, String)>,
    admin: Option<Admin>,
    top: Map<String, Value>,
    upstreams: BTreeMap<String, Upstream>,
    plugins: BTreeMap<String, Value>,
    routes: Vec<Route>,
}

#[derive(Debug, Clone, Default)]
struct Admin {
    address: Option<SocketAddr>,
    api_key: Option<String>,
    console: Option<Value>,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// A config file as written (a shipped `conf/` file, say). The builder methods add
    /// to it: upstreams and plugins by name, routes after its own, and the harness's
    /// listener and admin addresses replace its own.
    pub fn from_yaml(text: &str) -> Config {
        let top = match serde_yaml_ng::from_str(text).expect("the config is YAML") {
            Value::Object(map) => map,
            other => panic!("a config is a mapping, not {other}"),
        };
        let admin = top.get("admin").map(|a| Admin {
            address: None,
            api_key: a["api_key"].as_str().map(str::to_string),
            console: a.get("console").cloned(),
        });
        Config {
            admin,
            top,
            ..Config::default()
        }
    }

    /// The proxy listener; the harness sets it to the port it picked.
    pub fn listen(mut self, addr: SocketAddr) -> Config {
        self.listen = Some(addr);
        self
    }

    /// The proxy listener speaks TLS (and HTTP/2 through ALPN) with these files.
    pub fn listen_tls(
        mut self,
        cert_file: impl AsRef<std::path::Path>,
        key_file: impl AsRef<std::path::Path>,
    ) -> Config {
        let text = |p: &std::path::Path| p.display().to_string();
        self.tls = Some((text(cert_file.as_ref()), text(key_file.as_ref())));
        self
    }

    /// An admin listener; its address is the harness's to pick unless set here.
    pub fn with_admin(mut self) -> Config {
        self.admin.get_or_insert_with(Admin::default);
        self
    }

    pub fn admin_at(mut self, addr: SocketAddr) -> Config {
        self.admin.get_or_insert_with(Admin::default).address = Some(addr);
        self
    }

    /// An admin listener whose `/admin/*` needs `key`.
    pub fn admin_key(mut self, key: &str) -> Config {
        self.admin.get_or_insert_with(Admin::default).api_key = Some(key.to_string());
        self
    }

    /// `admin.console:` (the login whose admin sessions open the console).
    pub fn admin_console(mut self, console: Value) -> Config {
        self.admin.get_or_insert_with(Admin::default).console = Some(console);
        self
    }

    pub fn has_admin(&self) -> bool {
        self.admin.is_some()
    }

    /// A `server:` setting.
    pub fn server(mut self, key: &str, value: impl Into<Value>) -> Config {
        let server = self
            .top
            .entry("server")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = server {
            map.insert(key.to_string(), value.into());
        }
        self
    }

    /// Any other top-level key (`trusted_proxies`, `access_log`, `redis`...).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Config {
        self.top.insert(key.to_string(), value.into());
        self
    }

    pub fn upstream(mut self, name: &str, upstream: Upstream) -> Config {
        self.upstreams.insert(name.to_string(), upstream);
        self
    }

    /// A plugin under `plugins:`: its type and the rest of its settings (a JSON object).
    pub fn plugin(mut self, name: &str, type_name: &str, settings: Value) -> Config {
        let mut block = Map::new();
        block.insert("type".into(), type_name.into());
        if let Value::Object(settings) = settings {
            block.extend(settings);
        }
        self.plugins.insert(name.to_string(), Value::Object(block));
        self
    }

    pub fn route(mut self, route: Route) -> Config {
        self.routes.push(route);
        self
    }

    /// The config as a JSON value, in the shape of the YAML file. Under
    /// `GATEWARDEN_TEST_SHARDS` (a count or `auto`) every config that does not set
    /// `server.shards` itself is served by that many shards.
    pub fn to_value(&self) -> Value {
        let mut top = self.top.clone();
        if let Some(shards) = test_shards() {
            let server = top
                .entry("server")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(map) = server {
                map.entry("shards").or_insert(shards);
            }
        }
        if let Some(addr) = self.listen {
            let mut listener = json!({ "address": addr.to_string() });
            if let Some((cert, key)) = &self.tls {
                listener["tls"] = json!({ "cert_file": cert, "key_file": key });
            }
            top.insert("listeners".into(), json!([listener]));
        }
        if let Some(admin) = &self.admin {
            let mut section = Map::new();
            if let Some(addr) = admin.address {
                section.insert("address".into(), addr.to_string().into());
            }
            if let Some(key) = &admin.api_key {
                section.insert("api_key".into(), key.clone().into());
            }
            if let Some(console) = &admin.console {
                section.insert("console".into(), console.clone());
            }
            top.insert("admin".into(), Value::Object(section));
        }
        let section = |top: &mut Map<String, Value>, key: &str| match top
            .entry(key)
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
        };
        if !self.upstreams.is_empty() {
            let mut upstreams = section(&mut top, "upstreams");
            for (name, u) in &self.upstreams {
                upstreams.insert(name.clone(), u.to_value());
            }
            top.insert("upstreams".into(), Value::Object(upstreams));
        }
        if !self.plugins.is_empty() {
            let mut plugins = section(&mut top, "plugins");
            plugins.extend(self.plugins.clone());
            top.insert("plugins".into(), Value::Object(plugins));
        }
        if !self.routes.is_empty() {
            let mut routes = match top.remove("routes") {
                Some(Value::Array(routes)) => routes,
                _ => Vec::new(),
            };
            routes.extend(self.routes.iter().map(Route::to_value));
            top.insert("routes".into(), Value::Array(routes));
        }
        Value::Object(top)
    }

    /// The config file's text.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.to_value()).expect("a config serializes")
    }
}

/// `GATEWARDEN_TEST_SHARDS` as a `server.shards` value, when set.
pub fn test_shards() -> Option<Value> {
    let text = std::env::var("GATEWARDEN_TEST_SHARDS").ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(
        text.parse::<u64>()
            .map_or_else(|_| text.into(), Value::from),
    )
}

/// An entry of `upstreams:`.
#[derive(Debug, Clone)]
pub struct Upstream {
    backends: Vec<String>,
    settings: Map<String, Value>,
}

impl Upstream {
    /// An upstream of one backend.
    pub fn to(backend: SocketAddr) -> Upstream {
        Upstream::of(&[backend])
    }

    pub fn of(backends: &[SocketAddr]) -> Upstream {
        Upstream {
            backends: backends.iter().map(ToString::to_string).collect(),
            settings: Map::new(),
        }
    }

    /// A backend written as text (`localhost:3000`).
    pub fn named(backend: &str) -> Upstream {
        Upstream {
            backends: vec![backend.to_string()],
            settings: Map::new(),
        }
    }

    /// Any setting of the upstream (`read_timeout`, `retries`, `health_check`...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Upstream {
        self.settings.insert(key.to_string(), value.into());
        self
    }

    fn to_value(&self) -> Value {
        let mut map = self.settings.clone();
        map.insert("backends".into(), json!(self.backends));
        Value::Object(map)
    }
}

/// An entry of `routes:`.
#[derive(Debug, Clone)]
pub struct Route {
    settings: Map<String, Value>,
    matcher: Map<String, Value>,
}

impl Route {
    /// A route named `name` to `upstream` at access level `access`.
    pub fn new(name: &str, upstream: &str, access: &str) -> Route {
        let mut settings = Map::new();
        settings.insert("name".into(), name.into());
        settings.insert("upstream".into(), upstream.into());
        settings.insert("access".into(), access.into());
        Route {
            settings,
            matcher: Map::new(),
        }
    }

    pub fn public(name: &str, upstream: &str) -> Route {
        Route::new(name, upstream, "public")
    }

    pub fn path_prefix(mut self, prefix: &str) -> Route {
        self.matcher.insert("path_prefix".into(), prefix.into());
        self
    }

    pub fn hosts(mut self, hosts: &[&str]) -> Route {
        self.matcher.insert("hosts".into(), json!(hosts));
        self
    }

    pub fn methods(mut self, methods: &[&str]) -> Route {
        self.matcher.insert("methods".into(), json!(methods));
        self
    }

    pub fn plugins(self, names: &[&str]) -> Route {
        self.with("plugins", json!(names))
    }

    /// Any other setting of the route (`strip_prefix`, `max_request_body`...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Route {
        self.settings.insert(key.to_string(), value.into());
        self
    }

    fn to_value(&self) -> Value {
        let mut map = self.settings.clone();
        if !self.matcher.is_empty() {
            map.insert("match".into(), Value::Object(self.matcher.clone()));
        }
        Value::Object(map)
    }
}
