//! JSON lines written by a background thread: the request path only queues a line and
//! never waits on a disk. A full queue drops the line and counts it. Files are reopened
//! on request (SIGHUP or SIGUSR1), so log rotation needs no restart.
//!
//! A writer is made in two steps: [`LineWriter::new`] checks the target when a config
//! is built (its directory must exist) and touches nothing, so `check` creates no
//! file; [`LineWriter::start`] opens the file and starts the thread once the config is
//! about to serve (after a daemon has forked).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static REOPEN: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Asks every writer to reopen its file (after rotation).
pub fn request_reopen() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

/// Lines dropped because a writer's queue was full, for `gatewarden_log_lines_dropped_total`.
pub fn dropped_count() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// A writer's target and the receiving end of its queue, until it starts.
type NotStarted = Option<(Target, Receiver<String>)>;

/// The sending side; cheap to clone. The thread ends when every sender is dropped.
#[derive(Clone)]
pub struct LineWriter {
    tx: SyncSender<String>,
    /// The target and the queue's receiving end until the writer starts.
    waiting: Arc<Mutex<NotStarted>>,
}

impl std::fmt::Debug for LineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineWriter")
    }
}

fn open(target: &Target) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        Target::Stdout => Box::new(std::io::stdout()),
        Target::File(path) => {
            let mut options = OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o640);
            }
            let file: File = options.open(path)?;
            Box::new(file)
        }
    })
}

impl LineWriter {
    /// A writer for `target`, not started: the file's directory must exist. Lines
    /// written before [`LineWriter::start`] wait in the queue.
    pub fn new(target: Target, queue: usize) -> Result<LineWriter, String> {
        if let Target::File(path) = &target {
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(format!(
                    "cannot write {}: {} is not a directory",
                    path.display(),
                    dir.display()
                ));
            }
        }
        let (tx, rx) = sync_channel::<String>(queue.max(1));
        Ok(LineWriter {
            tx,
            waiting: Arc::new(Mutex::new(Some((target, rx)))),
        })
    }

    /// Opens the file and starts the writing thread; does nothing once started.
    pub fn start(&self) -> Result<(), String> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let Some((target, _)) = waiting.as_ref() else {
            return Ok(());
        };
        let first = open(target).map_err(|e| format!("cannot open {target:?}: {e}"))?;
        let Some((target, rx)) = waiting.take() else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("gw-log-writer".into())
            .spawn(move || write_loop(target, first, rx))
            .map_err(|e| format!("cannot start the log writer: {e}"))?;
        Ok(())
    }

    /// Queues one line (without its newline); drops it when the queue is full.
    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn write_loop(target: Target, first: Box<dyn Write + Send>, rx: Receiver<String>) {
    let mut out = BufWriter::new(first);
    let mut seen = REOPEN.load(Ordering::Relaxed);
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => Some(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        };
        if let Some(line) = line {
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
            // Write whatever else is queued before flushing once.
            while let Ok(more) = rx.try_recv() {
                let _ = out.write_all(more.as_bytes());
                let _ = out.write_all(b"\n");
            }
        }
        if let Err(e) = out.flush() {
            log::warn!("cannot write to {target:?}: {e}");
        }
        let wanted = REOPEN.load(Ordering::Relaxed);
        if wanted != seen {
            seen = wanted;
            match open(&target) {
                Ok(f) => out = BufWriter::new(f),
                Err(e) => {
                    log::error!("cannot reopen {target:?}, still writing to the old file: {e}")
                }
            }
        }
    }
}

/// Escapes nothing itself: lines are built with serde_json, which escapes control
/// characters; this only documents the contract for callers.
pub fn json_line(value: &serde_json::Value) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_and_reopen_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let w = LineWriter::new(Target::File(path.clone()), 16).unwrap();
        w.write("one".into());
        assert!(!path.exists(), "made before it was started");
        w.start().unwrap();
        w.start().unwrap();
        let wait = |p: &std::path::Path, text: &str| {
            for _ in 0..100 {
                if std::fs::read_to_string(p).is_ok_and(|t| t.contains(text)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("{text} never reached {}", p.display());
        };
        wait(&path, "one\n");
        std::fs::rename(&path, dir.path().join("a.log.1")).unwrap();
        request_reopen();
        std::thread::sleep(Duration::from_millis(400));
        w.write("two".into());
        wait(&path, "two\n");
        assert!(!std::fs::read_to_string(&path).unwrap().contains("one"));
    }

    #[test]
    fn a_bad_path_is_an_error() {
        assert!(LineWriter::new(Target::File("/nonexistent/dir/x.log".into()), 1).is_err());
        let dir = tempfile::tempdir().unwrap();
        let unwritable = LineWriter::new(Target::File(dir.path().to_path_buf()), 1).unwrap();
        assert!(unwritable.start().is_err(), "a directory is no log file");
    }
}
