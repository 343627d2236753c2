//! Integration tests: the real `gatewarden` binary, real upstreams, real HTTP, all on
//! ephemeral loopback ports. Every child process is killed when its handle drops.

// Test and bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

#[path = "../support/mod.rs"]
mod support;

mod harness;

mod basic_auth;
mod browser;
mod browser_safety;
mod chromium;
mod cli;
mod console;
mod console_login;
mod container;
mod deploy;
mod docs;
mod faults;
mod hostile;
mod identity;
mod jwt;
mod llm_route;
mod oidc;
mod operations;
mod proxying;
mod replicas;
mod routing;
mod schema;
mod shards;
mod switches;
mod tracing;
mod traffic;
mod upstreams;
mod websocket;
