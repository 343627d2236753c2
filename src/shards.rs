//! Shards: nginx's worker model inside one process. With `server.shards: N`, every
//! proxy listener is served by N Pingora services of one thread each, every one with a
//! listening socket of its own bound with `SO_REUSEPORT`. The kernel spreads new
//! connections over the sockets, and a connection's accept, reads, writes, upstream
//! connection pool and timers stay on the thread of the shard that accepted it.
//! Everything the config holds (rate limits, budgets, lockouts, keys, the snapshot
//! itself) is one copy shared by every shard, as it is shared by the threads of one
//! service.
//!
//! A graceful upgrade hands the listening sockets to the new process in one message,
//! each under a name that the new process looks its sockets up by: the address as the
//! service was given it. Shards of one address need names of their own, or the new
//! process would find one socket for all of them. Shard `i` binds the address with
//! `i + 1` zeros before its port (`127.0.0.1:08080`, `127.0.0.1:008080`...): a distinct
//! name that still parses as the same address. No shard takes the unpadded name, which
//! a process without shards binds without `SO_REUSEPORT`: an upgrade between the two
//! modes finds no socket to take over and binds anew (see the operations chapter).

use std::net::SocketAddr;

use crate::config::file::Shards;

/// Most listening sockets an upgrade can hand over: Pingora's new process makes room
/// for 32 descriptors in the message, and one with more fails to start.
pub const MAX_HANDED_OVER: usize = 32;

/// Most bytes of socket names, joined by spaces, in that message (Pingora's buffer).
pub const MAX_NAME_BYTES: usize = 2048;

/// How many shards serve each listener; 1 means no sharding, one service per listener
/// as without the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub shards: usize,
    /// Set when `auto` asked for more shards (this many CPUs) than an upgrade could
    /// hand over.
    pub capped_from: Option<usize>,
}

impl Plan {
    pub fn sharded(&self) -> bool {
        self.shards > 1
    }
}

/// The CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Works out the shard count for these listeners and admin listener, on a machine of
/// `cpus` CPUs. An error says why the count asked for cannot be served.
pub fn plan(
    setting: Option<Shards>,
    listeners: &[SocketAddr],
    admin: Option<SocketAddr>,
    cpus: usize,
) -> Result<Plan, String> {
    let (asked, auto) = match setting {
        None => return Ok(Plan::off()),
        Some(Shards::Count(n)) => (n, false),
        Some(Shards::Auto) => (cpus.max(1), true),
    };
    if asked <= 1 {
        return Ok(Plan::off());
    }
    if let Some(l) = listeners.iter().find(|l| l.port() == 0) {
        return Err(format!(
            "listener {l} has port 0: every shard would get a port of its own; name a port"
        ));
    }
    let fits = |n: usize| handed_over(listeners, admin, n).is_ok();
    if fits(asked) {
        return Ok(Plan {
            shards: asked,
            capped_from: None,
        });
    }
    if !auto {
        return Err(handed_over(listeners, admin, asked)
            .err()
            .unwrap_or_default());
    }
    let most = (1..asked).rev().find(|&n| fits(n)).unwrap_or(1);
    Ok(Plan {
        shards: most,
        capped_from: Some(asked),
    })
}

impl Plan {
    /// One service per listener.
    pub fn off() -> Plan {
        Plan {
            shards: 1,
            capped_from: None,
        }
    }

    /// What is worth telling about this plan: `auto` capped below the CPU count, or a
    /// `server.threads` (set when `threads_set`) that no longer sizes the listeners.
    pub fn warnings(&self, threads_set: bool) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(cpus) = self.capped_from {
            warnings.push(format!(
                "server.shards: auto would be {cpus} (one per CPU), but a graceful upgrade \
                 hands over too few listening sockets for that; using {}",
                self.shards
            ));
        }
        if self.sharded() && threads_set {
            warnings.push(
                "server.threads: each shard of a proxy listener has one thread; threads \
                 sizes only the admin listener and background tasks"
                    .to_string(),
            );
        }
        warnings
    }
}

/// Whether every listening socket (each listener's shards and the admin listener) can
/// be handed to the new process of a graceful upgrade.
fn handed_over(
    listeners: &[SocketAddr],
    admin: Option<SocketAddr>,
    shards: usize,
) -> Result<(), String> {
    let mut names: Vec<String> = listeners
        .iter()
        .flat_map(|&l| (0..shards).map(move |i| socket_name(l, i)))
        .collect();
    names.extend(admin.map(|a| a.to_string()));
    if names.len() > MAX_HANDED_OVER {
        return Err(format!(
            "{} listeners × {shards} shards{} is {} listening sockets; a graceful upgrade \
             hands over at most {MAX_HANDED_OVER}",
            listeners.len(),
            if admin.is_some() { " + admin" } else { "" },
            names.len()
        ));
    }
    let bytes = names
        .iter()
        .map(|n| n.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    if bytes > MAX_NAME_BYTES {
        return Err(format!(
            "the names of {} listening sockets take {bytes} bytes; a graceful upgrade \
             hands over at most {MAX_NAME_BYTES} bytes of them: fewer shards",
            names.len()
        ));
    }
    Ok(())
}

/// The name shard `index` of the listener on `addr` binds under: the address with
/// `index + 1` zeros before the port. It parses as `addr` again (leading zeros in a
/// port are allowed), and differs from every other shard's name and from `addr`'s own.
pub fn socket_name(addr: SocketAddr, index: usize) -> String {
    let text = addr.to_string();
    // An IPv6 address's colons are inside its brackets: the last colon is the port's.
    let (host, port) = text.rsplit_once(':').unwrap_or((&text, ""));
    format!("{host}:{}{port}", "0".repeat(index + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::ToSocketAddrs;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn shard_names_are_distinct_and_bind_the_listener_address() {
        for listener in ["127.0.0.1:8080", "[::1]:443", "0.0.0.0:80", "[fe80::1%2]:9"] {
            let listener = addr(listener);
            let names: Vec<String> = (0..16).map(|i| socket_name(listener, i)).collect();
            let distinct: HashSet<&String> = names.iter().collect();
            assert_eq!(distinct.len(), names.len(), "{names:?}");
            assert!(!names.contains(&listener.to_string()));
            for name in &names {
                // How Pingora resolves the name it binds.
                let resolved: Vec<SocketAddr> = name.as_str().to_socket_addrs().unwrap().collect();
                assert_eq!(resolved, [listener], "{name}");
            }
        }
        assert_eq!(socket_name(addr("127.0.0.1:8080"), 2), "127.0.0.1:0008080");
    }

    #[test]
    fn no_setting_and_one_shard_are_off() {
        let l = [addr("127.0.0.1:8080")];
        for setting in [None, Some(Shards::Count(1))] {
            let p = plan(setting, &l, None, 8).unwrap();
            assert!(!p.sharded());
        }
        assert!(!plan(Some(Shards::Auto), &l, None, 1).unwrap().sharded());
    }

    #[test]
    fn auto_is_one_shard_per_cpu() {
        let l = [addr("127.0.0.1:8080"), addr("127.0.0.1:8443")];
        let p = plan(Some(Shards::Auto), &l, Some(addr("127.0.0.1:9090")), 6).unwrap();
        assert_eq!(
            p,
            Plan {
                shards: 6,
                capped_from: None
            }
        );
    }

    #[test]
    fn more_sockets_than_an_upgrade_hands_over_is_an_error_or_capped_for_auto() {
        let l = [addr("127.0.0.1:8080"), addr("127.0.0.1:8443")];
        let admin = Some(addr("127.0.0.1:9090"));
        assert!(plan(Some(Shards::Count(15)), &l, admin, 2).is_ok());
        let e = plan(Some(Shards::Count(16)), &l, admin, 2).unwrap_err();
        assert!(e.contains("33 listening sockets"), "{e}");
        let p = plan(Some(Shards::Auto), &l, admin, 64).unwrap();
        assert_eq!(
            p,
            Plan {
                shards: 15,
                capped_from: Some(64)
            }
        );
    }

    #[test]
    fn long_names_count_against_the_handover_message() {
        // 58 bytes, and one more zero for every shard.
        let l = [addr(
            "[fe80:1111:2222:3333:4444:5555:6666:7777%4294967295]:65000",
        )];
        let e = plan(Some(Shards::Count(31)), &l, None, 2).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        let p = plan(Some(Shards::Auto), &l, None, 31).unwrap();
        assert_eq!(p.shards, 27, "{p:?}");
    }

    #[test]
    fn a_listener_on_port_zero_cannot_be_sharded() {
        let e = plan(Some(Shards::Count(2)), &[addr("127.0.0.1:0")], None, 2).unwrap_err();
        assert!(e.contains("port 0"), "{e}");
    }
}
