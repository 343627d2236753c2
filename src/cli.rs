//! The command line: `run`, `check`, `demo`, `protect`, `version`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Compiled};
use crate::server::{self, RunFlags};

#[derive(Parser, Debug)]
#[command(
    name = "gatewarden",
    version,
    about = "An authenticating gateway for self-hosted AI tools"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a config file.
    Run {
        /// Config file (default conf/gatewarden.yaml, then /etc/gatewarden/gatewarden.yaml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Run in the background.
        #[arg(short, long)]
        daemon: bool,
        /// Take over the listening sockets of a running gatewarden (graceful upgrade);
        /// then send SIGQUIT to the old process.
        #[arg(short, long)]
        upgrade: bool,
    },
    /// Validate a config file and everything it references.
    Check {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run the gateway in front of a built-in demo app, on loopback.
    Demo {
        /// Where the gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin listener (/metrics) listens.
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin: SocketAddr,
    },
    /// Put URL behind the gateway with no config file.
    Protect {
        /// The app to protect, such as http://127.0.0.1:3000.
        url: String,
        /// Where the gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Manage API keys in a keys file or in Redis.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Print usage per day, route, subject and key: from the Redis replicas share, or
    /// from a gateway's admin API.
    Usage {
        #[command(flatten)]
        source: UsageSource,
        /// First day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        from: Option<String>,
        /// Last day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        to: Option<String>,
        /// Only this subject.
        #[arg(long)]
        subject: Option<String>,
    },
    /// Print the JSON Schema of the config file (for editors and validators).
    Schema,
    /// Read a PIN from standard input and print its argon2id hash for `pin_gate`.
    HashPin,
    /// Print the version and build information.
    Version,
}

/// Where `gatewarden key` finds the keys: a keys file, or the Redis replicas share.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct KeyStoreArgs {
    /// The keys file (created by the first `key new`).
    #[arg(long)]
    file: Option<PathBuf>,
    /// The Redis that replicas share keys through (`api_key` with `store: redis`), as
    /// redis://[:password@]host:port[/db].
    #[arg(long)]
    redis: Option<String>,
}

impl KeyStoreArgs {
    fn open(self) -> Result<gatewarden_plugins::key_store::KeyStore, String> {
        use gatewarden_plugins::key_store::{KeyStore, RedisKeys};
        match (self.file, self.redis) {
            (Some(file), _) => Ok(KeyStore::File(file)),
            (None, Some(url)) => RedisKeys::open(&url).map(KeyStore::Redis),
            (None, None) => Err("give --file or --redis".into()),
        }
    }
}

/// Where `gatewarden usage` reads from.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct UsageSource {
    /// The Redis that replicas share usage through.
    #[arg(long)]
    redis: Option<String>,
    /// A gateway's admin listener, such as http://127.0.0.1:9091; the admin key comes
    /// from GATEWARDEN_ADMIN_KEY.
    #[arg(long)]
    admin: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum KeyAction {
    /// Create a key; its plaintext is printed once and never stored.
    New {
        #[command(flatten)]
        store: KeyStoreArgs,
        #[arg(long)]
        name: String,
        /// user or admin.
        #[arg(long, default_value = "user")]
        role: String,
        /// Who the key stands for (default: the name); upstreams see it as the identity.
        #[arg(long)]
        subject: Option<String>,
        /// Lifetime such as 30d or 12h (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never hashes or plaintext).
    List {
        #[command(flatten)]
        store: KeyStoreArgs,
    },
    /// Disable a key by id or prefix.
    Revoke {
        #[command(flatten)]
        store: KeyStoreArgs,
        /// The key's id (k_...) or prefix (gw_...).
        key: String,
    },
    /// Copy the keys of a keys file into Redis (keys already there, by id, are kept).
    Import {
        /// The keys file to read.
        #[arg(long)]
        file: PathBuf,
        /// The Redis to copy them into.
        #[arg(long)]
        redis: String,
    },
}

/// Runs the parsed command line; the exit code says what went wrong: 1 for a failed
/// `check`, 2 for a config that `run` cannot serve.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Version => {
            println!(
                "gatewarden {} (pingora 0.9, {} {})",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            ExitCode::SUCCESS
        }
        Command::Check { config } => check(&config::default_path(config.as_deref())),
        Command::Run {
            config,
            daemon,
            upgrade,
        } => {
            let path = config::default_path(config.as_deref());
            match config::load(&path, 1) {
                Ok(compiled) => serve(compiled, Some(path), RunFlags { daemon, upgrade }),
                Err(errors) => {
                    eprint!("{errors}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo { listen, admin } => demo(listen, admin),
        Command::Key { action } => key(action),
        Command::Usage {
            source,
            from,
            to,
            subject,
        } => usage(source, from, to, subject),
        Command::Schema => match serde_json::to_string_pretty(&config::schema::schema()) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::HashPin => hash_pin(),
        Command::Protect { url, listen } => protect(&url, listen),
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path, 1) {
        Ok(compiled) => {
            for w in &compiled.warnings {
                println!("warning: {w}");
            }
            let s = &compiled.snapshot;
            println!(
                "ok: {} routes, {} upstreams, {} plugins",
                s.router.routes().len(),
                s.pools.len(),
                s.plugin_count
            );
            if let Some(line) = shards_line(&compiled) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::from(1)
        }
    }
}

/// How `check`'s config would serve its listeners, when sharded.
fn shards_line(compiled: &Compiled) -> Option<String> {
    let plan = Some(&compiled.shards).filter(|p| p.sharded())?;
    let auto = if compiled.server.shards == Some(crate::config::file::Shards::Auto) {
        " (auto: one per CPU of this machine)"
    } else {
        ""
    };
    Some(format!(
        "shards: {} per listener{auto}, each one thread with a listening socket of its own \
         (SO_REUSEPORT)",
        plan.shards
    ))
}

fn serve(compiled: Compiled, path: Option<PathBuf>, flags: RunFlags) -> ExitCode {
    match server::run(compiled, path, flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Compiles a built-in config; a failure here is a bug, reported as such.
fn builtin(yaml: &str) -> Result<Compiled, ExitCode> {
    config::compile(yaml, 1).map_err(|errors| {
        for e in errors {
            eprintln!("built-in config: {e}");
        }
        ExitCode::from(2)
    })
}

fn demo(listen: SocketAddr, admin: SocketAddr) -> ExitCode {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            match crate::demo_upstream::DemoUpstream::start("127.0.0.1:0").await {
                Ok(up) => {
                    let _ = tx.send(Ok(up.addr));
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    let upstream = match rx.recv() {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => {
            eprintln!("error: cannot start the demo app: {e}");
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!("error: the demo app thread stopped");
            return ExitCode::from(2);
        }
    };
    let credentials = match Credentials::mint() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let yaml = format!(
        "
listeners: [{{ address: '{listen}' }}]
admin: {{ address: '{admin}' }}
upstreams:
  demo:
    backends: ['{upstream}']
    health_check: {{ kind: http, path: /health, interval: 5s }}
plugins:
  pin:
    type: pin_gate
    pin_hash: '{pin_hash}'
    secret: '{secret}'
  stamp:
    type: headers
    request: {{ set: {{ X-Gatewarden-User: '{{identity.subject}}', X-Gatewarden-Client: '{{client_ip}}' }} }}
    response: {{ set: {{ X-Frame-Options: DENY }} }}
routes:
  - name: demo
    access: user
    upstream: demo
    plugins: [pin, stamp]
",
        pin_hash = credentials.pin_hash,
        secret = credentials.secret,
    );
    let compiled = match builtin(&yaml) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "gatewarden demo: open http://{listen}/ and sign in with PIN {} (demo app on {upstream})",
        credentials.pin
    );
    serve(compiled, None, RunFlags::default())
}

fn protect(url: &str, listen: SocketAddr) -> ExitCode {
    let Some((tls, rest)) = url
        .strip_prefix("http://")
        .map(|r| (false, r))
        .or_else(|| url.strip_prefix("https://").map(|r| (true, r)))
    else {
        eprintln!("error: {url:?} must start with http:// or https://");
        return ExitCode::from(2);
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        eprintln!("error: {url:?} needs a host (and no user info)");
        return ExitCode::from(2);
    }
    let backend = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    // On loopback only this machine can reach the app, as it already could. Anywhere
    // else, nothing passes without the minted token or PIN.
    let exposed = !listen.ip().is_loopback();
    let credentials = if exposed {
        match Credentials::mint() {
            Ok(c) => Some(c),
            Err(code) => return code,
        }
    } else {
        None
    };
    let tls_line = if tls { "tls: true" } else { "tls: false" };
    let (plugins, access, chain) = match &credentials {
        Some(c) => (
            format!(
                "plugins:\n  token: {{ type: api_key, admin_key: '{}' }}\n  pin: {{ type: pin_gate, pin_hash: '{}', secret: '{}' }}\n",
                c.token, c.pin_hash, c.secret
            ),
            "user",
            "[token, pin]",
        ),
        None => (String::new(), "public", "[]"),
    };
    let yaml = format!(
        "
listeners: [{{ address: '{listen}' }}]
upstreams:
  app:
    backends: ['{backend}']
    {tls_line}
{plugins}routes:
  - name: app
    access: {access}
    upstream: app
    plugins: {chain}
"
    );
    let compiled = match builtin(&yaml) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &credentials {
        Some(c) => {
            println!("gatewarden: protecting {url} at http://{listen}/");
            println!("  API clients: Authorization: Bearer {}", c.token);
            println!("  browsers:    sign in with PIN {}", c.pin);
            println!("  these are shown once and not stored anywhere");
        }
        None => {
            println!("gatewarden: protecting {url} at http://{listen}/ (loopback only, no login)")
        }
    }
    serve(compiled, None, RunFlags::default())
}

fn key(action: KeyAction) -> ExitCode {
    use gatewarden_plugins::key_store::RedisKeys;
    use gatewarden_plugins::keys::{KeysFile, NewKey};
    use gatewarden_plugins::Role;
    let result: Result<(), String> = match action {
        KeyAction::New {
            store,
            name,
            role,
            subject,
            expires,
        } => (|| {
            let role = Role::parse(&role)
                .ok_or_else(|| format!("unknown role {role:?}; use user or admin"))?;
            let expires_at = match expires {
                Some(text) => {
                    let d = config::units::parse_duration(&text)?;
                    let d = chrono::Duration::from_std(d)
                        .map_err(|_| format!("{text:?} is too long"))?;
                    Some(chrono::Utc::now() + d)
                }
                None => None,
            };
            if name.trim().is_empty() {
                return Err("--name must not be empty".into());
            }
            let (record, plaintext) = store
                .open()?
                .create(NewKey {
                    name,
                    role,
                    subject,
                    expires_at,
                })
                .map_err(|e| e.to_string())?;
            eprintln!(
                "created key {} ({}, role {}, subject {}){}; it is shown once, store it now:",
                record.id,
                record.prefix,
                record.role.as_str(),
                record.subject,
                record
                    .expires_at
                    .map(|e| format!(", expires {}", e.to_rfc3339()))
                    .unwrap_or_default()
            );
            println!("{plaintext}");
            Ok(())
        })(),
        KeyAction::List { store } => store
            .open()
            .and_then(|s| s.list().map_err(|e| e.to_string()))
            .map(|(f, used)| {
                let now = chrono::Utc::now();
                let fmt = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
                };
                println!(
                    "{:<11} {:<16} {:<10} {:<6} {:<16} {:<16} {:<16} {:<16} STATUS",
                    "ID", "NAME", "PREFIX", "ROLE", "SUBJECT", "CREATED", "EXPIRES", "LAST USED"
                );
                for k in &f.keys {
                    println!(
                        "{:<11} {:<16} {:<10} {:<6} {:<16} {:<16} {:<16} {:<16} {}",
                        k.id,
                        k.name,
                        k.prefix,
                        k.role.as_str(),
                        k.subject,
                        fmt(Some(k.created_at)),
                        fmt(k.expires_at),
                        fmt(used.get(&k.id).copied()),
                        k.status(now)
                    );
                }
            }),
        KeyAction::Revoke { store, key } => store
            .open()
            .and_then(|s| s.revoke(&key).map_err(|e| e.to_string()))
            .map(|k| {
                println!("revoked {} ({}, {})", k.id, k.prefix, k.name);
            }),
        KeyAction::Import { file, redis } => (|| {
            if !file.exists() {
                return Err(format!("{} does not exist", file.display()));
            }
            let keys = KeysFile::load(&file).map_err(|e| e.to_string())?;
            let added = RedisKeys::open(&redis)?
                .import(&keys)
                .map_err(|e| e.to_string())?;
            println!(
                "imported {added} of {} keys from {} ({} were there already)",
                keys.keys.len(),
                file.display(),
                keys.keys.len() - added
            );
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage(
    source: UsageSource,
    from: Option<String>,
    to: Option<String>,
    subject: Option<String>,
) -> ExitCode {
    use crate::usage::{self, Query};
    let result = (|| -> Result<serde_json::Value, String> {
        let query = Query::parse(from.as_deref(), to.as_deref(), subject.as_deref())?;
        match (source.redis, source.admin) {
            (Some(url), _) => Ok(usage::to_json(
                &query,
                &usage::shared_blocking(&url, &query)?,
            )),
            (None, Some(admin)) => {
                let key = std::env::var("GATEWARDEN_ADMIN_KEY")
                    .map_err(|_| "set GATEWARDEN_ADMIN_KEY to the admin key".to_string())?;
                let mut path = format!("/admin/usage?from={}&to={}", query.from, query.to);
                if let Some(s) = &query.subject {
                    path.push_str("&subject=");
                    path.push_str(&gatewarden_plugins::forms::encode_query(s));
                }
                admin_get(&admin, &path, &key)
            }
            (None, None) => Err("give --redis or --admin".into()),
        }
    })();
    match result {
        Ok(answer) => {
            print_usage(&answer);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `GET path` on a gateway's plain-HTTP admin listener, with the admin key.
fn admin_get(base: &str, path: &str, key: &str) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    let authority = base
        .strip_prefix("http://")
        .ok_or("--admin takes an http:// URL of the admin listener")?
        .trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let timeout = std::time::Duration::from_secs(10);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("{authority}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{authority}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("{authority}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the admin listener sent no complete answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let body: serde_json::Value =
        serde_json::from_str(body).map_err(|_| format!("the admin listener answered {status}"))?;
    if status != "200" {
        let reason = body["error"].as_str().unwrap_or("no reason given");
        return Err(format!("the admin listener answered {status}: {reason}"));
    }
    Ok(body)
}

/// The usage as a table, one row per day, route, subject and key, then the totals.
fn print_usage(answer: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "{:<10} {:<14} {:<20} {:<11} {:>8} {:>6} {:>6} {:>6} {:>6} {:>10} {:>11} {:>9} {:>10} {:>9}",
        "DAY", "ROUTE", "SUBJECT", "KEY", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "BYTES IN",
        "BYTES OUT", "PROMPT", "COMPLETION", "TOKENS"
    );
    let rows = answer["rows"].as_array().cloned().unwrap_or_default();
    let totals = {
        let mut t = answer["totals"].clone();
        t["day"] = "total".into();
        t
    };
    for row in rows.iter().chain(std::iter::once(&totals)) {
        let text = |k: &str| row[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<10} {:<14} {:<20} {:<11} {:>8} {:>6} {:>6} {:>6} {:>6} {:>10} {:>11} {:>9} {:>10} {:>9}",
            text("day"),
            text("route"),
            text("subject"),
            text("key_id"),
            n(&row["requests"]),
            n(&row["responses"]["2xx"]),
            n(&row["responses"]["3xx"]),
            n(&row["responses"]["4xx"]),
            n(&row["responses"]["5xx"]),
            n(&row["bytes_in"]),
            n(&row["bytes_out"]),
            n(&row["tokens"]["prompt"]),
            n(&row["tokens"]["completion"]),
            n(&row["tokens"]["total"]),
        );
    }
}

fn hash_pin() -> ExitCode {
    let mut pin = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut pin) {
        eprintln!("error: cannot read the PIN from stdin: {e}");
        return ExitCode::from(1);
    }
    let pin = pin.trim_end_matches(['\r', '\n']);
    match gatewarden_plugins::pin_gate::hash_pin(pin) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// A random access token, PIN and session secret for the zero-config commands.
struct Credentials {
    token: String,
    pin: String,
    pin_hash: String,
    secret: String,
}

impl Credentials {
    fn mint() -> Result<Credentials, ExitCode> {
        use gatewarden_plugins::keys;
        // Eight digits from base62 noise: keep only digits until there are enough.
        let mut pin = String::new();
        while pin.len() < 8 {
            pin.extend(keys::random_base62(32).chars().filter(char::is_ascii_digit));
        }
        pin.truncate(8);
        let pin_hash = gatewarden_plugins::pin_gate::hash_pin(&pin).map_err(|e| {
            eprintln!("error: cannot hash the PIN: {e}");
            ExitCode::from(2)
        })?;
        Ok(Credentials {
            token: keys::generate_key(),
            pin,
            pin_hash,
            secret: keys::random_base62(48),
        })
    }
}
