//! Resident memory of the gateway while it holds many idle keep-alive client
//! connections (the target: "under 64 MiB RSS with 10,000 idle keep-alive client
//! connections").
//!
//! The bench starts a small keep-alive upstream in this process (it answers
//! `GET /small` with `ok\n`) and the real `gatewarden` binary in front of it, on
//! loopback ports. It reads the gateway's `VmRSS`/`VmHWM` from `/proc/<pid>/status`
//! after start, after a warm-up, while opening N client connections (each sends one
//! keep-alive request, reads the whole response and then stays open, idle), after a
//! settle pause with all N idle, and after closing them. A sample of the idle
//! connections then sends a second request, so the number is never measured on
//! connections the gateway already dropped. Two variants run, each with a fresh
//! gateway: `public` (one public route, no plugins) and `chain` (`api_key` +
//! `rate_limit` + `origin` + `headers` on an `access: user` route, as in
//! `benches/conf/gatewarden-chain.yaml`).
//!
//! Run: `cargo bench --bench idle_conns` (or build with `--no-run` and run the
//! printed executable). The open-files limit is raised to the hard limit; the gateway
//! inherits it. 10,000 connections need about 20,000 descriptors in all (this process
//! holds the client ends, the gateway the server ends).
//!
//! Environment knobs:
//! - `IDLE_CONNS` — idle connections to open (default 10000)
//! - `IDLE_CONCURRENCY` — connections opened at once (default 100), so the accept
//!   backlog never overflows
//! - `IDLE_SETTLE_SECS` — pause with all connections idle before measuring (default 3)
//! - `IDLE_SAMPLE` — idle connections re-used for a second request (default 100)
//! - `IDLE_WARMUP` — warm-up requests before the baseline (default 2000)
//! - `IDLE_THREADS` — `server.threads` of the gateway (default 2, the machine's cores)
//! - `IDLE_VARIANTS` — comma-separated subset of `public,chain` (default both)
//! - `GATEWARDEN_BIN` — another gatewarden binary to measure instead of the one cargo
//!   built for the bench
//! - `BENCH_TARGETS`, `BENCH_KEY` — measure proxies someone else started instead
//!   (`name=127.0.0.1:port@pid,pid ...`: the memory of all the listed processes counts,
//!   such as nginx's master and workers). Each must answer `GET /small` with `ok\n`;
//!   requests carry `BENCH_KEY` as a bearer key. `benches/load.sh` runs the bench so and
//!   gets a markdown table.
//!
//! The gateway inherits this process's environment, so allocator settings reach it:
//! `MIMALLOC_ALLOW_THP=0` shows what transparent huge pages add to the resident size.

// Test and bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::{
    env_or, external_auth, external_targets, find, ratio, table_row, GatewayProcess, Variant,
};

/// The target, for 10,000 idle connections.
const TARGET_BYTES: u64 = 64 << 20;
const TARGET_CONNS: usize = 10_000;
const UPSTREAM_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
/// Bound on any single exchange, so a wedged gateway fails the bench instead of
/// hanging it.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

struct Knobs {
    conns: usize,
    concurrency: usize,
    settle: Duration,
    sample: usize,
    warmup: usize,
    threads: usize,
    variants: Vec<Variant>,
}

impl Knobs {
    fn from_env() -> Knobs {
        let variants = Variant::list(
            &std::env::var("IDLE_VARIANTS").unwrap_or_else(|_| "public,chain".to_string()),
        );
        Knobs {
            conns: env_or("IDLE_CONNS", TARGET_CONNS),
            concurrency: env_or("IDLE_CONCURRENCY", 100usize).max(1),
            settle: Duration::from_secs(env_or("IDLE_SETTLE_SECS", 3u64)),
            sample: env_or("IDLE_SAMPLE", 100usize),
            warmup: env_or("IDLE_WARMUP", 2000usize),
            threads: env_or("IDLE_THREADS", 2usize).max(1),
            variants,
        }
    }
}

/// Starts the gateway of `variant` and waits until it answers through to the upstream;
/// returns it with the request every client sends (with the key for the chain).
fn start_gateway(
    rt: &tokio::runtime::Runtime,
    variant: Variant,
    threads: usize,
    upstream: SocketAddr,
) -> (GatewayProcess, Arc<[u8]>) {
    let mut gw = GatewayProcess::spawn(variant, threads, upstream, |u| u);
    let request: Arc<[u8]> = format!(
        "GET /small HTTP/1.1\r\nHost: bench.local\r\n{}\r\n",
        gw.auth
    )
    .into_bytes()
    .into();
    gw.wait_ready(|gw| {
        rt.block_on(async {
            let mut s = TcpStream::connect(gw.addr).await?;
            s.set_nodelay(true)?;
            exchange(&mut s, &request).await
        })
    });
    (gw, request)
}

// ---------------------------------------------------------------------------------
// Memory

#[derive(Clone, Copy, Default)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
}

/// The memory of every process in `pids`, added up.
fn mem_of(pids: &[u32]) -> Mem {
    pids.iter()
        .map(|&pid| mem(pid))
        .fold(Mem::default(), |a, b| Mem {
            rss_kib: a.rss_kib + b.rss_kib,
            hwm_kib: a.hwm_kib + b.hwm_kib,
            threads: a.threads + b.threads,
        })
}

fn mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Mem {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        threads: field("Threads:"),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------
// HTTP on the wire

async fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        stream.write_all(request).await?;
        let (status, body) = read_response(stream).await?;
        if status != 200 || body != b"ok\n" {
            return Err(std::io::Error::other(format!(
                "unexpected response {status}: {:?}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(())
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "exchange timed out"))?
}

/// Reads one response with a `Content-Length` or chunked body. Nothing is pipelined,
/// so bytes past the response are an error.
async fn read_response(stream: &mut TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(std::io::Error::other)?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    let mut rest = buf.split_off(head_end);
    let body = if chunked {
        while find(&rest, b"0\r\n\r\n").is_none() {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        dechunk(&rest)?
    } else {
        let length = length.ok_or_else(|| std::io::Error::other("response has no length"))?;
        while rest.len() < length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        if rest.len() > length {
            return Err(std::io::Error::other("bytes after the response body"));
        }
        rest
    };
    Ok((status, body))
}

/// Decodes a complete chunked body (the small `ok\n` one; no trailers expected).
fn dechunk(mut wire: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::other("bad chunked encoding");
    let mut body = Vec::new();
    loop {
        let line_end = find(wire, b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&wire[..line_end]).map_err(|_| bad())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad())?;
        wire = &wire[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if wire.len() < size + 2 {
            return Err(bad());
        }
        body.extend_from_slice(&wire[..size]);
        wire = &wire[size + 2..];
    }
}

// ---------------------------------------------------------------------------------
// The upstream

/// A keep-alive upstream: every request head gets `200 ok\n` (requests carry no
/// body). Returns its address; it lives as long as the runtime.
async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, most likely: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(serve_upstream(stream));
        }
    });
    addr
}

async fn serve_upstream(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        while let Some(i) = find(&buf, b"\r\n\r\n") {
            stream.write_all(UPSTREAM_RESPONSE).await?;
            buf.drain(..i + 4);
        }
        if buf.len() > 64 << 10 {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------
// The clients

/// Opens one connection and completes one keep-alive exchange on it; retries a few
/// times (a full accept queue under a busy machine is not what is being measured).
async fn open_one(addr: SocketAddr, request: Arc<[u8]>) -> std::io::Result<TcpStream> {
    let mut last = None;
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
        }
        let result = async {
            let mut s = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
            s.set_nodelay(true)?;
            exchange(&mut s, &request).await?;
            Ok::<_, std::io::Error>(s)
        }
        .await;
        match result {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt made")))
}

/// `total` requests over `conns` keep-alive connections, then all closed.
async fn warm_up(addr: SocketAddr, request: Arc<[u8]>, total: usize, conns: usize) {
    let per_conn = total.div_ceil(conns.max(1));
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut s = open_one(addr, request.clone()).await?;
                for _ in 1..per_conn {
                    exchange(&mut s, &request).await?;
                }
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await
            .expect("warm-up task")
            .expect("warm-up request through the gateway");
    }
}

// ---------------------------------------------------------------------------------
// The run

struct Row {
    stage: String,
    conns: usize,
    mem: Mem,
}

struct Outcome {
    name: String,
    conns: usize,
    baseline: Mem,
    idle: Mem,
    closed: Mem,
    sample_ok: usize,
    sample_total: usize,
    open_time: Duration,
}

impl Outcome {
    fn per_conn_kib(&self) -> f64 {
        (self.idle.rss_kib as f64 - self.baseline.rss_kib as f64) / self.conns.max(1) as f64
    }

    /// RSS the target is about: measured when N is 10,000, else extrapolated.
    fn rss_at_target_kib(&self) -> f64 {
        if self.conns == TARGET_CONNS {
            self.idle.rss_kib as f64
        } else {
            self.baseline.rss_kib as f64 + self.per_conn_kib() * TARGET_CONNS as f64
        }
    }

    fn pass(&self) -> bool {
        self.rss_at_target_kib() * 1024.0 < TARGET_BYTES as f64
    }
}

/// What is measured: a gateway this bench started, or a proxy someone else did.
struct Subject {
    name: String,
    addr: SocketAddr,
    pids: Vec<u32>,
    request: Arc<[u8]>,
    gateway: Option<GatewayProcess>,
}

impl Subject {
    fn gateway(
        rt: &tokio::runtime::Runtime,
        knobs: &Knobs,
        variant: Variant,
        upstream: SocketAddr,
    ) -> Subject {
        let (gw, request) = start_gateway(rt, variant, knobs.threads, upstream);
        Subject {
            name: variant.name().to_string(),
            addr: gw.addr,
            pids: vec![gw.pid()],
            request,
            gateway: Some(gw),
        }
    }

    /// Panics (with the gateway's output when there is one) if the process is gone.
    fn assert_alive(&mut self) {
        match &mut self.gateway {
            Some(gw) => gw.assert_alive(),
            None => {
                let pid = self.pids[0];
                assert!(
                    std::path::Path::new(&format!("/proc/{pid}")).exists(),
                    "{} (pid {pid}) exited",
                    self.name
                );
            }
        }
    }

    fn log(&self) -> String {
        self.gateway
            .as_ref()
            .map(GatewayProcess::log)
            .unwrap_or_default()
    }
}

fn run_subject(rt: &tokio::runtime::Runtime, knobs: &Knobs, mut subject: Subject) -> Outcome {
    let request = subject.request.clone();
    let pids = subject.pids.clone();
    let mut rows = vec![Row {
        stage: "started".into(),
        conns: 0,
        mem: mem_of(&pids),
    }];

    rt.block_on(warm_up(subject.addr, request.clone(), knobs.warmup, 20));
    std::thread::sleep(Duration::from_millis(500));
    let baseline = mem_of(&pids);
    rows.push(Row {
        stage: format!("after warm-up ({} req, closed)", knobs.warmup),
        conns: 0,
        mem: baseline,
    });

    // Open the connections in waves of `concurrency`, recording RSS at each quarter.
    let started = Instant::now();
    let mut conns: Vec<TcpStream> = Vec::with_capacity(knobs.conns);
    let quarter = knobs.conns.div_ceil(4).max(1);
    let mut next_mark = quarter;
    while conns.len() < knobs.conns {
        let wave = knobs.concurrency.min(knobs.conns - conns.len());
        let opened = rt.block_on(async {
            let tasks: Vec<_> = (0..wave)
                .map(|_| tokio::spawn(open_one(subject.addr, request.clone())))
                .collect();
            let mut opened = Vec::with_capacity(wave);
            for t in tasks {
                opened.push(t.await.expect("client task")?);
            }
            Ok::<_, std::io::Error>(opened)
        });
        match opened {
            Ok(opened) => conns.extend(opened),
            Err(e) => {
                subject.assert_alive();
                panic!(
                    "opening connection {} of {} to {}: {e}\n(check `ulimit -n`; gateway log:)\n{}",
                    conns.len() + 1,
                    knobs.conns,
                    subject.name,
                    subject.log()
                );
            }
        }
        if conns.len() >= next_mark && conns.len() < knobs.conns {
            rows.push(Row {
                stage: "opening".into(),
                conns: conns.len(),
                mem: mem_of(&pids),
            });
            next_mark += quarter;
        }
    }
    let open_time = started.elapsed();

    std::thread::sleep(knobs.settle);
    subject.assert_alive();
    let idle = mem_of(&pids);
    rows.push(Row {
        stage: format!("all idle, after {} s", knobs.settle.as_secs()),
        conns: conns.len(),
        mem: idle,
    });

    // The number above only counts if the gateway still holds the connections.
    let sample_total = knobs.sample.min(conns.len());
    let step = conns.len() / sample_total.max(1);
    let sample_ok = rt.block_on(async {
        let mut ok = 0;
        for i in 0..sample_total {
            if exchange(&mut conns[i * step], &request).await.is_ok() {
                ok += 1;
            }
        }
        ok
    });

    drop(conns);
    std::thread::sleep(Duration::from_secs(2));
    let closed = mem_of(&pids);
    rows.push(Row {
        stage: "all closed, after 2 s".into(),
        conns: 0,
        mem: closed,
    });
    subject.assert_alive();

    println!(
        "\n== {} — pids {pids:?}, {} OS threads",
        subject.name, idle.threads
    );
    println!(
        "  {:<34} {:>7} {:>11} {:>11}",
        "stage", "conns", "VmRSS MiB", "VmHWM MiB"
    );
    for r in &rows {
        println!(
            "  {:<34} {:>7} {:>11.1} {:>11.1}",
            r.stage,
            r.conns,
            mib(r.mem.rss_kib),
            mib(r.mem.hwm_kib)
        );
    }
    let outcome = Outcome {
        name: subject.name.clone(),
        conns: knobs.conns,
        baseline,
        idle,
        closed,
        sample_ok,
        sample_total,
        open_time,
    };
    println!(
        "  opened {} connections in {:.1} s; {}/{} sampled idle connections answered a second request",
        outcome.conns,
        outcome.open_time.as_secs_f64(),
        outcome.sample_ok,
        outcome.sample_total
    );
    assert_eq!(
        outcome.sample_ok, outcome.sample_total,
        "idle connections were dropped by the gateway; the RSS above is not a measurement of {} idle connections",
        outcome.conns
    );
    outcome
}

fn main() {
    let knobs = Knobs::from_env();
    // Client ends here, server ends (plus upstream pool) in the gateway: each process
    // needs a bit more than `conns` descriptors; the child inherits this limit.
    let want = knobs.conns as u64 + 1024;
    let got = rlimit::increase_nofile_limit(want).expect("raise RLIMIT_NOFILE");
    assert!(
        got >= want,
        "RLIMIT_NOFILE is {got}, {want} are needed for IDLE_CONNS={}; raise the hard limit \
         (ulimit -Hn) or lower IDLE_CONNS",
        knobs.conns
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let upstream = rt.block_on(start_upstream());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "idle_conns: {} idle keep-alive connections per variant, opened {} at a time; \
         RLIMIT_NOFILE {got}; {}; loadavg {}",
        knobs.conns,
        knobs.concurrency,
        support::measured(),
        load.trim()
    );

    if let Some(targets) = external_targets() {
        let request: Arc<[u8]> = format!(
            "GET /small HTTP/1.1\r\nHost: bench.local\r\n{}\r\n",
            external_auth()
        )
        .into_bytes()
        .into();
        // One proxy that cannot hold the connections (a connection limit below them)
        // is a row saying so, not the end of the table.
        let outcomes: Vec<Result<Outcome, String>> = targets
            .into_iter()
            .map(|t| {
                let name = t.name.clone();
                let subject = Subject {
                    name: t.name,
                    addr: t.addr,
                    pids: t.pids,
                    request: request.clone(),
                    gateway: None,
                };
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_subject(&rt, &knobs, subject)
                }))
                .map_err(|panic| {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    format!("{name}: {}", why.lines().next().unwrap_or("failed"))
                })
            })
            .collect();
        print_table(&outcomes);
        return;
    }
    let outcomes: Vec<Outcome> = knobs
        .variants
        .iter()
        .map(|&v| run_subject(&rt, &knobs, Subject::gateway(&rt, &knobs, v, upstream)))
        .collect();

    println!(
        "\nsummary (target: VmRSS < {} MiB with {TARGET_CONNS} idle connections)",
        TARGET_BYTES >> 20
    );
    println!(
        "  {:<8} {:>7} {:>12} {:>12} {:>10} {:>10} {:>12} {:>8}",
        "variant", "conns", "RSS before", "RSS idle", "KiB/conn", "HWM", "RSS closed", "target"
    );
    for o in &outcomes {
        let verdict = if o.pass() { "PASS" } else { "FAIL" };
        let note = if o.conns == TARGET_CONNS {
            String::new()
        } else {
            format!(
                "  (projected to {TARGET_CONNS}: {:.1} MiB)",
                o.rss_at_target_kib() / 1024.0
            )
        };
        println!(
            "  {:<8} {:>7} {:>8.1} MiB {:>8.1} MiB {:>10.2} {:>6.1} MiB {:>8.1} MiB {:>8}{note}",
            o.name,
            o.conns,
            mib(o.baseline.rss_kib),
            mib(o.idle.rss_kib),
            o.per_conn_kib(),
            mib(o.idle.hwm_kib),
            mib(o.closed.rss_kib),
            verdict
        );
    }
}

/// The summary `benches/load.sh` shows: one markdown row per proxy.
fn print_table(outcomes: &[Result<Outcome, String>]) {
    let nginx = outcomes
        .iter()
        .flatten()
        .find(|o| o.name == "nginx")
        .map(|o| o.idle.rss_kib as f64);
    println!();
    println!("| target | idle connections | RSS before MiB | RSS idle MiB | KiB per connection | RSS idle vs nginx |");
    println!("|---|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let o = match o {
            Ok(o) => o,
            Err(why) => {
                let (name, why) = why.split_once(": ").unwrap_or((why, ""));
                table_row(&[
                    name.to_string(),
                    format!("failed: {why}"),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
                continue;
            }
        };
        table_row(&[
            o.name.clone(),
            o.conns.to_string(),
            format!("{:.1}", mib(o.baseline.rss_kib)),
            format!("{:.1}", mib(o.idle.rss_kib)),
            format!("{:.2}", o.per_conn_kib()),
            ratio(o.idle.rss_kib as f64, nginx),
        ]);
    }
}
