//! The command line: `run`, `check`, `demo`, `protect`, `key`, `usage`, `hash-pin`,
//! `schema`, `version`.

mod keys;
mod usage;
mod zero_config;

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
        Command::Demo { listen, admin } => zero_config::demo(listen, admin),
        Command::Key { action } => keys::key(action),
        Command::Usage {
            source,
            from,
            to,
            subject,
        } => usage::usage(source, from, to, subject),
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
        Command::HashPin => keys::hash_pin(),
        Command::Protect { url, listen } => zero_config::protect(&url, listen),
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
