//! The plugin side of gatewarden: the [`Plugin`] trait every filter implements, the
//! per-request [`Ctx`] they share, the caller's [`Identity`], early [`Reply`]s, and the
//! built-in plugin types (one file each, wired up in [`registry`]).
//!
//! Plugins never see Pingora's `Session`: they get request and response headers, body
//! chunks and the `Ctx`. That keeps every plugin testable without a socket.
#![forbid(unsafe_code)]

pub mod credentials;
mod ctx;
pub mod key_store;
pub mod keys;
mod plugin;
pub mod registry;
mod reply;
pub mod template;
pub mod units;

pub mod api_key;
pub mod audit;
pub mod basic_auth;
pub mod cookies;
pub mod cors;
pub mod css_inject;
pub mod forms;
pub mod gcra;
pub mod headers;
pub mod ip_filter;
pub mod jwt;
pub mod line_writer;
pub mod llm_budget;
pub mod lockout;
pub mod oidc;
pub mod origin;
pub mod outbound;
pub mod password;
pub mod pin_gate;
pub mod rate_limit;
pub mod redis_store;
pub mod revocation;
pub mod secret;
pub mod session;
pub mod spelling;
pub mod totp;
pub mod upstream_auth;
pub mod value;
pub mod watch;

pub use ctx::{client_network, Conflict, Ctx, Identity, IpText, RequestId, Role, TokenUsage};
pub use plugin::{Hooks, Plugin, PluginType, RequestFlow, Verdict};
pub use registry::{build, shown, BuildEnv, BuildError, PluginPlan, PLUGIN_TYPES};
pub use reply::Reply;

/// Re-exported so the core and plugins agree on the header types.
pub use pingora_http::{RequestHeader, ResponseHeader};

/// What the upstream-request and response hooks edit: `http`'s own heads. Inserting a
/// prebuilt `HeaderName` into their maps parses and copies nothing, where Pingora's
/// `insert_header` parses every name (copying any custom one) and keeps a second map
/// of spellings in step.
pub use http::{request::Parts as RequestParts, response::Parts as ResponseParts};
