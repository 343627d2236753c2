//! Checking a password or PIN against its stored hash, with bounded concurrency.
//!
//! One argon2id check (the `gatewarden hash-pin` parameters) takes about 19 MiB and
//! tens of milliseconds of CPU, and anyone who can reach a login form can ask for one.
//! Left to tokio's pool of 512 blocking threads, a burst of logins would run hundreds
//! at once and take the gateway's memory with it. Here checks run on at most
//! [`Pool::workers`] blocking threads, with a bounded queue in front; a check that finds
//! the queue full is answered [`Verdict::Busy`] at once, and the login is refused with
//! 503 instead of waiting without end. Every login plugin shares the one pool, so the
//! bound holds for the whole process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use tokio::sync::Semaphore;

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Mismatch,
    /// Too many checks running and waiting; nothing was checked.
    Busy,
}

/// Checks that may wait for a worker; more are answered `Busy`.
const QUEUE: usize = 64;

/// The process's hash checkers.
pub struct Pool {
    workers: Arc<Semaphore>,
    worker_count: usize,
    /// Checks running or waiting for a worker.
    admitted: AtomicUsize,
    limit: usize,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| {
    // Half the cores: logins never take the CPU the proxy needs.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Pool::new(cores.div_ceil(2).clamp(1, 4), QUEUE)
});

/// Decrements the admitted count when a check is over, however it ends.
struct Admitted<'p>(&'p AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    fn new(workers: usize, queue: usize) -> Pool {
        Pool {
            workers: Arc::new(Semaphore::new(workers)),
            worker_count: workers,
            admitted: AtomicUsize::new(0),
            limit: workers + queue,
        }
    }

    /// The process's pool.
    pub fn shared() -> &'static Pool {
        &POOL
    }

    /// How many checks run at once.
    pub fn workers(&self) -> usize {
        self.worker_count
    }

    /// Checks `secret` against `phc_hash` (a PHC string such as `$argon2id$...`).
    pub async fn verify(&'static self, phc_hash: &str, secret: &[u8]) -> Verdict {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Verdict::Busy;
        }
        let admitted = Admitted(&self.admitted);
        let Ok(permit) = self.workers.clone().acquire_owned().await else {
            return Verdict::Busy;
        };
        let (hash, secret) = (phc_hash.to_owned(), secret.to_vec());
        // The permit and the count go with the work: a client that disconnects while
        // its check runs does not free a worker before the check is over.
        let check = tokio::task::spawn_blocking(move || {
            let matched = matches(&hash, &secret);
            drop((permit, admitted));
            matched
        });
        match check.await {
            Ok(true) => Verdict::Match,
            Ok(false) | Err(_) => Verdict::Mismatch,
        }
    }
}

/// The kinds of stored hash a password may be checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    Argon2,
    Bcrypt,
}

/// What kind of hash `stored` is, or why it cannot be used: argon2 (`$argon2id$...`, as
/// `gatewarden hash-pin` and `htpasswd`-like tools make) or bcrypt (`$2y$`, `$2b$`,
/// `$2a$`, as `htpasswd -B` makes).
pub fn hash_kind(stored: &str) -> Result<HashKind, String> {
    if ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|p| stored.starts_with(p))
    {
        return stored
            .parse::<bcrypt::HashParts>()
            .map(|_| HashKind::Bcrypt)
            .map_err(|_| "not a valid bcrypt hash".to_string());
    }
    match PasswordHash::new(stored) {
        Ok(h) if h.algorithm.as_str().starts_with("argon2") => Ok(HashKind::Argon2),
        _ => Err("not an argon2 or bcrypt hash (MD5, SHA-1 and crypt hashes are refused)".into()),
    }
}

/// True when `secret` matches `stored`: the slow part, run on a worker.
fn matches(stored: &str, secret: &[u8]) -> bool {
    match hash_kind(stored) {
        Ok(HashKind::Bcrypt) => bcrypt::verify(secret, stored).unwrap_or(false),
        Ok(HashKind::Argon2) => PasswordHash::new(stored)
            .is_ok_and(|h| Argon2::default().verify_password(secret, &h).is_ok()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn hash(secret: &str) -> String {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn bcrypt_and_argon2_hashes_are_both_checked() {
        let bcrypted = bcrypt::hash("s3cret", 4).unwrap();
        assert_eq!(hash_kind(&bcrypted), Ok(HashKind::Bcrypt));
        assert!(matches(&bcrypted, b"s3cret"));
        assert!(!matches(&bcrypted, b"s3cre"));
        let argon = hash("s3cret");
        assert_eq!(hash_kind(&argon), Ok(HashKind::Argon2));
        assert!(matches(&argon, b"s3cret"));
        for bad in [
            "$apr1$abc$def",
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "plain",
            "$2y$xx",
        ] {
            assert!(hash_kind(bad).is_err(), "{bad}");
            assert!(!matches(bad, b"plain"));
        }
    }

    #[test]
    fn matches_mismatches_and_refuses_past_the_queue() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(1, 2)));
        let stored = hash("1234");
        runtime.block_on(async {
            assert_eq!(pool.verify(&stored, b"1234").await, Verdict::Match);
            assert_eq!(pool.verify(&stored, b"0000").await, Verdict::Mismatch);
            assert_eq!(pool.verify("not a hash", b"1234").await, Verdict::Mismatch);
            // With the one worker taken, three checks fill the pool and wait; the next
            // is answered at once.
            let taken = pool.workers.clone().try_acquire_owned().unwrap();
            let waiting: Vec<_> = (0..3)
                .map(|_| {
                    let stored = stored.clone();
                    tokio::spawn(async move { pool.verify(&stored, b"1234").await })
                })
                .collect();
            while pool.admitted.load(Ordering::Acquire) < 3 {
                tokio::task::yield_now().await;
            }
            assert_eq!(pool.verify(&stored, b"1234").await, Verdict::Busy);
            drop(taken);
            for check in waiting {
                assert_eq!(check.await.unwrap(), Verdict::Match);
            }
            assert_eq!(pool.admitted.load(Ordering::Acquire), 0);
        });
    }
}
