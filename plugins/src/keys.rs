//! API keys and the keys file: generation, hashing, atomic updates, lookup.
//!
//! A key is `gw_` + 43 base62 characters (256 bits from the OS random source). Only its
//! SHA-256 is stored. The file is YAML:
//!
//! ```yaml
//! keys:
//!   - id: k_7QmZr2Lx
//!     name: laptop
//!     prefix: gw_4fQx9a
//!     hash: sha256:5e88…
//!     role: user
//!     subject: alice
//!     created_at: 2026-11-23T05:00:00Z
//!     expires_at: null
//!     disabled: false
//! ```
//!
//! Writes go to a temporary file in the same directory, are synced, then renamed over the
//! old file, so a crash leaves either the old or the new file, never half of one. Writers
//! take an exclusive lock on `<file>.lock` so two `key new` runs cannot lose a key.
//! Last use is kept apart, in `<file>.used`, so serving requests never rewrites the keys.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Role;

/// The visible start of every key.
pub const KEY_PREFIX: &str = "gw_";
/// Base62 characters after the prefix: 43 of them carry just over 256 bits.
pub const KEY_BODY_LEN: usize = 43;
/// How many characters of the body the stored `prefix` keeps (enough to tell keys
/// apart in a list, far too few to help a guess).
const SHOWN_BODY_CHARS: usize = 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `n` base62 characters from the OS random source, without modulo bias.
pub fn random_base62(n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        OsRng.fill_bytes(&mut buf);
        for &b in &buf {
            // 248 = 4 * 62: bytes above it would favour the first characters.
            if b < 248 && out.len() < n {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// A fresh plaintext key.
pub fn generate_key() -> String {
    format!("{KEY_PREFIX}{}", random_base62(KEY_BODY_LEN))
}

/// True when `text` has the shape of a key (it may still be wrong).
pub fn looks_like_key(text: &[u8]) -> bool {
    text.len() == KEY_PREFIX.len() + KEY_BODY_LEN
        && text.starts_with(KEY_PREFIX.as_bytes())
        && text[KEY_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

/// The SHA-256 of a key.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The stored form of a key's hash: `sha256:<hex>`.
pub fn hash_for_storage(key: &str) -> String {
    format!("sha256:{}", hex::encode(digest(key.as_bytes())))
}

/// Parses `sha256:<hex>` back into a digest.
pub fn parse_stored_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

fn role_to_str<S: serde::Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(role.as_str())
}

fn role_from_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
    let text = String::deserialize(d)?;
    Role::parse(&text).ok_or_else(|| {
        serde::de::Error::custom(format!("unknown role {text:?}; use user or admin"))
    })
}

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub hash: String,
    #[serde(serialize_with = "role_to_str", deserialize_with = "role_from_str")]
    pub role: Role,
    pub subject: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub disabled: bool,
}

impl KeyRecord {
    /// Usable now: not disabled and not expired.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        !self.disabled && self.expires_at.is_none_or(|e| e > now)
    }

    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        if self.disabled {
            "revoked"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// The whole keys file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

/// What can go wrong with a keys file.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid keys file: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no key with id or prefix {0:?}")]
    NotFound(String),
    #[error("{0:?} matches several keys; use the id")]
    Ambiguous(String),
    #[error("refusing to revoke the last active admin key; create another admin key first")]
    LastAdmin,
    /// The shared key store cannot be reached; nothing was changed.
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
}

impl KeysFile {
    /// Reads a keys file; a missing file is an empty one (so `key new` can create it).
    pub fn load(path: &Path) -> Result<KeysFile, KeysError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(KeysFile::default()),
            Err(source) => {
                return Err(KeysError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|message| KeysError::Invalid {
            path: path.into(),
            message,
        })
    }

    /// Parses and validates keys-file text.
    pub fn parse(text: &str) -> Result<KeysFile, String> {
        if text.trim().is_empty() {
            return Ok(KeysFile::default());
        }
        let file: KeysFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        file.check()?;
        Ok(file)
    }

    /// Every hash well-formed and every id used once.
    pub fn check(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            if parse_stored_hash(&k.hash).is_none() {
                return Err(format!(
                    "keys[{i}] ({}): hash must be sha256:<64 hex digits>",
                    k.id
                ));
            }
            if !ids.insert(&k.id) {
                return Err(format!("keys[{i}]: id {:?} is used twice", k.id));
            }
        }
        Ok(())
    }

    /// Disables the key named by id or prefix; refuses to disable the last active
    /// admin key. Returns its index.
    pub fn disable(&mut self, id_or_prefix: &str, now: DateTime<Utc>) -> Result<usize, KeysError> {
        let i = self.find(id_or_prefix)?;
        let key = &self.keys[i];
        if key.role == Role::Admin
            && key.is_active(now)
            && self.other_active_admins(&key.id, now) == 0
        {
            return Err(KeysError::LastAdmin);
        }
        self.keys[i].disabled = true;
        Ok(i)
    }

    /// Writes the file atomically with owner-only permissions.
    pub fn save(&self, path: &Path) -> Result<(), KeysError> {
        let text = serde_yaml_ng::to_string(self).map_err(|e| KeysError::Write {
            path: path.into(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(path, text.as_bytes()).map_err(|source| KeysError::Write {
            path: path.into(),
            source,
        })
    }

    /// Active admin keys other than `except`.
    fn other_active_admins(&self, except: &str, now: DateTime<Utc>) -> usize {
        self.keys
            .iter()
            .filter(|k| k.id != except && k.role == Role::Admin && k.is_active(now))
            .count()
    }

    /// Finds one key by exact id or by prefix (with or without `gw_`).
    pub fn find(&self, id_or_prefix: &str) -> Result<usize, KeysError> {
        if let Some(i) = self.keys.iter().position(|k| k.id == id_or_prefix) {
            return Ok(i);
        }
        let wanted = if id_or_prefix.starts_with(KEY_PREFIX) {
            id_or_prefix.to_string()
        } else {
            format!("{KEY_PREFIX}{id_or_prefix}")
        };
        let matches: Vec<usize> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.prefix == wanted)
            .map(|(i, _)| i)
            .collect();
        match matches.as_slice() {
            [i] => Ok(*i),
            [] => Err(KeysError::NotFound(id_or_prefix.into())),
            _ => Err(KeysError::Ambiguous(id_or_prefix.into())),
        }
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("keys");
    let tmp = dir.join(format!(".{name}.tmp.{}", random_base62(8)));
    let result = (|| {
        let mut f = open_private(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn open_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// An exclusive lock on `<file>.lock`, held while reading, changing and writing.
pub struct FileLock(File);

impl FileLock {
    pub fn acquire(keys_file: &Path) -> Result<FileLock, KeysError> {
        let lock_path = sidecar(keys_file, "lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| KeysError::Write {
                path: lock_path.clone(),
                source,
            })?;
        file.lock().map_err(|source| KeysError::Write {
            path: lock_path,
            source,
        })?;
        Ok(FileLock(file))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// `<file>.<ext>` next to the keys file.
pub fn sidecar(keys_file: &Path, ext: &str) -> PathBuf {
    let mut name = keys_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{ext}"));
    keys_file.with_file_name(name)
}

/// Settings of a new key.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub role: Role,
    pub subject: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A new key: its record (the hash, never the key) and the plaintext, shown once.
pub fn new_record(new: NewKey) -> (KeyRecord, String) {
    let plaintext = generate_key();
    let record = KeyRecord {
        id: format!("k_{}", random_base62(8)),
        prefix: plaintext[..KEY_PREFIX.len() + SHOWN_BODY_CHARS].to_string(),
        hash: hash_for_storage(&plaintext),
        subject: new.subject.unwrap_or_else(|| new.name.clone()),
        name: new.name,
        role: new.role,
        created_at: Utc::now(),
        expires_at: new.expires_at,
        disabled: false,
    };
    (record, plaintext)
}

/// Creates a key, stores its hash, and returns the record and the plaintext (shown once).
pub fn create_key(path: &Path, new: NewKey) -> Result<(KeyRecord, String), KeysError> {
    let _lock = FileLock::acquire(path)?;
    let mut file = KeysFile::load(path)?;
    let (record, plaintext) = new_record(new);
    file.keys.push(record.clone());
    file.save(path)?;
    Ok((record, plaintext))
}

/// Disables a key by id or prefix; refuses to disable the last active admin key.
pub fn revoke_key(path: &Path, id_or_prefix: &str) -> Result<KeyRecord, KeysError> {
    let _lock = FileLock::acquire(path)?;
    let mut file = KeysFile::load(path)?;
    let i = file.disable(id_or_prefix, Utc::now())?;
    file.save(path)?;
    Ok(file.keys[i].clone())
}

/// Last use per key id, as recorded by running gateways.
pub fn load_last_used(keys_file: &Path) -> BTreeMap<String, DateTime<Utc>> {
    std::fs::read_to_string(sidecar(keys_file, "used"))
        .ok()
        .and_then(|t| serde_yaml_ng::from_str(&t).ok())
        .unwrap_or_default()
}

/// Merges `updates` into the last-use file (keeping the later time of each key).
pub fn record_last_used(
    keys_file: &Path,
    updates: &BTreeMap<String, DateTime<Utc>>,
) -> std::io::Result<()> {
    let mut all = load_last_used(keys_file);
    for (id, at) in updates {
        let slot = all.entry(id.clone()).or_insert(*at);
        if *at > *slot {
            *slot = *at;
        }
    }
    let text = serde_yaml_ng::to_string(&all).map_err(std::io::Error::other)?;
    write_atomic(&sidecar(keys_file, "used"), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let k = generate_key();
        assert_eq!(k.len(), 46);
        assert!(looks_like_key(k.as_bytes()));
        assert_ne!(generate_key(), k);
        assert!(!looks_like_key(b"gw_short"));
        assert!(!looks_like_key(format!("gw_{}", "-".repeat(43)).as_bytes()));
    }

    #[test]
    fn create_list_revoke_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let new = |name: &str, role| NewKey {
            name: name.into(),
            role,
            subject: None,
            expires_at: None,
        };
        let (admin, plain) = create_key(&path, new("ops", Role::Admin)).unwrap();
        assert_eq!(admin.hash, hash_for_storage(&plain));
        assert!(plain.starts_with(&admin.prefix));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&plain), "the plaintext must never be stored");
        let (user, _) = create_key(&path, new("laptop", Role::User)).unwrap();
        assert!(matches!(
            revoke_key(&path, &admin.id),
            Err(KeysError::LastAdmin)
        ));
        let revoked = revoke_key(&path, &user.prefix).unwrap();
        assert!(revoked.disabled);
        let file = KeysFile::load(&path).unwrap();
        assert_eq!(file.keys.len(), 2);
        assert_eq!(file.keys[1].status(Utc::now()), "revoked");
        create_key(&path, new("ops2", Role::Admin)).unwrap();
        assert!(revoke_key(&path, &admin.id).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn invalid_files_are_refused_with_a_reason() {
        assert!(KeysFile::parse("keys: [{ id: a }]").is_err());
        let bad_hash = "keys:\n- {id: a, name: n, prefix: gw_x, hash: md5:00, role: user, subject: s, created_at: '2026-01-01T00:00:00Z'}\n";
        assert!(KeysFile::parse(bad_hash).unwrap_err().contains("sha256"));
        assert_eq!(KeysFile::parse("").unwrap(), KeysFile::default());
    }

    #[test]
    fn last_use_merges_keep_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let t1: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let t2: DateTime<Utc> = "2026-02-01T00:00:00Z".parse().unwrap();
        record_last_used(&path, &BTreeMap::from([("a".to_string(), t2)])).unwrap();
        record_last_used(
            &path,
            &BTreeMap::from([("a".to_string(), t1), ("b".to_string(), t1)]),
        )
        .unwrap();
        let used = load_last_used(&path);
        assert_eq!(used["a"], t2);
        assert_eq!(used["b"], t1);
    }
}
