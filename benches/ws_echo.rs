//! WebSocket echo through the gateway: how many round trips a second, and how long
//! each takes, on connections that stay open the whole run (the shape of a notebook
//! kernel or a chat UI's socket).
//!
//! An echo server in this process answers every message with the same message. Each
//! of `WS_CONNS` clients opens one WebSocket and sends `WS_MESSAGES` text messages of
//! `WS_SIZE` bytes, one at a time, waiting for each echo before the next. The clients
//! run directly against the echo server and through the real `gatewarden` binary on
//! loopback (`public`: a public route, no plugins; `chain`: `api_key` + `rate_limit` +
//! `origin` + `headers`, as in `benches/conf/gatewarden-chain.yaml`); the targets take
//! turns, round after round.
//!
//! Run: `cargo bench --bench ws_echo`.
//!
//! Environment knobs:
//! - `WS_CONNS` — connections at once (default 16)
//! - `WS_MESSAGES` — round trips per connection and round (default 2000)
//! - `WS_SIZE` — bytes per message (default 128)
//! - `WS_ROUNDS` — measured rounds per target (default 2)
//! - `WS_THREADS` — `server.threads` of the gateway (default 2)
//! - `WS_VARIANTS` — comma-separated subset of `public,chain` (default both)
//! - `WS_UPSTREAM_PORT` — the loopback port of the echo server (default: any free one)
//! - `BENCH_TARGETS`, `BENCH_KEY` — measure proxies someone else started instead
//!   (`name=127.0.0.1:port ...`, each proxying `/ws` to `WS_UPSTREAM_PORT`); requests
//!   carry `BENCH_KEY` as a bearer key. `benches/load.sh` runs the bench so and gets a
//!   markdown table.
//! - `GATEWARDEN_BIN` — another gatewarden binary to measure

// Bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod support;
use support::{env_or, external_auth, external_targets, ratio, table_row, GatewayProcess, Variant};

/// Bound on one connection's whole run, so a wedged proxy fails the bench.
const CONNECTION_LIMIT: Duration = Duration::from_secs(120);

struct Knobs {
    conns: usize,
    messages: usize,
    size: usize,
    rounds: usize,
    threads: usize,
    variants: Vec<Variant>,
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            conns: env_or("WS_CONNS", 16usize).max(1),
            messages: env_or("WS_MESSAGES", 2000usize).max(1),
            size: env_or("WS_SIZE", 128usize),
            rounds: env_or("WS_ROUNDS", 2usize).max(1),
            threads: env_or("WS_THREADS", 2usize).max(1),
            variants: Variant::list(
                &std::env::var("WS_VARIANTS").unwrap_or_else(|_| "public,chain".to_string()),
            ),
        }
    }
}

/// The echo server: every text or binary message comes back as it went out.
async fn start_echo(port: u16) -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind echo server");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                stream.set_nodelay(true)?;
                let mut ws = tokio_tungstenite::accept_async(stream)
                    .await
                    .map_err(std::io::Error::other)?;
                while let Some(message) = ws.next().await {
                    match message.map_err(std::io::Error::other)? {
                        m @ (Message::Text(_) | Message::Binary(_)) => {
                            ws.send(m).await.map_err(std::io::Error::other)?
                        }
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    addr
}

/// One client: opens `/ws` on `addr` and times `messages` round trips.
async fn client(
    addr: SocketAddr,
    auth: String,
    messages: usize,
    size: usize,
) -> std::io::Result<Vec<Duration>> {
    tokio::time::timeout(CONNECTION_LIMIT, async move {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut request = format!("ws://{addr}/ws")
            .into_client_request()
            .map_err(std::io::Error::other)?;
        if let Some((name, value)) = auth.trim_end().split_once(": ") {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).map_err(std::io::Error::other)?,
                value.parse().map_err(std::io::Error::other)?,
            );
        }
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(std::io::Error::other)?;
        let payload = "x".repeat(size);
        let mut times = Vec::with_capacity(messages);
        for _ in 0..messages {
            let sent = Instant::now();
            ws.send(Message::text(payload.clone()))
                .await
                .map_err(std::io::Error::other)?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(echo))) if echo.len() == size => break,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(other)) => {
                        return Err(std::io::Error::other(format!(
                            "unexpected message {other:?}"
                        )))
                    }
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                    None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                }
            }
            times.push(sent.elapsed());
        }
        let _ = ws.close(None).await;
        Ok(times)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connection run timed out"))?
}

/// One round against one target: every client at once; the round-trip times and the
/// wall time the round took.
async fn round(
    addr: SocketAddr,
    auth: &str,
    knobs: &Knobs,
) -> std::io::Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..knobs.conns)
        .map(|_| tokio::spawn(client(addr, auth.to_string(), knobs.messages, knobs.size)))
        .collect();
    let mut times = Vec::with_capacity(knobs.conns * knobs.messages);
    for task in tasks {
        times.extend(task.await.map_err(std::io::Error::other)??);
    }
    Ok((times, started.elapsed()))
}

struct Target {
    name: String,
    addr: SocketAddr,
    auth: String,
    times: Vec<Duration>,
    wall: Duration,
}

/// Nearest-rank quantile of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let knobs = Knobs::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let upstream = rt.block_on(start_echo(env_or("WS_UPSTREAM_PORT", 0u16)));
    let external = external_targets();
    let mut gateways: Vec<(Variant, GatewayProcess)> = match external {
        Some(_) => Vec::new(),
        None => knobs
            .variants
            .iter()
            .map(|&v| {
                let mut gw = GatewayProcess::spawn(v, knobs.threads, upstream, |u| u);
                gw.wait_ready(|gw| {
                    rt.block_on(client(gw.addr, gw.auth.clone(), 1, 8))
                        .map(drop)
                });
                (v, gw)
            })
            .collect(),
    };
    let mut targets = vec![Target {
        name: "direct".to_string(),
        addr: upstream,
        auth: String::new(),
        times: Vec::new(),
        wall: Duration::ZERO,
    }];
    for (v, gw) in &gateways {
        targets.push(Target {
            name: format!("gateway {}", v.name()),
            addr: gw.addr,
            auth: gw.auth.clone(),
            times: Vec::new(),
            wall: Duration::ZERO,
        });
    }
    for t in external.iter().flatten() {
        targets.push(Target {
            name: t.name.clone(),
            addr: t.addr,
            auth: external_auth(),
            times: Vec::new(),
            wall: Duration::ZERO,
        });
    }
    println!(
        "ws_echo: {} connections x {} round trips of {} B per round, {} round(s)",
        knobs.conns, knobs.messages, knobs.size, knobs.rounds
    );

    // Warm-up: connections, the gateway's code paths, the allocator.
    for t in &targets {
        rt.block_on(round(
            t.addr,
            &t.auth,
            &Knobs {
                messages: 50,
                ..Knobs::from_env()
            },
        ))
        .unwrap_or_else(|e| panic!("warm-up via {}: {e}", t.name));
    }
    for r in 0..knobs.rounds {
        let n = targets.len();
        for k in 0..n {
            let t = &mut targets[(k + r) % n];
            let (times, wall) = rt
                .block_on(round(t.addr, &t.auth, &knobs))
                .unwrap_or_else(|e| panic!("round {r} via {}: {e}", t.name));
            t.times.extend(times);
            t.wall += wall;
        }
        for (_, gw) in &mut gateways {
            gw.assert_alive();
        }
    }

    let rate = |t: &Target| t.times.len() as f64 / t.wall.as_secs_f64();
    let nginx = targets.iter().find(|t| t.name == "nginx").map(rate);
    println!();
    println!("| target | round trips/s | p50 µs | p99 µs | p99.9 µs | round trips/s vs nginx |");
    println!("|---|---:|---:|---:|---:|---:|");
    for t in &mut targets {
        t.times.sort_unstable();
        let us = |q| quantile(&t.times, q).as_secs_f64() * 1e6;
        table_row(&[
            t.name.clone(),
            format!("{:.0}", rate(t)),
            format!("{:.0}", us(0.5)),
            format!("{:.0}", us(0.99)),
            format!("{:.0}", us(0.999)),
            ratio(rate(t), nginx),
        ]);
    }
}
