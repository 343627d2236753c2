//! Benchmark-only switches: `GATEWARDEN_BENCH_OFF`, read once when the process starts,
//! turns off pieces of the gateway's performance plumbing so that a load run can
//! measure each with and without it, on the same build and config. Not a setting:
//! nothing outside a benchmark should set it.
//!
//! The value is a comma-separated list of:
//!
//! - `client_loop`: plain HTTP/1 clients are served by Pingora's own keep-alive loop,
//!   with Pingora's socket buffers, instead of [`super::client_loop`]'s;
//! - `write_gathering`: client writes go straight to the socket, as with
//!   `server.client_write_buffer_bytes: 0`, whatever the config says;
//! - `case_map`: a response that no plugin edits gets its `X-Request-Id` through
//!   Pingora's `insert_header`, keeping its map of header name spellings, instead of
//!   the round trip through `http`'s parts (`response_without_case_map`).
//!
//! `all` turns off all three.

use std::sync::LazyLock;

/// The environment variable the switches are read from.
pub const VARIABLE: &str = "GATEWARDEN_BENCH_OFF";

/// Which pieces are turned off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Off {
    pub client_loop: bool,
    pub write_gathering: bool,
    pub case_map: bool,
}

impl Off {
    /// Parses the variable's value; unknown names are returned too, to be warned of.
    pub fn parse(text: &str) -> (Off, Vec<String>) {
        let mut off = Off::default();
        let mut unknown = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "client_loop" => off.client_loop = true,
                "write_gathering" => off.write_gathering = true,
                "case_map" => off.case_map = true,
                "all" => {
                    off = Off {
                        client_loop: true,
                        write_gathering: true,
                        case_map: true,
                    }
                }
                other => unknown.push(other.to_string()),
            }
        }
        (off, unknown)
    }

    fn names(&self) -> Vec<&'static str> {
        [
            (self.client_loop, "client_loop"),
            (self.write_gathering, "write_gathering"),
            (self.case_map, "case_map"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

static OFF: LazyLock<(Off, Vec<String>)> =
    LazyLock::new(|| Off::parse(&std::env::var(VARIABLE).unwrap_or_default()));

/// The switches of this process.
pub fn off() -> Off {
    OFF.0
}

/// Logs the switches that are set, once, when the server starts.
pub fn log() {
    let (off, unknown) = &*OFF;
    if !unknown.is_empty() {
        log::warn!(
            "{VARIABLE}: unknown names {unknown:?}; known: client_loop, write_gathering, \
             case_map, all"
        );
    }
    let names = off.names();
    if !names.is_empty() {
        log::warn!(
            "{VARIABLE}: benchmark switches turned off {}",
            names.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_turn_off_their_piece_and_unknown_ones_are_kept() {
        assert_eq!(Off::parse(""), (Off::default(), vec![]));
        let (off, unknown) = Off::parse(" case_map, bogus ,write_gathering");
        assert_eq!(
            off,
            Off {
                client_loop: false,
                write_gathering: true,
                case_map: true
            }
        );
        assert_eq!(unknown, ["bogus"]);
        let (off, _) = Off::parse("all");
        assert_eq!(off.names(), ["client_loop", "write_gathering", "case_map"]);
    }
}
