//! Stopping: a graceful stop ends as soon as nothing is left to finish.
//!
//! Pingora's own stop sleeps through the whole `grace_period_seconds` once the
//! listeners close, however little is in flight (an idle gateway with the default
//! waits five minutes), and hears no further signal while it sleeps. Here the
//! listening services are wrapped in [`Drained`], so they learn of a stop from
//! gatewarden instead of from Pingora, and [`StopSignals`] runs the stop:
//!
//! - SIGTERM closes the listeners (idle keep-alive connections close with them), then
//!   waits until no client connection and no request is left, for at most the grace
//!   period, and only then hands over to Pingora, whose own grace period is zero.
//! - SIGQUIT first hands the listening sockets to the process started with
//!   `run --upgrade`, as Pingora does, then stops as SIGTERM does.
//! - SIGINT, or a second SIGTERM, SIGINT or SIGQUIT during a stop, stops at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ListenFds, RuntimeOpts, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::Service;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::observe::metrics;

/// How long the old process of an upgrade keeps accepting after it handed its sockets
/// over, so the new one has them ready before the old one stops: Pingora's wait.
const UPGRADE_HANDOVER: Duration = Duration::from_secs(5);

/// How often a stop looks whether anything is left.
const POLL: Duration = Duration::from_millis(25);

/// How long nothing must be left before the stop ends. A connection accepted just
/// before the listeners closed has a task that has not run yet, and is counted only
/// once it runs; this covers that hop. (A TLS connection is counted once its handshake
/// is done: Pingora has no hook that sees both ends of a handshake, failed ones
/// included.)
const QUIET: Duration = Duration::from_millis(100);

/// Client connections being served, from the proxy listeners.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Counts one client connection for as long as it is held.
#[derive(Debug)]
pub struct OpenConnection(());

impl OpenConnection {
    pub fn enter() -> Self {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::AcqRel);
        OpenConnection(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the listening services and the signal watch share.
pub struct Stopper {
    stop: watch::Sender<bool>,
    /// The listening sockets, as Pingora hands them to each service: what an upgrade
    /// sends to the new process.
    fds: Mutex<Option<ListenFds>>,
    /// Listening services whose accept loops still run.
    listening: AtomicUsize,
}

impl Stopper {
    pub fn new() -> Arc<Self> {
        Arc::new(Stopper {
            stop: watch::Sender::new(false),
            fds: Mutex::new(None),
            listening: AtomicUsize::new(0),
        })
    }

    /// Wraps a listening service so that it stops when this stopper says so.
    pub fn wrap<S>(self: &Arc<Self>, inner: S) -> Drained<S> {
        Drained {
            inner,
            stopper: self.clone(),
        }
    }

    /// Closes the listeners and tells every connection the server is stopping.
    fn begin(&self) {
        self.stop.send_replace(true);
    }

    /// True once the listeners are closed and no connection or request is left.
    fn drained(&self) -> bool {
        self.listening.load(Ordering::Acquire) == 0
            && OPEN_CONNECTIONS.load(Ordering::Acquire) == 0
            && metrics().inflight.get() <= 0
    }

    /// Returns once [`Stopper::drained`] has held for [`QUIET`].
    async fn until_drained(&self) {
        let mut quiet_since = None;
        loop {
            if self.drained() {
                let since = *quiet_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= QUIET {
                    return;
                }
            } else {
                quiet_since = None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn listen_fds(&self) -> Option<ListenFds> {
        self.fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A listening service that stops accepting when its [`Stopper`] says so, not when
/// Pingora's shutdown begins (by then the stop is over).
pub struct Drained<S> {
    inner: S,
    stopper: Arc<Stopper>,
}

#[async_trait]
impl<S: Service> Service for Drained<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(fds) = &fds {
            *self
                .stopper
                .fds
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(fds.clone());
        }
        self.stopper.listening.fetch_add(1, Ordering::AcqRel);
        let stop = self.stopper.stop.subscribe();
        self.inner.start_service(fds, stop, listeners_per_fd).await;
        self.stopper.listening.fetch_sub(1, Ordering::AcqRel);
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(&self, global: &RuntimeOpts) -> Option<RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// Pingora's signal watch, replaced: see the module documentation.
pub struct StopSignals {
    pub stopper: Arc<Stopper>,
    /// How long in-flight requests may take to finish.
    pub grace: Duration,
    /// Where a graceful upgrade sends the listening sockets.
    pub upgrade_sock: String,
}

/// The signals a stop hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    Term,
    Int,
    Quit,
}

impl std::fmt::Display for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sig::Term => "SIGTERM",
            Sig::Int => "SIGINT",
            Sig::Quit => "SIGQUIT",
        })
    }
}

/// SIGTERM, SIGINT and SIGQUIT, each heard as often as it comes.
struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
    quit: Option<Signal>,
}

impl Signals {
    fn listen() -> Self {
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for {name}: {e}");
                None
            }
        };
        Signals {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            int: listen(SignalKind::interrupt(), "SIGINT"),
            quit: listen(SignalKind::quit(), "SIGQUIT"),
        }
    }

    /// The next of the three signals to arrive.
    async fn next(&mut self) -> Sig {
        async fn one(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => Sig::Term,
            () = one(&mut self.int) => Sig::Int,
            () = one(&mut self.quit) => Sig::Quit,
        }
    }
}

fn in_flight() -> String {
    format!(
        "{} client connections, {} requests",
        OPEN_CONNECTIONS.load(Ordering::Acquire),
        metrics().inflight.get().max(0)
    )
}

#[async_trait]
impl ShutdownSignalWatch for StopSignals {
    async fn recv(&self) -> ShutdownSignal {
        let mut signals = Signals::listen();
        match signals.next().await {
            Sig::Term => log::info!(
                "SIGTERM: stopping; in flight: {}, given up to {}s",
                in_flight(),
                self.grace.as_secs()
            ),
            Sig::Quit => {
                log::info!("SIGQUIT: handing the listening sockets to the new process");
                self.hand_over();
                tokio::select! {
                    () = tokio::time::sleep(UPGRADE_HANDOVER) => {}
                    signal = signals.next() => {
                        log::warn!("{signal} during a graceful upgrade: stopping now");
                        return ShutdownSignal::FastShutdown;
                    }
                }
                log::info!(
                    "upgrade: stopping; in flight: {}, given up to {}s",
                    in_flight(),
                    self.grace.as_secs()
                );
            }
            Sig::Int => {
                log::info!("SIGINT: stopping now");
                return ShutdownSignal::FastShutdown;
            }
        }
        self.stopper.begin();
        tokio::select! {
            () = self.stopper.until_drained() => {
                log::info!("nothing left in flight; stopping");
            }
            () = tokio::time::sleep(self.grace) => {
                log::warn!(
                    "grace period of {}s over; stopping with {} still open",
                    self.grace.as_secs(),
                    in_flight()
                );
            }
            signal = signals.next() => {
                log::warn!("{signal} during a graceful stop: stopping now, with {} open", in_flight());
                return ShutdownSignal::FastShutdown;
            }
        }
        // Pingora's grace period is zero: what follows is its runtime shutdown, bounded
        // by `graceful_shutdown_timeout_seconds`.
        ShutdownSignal::GracefulTerminate
    }
}

impl StopSignals {
    /// Sends the listening sockets to the new process, as Pingora's upgrade does.
    fn hand_over(&self) {
        let Some(fds) = self.stopper.listen_fds() else {
            log::info!("no listening sockets to hand over");
            return;
        };
        let fds = fds.lock();
        if fds.is_empty() {
            log::info!("no listening sockets to hand over");
            return;
        }
        match fds.send_to_sock(self.upgrade_sock.as_str()) {
            Ok(_) => log::info!("listening sockets sent to {}", self.upgrade_sock),
            Err(e) => log::error!(
                "cannot send the listening sockets to {}: {e}",
                self.upgrade_sock
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_waits_for_open_connections_and_a_quiet_moment() {
        let stopper = Stopper::new();
        let conn = OpenConnection::enter();
        let waited = tokio::spawn({
            let stopper = stopper.clone();
            async move { stopper.until_drained().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waited.is_finished(), "a connection is still open");
        drop(conn);
        tokio::time::sleep(QUIET + POLL * 2).await;
        assert!(waited.is_finished());
    }
}
