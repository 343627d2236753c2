//! Sending spans to the collector, off the request path.
//!
//! A request only offers its finished span to a bounded queue and never waits: when the
//! queue is full the span is dropped and counted. One thread per tracing config takes
//! spans off the queue, gathers them into batches (by count or by time) and POSTs each
//! batch to `<endpoint>/v1/traces` as OTLP/HTTP protobuf. A collector that is down or
//! slow costs only that thread's time: failed batches are counted, dropped, and logged
//! at most once a minute.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::proto::{export_request, Resource};
use super::span::SpanRecord;
use crate::observe::metrics;

/// How often the exporting thread looks for a flush request while idle.
const POLL: Duration = Duration::from_millis(100);
/// At most one warning about a failing collector per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where and how batches are sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `<endpoint>/v1/traces`.
    pub url: String,
    /// Extra request headers (a collector's token); values are secrets.
    pub headers: Vec<(String, String)>,
    pub resource_service_name: String,
    pub queue_size: usize,
    pub batch_size: usize,
    pub interval: Duration,
    pub timeout: Duration,
}

/// Flush requests and their completion, between [`Exporter::flush`] and the thread.
#[derive(Default)]
struct Flushes {
    state: Mutex<(u64, u64)>,
    done: Condvar,
}

/// The sending side of one exporter. The thread ends, after sending what is queued,
/// once the exporter is dropped (with the config that made it).
pub struct Exporter {
    tx: SyncSender<SpanRecord>,
    waiting: Mutex<Option<(Settings, Receiver<SpanRecord>)>>,
    flushes: Arc<Flushes>,
}

impl Exporter {
    /// An exporter, not started: spans offered before [`Exporter::start`] wait in the
    /// queue.
    pub fn new(settings: Settings) -> Exporter {
        let (tx, rx) = sync_channel(settings.queue_size.max(1));
        Exporter {
            tx,
            waiting: Mutex::new(Some((settings, rx))),
            flushes: Arc::default(),
        }
    }

    /// Starts the exporting thread; does nothing once started.
    pub fn start(&self) -> Result<(), String> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let Some((settings, rx)) = waiting.take() else {
            return Ok(());
        };
        let flushes = self.flushes.clone();
        std::thread::Builder::new()
            .name("gw-trace-export".into())
            .spawn(move || Batcher::new(settings, flushes).run(rx))
            .map(drop)
            .map_err(|e| format!("cannot start the trace exporter: {e}"))
    }

    /// Queues a finished span, or drops and counts it when the queue is full.
    pub fn offer(&self, span: SpanRecord) {
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics().trace_spans_dropped.inc();
            }
        }
    }

    /// Sends what is queued now and waits for it, for at most `bound`. False when the
    /// bound ran out first (or the exporter never started).
    pub fn flush(&self, bound: Duration) -> bool {
        if self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return false;
        }
        let mut state = self.flushes.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 += 1;
        let wanted = state.0;
        let (state, _) = self
            .flushes
            .done
            .wait_timeout_while(state, bound, |s| s.1 < wanted)
            .unwrap_or_else(|p| p.into_inner());
        state.1 >= wanted
    }
}

/// The exporting thread's state.
struct Batcher {
    settings: Settings,
    resource: Resource,
    agent: ureq::Agent,
    flushes: Arc<Flushes>,
    batch: Vec<SpanRecord>,
    last_warning: Option<Instant>,
    failures_unreported: u64,
}

impl Batcher {
    fn new(settings: Settings, flushes: Arc<Flushes>) -> Batcher {
        let to = destination(&settings.url);
        Batcher {
            resource: Resource {
                service_name: settings.resource_service_name.clone(),
                service_version: env!("CARGO_PKG_VERSION"),
            },
            agent: gatewarden_plugins::outbound::agent(to, settings.timeout, 0),
            batch: Vec::with_capacity(settings.batch_size),
            settings,
            flushes,
            last_warning: None,
            failures_unreported: 0,
        }
    }

    fn run(mut self, rx: Receiver<SpanRecord>) {
        let mut due = Instant::now() + self.settings.interval;
        loop {
            let wait = due.saturating_duration_since(Instant::now()).min(POLL);
            match rx.recv_timeout(wait) {
                Ok(span) => {
                    self.batch.push(span);
                    if self.batch.len() >= self.settings.batch_size {
                        self.send();
                        due = Instant::now() + self.settings.interval;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.send();
                    self.acknowledge_flushes();
                    return;
                }
            }
            let (wanted, done) = *self.flushes.state.lock().unwrap_or_else(|p| p.into_inner());
            if wanted > done {
                while let Ok(span) = rx.try_recv() {
                    self.batch.push(span);
                    if self.batch.len() >= self.settings.batch_size {
                        self.send();
                    }
                }
                self.send();
                self.acknowledge_flushes();
                due = Instant::now() + self.settings.interval;
            } else if Instant::now() >= due {
                self.send();
                due = Instant::now() + self.settings.interval;
            }
        }
    }

    fn acknowledge_flushes(&self) {
        let mut state = self.flushes.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 = state.0;
        self.flushes.done.notify_all();
    }

    /// POSTs the batch; whatever happens, the batch is gone afterwards.
    fn send(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let body = export_request(&self.resource, &self.batch);
        let count = self.batch.len() as u64;
        self.batch.clear();
        let mut request = self
            .agent
            .post(&self.settings.url)
            .header("content-type", "application/x-protobuf");
        for (name, value) in &self.settings.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let failure = match request.send(&body[..]) {
            Ok(response) if response.status().is_success() => None,
            // The status only: a collector's error body could echo anything back.
            Ok(response) => Some(format!("the collector answered {}", response.status())),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => metrics().trace_spans_exported.inc_by(count),
            Some(reason) => {
                metrics().trace_export_failures.inc();
                metrics().trace_spans_dropped.inc_by(count);
                self.warn(&reason, count);
            }
        }
    }

    /// A warning now and then, not one per batch: a collector down for an hour would
    /// otherwise fill the error log.
    fn warn(&mut self, reason: &str, count: u64) {
        self.failures_unreported += 1;
        let quiet = self
            .last_warning
            .is_some_and(|at| at.elapsed() < WARN_EVERY);
        if quiet {
            return;
        }
        log::warn!(
            "tracing: cannot export {count} span(s) to {}: {reason} ({} failed export(s) since the last warning)",
            self.settings.url,
            self.failures_unreported
        );
        self.failures_unreported = 0;
        self.last_warning = Some(Instant::now());
    }
}

/// What the outbound agent needs to know about the collector's URL.
fn destination(url: &str) -> gatewarden_plugins::outbound::Destination {
    let uri: Option<http::Uri> = url.parse().ok();
    let host = uri
        .as_ref()
        .and_then(|u| u.host())
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    gatewarden_plugins::outbound::Destination {
        https: uri.as_ref().and_then(|u| u.scheme_str()) == Some("https"),
        loopback: host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::{Outcome, RequestTrace};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    fn settings(url: String, queue_size: usize, batch_size: usize) -> Settings {
        Settings {
            url,
            headers: vec![("x-token".into(), "collector-secret".into())],
            resource_service_name: "test".into(),
            queue_size,
            batch_size,
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
        }
    }

    fn span() -> SpanRecord {
        let trace = RequestTrace::begin(&http::HeaderMap::new(), false, 1.0);
        SpanRecord::finish(
            &trace,
            &Outcome {
                method: "GET",
                path: "/",
                status: 200,
                route: None,
                upstream: None,
                backend: None,
                client: "127.0.0.1".parse().unwrap(),
                subject: None,
                auth_method: None,
                auth_failure: None,
                request_id: "r",
            },
        )
    }

    /// A one-request HTTP server: returns the head and body it got, answering 200.
    fn collector() -> (String, std::thread::JoinHandle<(String, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut stream = stream;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .unwrap();
            (head, body)
        });
        (url, handle)
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let exporter = Exporter::new(settings("http://127.0.0.1:9/v1/traces".into(), 2, 10));
        let before = metrics().trace_spans_dropped.get();
        let started = Instant::now();
        for _ in 0..5 {
            exporter.offer(span());
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(metrics().trace_spans_dropped.get() - before >= 3);
    }

    #[test]
    fn a_flush_posts_the_queued_spans_with_the_configured_headers() {
        let (url, server) = collector();
        let exporter = Exporter::new(settings(url, 16, 100));
        exporter.offer(span());
        exporter.offer(span());
        exporter.start().unwrap();
        assert!(exporter.flush(Duration::from_secs(10)));
        let (head, body) = server.join().unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("post /v1/traces "), "{head}");
        assert!(
            head.contains("content-type: application/x-protobuf"),
            "{head}"
        );
        assert!(head.contains("x-token: collector-secret"), "{head}");
        // ExportTraceServiceRequest, field 1 (resource_spans), length-delimited.
        assert_eq!(body[0], 0x0a);
    }

    #[test]
    fn a_dead_collector_costs_the_request_path_nothing() {
        // Nothing listens on the discard port of loopback.
        let exporter = Exporter::new(settings("http://127.0.0.1:9/v1/traces".into(), 16, 1));
        exporter.start().unwrap();
        let before = metrics().trace_export_failures.get();
        let started = Instant::now();
        exporter.offer(span());
        assert!(started.elapsed() < Duration::from_millis(100));
        exporter.flush(Duration::from_secs(10));
        assert!(metrics().trace_export_failures.get() > before);
    }
}
