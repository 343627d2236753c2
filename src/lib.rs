//! Gatewarden: an authenticating gateway for self-hosted AI tools, built on Pingora.
//!
//! The core lives here and knows no plugin by name; plugins live in the
//! `gatewarden-plugins` crate.
#![forbid(unsafe_code)]

pub mod admin;
pub mod chain;
pub mod cli;
pub mod config;
pub mod console;
pub mod demo_upstream;
pub mod endpoints;
pub mod forwarding;
pub mod head_deadline;
pub mod logging;
pub mod observe;
pub mod plumbing;
pub mod proxy;
pub mod reload;
pub mod request_rules;
pub mod router;
pub mod server;
pub mod shards;
pub mod stop;
pub mod trace;
pub mod tunnel;
pub mod upstream;
pub mod usage;
