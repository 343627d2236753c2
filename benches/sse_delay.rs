//! The delay the gateway adds to each server-sent event (the target: "the added delay
//! per event through the gateway under 1 ms at the median").
//!
//! An SSE upstream in this process sends an event every `SSE_INTERVAL_MS` and writes
//! each event's send time into the event itself (nanoseconds since an `Instant` shared
//! by the whole process, so sender and receiver read the same clock). A client in the
//! same process reads the stream, finds each event's end (a blank line, across any
//! chunk or read boundary), notes when the read that completed it returned, and takes
//! the difference. It does so directly against the upstream and through the real
//! `gatewarden` binary on loopback: `public` (one `access: public` route, no plugins)
//! and `chain` (`api_key` + `rate_limit` + `origin` + `headers` on an `access: user`
//! route, as in `benches/conf/gatewarden-chain.yaml`). The targets take turns, round
//! after round, so a busy moment on the machine does not land on one of them only.
//! The added delay is the gateway's median minus the direct median.
//!
//! Nagle: the upstream and the client set `TCP_NODELAY` on their sockets; Pingora sets
//! it on the gateway's accepted and upstream sockets and flushes each body chunk (the
//! gateway makes the flush as soon as the connection waits again), so a small event is
//! never held back waiting for an ACK. The upstream sends each event as one HTTP chunk
//! and flushes it at once.
//!
//! Upstream and client each run on their own single-threaded runtime and OS thread, so
//! neither waits for the other's work to be scheduled.
//!
//! Run: `cargo bench --bench sse_delay` (or build with `--no-run` and run the printed
//! executable).
//!
//! Environment knobs:
//! - `SSE_EVENTS` — events per measured stream (default 300)
//! - `SSE_INTERVAL_MS` — time between events (default 20)
//! - `SSE_ROUNDS` — measured streams per target (default 2)
//! - `SSE_WARMUP` — events of an unmeasured stream per target first (default 25)
//! - `SSE_PAD` — bytes of filler per event, the size of a small LLM token event
//!   (default 120)
//! - `SSE_THREADS` — `server.threads` of the gateway (default 2, the machine's cores)
//! - `SSE_VARIANTS` — comma-separated subset of `public,chain` (default both)
//! - `GATEWARDEN_BIN` — another gatewarden binary to measure instead of the one cargo
//!   built for the bench
//! - `SSE_UPSTREAM_PORT` — the loopback port of the upstream (default: any free one)
//! - `BENCH_TARGETS`, `BENCH_KEY` — measure proxies someone else started (nginx, Caddy,
//!   gatewarden builds...) instead of starting gateways: `name=127.0.0.1:port ...`, each
//!   proxying `/events` to `SSE_UPSTREAM_PORT`; requests carry `BENCH_KEY` as a bearer
//!   key. `benches/load.sh` runs the bench so and gets a markdown table.

// Test and bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::{env_or, external_auth, external_targets, find, table_row, GatewayProcess, Variant};

const TARGET: Duration = Duration::from_millis(1);

/// The clock both ends of every stream measure against.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

struct Knobs {
    events: usize,
    interval: Duration,
    rounds: usize,
    warmup: usize,
    pad: usize,
    threads: usize,
    variants: Vec<Variant>,
}

impl Knobs {
    fn from_env() -> Knobs {
        let variants = Variant::list(
            &std::env::var("SSE_VARIANTS").unwrap_or_else(|_| "public,chain".to_string()),
        );
        Knobs {
            events: env_or("SSE_EVENTS", 300usize).max(1),
            interval: Duration::from_millis(env_or("SSE_INTERVAL_MS", 20u64)),
            rounds: env_or("SSE_ROUNDS", 2usize).max(1),
            warmup: env_or("SSE_WARMUP", 25usize),
            pad: env_or("SSE_PAD", 120usize),
            threads: env_or("SSE_THREADS", 2usize).max(1),
            variants,
        }
    }
}

/// The row label of a gateway variant.
fn label(variant: Variant) -> &'static str {
    match variant {
        Variant::Public => "gateway public",
        Variant::Chain => "gateway chain",
    }
}

/// Starts the gateway of `variant` and waits until a one-event stream goes through it
/// end to end.
fn start_gateway(
    client: &tokio::runtime::Runtime,
    variant: Variant,
    threads: usize,
    upstream: SocketAddr,
) -> GatewayProcess {
    let mut gw = GatewayProcess::spawn(variant, threads, upstream, |u| {
        u.with("read_timeout", "60s")
    });
    gw.wait_ready(|gw| {
        client
            .block_on(stream_events(gw.addr, &gw.auth, 1, Duration::ZERO, 0))
            .map(drop)
    });
    gw
}

// ---------------------------------------------------------------------------------
// The SSE upstream

/// Starts the upstream on `port` (0: any free one) on its own thread and runtime;
/// returns its address. The thread lives as long as the process.
fn start_upstream(port: u16) -> SocketAddr {
    let listener = StdTcpListener::bind(("127.0.0.1", port)).expect("bind upstream");
    listener
        .set_nonblocking(true)
        .expect("non-blocking upstream listener");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::Builder::new()
        .name("sse-upstream".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("upstream runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(serve_sse(stream));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
        })
        .expect("spawn upstream thread");
    addr
}

/// What a request asks of the upstream: `GET /events?n=<events>&ms=<interval>&pad=<bytes>`.
struct StreamSpec {
    events: usize,
    interval: Duration,
    pad: usize,
}

fn parse_spec(head: &[u8]) -> Option<StreamSpec> {
    let head = std::str::from_utf8(head).ok()?;
    let target = head.split(' ').nth(1)?;
    let query = target.strip_prefix("/events?")?;
    let mut spec = StreamSpec {
        events: 0,
        interval: Duration::ZERO,
        pad: 0,
    };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "n" => spec.events = v as usize,
            "ms" => spec.interval = Duration::from_millis(v),
            "pad" => spec.pad = v as usize,
            _ => return None,
        }
    }
    Some(spec)
}

/// Serves event streams, one per request, keep-alive. Each event is one HTTP chunk,
/// written (and so sent: no user-space buffer, `TCP_NODELAY`) right after its send
/// time is stamped into it.
async fn serve_sse(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(2048);
    let mut read = [0u8; 2048];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 << 10 {
                return Err(std::io::Error::other("request head too large"));
            }
            let n = stream.read(&mut read).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&read[..n]);
        };
        let Some(spec) = parse_spec(&buf[..head_end]) else {
            stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await?;
            buf.drain(..head_end);
            continue;
        };
        buf.drain(..head_end);
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .await?;
        let padding = "x".repeat(spec.pad);
        let start = tokio::time::Instant::now();
        let mut event = String::with_capacity(spec.pad + 128);
        let mut wire = Vec::with_capacity(spec.pad + 160);
        for seq in 0..spec.events {
            tokio::time::sleep_until(start + spec.interval * seq as u32).await;
            event.clear();
            let sent = epoch().elapsed().as_nanos();
            let _ = write!(
                event,
                "id: {seq}\nevent: tick\ndata: seq={seq} t={sent}\ndata: {padding}\n\n"
            );
            wire.clear();
            wire.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
            wire.extend_from_slice(event.as_bytes());
            wire.extend_from_slice(b"\r\n");
            stream.write_all(&wire).await?;
        }
        stream.write_all(b"0\r\n\r\n").await?;
    }
}

// ---------------------------------------------------------------------------------
// The client

/// How the response body is framed on the client's side of the connection.
enum Framing {
    Chunked(ChunkDecoder),
    Length(usize),
    Close,
}

/// An incremental `Transfer-Encoding: chunked` decoder: bytes go in as they arrive,
/// split anywhere, and decoded body bytes come out.
#[derive(Default)]
struct ChunkDecoder {
    pending: Vec<u8>,
    state: ChunkState,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    /// The last chunk was read; trailers (if any) are ignored.
    Done,
}

impl ChunkDecoder {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        let bad = |what: &str| std::io::Error::other(format!("bad chunked encoding: {what}"));
        self.pending.extend_from_slice(input);
        let mut at = 0;
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = find(&self.pending[at..], b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&self.pending[at..at + end])
                        .map_err(|_| bad("size line"))?;
                    let size_text = line.split(';').next().unwrap_or("").trim();
                    let size =
                        usize::from_str_radix(size_text, 16).map_err(|_| bad("size line"))?;
                    at += end + 2;
                    self.state = if size == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    let take = left.min(self.pending.len() - at);
                    if take == 0 {
                        break;
                    }
                    out.extend_from_slice(&self.pending[at..at + take]);
                    at += take;
                    self.state = if take == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataEnd => {
                    if self.pending.len() - at < 2 {
                        break;
                    }
                    if &self.pending[at..at + 2] != b"\r\n" {
                        return Err(bad("no CRLF after chunk data"));
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => break,
            }
        }
        self.pending.drain(..at);
        Ok(())
    }

    fn done(&self) -> bool {
        matches!(self.state, ChunkState::Done)
    }
}

/// Removes and returns the first complete event (up to and including the blank line
/// that ends it, `\n\n` or `\r\n\r\n`) from `buf`.
fn take_event(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let lf = find(buf, b"\n\n").map(|i| (i, i + 2));
    let crlf = find(buf, b"\r\n\r\n").map(|i| (i, i + 4));
    let (_, end) = match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }?;
    let rest = buf.split_off(end);
    Some(std::mem::replace(buf, rest))
}

/// `seq` and send time (ns since [`epoch`]) from an event's `data: seq=.. t=..` line;
/// `None` for events without one (comments, keep-alive pings).
fn parse_event(event: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(event).ok()?;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.strip_prefix(' ').unwrap_or(data);
        let (Some(seq), Some(t)) = (data.strip_prefix("seq="), data.split_once(" t=")) else {
            continue;
        };
        let seq = seq.split(' ').next()?.parse().ok()?;
        return Some((seq, t.1.trim().parse().ok()?));
    }
    None
}

/// Reads one event stream of `events` events from `addr` and returns each event's
/// delay from its send stamp to the return of the read that completed it.
async fn stream_events(
    addr: SocketAddr,
    extra_headers: &str,
    events: usize,
    interval: Duration,
    pad: usize,
) -> std::io::Result<Vec<Duration>> {
    let bound = interval * events as u32 + Duration::from_secs(10);
    tokio::time::timeout(bound, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET /events?n={events}&ms={}&pad={pad} HTTP/1.1\r\nHost: bench.local\r\n\
             Accept: text/event-stream\r\nConnection: close\r\n{extra_headers}\r\n",
            interval.as_millis()
        );
        stream.write_all(request.as_bytes()).await?;

        let mut read = vec![0u8; 16 << 10];
        let mut head = Vec::new();
        let (mut framing, first_body) = loop {
            let n = stream.read(&mut read).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&read[..n]);
            if let Some(i) = find(&head, b"\r\n\r\n") {
                let body = head.split_off(i + 4);
                break (response_framing(&head)?, body);
            }
        };

        let mut delays = Vec::with_capacity(events);
        let mut body = Vec::new();
        let mut events_buf = Vec::new();
        let mut input = first_body;
        let mut arrived = Instant::now();
        loop {
            let finished = match &mut framing {
                Framing::Chunked(decoder) => {
                    decoder.feed(&input, &mut body)?;
                    decoder.done()
                }
                Framing::Length(left) => {
                    let take = input.len().min(*left);
                    body.extend_from_slice(&input[..take]);
                    *left -= take;
                    *left == 0
                }
                Framing::Close => {
                    body.extend_from_slice(&input);
                    false
                }
            };
            events_buf.append(&mut body);
            while let Some(event) = take_event(&mut events_buf) {
                let Some((seq, sent_ns)) = parse_event(&event) else {
                    continue;
                };
                if seq != delays.len() {
                    return Err(std::io::Error::other(format!(
                        "event {seq} arrived, {} expected",
                        delays.len()
                    )));
                }
                let sent = epoch() + Duration::from_nanos(sent_ns);
                delays.push(arrived.saturating_duration_since(sent));
            }
            if finished || delays.len() == events {
                break;
            }
            let n = stream.read(&mut read).await?;
            arrived = Instant::now();
            if n == 0 {
                break;
            }
            input = read[..n].to_vec();
        }
        if delays.len() != events {
            return Err(std::io::Error::other(format!(
                "stream ended after {} of {events} events",
                delays.len()
            )));
        }
        Ok(delays)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "event stream timed out"))?
}

fn response_framing(head: &[u8]) -> std::io::Result<Framing> {
    let head = std::str::from_utf8(head).map_err(std::io::Error::other)?;
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or("");
    if status != "200" {
        return Err(std::io::Error::other(format!(
            "unexpected response: {head}"
        )));
    }
    let mut framing = Framing::Close;
    let mut is_sse = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked(ChunkDecoder::default());
        } else if name.eq_ignore_ascii_case("content-length") {
            if let (Framing::Close, Ok(n)) = (&framing, value.parse()) {
                framing = Framing::Length(n);
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            is_sse = value.starts_with("text/event-stream");
        } else if name.eq_ignore_ascii_case("content-encoding") {
            return Err(std::io::Error::other(format!(
                "the stream came back encoded ({value}); the delay would include compression"
            )));
        }
    }
    if !is_sse {
        return Err(std::io::Error::other(format!(
            "not an event stream: {head}"
        )));
    }
    Ok(framing)
}

// ---------------------------------------------------------------------------------
// Statistics and the run

struct Stats {
    n: usize,
    min: Duration,
    median: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Stats {
    fn of(delays: &mut [Duration]) -> Stats {
        assert!(!delays.is_empty(), "no delays to summarise");
        delays.sort_unstable();
        // Nearest rank: the smallest value with at least q of the samples at or below it.
        let q =
            |q: f64| delays[((q * delays.len() as f64).ceil() as usize).clamp(1, delays.len()) - 1];
        Stats {
            n: delays.len(),
            min: delays[0],
            median: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: delays[delays.len() - 1],
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Target {
    name: String,
    addr: SocketAddr,
    auth: String,
    delays: Vec<Duration>,
}

fn main() {
    let knobs = Knobs::from_env();
    let _ = epoch();
    let upstream = start_upstream(env_or("SSE_UPSTREAM_PORT", 0u16));
    let external = external_targets();
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "sse_delay: {} events every {} ms per stream, {} round(s), {} B filler per event, \
         gateway server.threads {}; {}; loadavg {}",
        knobs.events,
        knobs.interval.as_millis(),
        knobs.rounds,
        knobs.pad,
        knobs.threads,
        support::measured(),
        load_before.trim()
    );

    // Gateways first (they stay up for every round), then the targets in a fixed turn.
    let mut gateways: Vec<(Variant, GatewayProcess)> = match external {
        Some(_) => Vec::new(),
        None => knobs
            .variants
            .iter()
            .map(|&v| (v, start_gateway(&client, v, knobs.threads, upstream)))
            .collect(),
    };
    let mut targets = vec![Target {
        name: "direct".to_string(),
        addr: upstream,
        auth: String::new(),
        delays: Vec::new(),
    }];
    for (v, gw) in &gateways {
        targets.push(Target {
            name: label(*v).to_string(),
            addr: gw.addr,
            auth: gw.auth.clone(),
            delays: Vec::new(),
        });
    }
    for t in external.iter().flatten() {
        targets.push(Target {
            name: t.name.clone(),
            addr: t.addr,
            auth: external_auth(),
            delays: Vec::new(),
        });
    }

    // Warm-up: connections, the gateway's upstream pool, allocator, page cache.
    for t in &targets {
        client
            .block_on(stream_events(
                t.addr,
                &t.auth,
                knobs.warmup.max(1),
                knobs.interval,
                knobs.pad,
            ))
            .unwrap_or_else(|e| panic!("warm-up stream via {}: {e}", t.name));
    }

    for round in 0..knobs.rounds {
        // Rotate the order each round so no target always follows the same one.
        let n = targets.len();
        for k in 0..n {
            let t = &mut targets[(k + round) % n];
            let delays = client
                .block_on(stream_events(
                    t.addr,
                    &t.auth,
                    knobs.events,
                    knobs.interval,
                    knobs.pad,
                ))
                .unwrap_or_else(|e| panic!("round {round}, stream via {}: {e}", t.name));
            t.delays.extend(delays);
        }
        for (_, gw) in &mut gateways {
            gw.assert_alive();
        }
    }

    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("loadavg after: {}", load_after.trim());
    println!(
        "\n  {:<16} {:>7} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "path", "events", "min µs", "median µs", "p90 µs", "p99 µs", "max µs"
    );
    let mut stats = Vec::new();
    for t in &mut targets {
        let s = Stats::of(&mut t.delays);
        println!(
            "  {:<16} {:>7} {:>9.0} {:>11.0} {:>9.0} {:>9.0} {:>9.0}",
            t.name,
            s.n,
            us(s.min),
            us(s.median),
            us(s.p90),
            us(s.p99),
            us(s.max)
        );
        stats.push((t.name.clone(), s));
    }
    if external.is_some() {
        print_table(&stats);
        return;
    }
    let direct = &stats[0].1;
    println!(
        "\n  added delay per event (gateway − direct), target < {} µs at the median:",
        us(TARGET)
    );
    for (name, s) in &stats[1..] {
        let added = us(s.median) - us(direct.median);
        let verdict = if added < us(TARGET) { "PASS" } else { "FAIL" };
        println!(
            "  {:<16} median {:>+8.0} µs  p90 {:>+8.0} µs  p99 {:>+8.0} µs  {verdict}",
            name,
            added,
            us(s.p90) - us(direct.p90),
            us(s.p99) - us(direct.p99),
        );
    }
}

/// The summary `benches/load.sh` shows: one markdown row per target, with what it adds
/// to the direct stream.
fn print_table(stats: &[(String, Stats)]) {
    let direct = &stats[0].1;
    println!();
    println!("| target | events | median µs | p90 µs | p99 µs | added at the median µs | added at p99 µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, s) in stats {
        table_row(&[
            name.clone(),
            s.n.to_string(),
            format!("{:.0}", us(s.median)),
            format!("{:.0}", us(s.p90)),
            format!("{:.0}", us(s.p99)),
            format!("{:+.0}", us(s.median) - us(direct.median)),
            format!("{:+.0}", us(s.p99) - us(direct.p99)),
        ]);
    }
}
