//! Revoked browser sessions: one session ended by its logout, or every session of a
//! subject ended at once ("sign out everywhere").
//!
//! A session cookie names its session (`sid`) and when it was issued (`iat`). A session
//! is revoked when its id is listed, or when its subject was revoked at or after the
//! second it was issued. Entries expire when the sessions they name would have.
//!
//! Without `redis:` the list is kept in this process (and so survives reloads); with
//! it, in Redis, shared by every replica, under `gw:sess:id:<sid>` and
//! `gw:sess:subject:<SHA-256 of the subject>`. This process's own list is always kept
//! too, so a revocation made here holds here even while Redis is away.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::redis_store::{self, RedisHandle};
use crate::session::now_secs;

/// What a session check does while Redis cannot say whether a session was revoked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnRevocationError {
    /// Refuse the session (503): a revoked session never gets through.
    #[default]
    Deny,
    /// Accept it on the strength of its signature and this replica's own list.
    Allow,
}

/// Revocations known to this process: session id → until, subject → (revoked at, until).
#[derive(Default)]
struct Local {
    sessions: HashMap<String, u64>,
    subjects: HashMap<String, (u64, u64)>,
}

/// Entries past which the local list drops what has expired before adding more.
const PRUNE_AT: usize = 10_000;

static LOCAL: LazyLock<Mutex<Local>> = LazyLock::new(Mutex::default);

fn local() -> std::sync::MutexGuard<'static, Local> {
    LOCAL.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Local {
    fn prune(&mut self, now: u64) {
        if self.sessions.len() + self.subjects.len() >= PRUNE_AT {
            self.sessions.retain(|_, until| *until > now);
            self.subjects.retain(|_, (_, until)| *until > now);
        }
    }

    fn revoked(&self, sid: &str, subject: &str, iat: u64, now: u64) -> bool {
        let by_id = !sid.is_empty() && self.sessions.get(sid).is_some_and(|until| *until > now);
        let by_subject = self
            .subjects
            .get(subject)
            .is_some_and(|(at, until)| *until > now && iat <= *at);
        by_id || by_subject
    }
}

/// Why a session could not be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// The revocation list sessions are checked against and added to.
#[derive(Clone, Default)]
pub struct Revocations {
    redis: Option<Arc<RedisHandle>>,
    on_error: OnRevocationError,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("shared", &self.redis.is_some())
            .field("on_error", &self.on_error)
            .finish()
    }
}

fn session_key(sid: &str) -> String {
    format!("gw:sess:id:{sid}")
}

fn subject_key(subject: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(subject.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("gw:sess:subject:{hex}")
}

impl Revocations {
    pub fn new(redis: Option<Arc<RedisHandle>>, on_error: OnRevocationError) -> Self {
        Revocations { redis, on_error }
    }

    /// True when the revocation list is shared through Redis (checks then wait for it).
    pub fn shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Revoked by this process's own list.
    pub fn revoked_here(&self, sid: &str, subject: &str, iat: u64) -> bool {
        local().revoked(sid, subject, iat, now_secs())
    }

    /// Revoked anywhere: this process's list, then Redis's. While Redis cannot answer,
    /// `on_error` decides.
    pub async fn revoked(&self, sid: &str, subject: &str, iat: u64) -> Result<bool, Unavailable> {
        if self.revoked_here(sid, subject, iat) {
            return Ok(true);
        }
        let Some(redis) = &self.redis else {
            return Ok(false);
        };
        let keys = [session_key(sid), subject_key(subject)];
        let answer: Result<(Option<String>, Option<u64>), String> =
            redis.query(redis::cmd("MGET").arg(&keys[..])).await;
        match answer {
            Ok((by_id, by_subject)) => {
                Ok((!sid.is_empty() && by_id.is_some()) || by_subject.is_some_and(|at| iat <= at))
            }
            Err(e) => {
                redis_store::report_error("session revocation check", &e);
                match self.on_error {
                    OnRevocationError::Allow => Ok(false),
                    OnRevocationError::Deny => {
                        Err(Unavailable("the session store is unavailable".into()))
                    }
                }
            }
        }
    }

    /// Ends one session, until it would have expired (`until`, Unix seconds).
    pub async fn revoke_session(&self, sid: &str, until: u64) -> Result<(), Unavailable> {
        if sid.is_empty() {
            return Ok(());
        }
        let now = now_secs();
        {
            let mut local = local();
            local.prune(now);
            local.sessions.insert(sid.to_string(), until);
        }
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        set_expiring(redis, &session_key(sid), 1, until.saturating_sub(now)).await
    }

    /// Ends every session of `subject` issued up to now, for `lifetime` (the longest a
    /// session lasts).
    pub async fn revoke_subject(
        &self,
        subject: &str,
        lifetime: Duration,
    ) -> Result<(), Unavailable> {
        let now = now_secs();
        let until = now + lifetime.as_secs();
        {
            let mut local = local();
            local.prune(now);
            local.subjects.insert(subject.to_string(), (now, until));
        }
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        set_expiring(redis, &subject_key(subject), now, lifetime.as_secs()).await
    }
}

/// `SET key value EX ttl` (at least a second), for an entry that lasts as long as the
/// sessions it names.
async fn set_expiring(
    redis: &RedisHandle,
    key: &str,
    value: u64,
    ttl_secs: u64,
) -> Result<(), Unavailable> {
    let set = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("EX")
        .arg(ttl_secs.max(1))
        .clone();
    redis
        .query::<()>(&set)
        .await
        .map_err(|e| Unavailable(format!("redis: {e}")))
}
