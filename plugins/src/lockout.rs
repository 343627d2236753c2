//! Lockouts of client addresses after failed logins, for every plugin with a password
//! (`pin_gate`, `basic_auth`).
//!
//! ```yaml
//! lockout: { max_failures: 5, window: 10m, ban: 15m }
//! ```
//!
//! After `max_failures` wrong attempts from one client within `window`, that client gets
//! 429 with `Retry-After` for `ban`, whatever it sends, the right password too. A client
//! is an IPv4 address or an IPv6 /64 ([`crate::client_network`]). With a top-level
//! `redis:` block, failures and bans are kept in Redis, so every replica sees them;
//! each process also keeps its own count, which stays in force while Redis is
//! unreachable.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::units::Span;

/// `lockout:` of a password plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failed attempts from one client within `window` that start a ban (default 5, at
    /// least 1).
    #[serde(default = "default_failures")]
    pub max_failures: u32,
    /// How long failures are remembered (default 10m).
    #[serde(default = "default_window")]
    pub window: Span,
    /// How long a ban lasts (default 15m).
    #[serde(default = "default_ban")]
    pub ban: Span,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            max_failures: default_failures(),
            window: default_window(),
            ban: default_ban(),
        }
    }
}

fn default_failures() -> u32 {
    5
}
fn default_window() -> Span {
    Span::from_secs(600)
}
fn default_ban() -> Span {
    Span::from_secs(900)
}

/// Failures per client address. Bounded: past `MAX_TRACKED` addresses the oldest
/// records are dropped, so a flood of addresses cannot grow memory without bound.
///
/// An attempt is charged as a failure before its password is checked, in the same step that
/// looks for a ban ([`Lockout::admit`]), and refunded only once it proves right. However
/// many attempts arrive at once, at most `max_failures` of them per window are ever
/// checked.
struct Lockout {
    max_failures: u32,
    window: Duration,
    ban: Duration,
    clients: Mutex<HashMap<IpAddr, Attempts>>,
}

#[derive(Clone, Copy)]
struct Attempts {
    first_failure: Instant,
    failures: u32,
    banned_until: Option<Instant>,
}

const MAX_TRACKED: usize = 100_000;

/// Whether a login attempt may have its PIN checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Charged as a failure until it proves right.
    Admitted(Charge),
    /// The client is banned for this many more seconds.
    Banned(u64),
}

/// What admitting an attempt did, so that it can be taken back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// This attempt reached `max_failures` and started this process's ban.
    local_ban: bool,
    /// The attempt was also charged in Redis.
    shared: bool,
    /// ... and started the ban there.
    shared_ban: bool,
}

impl Charge {
    /// True when this attempt's charge started a ban: if it fails, the client is locked
    /// out from now on.
    pub fn started_ban(self) -> bool {
        self.local_ban || self.shared_ban
    }
}

impl Lockout {
    /// Seconds left on a ban of `ip`, if banned now.
    fn banned_for(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let until = clients.get(&ip)?.banned_until?;
        (until > now).then(|| (until - now).as_secs().max(1))
    }

    /// Looks for a ban and charges the attempt, in one step under the lock.
    fn admit(&self, ip: IpAddr, now: Instant) -> Admission {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.len() >= MAX_TRACKED && !clients.contains_key(&ip) {
            let window = self.window.max(self.ban);
            clients.retain(|_, a| {
                now.duration_since(a.first_failure) < window
                    || a.banned_until.is_some_and(|u| u > now)
            });
            if clients.len() >= MAX_TRACKED {
                clients.clear();
            }
        }
        let a = clients.entry(ip).or_insert(Attempts {
            first_failure: now,
            failures: 0,
            banned_until: None,
        });
        if let Some(until) = a.banned_until.filter(|u| *u > now) {
            return Admission::Banned((until - now).as_secs().max(1));
        }
        if now.duration_since(a.first_failure) > self.window || a.banned_until.is_some() {
            *a = Attempts {
                first_failure: now,
                failures: 0,
                banned_until: None,
            };
        }
        a.failures += 1;
        let local_ban = a.failures >= self.max_failures;
        if local_ban {
            a.banned_until = Some(now + self.ban);
        }
        Admission::Admitted(Charge {
            local_ban,
            ..Charge::default()
        })
    }

    /// Takes back an attempt's charge: it proved right, or was never checked. A ban the
    /// charge started is lifted; with `forgive` (a right PIN) and no ban standing, the
    /// client's earlier failures are forgotten too.
    fn refund(&self, ip: IpAddr, charge: Charge, forgive: bool, now: Instant) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = clients.get_mut(&ip) else {
            return;
        };
        a.failures = a.failures.saturating_sub(1);
        if charge.local_ban {
            a.banned_until = None;
        }
        if forgive && a.banned_until.is_none_or(|u| u <= now) {
            clients.remove(&ip);
        }
    }
}

/// Lockout state in Redis: `gw:lock:<plugin>:<address>` counts the attempts charged
/// within the window, `gw:ban:<plugin>:<address>` exists while the address is banned.
struct SharedLockout {
    redis: Arc<crate::redis_store::RedisHandle>,
    prefix: String,
    admit: redis::Script,
    refund: redis::Script,
    banned: redis::Script,
}

/// Looks for a ban and charges the attempt, atomically. KEYS: failures, ban. ARGV: max
/// failures, window ms, ban ms. Returns {0, 0} when admitted, {1, ban ms} when admitted
/// and this charge started the ban, {2, ms left} when banned. The count ends with the
/// ban it started, so a client starts afresh after serving one.
const ADMIT_SCRIPT: &str = r"
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {2, left} end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, tonumber(ARGV[3])}
end
return {0, 0}
";

/// Takes back a charge. KEYS: failures, ban. ARGV: '1' when the charge started the ban,
/// '1' to forget the failures when no ban stands.
const REFUND_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('DECR', KEYS[1]) end
if ARGV[1] == '1' then redis.call('DEL', KEYS[2]) end
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
return 0
";

impl SharedLockout {
    fn keys(&self, ip: IpAddr) -> (String, String) {
        (
            format!("gw:lock:{}:{ip}", self.prefix),
            format!("gw:ban:{}:{ip}", self.prefix),
        )
    }

    fn seconds(ms: i64) -> Option<u64> {
        (ms > 0).then(|| (ms as u64).div_ceil(1000))
    }
}

/// A login lockout: this process's count, and Redis's when shared.
pub struct LoginLockout {
    local: Lockout,
    shared: Option<SharedLockout>,
}

impl LoginLockout {
    /// Checks `config`; `env.name` names the shared state in Redis.
    pub fn new(config: &LockoutConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        if config.max_failures == 0 {
            return Err("lockout.max_failures must be at least 1".into());
        }
        let local = Lockout {
            max_failures: config.max_failures,
            window: config.window.get(),
            ban: config.ban.get(),
            clients: Mutex::new(HashMap::new()),
        };
        Ok(LoginLockout {
            local,
            shared: env.redis.clone().map(|redis| SharedLockout {
                redis,
                prefix: env.name.clone(),
                admit: redis::Script::new(ADMIT_SCRIPT),
                refund: redis::Script::new(REFUND_SCRIPT),
                banned: redis::Script::new("return redis.call('PTTL', KEYS[1])"),
            }),
        })
    }

    /// Seconds left on a ban of `ip` that this process knows of, without asking Redis:
    /// for checks on every request, where a round trip would cost too much.
    pub fn banned_here(&self, ip: IpAddr) -> Option<u64> {
        self.local.banned_for(ip, Instant::now())
    }

    /// How long a ban lasts, in seconds (at least 1).
    pub fn ban_secs(&self) -> u64 {
        self.local.ban.as_secs().max(1)
    }

    /// Seconds left on a ban of `ip`: from Redis when shared (falling back to this
    /// process's own record if Redis cannot answer), else local.
    pub async fn banned_for(&self, ip: IpAddr) -> Option<u64> {
        if let Some(shared) = &self.shared {
            let (_, ban) = shared.keys(ip);
            match shared.redis.run::<i64>(&shared.banned, &[&ban], &[]).await {
                Ok(ms) => return SharedLockout::seconds(ms),
                Err(e) => crate::redis_store::report_error("login lockout", &e),
            }
        }
        self.local.banned_for(ip, Instant::now())
    }

    /// Looks for a ban of `ip` and charges this attempt: in this process (always, so
    /// a Redis outage never lifts a lockout) and, when shared, in Redis.
    pub async fn admit(&self, ip: IpAddr) -> Admission {
        let mut charge = match self.local.admit(ip, Instant::now()) {
            Admission::Admitted(charge) => charge,
            banned => return banned,
        };
        let Some(shared) = &self.shared else {
            return Admission::Admitted(charge);
        };
        let (fails, ban) = shared.keys(ip);
        let l = &self.local;
        let args = [
            i64::from(l.max_failures),
            l.window.as_millis() as i64,
            l.ban.as_millis() as i64,
        ];
        match shared
            .redis
            .run::<(i64, i64)>(&shared.admit, &[&fails, &ban], &args)
            .await
        {
            Ok((2, ms)) => {
                // Not checked after all: this process's count takes it back.
                self.local.refund(ip, charge, false, Instant::now());
                Admission::Banned(SharedLockout::seconds(ms).unwrap_or(1))
            }
            Ok((state, _)) => {
                charge.shared = true;
                charge.shared_ban = state == 1;
                Admission::Admitted(charge)
            }
            Err(e) => {
                crate::redis_store::report_error("login lockout", &e);
                Admission::Admitted(charge)
            }
        }
    }

    /// Takes back an attempt's charge (see [`Lockout::refund`]).
    pub async fn refund(&self, ip: IpAddr, charge: Charge, forgive: bool) {
        self.local.refund(ip, charge, forgive, Instant::now());
        let Some(shared) = self.shared.as_ref().filter(|_| charge.shared) else {
            return;
        };
        let (fails, ban) = shared.keys(ip);
        let args = [i64::from(charge.shared_ban), i64::from(forgive)];
        if let Err(e) = shared
            .redis
            .run::<i64>(&shared.refund, &[&fails, &ban], &args)
            .await
        {
            crate::redis_store::report_error("login lockout", &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lockout() -> LoginLockout {
        let config: LockoutConfig =
            serde_yaml_ng::from_str("{ max_failures: 3, window: 1m, ban: 1m }").unwrap();
        LoginLockout::new(&config, &crate::BuildEnv::default()).unwrap()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn attempts_are_charged_before_they_are_checked() {
        let l = lockout().local;
        let now = Instant::now();
        let admitted = (0..10)
            .filter(|_| matches!(l.admit(ip(1), now), Admission::Admitted(_)))
            .count();
        assert_eq!(admitted, 3);
        assert_eq!(l.admit(ip(1), now), Admission::Banned(60));
        assert!(matches!(l.admit(ip(2), now), Admission::Admitted(_)));
    }

    #[test]
    fn a_ban_another_attempt_started_stands_through_a_right_password() {
        let l = lockout().local;
        let now = Instant::now();
        let Admission::Admitted(first) = l.admit(ip(11), now) else {
            panic!("admitted")
        };
        for _ in 0..2 {
            assert!(matches!(l.admit(ip(11), now), Admission::Admitted(_)));
        }
        l.refund(ip(11), first, true, now);
        assert!(matches!(l.admit(ip(11), now), Admission::Banned(60)));
    }

    #[test]
    fn max_failures_must_be_positive() {
        let config: LockoutConfig = serde_yaml_ng::from_str("{ max_failures: 0 }").unwrap();
        assert!(LoginLockout::new(&config, &crate::BuildEnv::default()).is_err());
    }
}
