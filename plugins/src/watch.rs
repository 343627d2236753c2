//! Following a file a plugin reads (a users file, a keys file): checked once a second,
//! applied once it stands still, and a file that cannot be used is logged while the
//! previous contents stay in force.

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, SystemTime};

/// How often the file is looked at.
const INTERVAL: Duration = Duration::from_secs(1);
/// How long a changed file must stand still before it is read. A script or editor that
/// rewrites a file in place (truncate, then write) leaves it empty or half-written for
/// a moment; applying that would drop what the file holds until the next check.
const SETTLE: Duration = Duration::from_millis(100);

/// What a change is judged by: modification time and length.
pub fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A file followed for its owner: how a change is taken in, and an optional chore
/// done on the same thread while the owner lives.
pub struct Follow<T> {
    /// Names the file in logs ("keys file", "users file").
    pub what: &'static str,
    pub path: PathBuf,
    /// Reads the changed file and applies it; `Ok` says what was loaded (for the log,
    /// may be empty), `Err` why the file cannot be used.
    pub apply: fn(&T, &Path) -> Result<String, String>,
    /// Done about every so often (rounded up to the check interval).
    pub chore: Option<Chore<T>>,
}

/// A chore and how often it is done.
pub type Chore<T> = (Duration, fn(&T));

impl<T: Send + Sync + 'static> Follow<T> {
    /// Follows the file on a thread of its own that ends when `owner` is dropped.
    pub fn spawn(self, owner: Weak<T>) {
        let Follow {
            what,
            path,
            apply,
            chore,
        } = self;
        let spawned = std::thread::Builder::new()
            .name("gw-file-watch".into())
            .spawn(move || {
                let mut seen = stamp(&path);
                let mut since_chore = Duration::ZERO;
                loop {
                    std::thread::sleep(INTERVAL);
                    let Some(owner) = owner.upgrade() else { return };
                    let now = stamp(&path);
                    if now != seen {
                        std::thread::sleep(SETTLE);
                        // Changed again meanwhile: still being written; look at the
                        // next check.
                        if stamp(&path) == now {
                            seen = now;
                            match apply(&owner, &path) {
                                Ok(loaded) => {
                                    log::info!("{what} {} reloaded{loaded}", path.display())
                                }
                                Err(e) => log::error!(
                                    "{what} {} changed but cannot be used, keeping the previous one: {e}",
                                    path.display()
                                ),
                            }
                        }
                    }
                    if let Some((every, chore)) = chore {
                        since_chore += INTERVAL;
                        if since_chore >= every {
                            since_chore = Duration::ZERO;
                            chore(&owner);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot watch the {what}; changes need a reload: {e}");
        }
    }
}
