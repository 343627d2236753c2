//! `basic_auth`: recognise callers by HTTP Basic credentials from an htpasswd-style file.
//!
//! ```yaml
//! plugins:
//!   team:
//!     type: basic_auth
//!     users_file: /etc/gatewarden/users.htpasswd   # `user:hash` lines; bcrypt or argon2
//!     realm: gatewarden
//!     role: user
//!     admin_users: [alice]
//!     lockout: { max_failures: 5, window: 10m, ban: 15m }
//! ```
//!
//! Make the file with `htpasswd -B -c users.htpasswd alice` (bcrypt), or put an argon2
//! hash from `gatewarden hash-pin` after `alice:`. MD5, SHA-1 and crypt hashes are
//! refused. The file is re-read within a second of a change; a broken file is logged and
//! the previous users stay in force.
//!
//! A request with `Authorization: Basic` is checked: a wrong user or password is 401
//! with `WWW-Authenticate: Basic realm="..."`, never a fall-through to another method.
//! A request without credentials on a `user` or `admin` route also gets that challenge,
//! so browsers show their login prompt. The caller's subject is the user name; users in
//! `admin_users` have the admin role. The `Authorization` header never reaches the
//! upstream.
//!
//! Failed attempts lock a client out as with `pin_gate` ([`crate::lockout`]), and every
//! password check runs in the process's bounded hash pool ([`crate::password`]). Since
//! browsers send the credentials with every request, a password that checked out is
//! remembered (as a keyed digest, for five minutes, until the file changes) so that
//! later requests skip the slow hash; a wrong one is checked every time.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lockout::{Admission, LockoutConfig, LoginLockout};
use crate::password::{self, Verdict as Checked};
use crate::{
    client_network, credentials, Ctx, Hooks, Identity, Plugin, Reply, RequestFlow, RequestHeader,
    Role, Verdict,
};

/// Settings of a `basic_auth` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// The users: one `user:hash` line each (`htpasswd -B` makes bcrypt hashes; argon2
    /// hashes work too). `#` starts a comment. Re-read when it changes.
    pub users_file: String,
    /// The realm browsers show in their login prompt (default `gatewarden`).
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Role of users not in `admin_users` (default user).
    #[serde(default = "default_role")]
    pub role: String,
    /// Users with the admin role.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Lockout of clients after failed attempts (as `pin_gate`).
    #[serde(default)]
    pub lockout: LockoutConfig,
}

fn default_realm() -> String {
    "gatewarden".into()
}

fn default_role() -> String {
    "user".into()
}

/// How long a password that checked out is taken on trust.
const REMEMBER: Duration = Duration::from_secs(300);
/// Most passwords remembered at once; past it the memory starts afresh.
const REMEMBERED_MAX: usize = 10_000;

/// Keyed digests of `user:password` pairs that matched: the user, and when.
type Remembered = HashMap<[u8; 32], (Arc<str>, Instant)>;

/// The users file as read, and the passwords that checked out against it.
struct Users {
    hashes: HashMap<String, String>,
    remembered: Mutex<Remembered>,
}

impl Users {
    /// Parses the file; errors name the line, never a hash.
    fn parse(text: &str) -> Result<Users, String> {
        let mut hashes = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = n + 1;
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {at}: expected user:hash"))?;
            if user.is_empty() || user.chars().any(char::is_control) {
                return Err(format!(
                    "line {at}: the user name is empty or not printable"
                ));
            }
            password::hash_kind(hash).map_err(|e| format!("line {at} ({user}): {e}"))?;
            if hashes.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {at}: user {user} is listed twice"));
            }
        }
        Ok(Users {
            hashes,
            remembered: Mutex::new(HashMap::new()),
        })
    }

    fn remembered(&self, key: &[u8; 32]) -> Option<Arc<str>> {
        let remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let (user, at) = remembered.get(key)?;
        (at.elapsed() < REMEMBER).then(|| user.clone())
    }

    fn remember(&self, key: [u8; 32], user: Arc<str>) {
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if remembered.len() >= REMEMBERED_MAX {
            remembered.clear();
        }
        remembered.insert(key, (user, Instant::now()));
    }
}

/// Shared with the file watcher.
struct Store {
    users: ArcSwap<Users>,
}

fn reload_users(store: &Store, path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let users = Users::parse(&text)?;
    let loaded = format!(": {} users", users.hashes.len());
    store.users.store(Arc::new(users));
    Ok(loaded)
}

/// The runtime form of a `basic_auth` plugin.
pub struct BasicAuth {
    store: Arc<Store>,
    users_file: PathBuf,
    watching: std::sync::Once,
    realm: String,
    role: Role,
    admin_users: BTreeSet<String>,
    lockout: LoginLockout,
    /// Keys the digests of remembered passwords; new in every process.
    digest_key: [u8; 32],
    /// Checked for unknown users, so that the answer takes as long as for known ones.
    decoy_hash: String,
    challenge: HeaderValue,
}

impl BasicAuth {
    pub fn new(config: BasicAuthConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        let path = env.base_dir.join(&config.users_file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("users_file {}: {e}", path.display()))?;
        let users =
            Users::parse(&text).map_err(|e| format!("users_file {}: {e}", path.display()))?;
        if config.realm.is_empty()
            || config
                .realm
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err("realm: use printable text without quotes or backslashes".into());
        }
        let role = Role::parse(&config.role)
            .ok_or_else(|| format!("role: unknown role {:?}; use user or admin", config.role))?;
        let challenge = HeaderValue::from_str(&format!(
            "Basic realm=\"{}\", charset=\"UTF-8\"",
            config.realm
        ))
        .map_err(|_| "realm: use printable ASCII".to_string())?;
        let store = Arc::new(Store {
            users: ArcSwap::from_pointee(users),
        });
        Ok(BasicAuth {
            store,
            users_file: path,
            watching: std::sync::Once::new(),
            realm: config.realm,
            role,
            admin_users: config.admin_users.into_iter().collect(),
            lockout: LoginLockout::new(&config.lockout, env)?,
            digest_key: rand::random(),
            decoy_hash: crate::pin_gate::hash_pin(&crate::keys::random_base62(16))?,
            challenge,
        })
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.digest_key);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password);
        h.finalize().into()
    }

    fn refused(&self, reason: &str) -> Reply {
        Reply::error(401, reason).with_header(
            http::header::WWW_AUTHENTICATE,
            self.challenge.to_str().unwrap_or("Basic"),
        )
    }

    fn identity(&self, user: Arc<str>) -> Identity {
        let role = if self.admin_users.contains(&*user) {
            Role::Admin
        } else {
            self.role
        };
        Identity {
            subject: user,
            role,
            method: "basic",
        }
    }

    /// Takes the caller as `user`: sets the identity and removes the credential.
    fn accept(&self, user: Arc<str>, req: &mut RequestHeader, ctx: &mut Ctx) -> Verdict {
        if ctx.identify(self.identity(user)).is_err() {
            return Verdict::Reply(credentials::conflicting());
        }
        req.remove_header(&http::header::AUTHORIZATION);
        Verdict::Continue
    }

    /// Checks a password that is not remembered: charged to the lockout first, then
    /// checked in the hash pool.
    async fn check(
        &self,
        user: String,
        password: Vec<u8>,
        key: [u8; 32],
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Verdict {
        let client = client_network(ctx.client_ip);
        let charge = match self.lockout.admit(client).await {
            Admission::Admitted(charge) => charge,
            Admission::Banned(seconds) => return self.locked(seconds, ctx),
        };
        let users = self.store.users.load_full();
        let stored = users.hashes.get(&user);
        let hash = stored.map_or(self.decoy_hash.as_str(), String::as_str);
        let checked = password::Pool::shared().verify(hash, &password).await;
        match (checked, stored) {
            (Checked::Busy, _) => {
                self.lockout.refund(client, charge, false).await;
                Verdict::Reply(
                    Reply::error(503, "too many sign-ins at once, try again")
                        .with_header(http::header::RETRY_AFTER, "1"),
                )
            }
            (Checked::Match, Some(_)) => {
                self.lockout.refund(client, charge, true).await;
                let user: Arc<str> = Arc::from(user);
                users.remember(key, user.clone());
                self.accept(user, req, ctx)
            }
            _ if charge.started_ban() => self.locked(self.lockout.ban_secs(), ctx),
            _ => {
                ctx.auth_failure = Some("invalid_password");
                Verdict::Reply(self.refused("wrong user name or password"))
            }
        }
    }

    fn locked(&self, seconds: u64, ctx: &mut Ctx) -> Verdict {
        ctx.auth_failure = Some("locked_out");
        Verdict::Reply(
            Reply::error(429, "too many failed attempts")
                .with_header(http::header::RETRY_AFTER, &seconds.to_string()),
        )
    }
}

/// The user and password of an `Authorization: Basic` value; `Ok(None)` for another
/// scheme, `Err` for a Basic value that cannot be read.
fn basic_credentials(value: &[u8]) -> Result<Option<(String, Vec<u8>)>, &'static str> {
    let value = value.trim_ascii();
    let Some(gap) = value.iter().position(|b| matches!(b, b' ' | b'\t')) else {
        return Ok(None);
    };
    let (scheme, encoded) = value.split_at(gap);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .map_err(|_| "malformed Basic credentials")?;
    let colon = decoded
        .iter()
        .position(|b| *b == b':')
        .ok_or("malformed Basic credentials")?;
    let user = std::str::from_utf8(&decoded[..colon]).map_err(|_| "malformed Basic credentials")?;
    Ok(Some((user.to_string(), decoded[colon + 1..].to_vec())))
}

impl crate::PluginType for BasicAuth {
    const TYPE: &'static str = "basic_auth";
    type Config = BasicAuthConfig;

    fn build(config: BasicAuthConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        BasicAuth::new(config, env)
    }
}

impl Plugin for BasicAuth {
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

    fn challenge(&self) -> Option<HeaderValue> {
        Some(self.challenge.clone())
    }

    fn start(&self) -> Result<(), String> {
        self.watching.call_once(|| {
            crate::watch::Follow {
                what: "users file",
                path: self.users_file.clone(),
                apply: reload_users,
                chore: None,
            }
            .spawn(Arc::downgrade(&self.store))
        });
        Ok(())
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        let value = match credentials::only_value(req, &http::header::AUTHORIZATION) {
            Ok(Some(value)) => value,
            Ok(None) => return RequestFlow::CONTINUE,
            Err(_) => {
                ctx.auth_failure = Some("repeated_credentials");
                return RequestFlow::reply(self.refused("Authorization sent more than once"));
            }
        };
        let (user, password) = match basic_credentials(value.as_bytes()) {
            Ok(Some(pair)) => pair,
            Ok(None) => return RequestFlow::CONTINUE,
            Err(reason) => {
                ctx.auth_failure = Some("invalid_password");
                return RequestFlow::reply(self.refused(reason));
            }
        };
        let key = self.digest(&user, &password);
        let users = self.store.users.load();
        if let Some(user) = users.remembered(&key) {
            // A banned client stays banned, even with a password that checked out.
            let client = client_network(ctx.client_ip);
            if let Some(seconds) = self.lockout.banned_here(client) {
                return RequestFlow::Done(self.locked(seconds, ctx));
            }
            return RequestFlow::Done(self.accept(user, req, ctx));
        }
        RequestFlow::Wait(Box::pin(self.check(user, password, key, req, ctx)))
    }
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestId;
    use std::net::IpAddr;

    fn plugin(extra: &str) -> (tempfile::TempDir, BasicAuth) {
        let dir = tempfile::tempdir().unwrap();
        let users = format!(
            "# team\nalice:{}\nbob:{}\n",
            bcrypt::hash("wonderland", 4).unwrap(),
            crate::pin_gate::hash_pin("builder").unwrap()
        );
        std::fs::write(dir.path().join("users"), users).unwrap();
        let yaml = format!("{{ users_file: users, admin_users: [bob], lockout: {{ max_failures: 3, window: 1m, ban: 1m }} {extra} }}");
        let env = crate::BuildEnv {
            base_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let p = BasicAuth::new(serde_yaml_ng::from_str(&yaml).unwrap(), &env).unwrap();
        (dir, p)
    }

    fn basic(user: &str, password: &str) -> String {
        let pair = format!("{user}:{password}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    /// Runs the request hook: (status or 0 when it passed, identity, the request after).
    fn run(p: &BasicAuth, auth: &[&str], ip: u8) -> (u16, Option<Identity>, RequestHeader) {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for a in auth {
            req.append_header("Authorization", *a).unwrap();
        }
        let mut ctx = Ctx::new(
            IpAddr::from([192, 0, 2, ip]),
            RequestId::from_random(1),
            false,
        );
        let verdict = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(p.on_request(&mut req, &mut ctx).resolve());
        let status = match verdict {
            Verdict::Continue => 0,
            Verdict::Reply(r) => r.status,
        };
        (status, ctx.identity, req)
    }

    #[test]
    fn right_passwords_identify_and_the_header_is_removed() {
        let (_dir, p) = plugin("");
        let (status, id, req) = run(&p, &[&basic("alice", "wonderland")], 1);
        assert_eq!(status, 0);
        let id = id.unwrap();
        assert_eq!(
            (&*id.subject, id.role, id.method),
            ("alice", Role::User, "basic")
        );
        assert!(req.headers.get("authorization").is_none());
        // Remembered: the second request passes without a hash, as the same caller.
        let (status, id, _) = run(&p, &[&basic("alice", "wonderland")], 1);
        assert_eq!((status, id.unwrap().role), (0, Role::User));
        let (status, id, _) = run(&p, &[&basic("bob", "builder")], 1);
        assert_eq!((status, id.unwrap().role), (0, Role::Admin));
    }

    #[test]
    fn wrong_unknown_or_malformed_credentials_are_401_with_the_challenge() {
        let (_dir, p) = plugin(", realm: Team Chat");
        for auth in [
            basic("alice", "wonderlanD"),
            basic("mallory", "wonderland"),
            "Basic !!!".to_string(),
            "Basic bm9jb2xvbg==".to_string(),
        ] {
            let (status, id, _) = run(&p, &[&auth], 2 + auth.len() as u8 % 50);
            assert_eq!(status, 401, "{auth}");
            assert!(id.is_none());
        }
        let (status, _, _) = run(
            &p,
            &[&basic("alice", "wonderland"), &basic("alice", "wonderland")],
            99,
        );
        assert_eq!(status, 401);
        assert_eq!(
            p.challenge().unwrap(),
            "Basic realm=\"Team Chat\", charset=\"UTF-8\""
        );
        // Other schemes are not this plugin's.
        let (status, id, req) = run(&p, &["Bearer abc"], 3);
        assert_eq!((status, id), (0, None));
        assert!(req.headers.get("authorization").is_some());
    }

    #[test]
    fn failures_lock_the_client_out_even_with_the_right_password() {
        let (_dir, p) = plugin("");
        assert_eq!(run(&p, &[&basic("alice", "x")], 7).0, 401);
        assert_eq!(run(&p, &[&basic("alice", "y")], 7).0, 401);
        assert_eq!(run(&p, &[&basic("alice", "z")], 7).0, 429);
        assert_eq!(run(&p, &[&basic("alice", "wonderland")], 7).0, 429);
        assert_eq!(run(&p, &[&basic("alice", "wonderland")], 8).0, 0);
    }

    #[test]
    fn the_users_file_is_checked() {
        let bad = |text: &str| Users::parse(text).err().unwrap_or_default();
        assert!(bad("alice").contains("line 1"));
        assert!(bad("alice:$apr1$x$y").contains("refused"));
        assert!(bad("alice:{SHA}abc").contains("line 1"));
        let hash = bcrypt::hash("x", 4).unwrap();
        assert!(bad(&format!("a:{hash}\na:{hash}")).contains("twice"));
        assert!(!bad(&format!("a:{hash}")).contains(&hash));
        assert!(Users::parse(&format!("# c\n\na:{hash}\n")).is_ok());
    }
}
