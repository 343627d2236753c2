//! The YAML file as written by users. Parsed with serde, every struct strict about
//! unknown keys; `compile` turns it into the runtime model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::units::{Size, Span};

/// `server:` — process settings handed on to Pingora.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads per listener service (default: the number of CPUs).
    pub threads: Option<usize>,
    /// Let idle worker threads steal work from busy ones (default true).
    pub work_stealing: Option<bool>,
    /// Serve each proxy listener with this many single-threaded shards, each with a
    /// listening socket of its own (Linux `SO_REUSEPORT`), or `auto` for one per CPU
    /// (default: off, one service of `threads` workers per listener).
    pub shards: Option<Shards>,
    /// Seconds to keep serving after a shutdown or upgrade signal before closing listeners.
    pub grace_period_seconds: Option<u64>,
    /// Seconds in-flight requests get to finish after the grace period.
    pub graceful_shutdown_timeout_seconds: Option<u64>,
    /// Where the pid is written (used by `--daemon` and upgrades).
    pub pid_file: Option<String>,
    /// Unix socket the listening sockets are handed over on during `run --upgrade`.
    pub upgrade_sock: Option<String>,
    /// Error log file when running as a daemon.
    pub error_log: Option<String>,
    /// User and group to switch to after binding when started as root with `--daemon`.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Idle upstream connections kept for reuse, across all upstreams.
    pub upstream_keepalive_pool_size: Option<usize>,
    /// Accept tasks per listening socket.
    pub listener_tasks_per_fd: Option<usize>,
    /// Seconds an idle HTTP/1.1 client connection is kept open between requests
    /// (default 75, as nginx's `keepalive_timeout`; 0 closes after every response).
    pub client_keepalive_timeout_seconds: Option<u64>,
    /// Bytes of write buffer per plain-HTTP client connection (default 1460, Pingora's).
    /// A response's head and body that fit in it leave in one send; it is held for the
    /// connection's whole life.
    pub client_write_buffer_bytes: Option<usize>,
    /// Seconds a client has for its first request head, from its first byte, and to
    /// send it at all once connected (default 60, as nginx's `client_header_timeout`).
    pub client_header_timeout_seconds: Option<u64>,
    /// Seconds a client may stay silent while it sends a request body before it gets
    /// 408 (default 60, as nginx's `client_body_timeout`).
    pub client_body_timeout_seconds: Option<u64>,
}

/// `server.shards`: a count, or `auto` for one shard per CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    Count(usize),
    Auto,
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Shards;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of shards (1 or more) or `auto`")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Shards, E> {
                match usize::try_from(n) {
                    Ok(n) if n >= 1 => Ok(Shards::Count(n)),
                    _ => Err(E::custom("shards must be at least 1, or `auto`")),
                }
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Shards, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom("shards must be at least 1, or `auto`")),
                }
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Shards, E> {
                if s.trim().eq_ignore_ascii_case("auto") {
                    Ok(Shards::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl schemars::JsonSchema for Shards {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Shards".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                { "type": "integer", "minimum": 1 },
                { "const": "auto" },
            ],
            "description": "A number of shards, or `auto` for one per CPU.",
        })
    }
}

/// An entry of `listeners:`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    /// `IP:PORT` to bind.
    pub address: String,
    /// Serve HTTPS (and HTTP/2 via ALPN) with this certificate.
    pub tls: Option<TlsSection>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: String,
    pub key_file: String,
}

/// `admin:` — the internal listener.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub address: String,
    /// Required for `/admin/*`; `/metrics` and `/healthz` need none.
    pub api_key: Option<super::mask::Secret>,
    #[serde(default)]
    pub console: Option<ConsoleSection>,
}

/// `admin.console:` — a second way into the console, besides the admin key.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSection {
    /// A plugin whose login sessions the console accepts (a `pin_gate` or `oidc`
    /// instance); a session whose role is `admin` signs in.
    pub login: String,
    /// Where that login's page is, as the browser reaches it
    /// (`https://gw.example.com/.gatewarden/login`): the console's sign-in links there.
    #[serde(default)]
    pub login_url: Option<String>,
}

/// `redis:` — shared state for several replicas.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    pub url: String,
}

/// A backend: `127.0.0.1:3000` or `{ address: 127.0.0.1:3000, weight: 2 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum BackendSection {
    Address(String),
    Weighted(WeightedBackend),
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedBackend {
    pub address: String,
    #[serde(default = "one")]
    pub weight: usize,
}

fn one() -> usize {
    1
}

/// `tls:` of an upstream: `false`, `true`, or `{ sni, verify }`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum UpstreamTlsSection {
    Enabled(bool),
    Settings(UpstreamTlsSettings),
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSettings {
    /// Server name sent in the TLS handshake and checked against the certificate.
    pub sni: Option<String>,
    /// Verify the upstream's certificate (default true).
    pub verify: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    /// `http` (GET `path`, healthy on 200) or `tcp` (a connect succeeds).
    #[schemars(extend("enum" = ["http", "tcp"]))]
    pub kind: String,
    pub path: Option<String>,
    pub interval: Option<Span>,
    pub timeout: Option<Span>,
    pub healthy_after: Option<usize>,
    pub unhealthy_after: Option<usize>,
}

/// An entry of `upstreams:`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub backends: Vec<BackendSection>,
    pub tls: Option<UpstreamTlsSection>,
    #[schemars(extend("enum" = ["round_robin", "random", "hash", null]))]
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub health_check: Option<HealthCheckSection>,
    pub connect_timeout: Option<Span>,
    pub read_timeout: Option<Span>,
    pub write_timeout: Option<Span>,
    pub idle_timeout: Option<Span>,
    pub retries: Option<usize>,
}

/// `match:` of a route.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
}

/// An entry of `routes:`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchSection,
    pub strip_prefix: Option<String>,
    #[schemars(extend("enum" = ["public", "user", "admin", null]))]
    pub access: Option<String>,
    pub upstream: String,
    #[serde(default)]
    pub plugins: Vec<String>,
    pub max_request_body: Option<Size>,
}

/// `tracing:` — OpenTelemetry traces over OTLP/HTTP; off when absent.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// The collector's OTLP/HTTP base URL, such as `http://127.0.0.1:4318`; spans are
    /// POSTed to `<otlp_endpoint>/v1/traces` as protobuf.
    pub otlp_endpoint: String,
    /// Share of new traces recorded, 0 to 1 (default 1). A trace continued from a
    /// trusted proxy follows that proxy's decision instead.
    pub sample_ratio: Option<f64>,
    /// `service.name` of the spans (default `gatewarden`).
    pub service_name: Option<String>,
    /// Headers sent with every export, such as the collector's `Authorization`; the
    /// values are secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, super::mask::Secret>,
    /// Finished spans waiting for export (default 2048); more are dropped and counted.
    pub queue_size: Option<usize>,
    /// Most spans per export request (default 512).
    pub batch_size: Option<usize>,
    /// Longest time a span waits for its batch to fill before it is sent (default 5s).
    pub export_interval: Option<Span>,
    /// Time allowed for one export request (default 10s).
    pub export_timeout: Option<Span>,
}

/// The top-level keys, for the unknown-key check and their order in messages.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "listeners",
    "admin",
    "trusted_proxies",
    "health_path",
    "max_request_body",
    "redis",
    "upstreams",
    "plugins",
    "global_plugins",
    "routes",
    "access_log",
    "tracing",
];

/// A parsed `plugins:` entry: its type and the rest of its block.
pub struct PluginSection {
    pub type_name: String,
    pub settings: serde_yaml_ng::Value,
}

pub type Upstreams = BTreeMap<String, UpstreamSection>;
