//! `api_key`: recognise callers by API key.
//!
//! ```yaml
//! plugins:
//!   keys:
//!     type: api_key
//!     keys_file: /var/lib/gatewarden/keys.yaml   # managed with `gatewarden key new/list/revoke`
//!     admin_key: ${env:GATEWARDEN_ADMIN_KEY}     # optional single admin key
//!     sources: [bearer, x-api-key]
//!     strip: true
//! ```
//!
//! Keys come from `Authorization: Bearer <key>` or `X-API-Key: <key>`, never from the
//! query string. A presented key that is unknown, revoked, disabled or expired is refused
//! with 401 at once: it never falls through to another method or to anonymous. Bearer
//! tokens shaped like a JWT (three dot-separated parts) are left for a `jwt` plugin.
//!
//! Only SHA-256 digests are kept in memory, looked up by digest: the time a lookup takes
//! depends on the digest, which a guesser cannot steer, not on how much of a key was
//! right. The keys file is re-read within a second of a change; a broken file is logged
//! and the previous keys stay in force.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use http::HeaderName;
use serde::{Deserialize, Serialize};

use crate::key_store::{KeyStore, Loaded, RedisFollow, RedisKeys};
use crate::keys::{self, KeysFile};
use crate::{credentials, Ctx, Hooks, Identity, Plugin, Reply, RequestFlow, RequestHeader, Role};

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Where a key may be presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `Authorization: Bearer <key>`
    Bearer,
    /// `X-API-Key: <key>`
    XApiKey,
}

/// Settings of an `api_key` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The keys file managed by `gatewarden key`. Re-read when it changes.
    pub keys_file: Option<String>,
    /// `redis`: the keys live in the top-level `redis:`, shared by every replica and
    /// managed with `gatewarden key --redis` or the admin API. Instead of `keys_file`.
    pub store: Option<StoreKind>,
    /// One extra key with the admin role, kept outside the keys file (from the
    /// environment or a secret file). At least 16 characters.
    pub admin_key: Option<crate::secret::Secret>,
    /// Where keys are accepted (default both).
    #[serde(default = "default_sources")]
    pub sources: Vec<Source>,
    /// Remove the credential headers before proxying (default true).
    #[serde(default = "yes")]
    pub strip: bool,
}

/// Where an `api_key` plugin's keys live besides a keys file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Redis,
}

fn default_sources() -> Vec<Source> {
    vec![Source::Bearer, Source::XApiKey]
}

fn yes() -> bool {
    true
}

/// A key as held in memory.
#[derive(Debug)]
struct Entry {
    id: Arc<str>,
    subject: Arc<str>,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
    disabled: bool,
    /// Unix seconds of the last use by this process; 0 when unused.
    last_used: AtomicI64,
}

#[derive(Debug, Default)]
struct Table {
    by_digest: HashMap<[u8; 32], Arc<Entry>>,
}

impl Table {
    fn from_file(file: &KeysFile, previous: Option<&Table>) -> Table {
        let mut by_digest = HashMap::with_capacity(file.keys.len());
        for k in &file.keys {
            let Some(digest) = keys::parse_stored_hash(&k.hash) else {
                continue;
            };
            // Carry last-use over a reload so it is not lost before the next flush.
            let last_used = previous
                .and_then(|p| p.by_digest.get(&digest))
                .map_or(0, |e| e.last_used.load(Ordering::Relaxed));
            by_digest.insert(
                digest,
                Arc::new(Entry {
                    id: Arc::from(k.id.as_str()),
                    subject: Arc::from(k.subject.as_str()),
                    role: k.role,
                    expires_at: k.expires_at,
                    disabled: k.disabled,
                    last_used: AtomicI64::new(last_used),
                }),
            );
        }
        Table { by_digest }
    }
}

/// Where the keys come from.
enum KeySource {
    None,
    File(PathBuf),
    Redis(RedisKeys),
}

/// Shared between the plugin and the thread that follows its keys.
struct Store {
    source: KeySource,
    table: ArcSwap<Table>,
    dirty: AtomicBool,
}

/// The runtime form of an `api_key` plugin.
pub struct ApiKey {
    store: Arc<Store>,
    admin_digest: Option<[u8; 32]>,
    admin_subject: Arc<str>,
    bearer: bool,
    x_api_key: bool,
    strip: bool,
    watching: std::sync::Once,
}

/// How often last-use times are written out (only when a key was used since).
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
impl ApiKey {
    pub fn new(config: ApiKeyConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        if config.keys_file.is_none() && config.store.is_none() && config.admin_key.is_none() {
            return Err("set `keys_file` (or `store: redis`), `admin_key`, or both".into());
        }
        if config.keys_file.is_some() && config.store.is_some() {
            return Err("`keys_file` and `store: redis` exclude each other".into());
        }
        if config.sources.is_empty() {
            return Err("`sources` must name at least one of bearer, x-api-key".into());
        }
        if let Some(k) = &config.admin_key {
            if k.expose().len() < 16 {
                return Err("`admin_key` must be at least 16 characters".into());
            }
        }
        let (source, table) = match (config.keys_file.map(PathBuf::from), config.store) {
            (Some(p), _) => {
                if !p.exists() {
                    return Err(format!(
                        "keys file {} does not exist; create it with `gatewarden key new --file {} --name NAME`",
                        p.display(),
                        p.display()
                    ));
                }
                let file = KeysFile::load(&p).map_err(|e| e.to_string())?;
                (KeySource::File(p), Table::from_file(&file, None))
            }
            (None, Some(StoreKind::Redis)) => {
                let redis = env.redis.as_ref().ok_or(
                    "`store: redis` keeps keys in the top-level `redis:`, which is not set",
                )?;
                // Loaded when the plugin starts: building reads no network.
                let keys = RedisKeys::from_client(redis.client().clone());
                (KeySource::Redis(keys), Table::default())
            }
            (None, None) => (KeySource::None, Table::default()),
        };
        let store = Arc::new(Store {
            source,
            table: ArcSwap::from_pointee(table),
            dirty: AtomicBool::new(false),
        });
        Ok(ApiKey {
            store,
            admin_digest: config
                .admin_key
                .as_ref()
                .map(|k| k.expose())
                .map(|k| keys::digest(k.as_bytes())),
            admin_subject: Arc::from("admin"),
            bearer: config.sources.contains(&Source::Bearer),
            x_api_key: config.sources.contains(&Source::XApiKey),
            strip: config.strip,
            watching: std::sync::Once::new(),
        })
    }

    /// Every key presented: from `X-API-Key` and from `Authorization: Bearer` (when
    /// not a JWT), as the sources allow. A source header sent twice is an error.
    fn presented<'r>(&self, req: &'r RequestHeader) -> Result<Presented<'r>, Reply> {
        let mut keys = Presented::default();
        if self.x_api_key {
            keys.x_api_key = credentials::only_value(req, &X_API_KEY)
                .map_err(|_| credentials::repeated("X-API-Key"))?
                .map(|v| v.as_bytes().trim_ascii());
        }
        if self.bearer {
            keys.authorization = credentials::only_value(req, &http::header::AUTHORIZATION)
                .map_err(|_| credentials::repeated("Authorization"))?
                .and_then(|v| credentials::bearer(v.as_bytes()))
                .filter(|token| !credentials::looks_like_jwt(token));
        }
        Ok(keys)
    }

    /// The caller a key stands for, and the key's id (none for `admin_key`).
    fn check(&self, token: &[u8]) -> Result<(Identity, Option<Arc<str>>), &'static str> {
        let digest = keys::digest(token);
        if let Some(admin) = &self.admin_digest {
            if credentials::constant_time_eq(&digest, admin) {
                return Ok((
                    Identity {
                        subject: self.admin_subject.clone(),
                        role: Role::Admin,
                        method: "api_key",
                    },
                    None,
                ));
            }
        }
        let table = self.store.table.load();
        let entry = table.by_digest.get(&digest).ok_or("invalid API key")?;
        let now = Utc::now();
        if entry.disabled {
            return Err("API key revoked");
        }
        if entry.expires_at.is_some_and(|e| e <= now) {
            return Err("API key expired");
        }
        let secs = now.timestamp();
        // Only the first use in a second marks the store dirty: no write per request.
        if entry.last_used.swap(secs, Ordering::Relaxed) != secs {
            self.store.dirty.store(true, Ordering::Relaxed);
        }
        Ok((
            Identity {
                subject: entry.subject.clone(),
                role: entry.role,
                method: "api_key",
            },
            Some(entry.id.clone()),
        ))
    }
}

/// The keys a request presented, by where they came from.
#[derive(Default)]
struct Presented<'r> {
    x_api_key: Option<&'r [u8]>,
    authorization: Option<&'r [u8]>,
}

/// Reads the keys file after a change. Unlike at startup, a missing or blank file is not
/// taken for "no keys": it is what a writer leaves between truncating and writing, or
/// between deleting and creating, and taking it would refuse every key until the next
/// good read. Removing every key takes an explicit `keys: []`.
fn read_for_reload(path: &Path) -> Result<KeysFile, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{} is missing", path.display()))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let blank = text
        .lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#'));
    if blank {
        return Err(format!(
            "{} is empty (write `keys: []` to remove every key)",
            path.display()
        ));
    }
    KeysFile::parse(&text).map_err(|e| format!("{} is not a valid keys file: {e}", path.display()))
}

/// Takes in a changed keys file, keeping what the keys already in use have recorded.
fn reload_keys(store: &Store, path: &Path) -> Result<String, String> {
    let file = read_for_reload(path)?;
    let table = Table::from_file(&file, Some(&store.table.load()));
    let loaded = format!(": {} keys", table.by_digest.len());
    store.table.store(Arc::new(table));
    Ok(loaded)
}

/// The last-use times recorded since the previous call (none when no key was used).
fn take_last_used(store: &Store) -> BTreeMap<String, DateTime<Utc>> {
    if !store.dirty.swap(false, Ordering::Relaxed) {
        return BTreeMap::new();
    }
    store
        .table
        .load()
        .by_digest
        .values()
        .filter_map(|e| {
            let secs = e.last_used.load(Ordering::Relaxed);
            let at = DateTime::from_timestamp(secs, 0).filter(|_| secs > 0)?;
            Some((e.id.to_string(), at))
        })
        .collect()
}

fn flush_last_used(store: &Store) {
    let KeySource::File(path) = &store.source else {
        return;
    };
    let updates = take_last_used(store);
    if updates.is_empty() {
        return;
    }
    if let Err(e) = keys::record_last_used(path, &updates) {
        log::warn!(
            "cannot record key last-use times next to {}: {e}",
            path.display()
        );
    }
}

/// Takes in the key set as Redis holds it now.
fn apply_loaded(store: &Store, loaded: Loaded) {
    let table = Table::from_file(&loaded.file, Some(&store.table.load()));
    store.table.store(Arc::new(table));
}

impl Drop for ApiKey {
    fn drop(&mut self) {
        flush_last_used(&self.store);
    }
}

impl crate::PluginType for ApiKey {
    const TYPE: &'static str = "api_key";
    type Config = ApiKeyConfig;

    fn build(config: ApiKeyConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        ApiKey::new(config, env)
    }
}

impl Plugin for ApiKey {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            ..Hooks::default()
        }
    }

    fn is_identity(&self) -> bool {
        true
    }

    fn key_store(&self) -> Option<KeyStore> {
        match &self.store.source {
            KeySource::None => None,
            KeySource::File(path) => Some(KeyStore::File(path.clone())),
            KeySource::Redis(redis) => Some(KeyStore::Redis(redis.clone())),
        }
    }

    fn start(&self) -> Result<(), String> {
        self.watching.call_once(|| match &self.store.source {
            KeySource::None => {}
            KeySource::File(path) => crate::watch::Follow {
                what: "keys file",
                path: path.clone(),
                apply: reload_keys,
                chore: Some((FLUSH_INTERVAL, flush_last_used)),
            }
            .spawn(Arc::downgrade(&self.store)),
            KeySource::Redis(redis) => {
                let follow = RedisFollow {
                    redis: redis.clone(),
                    apply: apply_loaded,
                    used: take_last_used,
                };
                let version = follow.first_load(&self.store);
                follow.spawn(Arc::downgrade(&self.store), version);
            }
        });
        Ok(())
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        // Other spellings of X-API-Key are never read here, so never verified: an
        // upstream that merges them with the real one must not see them.
        if self.x_api_key {
            crate::spelling::remove_other_spellings_from(req, &X_API_KEY);
        }
        let presented = match self.presented(req) {
            Ok(presented) => presented,
            Err(reply) => {
                ctx.auth_failure = Some("repeated_credentials");
                return RequestFlow::reply(reply);
            }
        };
        // Every key presented is checked: one wrong key is a refusal whatever else
        // came with it, and two right keys must name the same caller.
        for token in [presented.x_api_key, presented.authorization]
            .into_iter()
            .flatten()
        {
            let identity = match self.check(token) {
                Ok((identity, key_id)) => {
                    ctx.key_id = key_id;
                    identity
                }
                Err(reason) => {
                    ctx.auth_failure = Some("invalid_api_key");
                    return RequestFlow::reply(credentials::refused(reason));
                }
            };
            if ctx.identify(identity).is_err() {
                return RequestFlow::reply(credentials::conflicting());
            }
        }
        let (from_x_api_key, from_authorization) = (
            presented.x_api_key.is_some(),
            presented.authorization.is_some(),
        );
        if self.strip {
            if from_x_api_key {
                req.remove_header(&X_API_KEY);
            }
            if from_authorization {
                req.remove_header(&http::header::AUTHORIZATION);
            }
        }
        RequestFlow::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{create_key, revoke_key, NewKey};
    use crate::{RequestId, Verdict};

    fn ctx() -> Ctx {
        Ctx::new(
            "127.0.0.1".parse().unwrap(),
            RequestId::from_random(1),
            false,
        )
    }

    fn run(p: &ApiKey, headers: &[(&str, &str)]) -> (Result<Option<Identity>, u16>, RequestHeader) {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        let mut c = ctx();
        let verdict = match p.on_request(&mut req, &mut c) {
            RequestFlow::Done(v) => v,
            RequestFlow::Wait(_) => panic!("api_key never waits"),
        };
        let out = match verdict {
            Verdict::Continue => Ok(c.identity),
            Verdict::Reply(r) => Err(r.status),
        };
        (out, req)
    }

    fn setup() -> (tempfile::TempDir, PathBuf, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let (_, user) = create_key(
            &path,
            NewKey {
                name: "u".into(),
                role: Role::User,
                subject: Some("alice".into()),
                expires_at: None,
            },
        )
        .unwrap();
        let (_, admin) = create_key(
            &path,
            NewKey {
                name: "a".into(),
                role: Role::Admin,
                subject: None,
                expires_at: None,
            },
        )
        .unwrap();
        (dir, path, user, admin)
    }

    fn plugin(path: &Path) -> ApiKey {
        ApiKey::new(
            ApiKeyConfig {
                keys_file: Some(path.display().to_string()),
                store: None,
                admin_key: Some(crate::secret::Secret::new("a-very-long-admin-key")),
                sources: default_sources(),
                strip: true,
            },
            &crate::BuildEnv::default(),
        )
        .unwrap()
    }

    #[test]
    fn good_keys_identify_and_are_stripped() {
        let (_d, path, user, _) = setup();
        let p = plugin(&path);
        let (out, req) = run(&p, &[("Authorization", &format!("Bearer {user}"))]);
        let id = out.unwrap().unwrap();
        assert_eq!((&*id.subject, id.role), ("alice", Role::User));
        assert!(req.headers.get("authorization").is_none());
        let (out, req) = run(&p, &[("X-API-Key", &user)]);
        assert!(out.unwrap().is_some());
        assert!(req.headers.get("x-api-key").is_none());
        let (out, _) = run(&p, &[("Authorization", "bearer a-very-long-admin-key")]);
        assert_eq!(out.unwrap().unwrap().role, Role::Admin);
    }

    #[test]
    fn bad_keys_are_401_never_anonymous() {
        let (_d, path, user, _) = setup();
        let p = plugin(&path);
        let mut wrong = user.clone();
        wrong.replace_range(20..21, if &user[20..21] == "A" { "B" } else { "A" });
        assert_eq!(
            run(&p, &[("Authorization", &format!("Bearer {wrong}"))])
                .0
                .unwrap_err(),
            401
        );
        assert_eq!(run(&p, &[("X-API-Key", "nonsense")]).0.unwrap_err(), 401);
        assert_eq!(
            run(&p, &[("Authorization", "Bearer not-a-key")])
                .0
                .unwrap_err(),
            401
        );
        revoke_key(&path, &user[..9]).unwrap();
        let p = plugin(&path);
        assert_eq!(run(&p, &[("X-API-Key", &user)]).0.unwrap_err(), 401);
    }

    #[test]
    fn no_credential_or_a_jwt_passes_without_identity() {
        let (_d, path, _, _) = setup();
        let p = plugin(&path);
        assert_eq!(run(&p, &[]).0.unwrap(), None);
        assert_eq!(
            run(&p, &[("Authorization", "Bearer aaa.bbb.ccc")])
                .0
                .unwrap(),
            None
        );
        assert_eq!(
            run(&p, &[("Authorization", "Basic dXNlcjpwYXNz")])
                .0
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_reload_never_takes_a_missing_or_blank_file_for_no_keys() {
        let (dir, path, _, _) = setup();
        assert_eq!(read_for_reload(&path).unwrap().keys.len(), 2);
        // What an in-place writer leaves between truncating and writing.
        for blank in ["", "\n  \n", "# being rewritten\n"] {
            std::fs::write(&path, blank).unwrap();
            let err = read_for_reload(&path).unwrap_err();
            assert!(
                err.contains("is empty") && err.contains("keys: []"),
                "{err}"
            );
        }
        std::fs::write(&path, "keys:\n- id: half").unwrap();
        assert!(read_for_reload(&path)
            .unwrap_err()
            .contains("not a valid keys file"));
        // Removing every key is still possible, when said.
        std::fs::write(&path, "keys: []\n").unwrap();
        assert!(read_for_reload(&path).unwrap().keys.is_empty());
        std::fs::remove_file(&path).unwrap();
        assert!(read_for_reload(&path).unwrap_err().contains("is missing"));
        drop(dir);
    }

    #[test]
    fn expired_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let past = Utc::now() - chrono::Duration::seconds(5);
        let (_, key) = create_key(
            &path,
            NewKey {
                name: "old".into(),
                role: Role::User,
                subject: None,
                expires_at: Some(past),
            },
        )
        .unwrap();
        assert_eq!(
            run(&plugin(&path), &[("X-API-Key", &key)]).0.unwrap_err(),
            401
        );
    }

    #[test]
    fn settings_are_checked() {
        let cfg = |yaml: &str| serde_yaml_ng::from_str::<ApiKeyConfig>(yaml);
        assert!(ApiKey::new(cfg("{}").unwrap(), &crate::BuildEnv::default()).is_err());
        assert!(ApiKey::new(
            cfg("{ admin_key: short }").unwrap(),
            &crate::BuildEnv::default()
        )
        .is_err());
        let err = ApiKey::new(
            cfg("{ keys_file: /nonexistent/keys.yaml }").unwrap(),
            &crate::BuildEnv::default(),
        )
        .err()
        .unwrap();
        assert!(err.contains("key new"), "{err}");
        assert!(cfg("{ admin_key: x, sources: [query] }").is_err());
    }
}
