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
    /// Print the version and build information.
    Version,
}

/// Runs the parsed command line; the exit code follows the SPEC: 1 for a failed
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
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::from(1)
        }
    }
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
    let yaml = format!(
        "
listeners: [{{ address: '{listen}' }}]
admin: {{ address: '{admin}' }}
upstreams:
  demo:
    backends: ['{upstream}']
    health_check: {{ kind: http, path: /health, interval: 5s }}
plugins:
  stamp:
    type: headers
    request: {{ set: {{ X-Gatewarden-Client: '{{client_ip}}' }} }}
    response: {{ set: {{ X-Frame-Options: DENY }} }}
routes:
  - name: demo
    access: public
    upstream: demo
    plugins: [stamp]
"
    );
    let compiled = match builtin(&yaml) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("gatewarden demo: open http://{listen}/ (demo app on {upstream}; all routes public in this build)");
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
    if !listen.ip().is_loopback() {
        eprintln!(
            "error: protect on a non-loopback address ({listen}) needs an access token and PIN, which arrive with the identity plugins; listen on 127.0.0.1 for now"
        );
        return ExitCode::from(2);
    }
    let tls_line = if tls { "tls: true" } else { "tls: false" };
    let yaml = format!(
        "
listeners: [{{ address: '{listen}' }}]
upstreams:
  app:
    backends: ['{backend}']
    {tls_line}
routes:
  - name: app
    access: public
    upstream: app
"
    );
    let compiled = match builtin(&yaml) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("gatewarden: protecting {url} at http://{listen}/ (loopback only)");
    serve(compiled, None, RunFlags::default())
}
