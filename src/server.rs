//! Assembles the Pingora server from a compiled config and runs it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::prelude::Opt;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::compile::Listener;
use crate::config::Compiled;
use crate::head_deadline::HEAD_DEADLINE;
use crate::plumbing::{ClientConnections, ClientSettings, DEFAULT_WRITE_BUFFER};
use crate::proxy::Gateway;
use crate::reload::{SighupReloader, State};
use crate::stop::{StopSignals, Stopper};
use crate::upstream::HealthChecker;

/// Idle seconds before a kept-alive client connection is closed, unless
/// `server.client_keepalive_timeout_seconds` says otherwise (nginx's default).
const DEFAULT_CLIENT_KEEPALIVE_SECS: u64 = 75;

/// Plain-TCP client sockets get no L4 buffers of their own. Pingora's default is a
/// 64 KiB read buffer per accepted socket for its whole life: 10 000 idle keep-alive
/// clients held ~620 MiB in those alone. The HTTP/1 reader already reads heads into its
/// own buffer and bodies in large reads, and an A/B run of the load bench showed no loss
/// without it. Writes are coalesced by [`crate::plumbing::ClientStream`], whose
/// buffer is held only while a response is written. TLS listeners keep the defaults:
/// the TLS record reader issues many small reads that the buffer saves syscalls on.
fn client_buffers() -> L4BufferSettings {
    if crate::plumbing::switches::off().client_loop {
        return L4BufferSettings::default();
    }
    L4BufferSettings::default().read(0).write(0)
}

type ProxyService = Service<ClientConnections<HttpProxy<Gateway>>>;

/// The TLS settings of a listener: certificate and key, HTTP/2 offered through ALPN.
fn tls_settings(addr: &str, cert: &str, key: &str) -> anyhow::Result<TlsSettings> {
    let mut tls = TlsSettings::intermediate(cert, key)
        .map_err(|e| anyhow::anyhow!("listener {addr}: cannot load {cert} / {key}: {e}"))?;
    tls.enable_h2();
    Ok(tls)
}

/// A listener as one service, on the server's worker threads.
fn whole_service(
    listener: &Listener,
    app: ClientConnections<HttpProxy<Gateway>>,
) -> anyhow::Result<ProxyService> {
    let addr = listener.address.to_string();
    let mut service = Service::new(format!("gatewarden {addr}"), app);
    match &listener.tls {
        Some((cert, key)) => {
            service.add_tls_with_settings(&addr, None, tls_settings(&addr, cert, key)?)
        }
        None => {
            service.add_listener(ListenerConfig::tcp(addr.as_str()).l4_buffer(client_buffers()))
        }
    }
    Ok(service)
}

/// Shard `index` of a listener: one thread, and a socket of its own bound with
/// `SO_REUSEPORT` under a name that an upgrade hands over apart from its siblings'
/// (see [`crate::shards`]).
fn sharded_service(
    listener: &Listener,
    index: usize,
    app: ClientConnections<HttpProxy<Gateway>>,
) -> anyhow::Result<ProxyService> {
    let addr = listener.address.to_string();
    let name = crate::shards::socket_name(listener.address, index);
    let mut service = Service::new(format!("shard {index} of {addr}"), app);
    service.threads = Some(1);
    let mut reuseport = TcpSocketOptions::default();
    reuseport.so_reuseport = Some(true);
    match &listener.tls {
        Some((cert, key)) => {
            service.add_tls_with_settings(&name, Some(reuseport), tls_settings(&addr, cert, key)?)
        }
        None => service.add_listener(
            ListenerConfig::tcp(name)
                .tcp_socket_options(reuseport)
                .l4_buffer(client_buffers()),
        ),
    }
    Ok(service)
}

/// How long in-flight requests may take to finish after SIGTERM or an upgrade's
/// SIGQUIT, unless `server.grace_period_seconds` says otherwise: Pingora's default.
const DEFAULT_GRACE_PERIOD_SECS: u64 = 300;

/// How long a stopping gateway waits for its last spans to reach the collector.
const TRACE_FLUSH_BOUND: Duration = Duration::from_secs(5);

/// How the process was asked to start.
#[derive(Debug, Default, Clone)]
pub struct RunFlags {
    pub daemon: bool,
    pub upgrade: bool,
}

fn server_conf(compiled: &Compiled, flags: &RunFlags) -> ServerConf {
    let s = &compiled.server;
    let mut conf = ServerConf {
        threads: s
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        daemon: flags.daemon,
        // Daemonizing moves to / by default; relative paths in the config (keys files,
        // logs, certificates) must keep meaning what they meant when it was checked.
        working_directory: std::env::current_dir().ok(),
        ..ServerConf::default()
    };
    if let Some(v) = s.work_stealing {
        conf.work_stealing = v;
    }
    // The grace period is gatewarden's (see `crate::stop`): Pingora's own would be slept
    // through in full after every graceful stop.
    conf.grace_period_seconds = Some(0);
    conf.graceful_shutdown_timeout_seconds = s
        .graceful_shutdown_timeout_seconds
        .or(conf.graceful_shutdown_timeout_seconds);
    if let Some(v) = &s.pid_file {
        conf.pid_file = v.clone();
    }
    if let Some(v) = &s.upgrade_sock {
        conf.upgrade_sock = v.clone();
    }
    conf.error_log = s.error_log.clone();
    conf.user = s.user.clone();
    conf.group = s.group.clone();
    if let Some(v) = s.upstream_keepalive_pool_size {
        conf.upstream_keepalive_pool_size = v;
    }
    if let Some(v) = s.listener_tasks_per_fd {
        conf.listener_tasks_per_fd = v;
    }
    conf
}

/// Serves `compiled` until the process is told to stop. `config_path` is reloaded on
/// SIGHUP and `POST /admin/reload`. Returns once a shutdown has finished.
pub fn run(
    compiled: Compiled,
    config_path: Option<PathBuf>,
    flags: RunFlags,
) -> anyhow::Result<()> {
    let conf = server_conf(&compiled, &flags);
    let opt = Opt {
        upgrade: flags.upgrade,
        daemon: flags.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let conf = server.configuration.clone();
    let stopper = Stopper::new();
    let stop_signals = StopSignals {
        stopper: stopper.clone(),
        grace: Duration::from_secs(
            compiled
                .server
                .grace_period_seconds
                .unwrap_or(DEFAULT_GRACE_PERIOD_SECS),
        ),
        upgrade_sock: conf.upgrade_sock.clone(),
    };

    let Compiled {
        snapshot,
        listeners,
        admin,
        warnings,
        server: server_section,
        shards: plan,
    } = compiled;
    for w in &warnings {
        log::warn!("{w}");
    }
    let config_path = config_path.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    // A daemon starts them after forking (threads do not survive a fork), when it
    // builds its config again.
    if !(flags.daemon && config_path.is_some()) {
        if let Err(problems) = snapshot.start() {
            anyhow::bail!("{}", problems.join("\n"));
        }
    }
    let state = Arc::new(State::new(snapshot, config_path));

    let client_keepalive = match server_section.client_keepalive_timeout_seconds {
        None => Some(DEFAULT_CLIENT_KEEPALIVE_SECS),
        Some(0) => None,
        Some(secs) => Some(secs),
    };
    let clients = ClientSettings {
        head_limit: server_section
            .client_header_timeout_seconds
            .map_or(HEAD_DEADLINE, Duration::from_secs),
        keepalive: client_keepalive.map(Duration::from_secs),
        write_buffer: if crate::plumbing::switches::off().write_gathering {
            0
        } else {
            server_section
                .client_write_buffer_bytes
                .unwrap_or(DEFAULT_WRITE_BUFFER)
        },
        own_loop: !crate::plumbing::switches::off().client_loop,
    };
    crate::plumbing::switches::log();
    if plan.sharded() {
        log::info!(
            "shards: {} per listener, each one thread with a listening socket of its own \
             (SO_REUSEPORT)",
            plan.shards
        );
    } else {
        log::info!(
            "shards: off; each listener is one service of {} worker threads",
            conf.threads
        );
    }
    let mut lines = Vec::new();
    for listener in &listeners {
        let addr = listener.address.to_string();
        for shard in 0..plan.shards {
            let gateway = Gateway {
                state: state.clone(),
                tls: listener.tls.is_some(),
                client_keepalive,
                client_body_timeout: server_section
                    .client_body_timeout_seconds
                    .map(Duration::from_secs),
                // Each shard dials its upstreams from its own thread.
                upgrades: crate::tunnel::Upgrades::new(&conf),
            };
            let shard_label = if plan.sharded() {
                shard.to_string()
            } else {
                "-".to_string()
            };
            let accepted = crate::observe::metrics()
                .client_connections
                .with_label_values(&[addr.as_str(), shard_label.as_str()]);
            // Every shard has its own proxy, so its own upstream connection pool.
            let app = ClientConnections::new(pingora::proxy::http_proxy(&conf, gateway), clients)
                .counted(accepted);
            let service = if plan.sharded() {
                sharded_service(listener, shard, app)?
            } else {
                whole_service(listener, app)?
            };
            server.add_service(stopper.wrap(service));
        }
        let shards = if plan.sharded() {
            format!(", {} shards", plan.shards)
        } else {
            String::new()
        };
        lines.push(match &listener.tls {
            Some(_) => format!("listening on https://{addr} (HTTP/1.1 and HTTP/2{shards})"),
            None if plan.sharded() => {
                format!("listening on http://{addr} ({} shards)", plan.shards)
            }
            None => format!("listening on http://{addr}"),
        });
    }
    if let Some(admin) = &admin {
        let mut service = Service::new(
            "gatewarden admin".to_string(),
            AdminApp {
                state: state.clone(),
                console: Default::default(),
            },
        );
        service.add_tcp(&admin.address.to_string());
        server.add_service(stopper.wrap(service));
        lines.push(format!(
            "admin on http://{} (/metrics, /healthz, /admin/*, the console at /ui/)",
            admin.address
        ));
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker {
            state: state.clone(),
        },
    ));
    server.add_service(background_service(
        "usage to redis",
        crate::usage::UsageFlusher {
            state: state.clone(),
        },
    ));
    if flags.daemon && state.config_path.is_some() {
        server.add_service(background_service(
            "start plugins after daemonizing",
            crate::reload::AfterDaemonize {
                state: state.clone(),
            },
        ));
    }
    server.add_service(background_service(
        "reload on SIGHUP",
        SighupReloader {
            state: state.clone(),
        },
    ));

    for line in lines {
        println!("{line}");
    }
    // Not `run_forever`: it ends in `process::exit`, which skips destructors, and the
    // config's plugins write out what they hold when dropped (API keys' last use).
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(stop_signals),
    });
    if let Some(tracer) = &state.current().tracing {
        if !tracer.flush(TRACE_FLUSH_BOUND) {
            log::warn!("tracing: spans still queued at exit were not all sent");
        }
    }
    drop(state);
    Ok(())
}
