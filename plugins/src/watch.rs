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

/// Calls `apply(owner, text)` with the file's new contents after each change, on a
/// thread of its own that ends when `owner` is dropped. `what` names the file in logs.
pub fn follow<T: Send + Sync + 'static>(
    what: &'static str,
    path: PathBuf,
    owner: Weak<T>,
    apply: fn(&T, &str) -> Result<(), String>,
) {
    let spawned = std::thread::Builder::new()
        .name("gw-file-watch".into())
        .spawn(move || {
            let mut seen = stamp(&path);
            loop {
                std::thread::sleep(INTERVAL);
                let Some(owner) = owner.upgrade() else { return };
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                std::thread::sleep(SETTLE);
                // Changed again meanwhile: still being written; look at the next check.
                if stamp(&path) != now {
                    continue;
                }
                seen = now;
                let outcome = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read it: {e}"))
                    .and_then(|text| apply(&owner, &text));
                match outcome {
                    Ok(()) => log::info!("{what} {} reloaded", path.display()),
                    Err(e) => log::error!(
                        "{what} {} changed but cannot be used, keeping the previous one: {e}",
                        path.display()
                    ),
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot watch the {what}; changes need a reload: {e}");
    }
}
