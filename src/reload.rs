//! The current configuration, swapped atomically on reload. Each request pins the
//! snapshot it started with, so in-flight requests finish on the config they began on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{self, Snapshot};
use crate::observe::metrics;

/// Shared by the proxy services, the admin listener and the background services.
pub struct State {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
    /// Held while a config is read and built: one build at a time, each with a
    /// generation of its own, each starting from the snapshot the last one left.
    building: Mutex<()>,
    /// The file the snapshot came from; `None` for built-in configs (demo, protect).
    pub config_path: Option<PathBuf>,
}

impl State {
    pub fn new(snapshot: Snapshot, config_path: Option<PathBuf>) -> Self {
        State {
            generation: AtomicU64::new(snapshot.generation),
            building: Mutex::new(()),
            current: ArcSwap::from_pointee(snapshot),
            config_path,
        }
    }

    /// The snapshot in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Re-reads the config file and swaps it in if it compiles. On error the old config
    /// stays in force and every problem is returned. Listener and `server:` changes need
    /// a restart or graceful upgrade; they are reported as warnings.
    pub fn reload(&self) -> Result<u64, String> {
        self.load()
    }

    /// [`State::reload`] from async code: the build (file reads, plugin set-up) runs on
    /// a blocking thread, never on the proxy's workers.
    pub async fn reload_off_thread(self: &Arc<Self>) -> Result<u64, String> {
        let state = self.clone();
        tokio::task::spawn_blocking(move || state.reload())
            .await
            .unwrap_or_else(|e| Err(format!("the reload did not finish: {e}")))
    }

    fn load(&self) -> Result<u64, String> {
        let Some(path) = &self.config_path else {
            return Err("this gateway runs a built-in config; there is no file to reload".into());
        };
        // A reload that panicked left nothing half-done: the snapshot swaps whole.
        let _building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let current = self.current();
        match config::load_with(path, generation, Some(&current)) {
            Ok(compiled) => {
                for w in &compiled.warnings {
                    log::warn!("{w}");
                }
                // Started before it serves; instances kept from the current config
                // are running already and start nothing again.
                if let Err(problems) = compiled.snapshot.start() {
                    metrics().config_reloads.with_label_values(&["error"]).inc();
                    let text = problems.join("; ");
                    log::error!(
                        "config reload failed, keeping generation {}: {text}",
                        generation - 1
                    );
                    return Err(text);
                }
                self.current.store(Arc::new(compiled.snapshot));
                self.generation.store(generation, Ordering::Release);
                metrics().config_reloads.with_label_values(&["ok"]).inc();
                log::info!(
                    "config reloaded from {} (generation {generation})",
                    path.display()
                );
                Ok(generation)
            }
            Err(errors) => {
                metrics().config_reloads.with_label_values(&["error"]).inc();
                let text = errors.to_string();
                log::error!(
                    "config reload failed, keeping generation {}: {text}",
                    generation - 1
                );
                Err(text)
            }
        }
    }
}

/// Reloads on SIGHUP, and reopens log files on SIGHUP and SIGUSR1.
pub struct SighupReloader {
    pub state: Arc<State>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for SighupReloader {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut hup, mut usr1) = match (
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) {
            (Ok(h), Ok(u)) => (h, u),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("cannot listen for SIGHUP/SIGUSR1, reload and log reopening by signal are off: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    gatewarden_plugins::line_writer::request_reopen();
                    let _ = self.state.reload_off_thread().await;
                }
                _ = usr1.recv() => gatewarden_plugins::line_writer::request_reopen(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Starts the config's plugins (log writers, file watches, key fetches) once the
/// server runs in its daemon process: threads started before the fork would exist only
/// in the parent. The config itself, built before, is used as it is.
pub struct AfterDaemonize {
    pub state: Arc<State>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for AfterDaemonize {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        let snapshot = self.state.current();
        let started = tokio::task::spawn_blocking(move || snapshot.start()).await;
        let problems = match started {
            Ok(Ok(())) => return,
            Ok(Err(problems)) => problems.join("; "),
            Err(e) => e.to_string(),
        };
        log::error!("cannot start the config in the daemon, stopping: {problems}");
        std::process::exit(2);
    }
}
