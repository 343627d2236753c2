//! Keys that change while the gateway runs (a JWKS, a key file): the shared store, and
//! the thread that refreshes it on schedule and on request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, Validation};

use super::*;

/// Where keys come from after the plugin is built.
pub(super) enum Origin {
    Jwks { url: String, agent: ureq::Agent },
    File { path: PathBuf },
}

/// Keys that change at run time (JWKS, key file), shared with the refresher thread.
pub(super) struct Store {
    pub(super) origin: Origin,
    /// The configured algorithms.
    pub(super) algorithms: Vec<Algorithm>,
    /// Claims checks; each key gets a copy with its own algorithms.
    pub(super) base: Validation,
    pub(super) keys: ArcSwap<KeySet>,
    /// Counts finished fetches, so requests can wait for the one they asked for.
    pub(super) fetched: tokio::sync::watch::Sender<u64>,
    pub(super) in_flight: AtomicBool,
    /// When a request last asked for a refresh.
    pub(super) last_asked: Mutex<Option<Instant>>,
    pub(super) refresh_every: Duration,
    pub(super) cooldown: Duration,
    /// The key file's modification time and size when last read.
    pub(super) file_stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl Store {
    /// Fetches or re-reads the keys; on success they replace the current set. Returns
    /// whether it worked. Blocking, bounded by [`FETCH_TIMEOUT`].
    pub(super) fn refresh(&self) -> bool {
        self.in_flight.store(true, Ordering::Release);
        let loaded = match &self.origin {
            Origin::Jwks { url, agent } => fetch_jwks(agent, url, &self.algorithms, &self.base),
            Origin::File { path } => load_key_file(path, &self.algorithms, &self.base),
        };
        let ok = match loaded {
            Ok(set) => {
                let file = matches!(self.origin, Origin::File { .. });
                if file || self.keys.load().kids() != set.kids() {
                    log::info!(
                        "jwt: {} signing keys loaded from {} (kid: {})",
                        set.keys.len(),
                        self.origin_name(),
                        set.kids().join(", ")
                    );
                }
                self.keys.store(Arc::new(set));
                true
            }
            Err(e) => {
                let held = self.keys.load().keys.len();
                log::warn!(
                    "jwt: cannot load signing keys from {}: {e}; {}",
                    self.origin_name(),
                    if held == 0 {
                        "tokens are refused until a retry succeeds".to_string()
                    } else {
                        format!("keeping the {held} keys held")
                    }
                );
                false
            }
        };
        self.in_flight.store(false, Ordering::Release);
        self.fetched.send_modify(|n| *n = n.wrapping_add(1));
        ok
    }

    pub(super) fn origin_name(&self) -> String {
        match &self.origin {
            Origin::Jwks { url, .. } => url.clone(),
            Origin::File { path } => path.display().to_string(),
        }
    }

    /// How long the refresher sleeps before its next load, given failures in a row.
    pub(super) fn next_wait(&self, failures: u32) -> Duration {
        match &self.origin {
            Origin::File { .. } => FILE_POLL,
            Origin::Jwks { .. } if failures > 0 => FIRST_RETRY
                .saturating_mul(1 << (failures - 1).min(16))
                .min(self.refresh_every),
            Origin::Jwks { .. } if self.keys.load().keys.is_empty() => Duration::ZERO,
            Origin::Jwks { .. } => self.refresh_every,
        }
    }

    /// Re-reads the key file when its stamp changed.
    pub(super) fn reread_if_changed(&self) {
        let Origin::File { path } = &self.origin else {
            return;
        };
        let now = crate::watch::stamp(path);
        let mut stamp = self.file_stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now != *stamp {
            *stamp = now;
            drop(stamp);
            self.refresh();
        }
    }

    /// Claims the right to ask for a refresh now; false in the cooldown.
    pub(super) fn may_ask(&self) -> bool {
        let mut last = self.last_asked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.cooldown) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// The background thread of a [`Store`], started on first use so that it runs in the
/// process that serves (not in one that forks into a daemon afterwards).
pub(super) struct Refresher {
    pub(super) store: Arc<Store>,
    pub(super) wake: SyncSender<()>,
    pub(super) woken: Mutex<Option<Receiver<()>>>,
    pub(super) started: Once,
    /// The first load of a key set that has none yet.
    pub(super) loaded: Once,
}

impl Refresher {
    pub(super) fn new(store: Arc<Store>) -> Self {
        let (wake, woken) = mpsc::sync_channel(1);
        Refresher {
            store,
            wake,
            woken: Mutex::new(Some(woken)),
            started: Once::new(),
            loaded: Once::new(),
        }
    }

    /// Loads the keys once, if there are none yet (a JWKS not fetched), then starts the
    /// background refresh. A provider that is down must not stop the gateway: a failed
    /// fetch is logged, and the refresher retries.
    pub(super) fn start(&self) {
        self.loaded.call_once(|| {
            if self.store.keys.load().keys.is_empty() {
                self.store.refresh();
            }
        });
        self.ensure_started();
    }

    pub(super) fn ensure_started(&self) {
        self.started.call_once(|| {
            let woken = self.woken.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(woken) = woken {
                spawn_refresher(Arc::downgrade(&self.store), woken);
            }
        });
    }

    /// Asks for a refresh if the cooldown allows, and returns a receiver that sees the
    /// fetch finish; `None` when no fetch is coming.
    pub(super) fn ask(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let rx = self.store.fetched.subscribe();
        if self.store.in_flight.load(Ordering::Acquire) {
            return Some(rx);
        }
        if !self.store.may_ask() {
            return None;
        }
        match self.wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => Some(rx),
            Err(TrySendError::Disconnected(())) => None,
        }
    }
}

/// Loads keys on schedule and on request, until the plugin is dropped (its sender with
/// it, which ends the wait with `Disconnected`).
pub(super) fn spawn_refresher(store: Weak<Store>, woken: Receiver<()>) {
    let spawned = std::thread::Builder::new()
        .name("gw-jwt-keys".into())
        .spawn(move || {
            let mut failures = 0u32;
            loop {
                let wait = match store.upgrade() {
                    Some(s) => s.next_wait(failures),
                    None => return,
                };
                if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(wait) {
                    return;
                }
                let Some(s) = store.upgrade() else { return };
                match s.origin {
                    Origin::File { .. } => s.reread_if_changed(),
                    Origin::Jwks { .. } => {
                        failures = if s.refresh() {
                            0
                        } else {
                            failures.saturating_add(1)
                        };
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("jwt: cannot start the key refresher; keys stay as loaded at start: {e}");
    }
}

pub(super) enum Keys {
    /// `hs_secret`: never changes.
    Fixed(KeySet),
    /// JWKS or key file.
    Live(Refresher),
}
