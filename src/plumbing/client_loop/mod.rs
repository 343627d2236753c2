//! Client connections: the HTTP/1 keep-alive loop, and the stream every client
//! connection is read and written through.
//!
//! Pingora waits for a connection's next request inside its request machinery: the
//! proxy's per-request future (one allocation sized for its largest state, ~10 KiB)
//! and a 4 KiB head buffer are held for as long as the client stays silent, in a task
//! sized for a TLS handshake (2.5 KiB), with a 1460-byte write buffer. With thousands
//! of idle keep-alive clients that is most of the gateway's memory.
//!
//! Here every plain-TCP HTTP/1 connection is served by a small task of its own. It
//! waits for the next request itself, reads what arrives into a buffer of its own, and
//! only then builds a session and hands it to Pingora, whose first read is served from
//! that buffer: no more reads than Pingora would make. The read and write buffers are
//! taken from per-thread spare lists only while there is something in them. A parked
//! connection holds its socket, Pingora's per-socket state and a few hundred bytes of
//! loop state.
//!
//! Flushes are made when the session waits. Pingora flushes after a response head
//! without a length, after each chunk and after the last one: three sends for a
//! chunked page that arrived in one read. Here a flush only notes that a send is owed,
//! and the loop makes it as soon as the session waits for anything (the upstream, the
//! client, a timer) or is done. What one turn of the task writes leaves together, and
//! nothing waits longer than that turn: an event streamed to the client still leaves
//! as soon as it is written.
//!
//! The wait is bounded as Pingora bounds it: the first request of a connection by the
//! client header timeout (`server.client_header_timeout_seconds`, 60 s unless set),
//! each later one by the client keep-alive timeout. A graceful shutdown or upgrade
//! closes parked connections at once, except that a
//! connection accepted moments before and still waiting for its first request gets
//! [`FIRST_REQUEST_SHUTDOWN_GRACE`] for it to arrive. TLS connections
//! (where ALPN may pick HTTP/2) and h2c keep Pingora's own loop.

mod buffers;
mod stream;
#[cfg(test)]
mod tests;

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::Either;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;

use crate::stop::OpenConnection;

pub use stream::ClientStream;
use stream::SharedStream;

/// How long a new connection may still send its first request once the server is
/// shutting down. A client whose connection was accepted just before a graceful stop
/// or upgrade has its request on the way, and retries nothing on a connection that
/// never answered; an idle connection between requests is closed at once (clients
/// retry those on a new one).
const FIRST_REQUEST_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// How long the end of a response may wait for the client to take it once the
/// session is done with it: the last bytes of a response, at most what one turn
/// gathers.
const SEND_WAIT: Duration = Duration::from_secs(60);

/// Most bytes a turn gathers once a flush is owed: a 16 KiB page with its head and
/// chunk framing.
const OWED_GATHER: usize = 32 * 1024;

/// The client write buffer unless configured: Pingora's size, one Ethernet segment.
pub const DEFAULT_WRITE_BUFFER: usize = 1460;

/// How client connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// The first request head's deadline, from its first byte, and how long a new
    /// connection may wait before sending it.
    pub head_limit: Duration,
    /// How long a kept-alive connection may wait for its next request; `None`
    /// closes connections after each response.
    pub keepalive: Option<Duration>,
    /// Write buffer of a plain-TCP connection, in bytes; 0 writes straight through.
    pub write_buffer: usize,
    /// Serve plain HTTP/1 connections with this module's loop; false leaves them to
    /// Pingora's (a benchmark switch, [`super::switches`]).
    pub own_loop: bool,
}

/// A [`ServerApp`] that runs the keep-alive loop of an [`HttpServerApp`] itself.
pub struct ClientConnections<A> {
    app: Arc<A>,
    settings: ClientSettings,
    /// Connections accepted by this listener (or shard of one).
    accepted: Option<IntCounter>,
}

impl<A> ClientConnections<A> {
    pub fn new(app: A, settings: ClientSettings) -> Self {
        ClientConnections {
            app: Arc::new(app),
            settings,
            accepted: None,
        }
    }

    /// Counts every connection accepted in `counter`.
    pub fn counted(mut self, counter: IntCounter) -> Self {
        self.accepted = Some(counter);
        self
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> ClientConnections<A> {
    /// Whether this loop serves the stream: plain HTTP/1, as Pingora would pick it.
    fn parks(&self, stream: &Stream) -> bool {
        let options = self.app.server_options();
        let h2c_or_custom = options.is_some_and(|o| o.h2c || o.force_custom);
        self.settings.own_loop
            && stream.get_ssl_digest().is_none()
            && stream.selected_alpn_proto().is_none()
            && !h2c_or_custom
    }

    /// The keep-alive loop of one plain HTTP/1 connection.
    async fn serve(self: Arc<Self>, stream: ClientStream, mut shutdown: ShutdownWatch) {
        let conn = SharedStream::new(stream);
        let mut handle = Box::new(conn.clone());
        let mut carried = None;
        let mut wait = self.settings.head_limit;
        let mut first = true;
        while next_request(&conn, wait, first, &mut shutdown).await {
            first = false;
            let session = self.session(handle, carried.take(), &shutdown);
            let served = in_turns(&conn, self.app.process_new_http(session, &shutdown)).await;
            if !send_the_rest(&conn).await {
                return;
            }
            let Some(reused) = served else {
                return;
            };
            let (back, settings) = reused.consume();
            // The session hands back the stream it was given.
            let Ok(back) = back.into_any().downcast::<SharedStream>() else {
                log::error!("client connection: the session handed back another stream");
                return;
            };
            (handle, carried) = (back, settings);
            // (Without keep-alive the proxy never hands the stream back.)
            wait = self.settings.keepalive.unwrap_or(self.settings.head_limit);
        }
    }

    /// A session for the next request, set up as Pingora sets one up.
    fn session(
        &self,
        stream: Box<SharedStream>,
        carried: Option<HttpPersistentSettings>,
        shutdown: &ShutdownWatch,
    ) -> ServerSession {
        let mut session = ServerSession::new_http1(stream);
        match carried {
            Some(settings) => settings.apply_to_session(&mut session),
            // A connection's first request: 60 s until the proxy applies ours, none
            // while shutting down, and the configured reuse limit.
            None => {
                session.set_keepalive((!*shutdown.borrow()).then_some(60));
                session.set_keepalive_reuses_remaining(
                    self.app
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            }
        }
        session
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ClientConnections<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A graceful stop waits for this connection until it is dropped.
        let open = OpenConnection::enter();
        if let Some(accepted) = &self.accepted {
            accepted.inc();
        }
        let parks = self.parks(&stream);
        // Under TLS, Pingora's own buffer sits below the encryption.
        let write_buffer = if parks { self.settings.write_buffer } else { 0 };
        let stream = ClientStream::new(stream, self.settings.head_limit, write_buffer);
        if !parks {
            let reused = ServerApp::process_new(&self.app, Box::new(stream), shutdown).await;
            drop(open);
            return reused;
        }
        // Pingora's task for the connection is sized for a TLS handshake this one did
        // not need, and would be held for the connection's life. A task of our own, a
        // fifth of that, serves it from here, and Pingora's ends.
        let this = self.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            this.serve(stream, shutdown).await;
            drop(open);
        });
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// Parks until the client sends something, and reads it ahead. False when the client
/// closed, the wait ran out, the server is shutting down or the socket failed: the
/// connection is then closed without an answer, as Pingora closes an idle one. The
/// `first` request of a connection still has [`FIRST_REQUEST_SHUTDOWN_GRACE`] to
/// arrive once the server is shutting down.
async fn next_request(
    conn: &SharedStream,
    wait: Duration,
    first: bool,
    shutdown: &mut ShutdownWatch,
) -> bool {
    let mut arrived = pin!(poll_fn(|cx| conn.lock().poll_read_ahead(cx)));
    let timer = idle_timer(wait);
    tokio::select! {
        biased;
        read = &mut arrived => return matches!(read, Ok(n) if n > 0),
        () = timer => return false,
        () = shutting_down(shutdown) => {}
    }
    if !first {
        return false;
    }
    tokio::select! {
        biased;
        read = arrived => matches!(read, Ok(n) if n > 0),
        () = pingora::time::sleep(FIRST_REQUEST_SHUTDOWN_GRACE) => false,
    }
}

/// Ends after `wait`. Pingora's `timeout` boxes its timer twice each time a wait
/// begins, once per request here; its `sleep` waits on the same shared 10 ms timers
/// from inside this future. Those timers stay registered until due even when the wait
/// ends early, so a wait longer than Pingora's limit for that (15 minutes unless
/// changed) takes tokio's timer instead, as Pingora's `timeout` would.
fn idle_timer(wait: Duration) -> impl Future<Output = ()> {
    let long = pingora::time::fast_timeout::fast_timeout_to_tokio_threshold()
        .is_some_and(|limit| wait > limit);
    if long {
        Either::Left(Box::pin(tokio::time::sleep(wait)))
    } else {
        Either::Right(pingora::time::sleep(wait))
    }
}

/// Runs `served`, Pingora serving a request on `conn`, and makes the flushes it asked
/// for each time it waits. Everything one turn of the task writes (a response head,
/// a chunk, the last chunk) leaves in as few sends as the write buffer allows, where
/// each flush used to be a send of its own; nothing waits longer than the turn.
async fn in_turns<F: Future>(conn: &SharedStream, served: F) -> F::Output {
    let mut served = pin!(served);
    poll_fn(|cx| {
        let polled = served.as_mut().poll(cx);
        // A failure is the session's to report, at its next write.
        let _ = conn.lock().poll_owed_flush(cx);
        polled
    })
    .await
}

/// Sends what the session left buffered once it is done with the request, waiting up
/// to [`SEND_WAIT`] for the client to take it. False if it could not be sent.
async fn send_the_rest(conn: &SharedStream) -> bool {
    let sent = poll_fn(|cx| conn.lock().poll_flush_now(cx));
    matches!(pingora::time::timeout(SEND_WAIT, sent).await, Ok(Ok(())))
}

/// Sends what the client is owed now, if its socket takes it at once. The proxy calls
/// this as soon as a response is complete, so the client has it before the request's
/// bookkeeping (metrics, logs) runs, as it would with Pingora's own flush; anything
/// the socket does not take at once is sent when the session next waits. Streams of
/// other connections (TLS, h2c) flush themselves.
pub fn send_owed(stream: Option<&Stream>) {
    let Some(shared) = stream.and_then(|s| s.as_any().downcast_ref::<SharedStream>()) else {
        return;
    };
    // The loop polls again with the task's waker whenever the session waits.
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let _ = shared.lock().poll_owed_flush(&mut cx);
}

/// Completes once the server starts shutting down.
async fn shutting_down(shutdown: &mut ShutdownWatch) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
