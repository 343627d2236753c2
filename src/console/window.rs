//! Per-route request statistics over the last few minutes, for the console: a ring of
//! ten-second buckets, each counting requests, 4xx and 5xx answers and a fixed latency
//! histogram. Recording is a handful of relaxed atomic adds; a lock is taken only by
//! the first request of a new bucket, to clear it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Width of one bucket.
pub const BUCKET_SECS: u64 = 10;
/// Buckets kept: the window is `BUCKETS * BUCKET_SECS` seconds (five minutes).
const BUCKETS: usize = 30;
/// Upper bounds of the latency histogram, in milliseconds; one more bucket counts
/// everything slower than the last.
pub const LATENCY_BOUNDS_MS: [u64; 15] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];
const LATENCY_SLOTS: usize = LATENCY_BOUNDS_MS.len() + 1;

struct Bucket {
    /// Which ten seconds (counted from process start, plus one) the counts are for;
    /// 0 for a bucket never used.
    epoch: AtomicU64,
    requests: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    latency: [AtomicU64; LATENCY_SLOTS],
    /// Held while the bucket is cleared for a new epoch.
    roll: Mutex<()>,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            epoch: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            client_errors: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            roll: Mutex::new(()),
        }
    }

    /// Makes this bucket count for `epoch`, clearing what an older epoch left.
    fn enter(&self, epoch: u64) {
        if self.epoch.load(Ordering::Acquire) == epoch {
            return;
        }
        let _rolling = self.roll.lock().unwrap_or_else(|p| p.into_inner());
        if self.epoch.load(Ordering::Acquire) == epoch {
            return;
        }
        for counter in [&self.requests, &self.client_errors, &self.server_errors]
            .into_iter()
            .chain(&self.latency)
        {
            counter.store(0, Ordering::Relaxed);
        }
        // Published after the clearing: a recorder that sees the new epoch adds to
        // counters that are already zeroed.
        self.epoch.store(epoch, Ordering::Release);
    }
}

/// One route's recent requests.
pub struct RouteWindow {
    buckets: Box<[Bucket]>,
}

/// What a window holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Seconds the counts span (less than the window while the process is young).
    pub seconds: u64,
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    /// Upper bounds of the buckets holding the median and the 99th percentile, in
    /// milliseconds; `None` with no requests, `Some(None)` when slower than the last
    /// bound.
    pub p50_ms: Option<Option<u64>>,
    pub p99_ms: Option<Option<u64>>,
}

impl Summary {
    pub fn to_json(&self) -> serde_json::Value {
        let per_second = if self.seconds == 0 {
            0.0
        } else {
            self.requests as f64 / self.seconds as f64
        };
        let rate = |n: u64| {
            if self.requests == 0 {
                0.0
            } else {
                n as f64 / self.requests as f64
            }
        };
        serde_json::json!({
            "seconds": self.seconds,
            "requests": self.requests,
            "per_second": per_second,
            "client_errors": self.client_errors,
            "server_errors": self.server_errors,
            "client_error_rate": rate(self.client_errors),
            "server_error_rate": rate(self.server_errors),
            "p50_ms": self.p50_ms.flatten(),
            "p99_ms": self.p99_ms.flatten(),
            "p50_over_max": self.p50_ms.is_some_and(|p| p.is_none()),
            "p99_over_max": self.p99_ms.is_some_and(|p| p.is_none()),
        })
    }
}

static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Seconds since the process started counting.
fn now_secs() -> u64 {
    STARTED.elapsed().as_secs()
}

impl Default for RouteWindow {
    fn default() -> Self {
        RouteWindow {
            buckets: (0..BUCKETS).map(|_| Bucket::new()).collect(),
        }
    }
}

impl RouteWindow {
    /// Counts one answered request.
    pub fn record(&self, status: u16, latency: Duration) {
        self.record_at(now_secs(), status, latency);
    }

    fn record_at(&self, secs: u64, status: u16, latency: Duration) {
        let epoch = secs / BUCKET_SECS + 1;
        let bucket = &self.buckets[(epoch % BUCKETS as u64) as usize];
        bucket.enter(epoch);
        bucket.requests.fetch_add(1, Ordering::Relaxed);
        match status {
            400..=499 => bucket.client_errors.fetch_add(1, Ordering::Relaxed),
            500..=599 => bucket.server_errors.fetch_add(1, Ordering::Relaxed),
            // Status 0 (no answer went out, mostly a client that left) is no error of
            // either side's that a status could name: counted as a request only.
            _ => 0,
        };
        let ms = latency.as_millis();
        let slot = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms <= u128::from(*bound))
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        bucket.latency[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts of the last five minutes.
    pub fn summary(&self) -> Summary {
        self.summary_at(now_secs())
    }

    fn summary_at(&self, secs: u64) -> Summary {
        let epoch = secs / BUCKET_SECS + 1;
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1).max(1);
        let mut summary = Summary {
            // The current bucket counts only the seconds gone by in it.
            seconds: ((BUCKETS as u64 - 1) * BUCKET_SECS + secs % BUCKET_SECS + 1).min(secs + 1),
            requests: 0,
            client_errors: 0,
            server_errors: 0,
            p50_ms: None,
            p99_ms: None,
        };
        let mut latency = [0u64; LATENCY_SLOTS];
        for bucket in self.buckets.iter() {
            let at = bucket.epoch.load(Ordering::Acquire);
            if at < oldest || at > epoch {
                continue;
            }
            summary.requests += bucket.requests.load(Ordering::Relaxed);
            summary.client_errors += bucket.client_errors.load(Ordering::Relaxed);
            summary.server_errors += bucket.server_errors.load(Ordering::Relaxed);
            for (sum, counter) in latency.iter_mut().zip(&bucket.latency) {
                *sum += counter.load(Ordering::Relaxed);
            }
        }
        summary.p50_ms = percentile(&latency, 50);
        summary.p99_ms = percentile(&latency, 99);
        summary
    }
}

/// The upper bound of the histogram bucket holding the `pct`th percentile.
fn percentile(latency: &[u64; LATENCY_SLOTS], pct: u64) -> Option<Option<u64>> {
    let total: u64 = latency.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the percentile, counted from 1 and rounded up.
    let rank = (total * pct).div_ceil(100).max(1);
    let mut seen = 0;
    for (slot, count) in latency.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(LATENCY_BOUNDS_MS.get(slot).copied());
        }
    }
    Some(None)
}

static WINDOWS: LazyLock<Mutex<HashMap<String, Arc<RouteWindow>>>> =
    LazyLock::new(Default::default);

/// The window of the route named `route`: the same one across reloads, so a reload
/// does not empty the console's figures. A route removed from the config keeps its
/// (small) window, as its Prometheus series stay too.
pub fn for_route(route: &str) -> Arc<RouteWindow> {
    // The clock starts with the first config, not on the first request's path.
    LazyLock::force(&STARTED);
    let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
    windows.entry(route.to_string()).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn counts_requests_errors_and_latency_percentiles() {
        let w = RouteWindow::default();
        for i in 0..98 {
            w.record_at(100 + i % 7, 200, MS * 3);
        }
        w.record_at(105, 404, MS * 40);
        w.record_at(106, 502, MS * 2_000);
        w.record_at(106, 0, MS);
        let s = w.summary_at(106);
        assert_eq!(s.requests, 101);
        assert_eq!(s.client_errors, 1);
        assert_eq!(s.server_errors, 1);
        // 99 of 101 took at most 5 ms; the 100th fastest took 40 ms.
        assert_eq!(s.p50_ms, Some(Some(5)));
        assert_eq!(s.p99_ms, Some(Some(50)));
        let json = s.to_json();
        assert_eq!(json["server_error_rate"], 1.0 / 101.0);
        assert_eq!(json["p99_ms"], 50);
    }

    #[test]
    fn an_empty_window_has_no_percentiles_and_no_rate() {
        let w = RouteWindow::default();
        let s = w.summary_at(1_000);
        assert_eq!((s.requests, s.p50_ms, s.p99_ms), (0, None, None));
        assert_eq!(s.to_json()["per_second"], 0.0);
        assert_eq!(s.to_json()["p50_ms"], serde_json::Value::Null);
    }

    #[test]
    fn latency_beyond_the_last_bound_is_reported_as_over() {
        let w = RouteWindow::default();
        w.record_at(0, 200, Duration::from_secs(120));
        let s = w.summary_at(0);
        assert_eq!(s.p50_ms, Some(None));
        assert_eq!(s.to_json()["p50_over_max"], true);
        // A young process: the rate is over the seconds it has run, not five minutes.
        assert_eq!(s.seconds, 1);
    }

    #[test]
    fn old_buckets_leave_the_window_and_are_reused_cleared() {
        let w = RouteWindow::default();
        w.record_at(5, 500, MS);
        w.record_at(295, 200, MS);
        // At 299 s the first bucket (0-9 s) is still inside the five minutes.
        assert_eq!(w.summary_at(299).requests, 2);
        // At 300 s it is not: its slot is the current bucket's.
        let s = w.summary_at(300);
        assert_eq!((s.requests, s.server_errors), (1, 0));
        // 29 whole buckets and the first second of the current one.
        assert_eq!(s.seconds, 291);
        // Recording into the reused slot starts from zero, not from the old counts.
        w.record_at(301, 200, MS);
        let s = w.summary_at(301);
        assert_eq!((s.requests, s.server_errors), (2, 0));
        // Long idle: nothing left.
        assert_eq!(w.summary_at(10_000).requests, 0);
    }

    #[test]
    fn concurrent_recording_loses_nothing_within_a_bucket() {
        let w = Arc::new(RouteWindow::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        w.record_at(42, 503, MS);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = w.summary_at(45);
        assert_eq!((s.requests, s.server_errors), (40_000, 40_000));
    }

    #[test]
    fn a_route_keeps_its_window_across_lookups() {
        let a = for_route("window-test-route");
        a.record(200, MS);
        assert!(Arc::ptr_eq(&a, &for_route("window-test-route")));
        assert!(!Arc::ptr_eq(&a, &for_route("window-test-other")));
    }
}
