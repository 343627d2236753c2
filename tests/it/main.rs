//! Integration tests: the real `gatewarden` binary, real upstreams, real HTTP, all on
//! ephemeral loopback ports. Every child process is killed when its handle drops.

mod harness;

mod cli;
mod jwt;
mod operations;
mod proxying;
mod routing;
mod traffic;
mod upstreams;
