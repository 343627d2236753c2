//! Where API keys are kept: a keys file on one machine, or a Redis (or Valkey) that
//! every replica shares.
//!
//! In Redis the keys live in one hash, `gatewarden:keys` (key id → the key's record as
//! JSON, the same fields as a keys file: the SHA-256 of the key, never the key), with
//! a version number `gatewarden:keys:version` that every change increments and
//! announces on the channel `gatewarden:keys:changed`. Last use is kept apart, in
//! `gatewarden:keys:used` (key id → Unix seconds), so that using a key never rewrites
//! its record. Changes run in a `WATCH` transaction: two replicas revoking the last two
//! admin keys at once cannot both succeed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::Commands;

use crate::keys::{self, KeyRecord, KeysError, KeysFile, NewKey};
use crate::redis_store::LogLimit;

/// The hash of key records.
pub const KEYS: &str = "gatewarden:keys";
/// Incremented on every change of [`KEYS`].
pub const VERSION: &str = "gatewarden:keys:version";
/// Where a change is announced (its new version).
pub const CHANGED: &str = "gatewarden:keys:changed";
/// Last use per key id, in Unix seconds.
pub const USED: &str = "gatewarden:keys:used";

/// How long a connection and each command may take: an admin call or a resync waits
/// no longer than this on a Redis that does not answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Where a set of keys is kept.
#[derive(Clone, Debug)]
pub enum KeyStore {
    File(PathBuf),
    Redis(RedisKeys),
}

impl KeyStore {
    /// Every key with its last use, for listing.
    pub fn list(&self) -> Result<(KeysFile, BTreeMap<String, DateTime<Utc>>), KeysError> {
        match self {
            KeyStore::File(path) => Ok((KeysFile::load(path)?, keys::load_last_used(path))),
            KeyStore::Redis(redis) => {
                let loaded = redis.load()?;
                Ok((loaded.file, loaded.last_used))
            }
        }
    }

    /// Creates a key; returns its record and the plaintext, shown once.
    pub fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeysError> {
        match self {
            KeyStore::File(path) => keys::create_key(path, new),
            KeyStore::Redis(redis) => redis.create(new),
        }
    }

    /// Disables a key by id or prefix; never the last active admin key.
    pub fn revoke(&self, id_or_prefix: &str) -> Result<KeyRecord, KeysError> {
        match self {
            KeyStore::File(path) => keys::revoke_key(path, id_or_prefix),
            KeyStore::Redis(redis) => redis.revoke(id_or_prefix),
        }
    }

    /// Two handles on the same store.
    pub fn same_as(&self, other: &KeyStore) -> bool {
        match (self, other) {
            (KeyStore::File(a), KeyStore::File(b)) => a == b,
            (KeyStore::Redis(a), KeyStore::Redis(b)) => a.target == b.target,
            _ => false,
        }
    }
}

/// A Redis that holds keys for every replica.
#[derive(Clone)]
pub struct RedisKeys {
    client: redis::Client,
    /// Host, port and database, for telling stores apart; never the password.
    target: String,
}

impl std::fmt::Debug for RedisKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeys")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The keys as read from Redis.
pub struct Loaded {
    pub version: u64,
    pub file: KeysFile,
    pub last_used: BTreeMap<String, DateTime<Utc>>,
}

fn unavailable(e: redis::RedisError) -> KeysError {
    KeysError::Unavailable(format!("redis: {e}"))
}

impl RedisKeys {
    /// Reads the URL (`redis://`, `rediss://`, `valkey://`); nothing connects yet.
    pub fn open(url: &str) -> Result<RedisKeys, String> {
        let client =
            redis::Client::open(url).map_err(|e| format!("invalid redis url ({:?})", e.kind()))?;
        Ok(Self::from_client(client))
    }

    pub fn from_client(client: redis::Client) -> RedisKeys {
        let info = client.get_connection_info();
        let target = format!("{:?}/{}", info.addr(), info.redis_settings().db());
        RedisKeys { client, target }
    }

    /// A connection whose connect, reads and writes each give up after [`TIMEOUT`].
    pub fn connect(&self) -> redis::RedisResult<redis::Connection> {
        crate::redis_store::blocking_connection(&self.client, TIMEOUT)
    }

    /// The version of the key set, 0 before the first change.
    pub fn version(con: &mut redis::Connection) -> redis::RedisResult<u64> {
        let v: Option<u64> = con.get(VERSION)?;
        Ok(v.unwrap_or(0))
    }

    /// Every key and its last use.
    pub fn load(&self) -> Result<Loaded, KeysError> {
        let mut con = self.connect().map_err(unavailable)?;
        self.load_with(&mut con)
    }

    pub fn load_with(&self, con: &mut redis::Connection) -> Result<Loaded, KeysError> {
        // One round trip, in one transaction: the version belongs to these records.
        let (version, records, used): (
            Option<u64>,
            BTreeMap<String, String>,
            BTreeMap<String, i64>,
        ) = redis::pipe()
            .atomic()
            .get(VERSION)
            .hgetall(KEYS)
            .hgetall(USED)
            .query(con)
            .map_err(unavailable)?;
        let file = records_to_file(&records)?;
        let last_used = used
            .into_iter()
            .filter_map(|(id, secs)| Some((id, DateTime::from_timestamp(secs, 0)?)))
            .collect();
        Ok(Loaded {
            version: version.unwrap_or(0),
            file,
            last_used,
        })
    }

    pub fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeysError> {
        let (record, plaintext) = keys::new_record(new);
        let text =
            serde_json::to_string(&record).map_err(|e| KeysError::Unavailable(e.to_string()))?;
        let mut con = self.connect().map_err(unavailable)?;
        let (added, version): (bool, u64) = redis::pipe()
            .atomic()
            .hset_nx(KEYS, &record.id, text)
            .incr(VERSION, 1)
            .query(&mut con)
            .map_err(unavailable)?;
        if !added {
            // Ids are 8 random base62 characters: a clash is a one in 2^47 event.
            return Err(KeysError::Unavailable(
                "a key with that id exists already; try again".into(),
            ));
        }
        announce(&mut con, version);
        Ok((record, plaintext))
    }

    pub fn revoke(&self, id_or_prefix: &str) -> Result<KeyRecord, KeysError> {
        let mut con = self.connect().map_err(unavailable)?;
        let mut outcome: Option<Result<KeyRecord, KeysError>> = None;
        let version: Option<u64> = redis::transaction(&mut con, &[KEYS], |con, pipe| {
            let records: BTreeMap<String, String> = con.hgetall(KEYS)?;
            let mut file = match records_to_file(&records) {
                Ok(file) => file,
                Err(e) => {
                    outcome = Some(Err(e));
                    return Ok(Some(None));
                }
            };
            match file.disable(id_or_prefix, Utc::now()) {
                Ok(i) => {
                    let record = file.keys[i].clone();
                    let text = serde_json::to_string(&record)
                        .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
                    let done: Option<(u64,)> = pipe
                        .hset(KEYS, &record.id, text)
                        .ignore()
                        .incr(VERSION, 1)
                        .query(con)?;
                    // `None`: the hash changed since it was read; the transaction
                    // runs again on what it holds now.
                    Ok(done.map(|(version,)| {
                        outcome = Some(Ok(record));
                        Some(version)
                    }))
                }
                Err(e) => {
                    outcome = Some(Err(e));
                    Ok(Some(None))
                }
            }
        })
        .map_err(unavailable)?;
        if let Some(version) = version {
            announce(&mut con, version);
        }
        outcome.unwrap_or_else(|| Err(KeysError::Unavailable("the revocation did not run".into())))
    }

    /// Adds the keys of `file` that Redis does not hold yet (by id); returns how many.
    pub fn import(&self, file: &KeysFile) -> Result<usize, KeysError> {
        let mut con = self.connect().map_err(unavailable)?;
        let mut added = 0;
        for record in &file.keys {
            let text =
                serde_json::to_string(record).map_err(|e| KeysError::Unavailable(e.to_string()))?;
            let new: bool = con.hset_nx(KEYS, &record.id, text).map_err(unavailable)?;
            added += usize::from(new);
        }
        if added > 0 {
            let version: u64 = con.incr(VERSION, 1).map_err(unavailable)?;
            announce(&mut con, version);
        }
        Ok(added)
    }

    /// Records last-use times, keeping the later of what is stored and what is given.
    pub fn record_last_used(
        &self,
        updates: &BTreeMap<String, DateTime<Utc>>,
    ) -> Result<(), KeysError> {
        if updates.is_empty() {
            return Ok(());
        }
        let script = redis::Script::new(
            "for i = 1, #ARGV, 2 do \
               local at = tonumber(ARGV[i + 1]) \
               local was = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') \
               if at > was then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end \
             end \
             return 0",
        );
        let mut invocation = script.key(USED);
        for (id, at) in updates {
            invocation.arg(id).arg(at.timestamp());
        }
        let mut con = self.connect().map_err(unavailable)?;
        invocation
            .invoke::<i64>(&mut con)
            .map(drop)
            .map_err(unavailable)
    }
}

/// Tells the replicas that the key set changed. A lost announcement costs at most one
/// resync interval: replicas also compare versions on their own.
fn announce(con: &mut redis::Connection, version: u64) {
    let sent: redis::RedisResult<i64> = con.publish(CHANGED, version);
    if let Err(e) = sent {
        log::debug!("redis: cannot announce key set {version}: {e}");
    }
}

/// Key records as stored in the hash, checked as a keys file is.
fn records_to_file(records: &BTreeMap<String, String>) -> Result<KeysFile, KeysError> {
    let mut file = KeysFile::default();
    for (id, text) in records {
        let record: KeyRecord = serde_json::from_str(text).map_err(|e| KeysError::Invalid {
            path: Path::new(KEYS).into(),
            message: format!("{id}: {e}"),
        })?;
        file.keys.push(record);
    }
    file.keys
        .sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    file.check().map_err(|message| KeysError::Invalid {
        path: Path::new(KEYS).into(),
        message,
    })?;
    Ok(file)
}

/// Checks of the shared key set that failed since start, for
/// `gatewarden_key_store_errors_total`. Each one left the replica serving with the
/// keys it loaded last.
static FAILURES: AtomicU64 = AtomicU64::new(0);
static FAILURE_LOG: LogLimit = LogLimit::every(60);

pub fn failure_count() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}

/// Counts a failed check and logs it, at most once a minute.
fn report_failure(error: &dyn std::fmt::Display) {
    FAILURES.fetch_add(1, Ordering::Relaxed);
    if FAILURE_LOG.allow() {
        log::warn!(
            "key store: {error}; serving the keys loaded last until Redis answers \
             (failures counted in gatewarden_key_store_errors_total)"
        );
    }
}

/// How long a replica waits for an announcement before it compares versions itself:
/// a lost announcement (or one sent while it reconnected) costs at most this.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often the whole set is read again even when the version says nothing changed.
const FULL_RESYNC: Duration = Duration::from_secs(60);
/// How often last-use times are written.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Keeps a replica's copy of the shared key set in step with Redis.
pub struct RedisFollow<T> {
    pub redis: RedisKeys,
    /// Takes in a newly read key set.
    pub apply: fn(&T, Loaded),
    /// The last-use times recorded since the previous call.
    pub used: fn(&T) -> BTreeMap<String, DateTime<Utc>>,
}

impl<T: Send + Sync + 'static> RedisFollow<T> {
    /// Reads the key set once, within the store's timeout; the caller starts with it
    /// (an unreachable Redis is reported, and the set starts empty).
    pub fn first_load(&self, owner: &T) -> u64 {
        match self.redis.load() {
            Ok(loaded) => {
                let version = loaded.version;
                (self.apply)(owner, loaded);
                version
            }
            Err(e) => {
                report_failure(&e);
                0
            }
        }
    }

    /// Follows the key set on a thread of its own that ends when `owner` is dropped:
    /// announcements apply at once, versions are compared every second, and the whole
    /// set is read again every minute and after every reconnection.
    pub fn spawn(self, owner: Weak<T>, version: u64) {
        let spawned = std::thread::Builder::new()
            .name("gw-keys-redis".into())
            .spawn(move || self.run(&owner, version));
        if let Err(e) = spawned {
            log::error!("cannot follow the shared key set: {e}");
        }
    }

    fn run(&self, owner: &Weak<T>, mut version: u64) {
        let mut last_flush = Instant::now();
        while owner.strong_count() > 0 {
            if let Err(e) = self.session(owner, &mut version, &mut last_flush) {
                report_failure(&e);
                std::thread::sleep(CHECK_EVERY);
            }
        }
    }

    /// One connection's life: subscribe, catch up, then follow until it fails.
    fn session(
        &self,
        owner: &Weak<T>,
        version: &mut u64,
        last_flush: &mut Instant,
    ) -> Result<(), KeysError> {
        let mut commands = self.redis.connect().map_err(unavailable)?;
        let mut listener = self.redis.connect().map_err(unavailable)?;
        let mut announcements = listener.as_pubsub();
        announcements.subscribe(CHANGED).map_err(unavailable)?;
        announcements
            .set_read_timeout(Some(CHECK_EVERY))
            .map_err(unavailable)?;
        // Whatever changed while this replica was not listening.
        let mut full_due = Instant::now();
        loop {
            let heard = match announcements.get_message() {
                Ok(_) => true,
                Err(e) if e.is_timeout() => false,
                Err(e) => return Err(unavailable(e)),
            };
            let Some(owner) = owner.upgrade() else {
                return Ok(());
            };
            let full = Instant::now() >= full_due;
            let now_at = if heard || full {
                None
            } else {
                Some(RedisKeys::version(&mut commands).map_err(unavailable)?)
            };
            if full || heard || now_at != Some(*version) {
                let loaded = self.redis.load_with(&mut commands)?;
                *version = loaded.version;
                (self.apply)(&owner, loaded);
                if full {
                    full_due = Instant::now() + FULL_RESYNC;
                }
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                *last_flush = Instant::now();
                self.redis.record_last_used(&(self.used)(&owner))?;
            }
        }
    }
}
