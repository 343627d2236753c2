//! The generic cell rate algorithm (GCRA), the token bucket's exact twin: with rate `r`
//! per period and burst `b`, a key may spend `b` at once and then `r` per period. Each
//! key stores one number, its theoretical arrival time (TAT). Kept locally in a bounded
//! table, or in Redis by one atomic script so that all replicas share the limit.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A limit: one unit costs `interval`; a key may run `tolerance` ahead of now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    interval_ns: u64,
    tolerance_ns: u64,
    burst: u64,
}

/// The outcome for one request, with what the `RateLimit-*` headers show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Units left right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until one more unit fits (zero when allowed).
    pub retry_after: Duration,
}

impl Gcra {
    /// `count` units per `period`, `burst` at once (at least 1).
    pub fn new(count: u64, period: Duration, burst: u64) -> Gcra {
        let interval_ns = (period.as_nanos() as u64 / count.max(1)).max(1);
        let burst = burst.max(1);
        Gcra {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst),
            burst,
        }
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    pub fn tolerance_ns(&self) -> u64 {
        self.tolerance_ns
    }

    /// Spends `cost` units at `now` (nanoseconds on any monotonic clock) against `tat`.
    pub fn spend(&self, tat: &mut u64, now: u64, cost: u64) -> Decision {
        let base = (*tat).max(now);
        let new_tat = base.saturating_add(cost.saturating_mul(self.interval_ns));
        if new_tat - now > self.tolerance_ns {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: Duration::from_nanos(base - now),
                retry_after: Duration::from_nanos(new_tat - self.tolerance_ns - now),
            };
        }
        *tat = new_tat;
        Decision {
            allowed: true,
            remaining: (self.tolerance_ns - (new_tat - now)) / self.interval_ns,
            reset: Duration::from_nanos(new_tat - now),
            retry_after: Duration::ZERO,
        }
    }

    /// Whether a key may start at all: it has not run past its tolerance. Used by
    /// budgets that are charged after the fact (LLM tokens).
    pub fn peek(&self, tat: u64, now: u64) -> Decision {
        let ahead = tat.saturating_sub(now);
        if ahead >= self.tolerance_ns {
            return Decision {
                allowed: false,
                remaining: 0,
                reset: Duration::from_nanos(ahead),
                retry_after: Duration::from_nanos(ahead - self.tolerance_ns + self.interval_ns),
            };
        }
        Decision {
            allowed: true,
            remaining: (self.tolerance_ns - ahead) / self.interval_ns,
            reset: Duration::from_nanos(ahead),
            retry_after: Duration::ZERO,
        }
    }
}

const SHARDS: usize = 16;
/// Keys kept per shard; 16 shards hold a million keys at about 24 MiB.
const MAX_PER_SHARD: usize = 1 << 16;

/// Per-key TATs in memory, bounded. A key whose TAT has passed is indistinguishable
/// from a key never seen, so those are dropped first when a shard fills up; only under
/// a flood of live keys are live ones dropped (each then gets a fresh bucket: a bounded
/// error in the flood's favour, never unbounded memory).
pub struct LocalTable {
    shards: Vec<Mutex<HashMap<u64, u64>>>,
    hasher: RandomState,
    epoch: Instant,
}

impl Default for LocalTable {
    fn default() -> Self {
        LocalTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }
}

impl LocalTable {
    /// Nanoseconds since the table was made.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// A keyed (unguessable) hash of `key`: clients cannot aim collisions.
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn with_tat<R>(&self, key: u64, now: u64, f: impl FnOnce(&mut u64) -> R) -> R {
        let mut shard = self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if shard.len() >= MAX_PER_SHARD && !shard.contains_key(&key) {
            shard.retain(|_, tat| *tat > now);
            if shard.len() >= MAX_PER_SHARD {
                // A flood of live keys: forget an arbitrary half rather than grow.
                let mut n = 0;
                shard.retain(|_, _| {
                    n += 1;
                    n % 2 == 0
                });
            }
        }
        f(shard.entry(key).or_insert(0))
    }

    pub fn spend(&self, gcra: &Gcra, key: u64, cost: u64) -> Decision {
        let now = self.now();
        self.with_tat(key, now, |tat| gcra.spend(tat, now, cost))
    }

    pub fn peek(&self, gcra: &Gcra, key: u64) -> Decision {
        let now = self.now();
        self.with_tat(key, now, |tat| gcra.peek(*tat, now))
    }

    /// Charges `cost` even past the limit (a debt), for costs known only afterwards.
    pub fn charge(&self, gcra: &Gcra, key: u64, cost: u64) {
        let now = self.now();
        self.with_tat(key, now, |tat| {
            *tat = (*tat)
                .max(now)
                .saturating_add(cost.saturating_mul(gcra.interval_ns))
        });
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The same algorithm in Redis, atomically, on Redis's clock so that replicas with
/// skewed clocks still agree. KEYS[1]: the key. ARGV: interval µs, tolerance µs, cost,
/// mode (0 spend, 1 peek, 2 charge). Returns {allowed, remaining, reset µs, retry µs}.
pub const REDIS_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if mode == 1 then
  local ahead = tat - now
  if ahead >= tolerance then return {0, 0, ahead, ahead - tolerance + interval} end
  return {1, math.floor((tolerance - ahead) / interval), ahead, 0}
end
local new_tat = tat + cost * interval
if mode == 0 and new_tat - now > tolerance then
  return {0, 0, tat - now, new_tat - tolerance - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
local left = tolerance - (new_tat - now)
if left < 0 then left = 0 end
return {1, math.floor(left / interval), new_tat - now, 0}
";

/// What the Redis script does with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// Spend `cost` if it fits.
    Spend = 0,
    /// Only tell whether the key may start.
    Peek = 1,
    /// Spend `cost` even past the limit (a debt).
    Charge = 2,
}

/// GCRA state kept in Redis under `gw:<kind>:<plugin name>:<hash of the key>`.
pub struct RedisGcra {
    handle: std::sync::Arc<crate::redis_store::RedisHandle>,
    script: std::sync::Arc<redis::Script>,
    prefix: String,
}

impl RedisGcra {
    /// `kind` names the plugin type in the keys (`rl`, `llm`).
    pub fn new(env: &crate::BuildEnv, kind: &str) -> Result<Self, String> {
        let handle = env
            .redis
            .clone()
            .ok_or("`backend: redis` needs the top-level `redis:` block")?;
        Ok(RedisGcra {
            handle,
            script: std::sync::Arc::new(redis::Script::new(REDIS_SCRIPT)),
            prefix: format!("gw:{kind}:{}:", env.name),
        })
    }

    /// The Redis key for a bucket: fixed length whatever the key bytes are.
    pub fn key(&self, bytes: &[u8]) -> String {
        use sha2::Digest;
        format!(
            "{}{}",
            self.prefix,
            hex::encode(&sha2::Sha256::digest(bytes)[..16])
        )
    }

    /// Runs the script for `key`; an error means Redis could not decide.
    pub async fn call(
        &self,
        key: &str,
        gcra: &Gcra,
        cost: u64,
        mode: RedisMode,
    ) -> Result<Decision, String> {
        let args = [
            (gcra.interval_ns() / 1000).max(1) as i64,
            (gcra.tolerance_ns() / 1000) as i64,
            cost as i64,
            mode as i64,
        ];
        let reply = self
            .handle
            .run::<Vec<i64>>(&self.script, &[key], &args)
            .await?;
        decision_from_redis(&reply).ok_or_else(|| "unexpected script reply".to_string())
    }

    /// A handle for work that outlives the request (charging after the response).
    pub fn detached(&self) -> RedisGcra {
        RedisGcra {
            handle: self.handle.clone(),
            script: self.script.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

/// Reads the script's reply.
pub fn decision_from_redis(reply: &[i64]) -> Option<Decision> {
    let [allowed, remaining, reset, retry] = reply else {
        return None;
    };
    let us = |v: i64| Duration::from_micros(v.max(0) as u64);
    Some(Decision {
        allowed: *allowed == 1,
        remaining: (*remaining).max(0) as u64,
        reset: us(*reset),
        retry_after: us(*retry),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let g = Gcra::new(10, Duration::from_secs(1), 5);
        let mut tat = 0;
        let now = 100 * SEC;
        for i in 0..5 {
            let d = g.spend(&mut tat, now, 1);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = g.spend(&mut tat, now, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(100));
        assert!(g.spend(&mut tat, now + SEC / 10, 1).allowed);
    }

    #[test]
    fn steady_overload_admits_rate_plus_burst() {
        let g = Gcra::new(20, Duration::from_secs(1), 40);
        let mut tat = 0;
        let mut admitted = 0;
        // 1000 attempts per second for 10 seconds.
        for ms in 0..10_000u64 {
            if g.spend(&mut tat, 50 * SEC + ms * 1_000_000, 1).allowed {
                admitted += 1;
            }
        }
        let expected = 20 * 10 + 40;
        assert!(
            (admitted as f64 - expected as f64).abs() <= expected as f64 * 0.05,
            "{admitted}"
        );
    }

    #[test]
    fn peek_and_charge_for_after_the_fact_costs() {
        let g = Gcra::new(1000, Duration::from_secs(60), 1000);
        let t = LocalTable::default();
        let k = t.hash(b"alice");
        assert!(t.peek(&g, k).allowed);
        t.charge(&g, k, 1500);
        assert!(!t.peek(&g, k).allowed);
        let other = t.hash(b"bob");
        assert!(t.peek(&g, other).allowed);
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_keys() {
        let g = Gcra::new(1, Duration::from_secs(3600), 1);
        let t = LocalTable::default();
        for i in 0..(SHARDS * MAX_PER_SHARD * 2) as u64 {
            t.spend(&g, t.hash(&i.to_le_bytes()), 1);
        }
        assert!(t.len() <= SHARDS * MAX_PER_SHARD);
    }

    #[test]
    fn redis_replies_decode() {
        let d = decision_from_redis(&[0, 0, 1_000_000, 250_000]).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_millis(250));
        assert!(decision_from_redis(&[1, 2]).is_none());
    }
}
