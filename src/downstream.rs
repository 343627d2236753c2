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

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::thread::LocalKey;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::Either;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::head_deadline::HeadDeadline;
use crate::stop::OpenConnection;

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
}

/// A [`ServerApp`] that runs the keep-alive loop of an [`HttpServerApp`] itself.
pub struct ClientConnections<A> {
    app: Arc<A>,
    settings: ClientSettings,
}

impl<A> ClientConnections<A> {
    pub fn new(app: A, settings: ClientSettings) -> Self {
        ClientConnections {
            app: Arc::new(app),
            settings,
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> ClientConnections<A> {
    /// Whether this loop serves the stream: plain HTTP/1, as Pingora would pick it.
    fn parks(&self, stream: &Stream) -> bool {
        let options = self.app.server_options();
        let h2c_or_custom = options.is_some_and(|o| o.h2c || o.force_custom);
        stream.get_ssl_digest().is_none()
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

/// A client connection's stream: a deadline on the first request head, and read and
/// write buffers that exist only while there is something in them.
#[derive(Debug)]
pub struct ClientStream {
    inner: Stream,
    head: HeadDeadline,
    ahead: ReadAhead,
    out: WriteBuffer,
    /// Flushes only note that a send is owed: the keep-alive loop sends once the
    /// session waits ([`in_turns`]).
    defer_flushes: bool,
    flush_owed: bool,
    /// Why a deferred send failed: the session's next write or flush reports it.
    failed: Option<io::ErrorKind>,
}

impl ClientStream {
    /// `write_buffer` bytes of small writes are coalesced into one send; 0 passes
    /// every write through.
    pub fn new(inner: Stream, head_limit: Duration, write_buffer: usize) -> Self {
        ClientStream {
            inner,
            head: HeadDeadline::new(head_limit),
            ahead: ReadAhead::default(),
            out: WriteBuffer::new(write_buffer),
            defer_flushes: false,
            flush_owed: false,
            failed: None,
        }
    }

    /// How many bytes the write buffer may gather. Once a flush is owed, what the same
    /// turn writes next is gathered up to [`OWED_GATHER`] instead of being sent at
    /// once: a chunked page's chunk and last chunk, written after its head was
    /// flushed, then leave with the head in one send. A larger write still goes
    /// straight through, and nothing is gathered without a write buffer.
    fn gather_limit(&self) -> usize {
        if self.flush_owed && self.out.capacity > 0 {
            self.out.capacity.max(OWED_GATHER)
        } else {
            self.out.capacity
        }
    }

    /// The error a deferred send met, for the session's next write.
    fn failure(&self) -> Option<io::Error> {
        self.failed.map(io::Error::from)
    }

    /// Sends everything buffered and flushes the socket.
    fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.failure() {
            return Poll::Ready(Err(e));
        }
        ready!(self.out.poll_send(&mut self.inner, cx))?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.flush_owed = false;
        Poll::Ready(Ok(()))
    }

    /// Makes the flushes the session asked for since the last one. A failure is kept
    /// for the session's next write, as its own flush would have reported it, and
    /// what was buffered is dropped: the connection is lost.
    fn poll_owed_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.flush_owed {
            return Poll::Ready(Ok(()));
        }
        let sent = ready!(self.poll_flush_now(cx));
        if let Err(e) = &sent {
            self.failed.get_or_insert(e.kind());
            self.flush_owed = false;
            self.out.discard();
        }
        Poll::Ready(sent)
    }

    /// Waits until the client sends something and reads it into the read-ahead
    /// buffer, which the next reads are served from. Ready with the bytes waiting
    /// there, 0 once the client has closed. No buffer is held while waiting.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let waiting = self.ahead.unread().len();
        if waiting > 0 {
            return Poll::Ready(Ok(waiting));
        }
        let mut bytes = take_spare(&READ_SPARES, READ_AHEAD);
        bytes.resize(READ_AHEAD, 0);
        let mut buf = ReadBuf::new(&mut bytes);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        if matches!(polled, Poll::Ready(Ok(()))) && n > 0 {
            self.ahead = ReadAhead {
                bytes,
                start: 0,
                end: n,
            };
        } else {
            give_back(&READ_SPARES, bytes);
        }
        polled.map_ok(|()| n)
    }
}

/// Bytes of a request read while parked, waiting for Pingora to ask for them.
#[derive(Default)]
struct ReadAhead {
    /// `READ_AHEAD` initialized bytes while anything is unread; no allocation else.
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

// A request read ahead may carry credentials: debug output shows only how much is
// there.
impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadAhead({} bytes unread)", self.unread().len())
    }
}

impl ReadAhead {
    fn unread(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// Moves `n` bytes on, letting the buffer go once all is read.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            give_back(&READ_SPARES, std::mem::take(&mut self.bytes));
            (self.start, self.end) = (0, 0);
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head.poll_expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete within the deadline",
            )));
        }
        let before = buf.filled().len();
        let ahead = this.ahead.unread();
        let result = if ahead.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = ahead.len().min(buf.remaining());
            buf.put_slice(&ahead[..n]);
            this.ahead.consume(n);
            Poll::Ready(Ok(()))
        };
        if !this.head.done() && matches!(result, Poll::Ready(Ok(()))) {
            this.head.saw(&buf.filled()[before..]);
        }
        result
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        let gather = this.gather_limit();
        this.out
            .poll_write_vectored(&mut this.inner, cx, data, gather)
    }

    fn is_write_vectored(&self) -> bool {
        self.out.capacity > 0 || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.defer_flushes {
            if let Some(e) = this.failure() {
                return Poll::Ready(Err(e));
            }
            this.flush_owed = true;
            return Poll::Ready(Ok(()));
        }
        this.poll_flush_now(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_now(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Drop for ClientStream {
    /// Sends what is still buffered if the socket takes it at once, as Pingora's own
    /// stream does when dropped: a response cut short by a failing upstream keeps the
    /// part already written.
    fn drop(&mut self) {
        if self.out.bytes.len() > self.out.sent {
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            let _ = self.out.poll_send(&mut self.inner, &mut cx);
        }
    }
}

/// Most bytes of spare buffers a thread keeps of each kind: 179 write buffers of the
/// default size, 8 of 32 KiB, 64 read-ahead buffers. Larger buffers are freed once
/// used.
const SPARE_BYTES: usize = 256 * 1024;

/// Size of the read-ahead buffer: Pingora's first read of a request head.
const READ_AHEAD: usize = 4096;

type Spares = RefCell<Vec<Vec<u8>>>;

thread_local! {
    /// Buffers between uses. A busy connection takes one for each request or response
    /// and puts it back once done with it, so the heap is not asked per request, and
    /// an idle connection holds none.
    static WRITE_SPARES: Spares = const { RefCell::new(Vec::new()) };
    static READ_SPARES: Spares = const { RefCell::new(Vec::new()) };
}

/// A spare buffer with room for `capacity` bytes, or a new one.
fn take_spare(list: &'static LocalKey<Spares>, capacity: usize) -> Vec<u8> {
    list.try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .filter(|spare| spare.capacity() >= capacity)
        .unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Keeps `spare` for the next use, within [`SPARE_BYTES`]. Its contents stay: a
/// read-ahead buffer is initialized once.
fn give_back(list: &'static LocalKey<Spares>, spare: Vec<u8>) {
    if spare.capacity() == 0 {
        return;
    }
    // A stream dropped while the thread exits finds the list gone: then the buffer is
    // simply freed.
    let _ = list.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if (spares.len() + 1).saturating_mul(spare.capacity()) <= SPARE_BYTES {
            spares.push(spare);
        }
    });
}

/// Coalesces small writes (a response head and a short body) into one send, as the
/// `BufWriter` Pingora gives each socket does, but holds memory only from the first
/// write to the send. A write that does not fit leaves in the same vectored send as
/// what is buffered: a response head and a large body go out together, where
/// `BufWriter` sends the head on its own first.
struct WriteBuffer {
    /// Unsent bytes; no allocation while empty.
    bytes: Vec<u8>,
    /// How many of `bytes` are already sent.
    sent: usize,
    /// Most bytes coalesced; 0 passes every write through.
    capacity: usize,
}

// A response may carry credentials (a session cookie): debug output shows only how
// much is unsent.
impl std::fmt::Debug for WriteBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WriteBuffer({} of {} bytes unsent)",
            self.bytes.len() - self.sent,
            self.capacity
        )
    }
}

impl WriteBuffer {
    fn new(capacity: usize) -> Self {
        WriteBuffer {
            bytes: Vec::new(),
            sent: 0,
            capacity,
        }
    }

    /// Buffers `len` more bytes if that makes at most `limit`, taking a buffer if none
    /// is held.
    fn room_for(&mut self, len: usize, limit: usize) -> bool {
        if self.bytes.len().saturating_add(len) > limit {
            return false;
        }
        if self.bytes.capacity() == 0 {
            self.bytes = take_spare(&WRITE_SPARES, self.capacity);
            self.bytes.clear();
        }
        true
    }

    /// Buffers `data` if it fits within `limit`, else writes it through.
    fn poll_write_vectored(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
        limit: usize,
    ) -> Poll<io::Result<usize>> {
        let len = data
            .iter()
            .fold(0usize, |sum, slice| sum.saturating_add(slice.len()));
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.room_for(len, limit) {
            for slice in data {
                self.bytes.extend_from_slice(slice);
            }
            return Poll::Ready(Ok(len));
        }
        self.poll_write_through(inner, cx, data)
    }

    /// Writes `data` after whatever is still buffered, in one vectored write where
    /// the stream takes it whole; returns how much of `data` went.
    fn poll_write_through(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let buffered = &self.bytes[self.sent..];
            if buffered.is_empty() {
                self.release();
                return Pin::new(inner).poll_write_vectored(cx, data);
            }
            // The buffered bytes and the first few slices of `data` (a chunk's size
            // line, the chunk and its CRLF); the caller writes the rest next.
            let mut slices = [io::IoSlice::new(&[]); 4];
            slices[0] = io::IoSlice::new(buffered);
            let count = 1 + data.len().min(slices.len() - 1);
            slices[1..count].copy_from_slice(&data[..count - 1]);
            let n = ready!(Pin::new(&mut *inner).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let of_buffered = n.min(buffered.len());
            self.sent += of_buffered;
            if n > of_buffered {
                self.release();
                return Poll::Ready(Ok(n - of_buffered));
            }
        }
    }

    /// Sends what is buffered.
    fn poll_send(&mut self, inner: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.bytes.len() {
            match ready!(Pin::new(&mut *inner).poll_write(cx, &self.bytes[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.release();
        Poll::Ready(Ok(()))
    }

    /// Forgets what is unsent: the connection is lost.
    fn discard(&mut self) {
        self.bytes.clear();
        self.release();
    }

    /// Puts the buffer, all of it sent, back among this thread's spares.
    fn release(&mut self) {
        self.sent = 0;
        give_back(&WRITE_SPARES, std::mem::take(&mut self.bytes));
    }
}

// Everything else is the wrapped stream's: TLS details (ALPN picks HTTP/2), the socket
// digest (the client address), timings, the connection id.

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        let ClientStream { inner, out, .. } = self;
        if let Err(e) = poll_fn(|cx| out.poll_send(inner, cx)).await {
            log::debug!("client connection: unsent response bytes at shutdown: {e}");
        }
        inner.shutdown().await
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for ClientStream {
    /// Pingora peeks only before the first request, for an HTTP/2 preface over
    /// plain TCP, on connections that never read ahead; with bytes read ahead, say
    /// that peeking is not supported rather than peek past them.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if !self.ahead.unread().is_empty() {
            return Ok(false);
        }
        self.inner.try_peek(buf).await
    }
}

/// A parked connection's [`ClientStream`], shared by the connection's keep-alive loop
/// and the session Pingora serves a request in: the loop makes the session's flushes
/// once the session waits ([`in_turns`]). Both live in one task, so the lock is never
/// contended.
#[derive(Debug, Clone)]
struct SharedStream(Arc<Mutex<ClientStream>>);

impl SharedStream {
    fn new(mut stream: ClientStream) -> Self {
        stream.defer_flushes = true;
        SharedStream(Arc::new(Mutex::new(stream)))
    }

    fn lock(&self) -> MutexGuard<'_, ClientStream> {
        // Nothing panics while holding it; if something did, the stream is still whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.lock().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for SharedStream {
    async fn shutdown(&mut self) {
        // What Pingora's TCP stream does: send what is buffered, then shut down.
        let done = poll_fn(|cx| Pin::new(&mut *self.lock()).poll_shutdown(cx)).await;
        if let Err(e) = done {
            log::debug!("client connection: shutdown: {e}");
        }
    }
}

impl UniqueID for SharedStream {
    fn id(&self) -> UniqueIDType {
        self.lock().id()
    }
}

/// Parked connections are plain TCP: no TLS to describe.
impl Ssl for SharedStream {}

impl GetTimingDigest for SharedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.lock().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.lock().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.lock().get_write_pending_time()
    }
}

impl GetProxyDigest for SharedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.lock().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.lock().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for SharedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.lock().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.lock().set_socket_digest(digest)
    }
}

/// Pingora peeks only for an HTTP/2 preface over plain TCP (h2c), which never parks.
impl Peek for SharedStream {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_idle_wait_past_pingoras_limit_takes_tokios_timer() {
        // Paused time moves tokio's timers only. On Pingora's clock this wait would take
        // 16 real minutes, and the bound would end the test first.
        let wait = Duration::from_secs(16 * 60);
        let ended = tokio::time::timeout(wait + Duration::from_secs(1), idle_timer(wait)).await;
        assert!(ended.is_ok());
    }

    #[tokio::test]
    async fn a_short_idle_wait_ends_on_pingoras_timers() {
        let wait = idle_timer(Duration::from_millis(20));
        assert!(tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn a_trickled_head_fails_at_the_deadline_and_a_prompt_one_passes() {
        let limit = Duration::from_millis(300);
        let (client, server) = tokio::io::duplex(1024);
        let mut stream = ClientStream::new(Box::new(server), limit, 0);
        let started = tokio::time::Instant::now();
        let mut client = client;
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa" {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match stream.read(&mut buf).await {
                Ok(0) => panic!("the client closed"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        trickle.abort();

        let (mut client, server) = tokio::io::duplex(1024);
        let mut stream = ClientStream::new(Box::new(server), limit, 0);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(n, 27);
        // A body or stream that follows may take as long as it likes.
        tokio::time::sleep(limit * 2).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_request_read_ahead_is_served_to_the_next_reads_and_then_let_go() {
        let (mut client, server) = tokio::io::duplex(8192);
        let mut stream = ClientStream::new(Box::new(server), Duration::from_secs(1), 0);

        // Nothing sent yet: waiting holds no buffer.
        let waiting = poll_fn(|cx| Poll::Ready(stream.poll_read_ahead(cx))).await;
        assert!(waiting.is_pending());
        assert_eq!(stream.ahead.bytes.capacity(), 0);

        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(request).await.unwrap();
        let n = poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap();
        assert_eq!(n, request.len());
        // Asked again, it reports what is waiting without reading more.
        assert_eq!(poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap(), n);

        // Served in parts to a reader with little room, then from the socket again.
        let mut first = [0u8; 10];
        assert_eq!(stream.read(&mut first).await.unwrap(), 10);
        let mut rest = vec![0u8; 100];
        let m = stream.read(&mut rest).await.unwrap();
        assert_eq!([&first[..], &rest[..m]].concat(), request);
        assert_eq!(stream.ahead.bytes.capacity(), 0, "let go once read");
        client.write_all(b"more").await.unwrap();
        assert_eq!(stream.read(&mut rest).await.unwrap(), 4);

        // A client that closes reads ahead nothing.
        drop(client);
        assert_eq!(poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap(), 0);
        assert_eq!(stream.ahead.bytes.capacity(), 0);
    }

    #[tokio::test]
    async fn debug_output_shows_no_request_or_response_bytes() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut stream = ClientStream::new(Box::new(server), Duration::from_secs(1), 1460);
        client
            .write_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer sk-secret\r\n\r\n")
            .await
            .unwrap();
        poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap();
        stream
            .write_all(b"set-cookie: gw_session=secret")
            .await
            .unwrap();
        let shown = format!("{stream:?}");
        // Neither as text nor as the numbers a derived `Debug` prints for bytes.
        let as_numbers = format!("{:?}", b"secret");
        let as_numbers = as_numbers.trim_matches(|c| c == '[' || c == ']');
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains(as_numbers), "{shown}");
        assert!(shown.contains("bytes unread"), "{shown}");
    }

    /// A peer that records the size of every write it is handed.
    #[derive(Debug, Default)]
    struct Sends {
        sizes: Vec<usize>,
        bytes: Vec<u8>,
        /// The peer is gone: every send fails.
        broken: bool,
        /// Most bytes one send takes.
        most: usize,
    }

    #[derive(Debug)]
    struct Recorder(Arc<std::sync::Mutex<Sends>>);

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            // Takes few bytes a call (1000 unless a test says otherwise), so partial
            // sends are exercised too.
            let mut sends = self.0.lock().unwrap();
            if sends.broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let mut n = 0;
            for slice in data {
                let take = slice.len().min(sends.most - n);
                sends.bytes.extend_from_slice(&slice[..take]);
                n += take;
            }
            sends.sizes.push(n);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    // What a `Stream` must be besides readable and writable; nothing of it is used.
    #[async_trait]
    impl Shutdown for Recorder {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for Recorder {
        fn id(&self) -> UniqueIDType {
            0
        }
    }
    impl Ssl for Recorder {}
    impl GetTimingDigest for Recorder {
        fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
            Vec::new()
        }
    }
    impl GetProxyDigest for Recorder {
        fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for Recorder {
        fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
            None
        }
    }
    impl Peek for Recorder {}

    fn recorded(capacity: usize) -> (ClientStream, Arc<std::sync::Mutex<Sends>>) {
        let sends = Arc::new(std::sync::Mutex::new(Sends {
            most: 1000,
            ..Sends::default()
        }));
        let stream = ClientStream::new(
            Box::new(Recorder(sends.clone())),
            Duration::from_secs(1),
            capacity,
        );
        (stream, sends)
    }

    #[tokio::test]
    async fn small_writes_leave_in_one_send_and_the_buffer_is_let_go_once_sent() {
        let (mut stream, sends) = recorded(1460);
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        stream.write_all(b"ok\n").await.unwrap();
        assert!(sends.lock().unwrap().sizes.is_empty());
        assert!(stream.out.bytes.capacity() >= 1460);
        stream.flush().await.unwrap();
        assert_eq!(sends.lock().unwrap().sizes, [22]);
        assert_eq!(sends.lock().unwrap().bytes, b"HTTP/1.1 200 OK\r\n\r\nok\n");
        assert_eq!(stream.out.bytes.capacity(), 0, "held while idle");

        // The next response takes the buffer back from this thread's spares.
        stream.write_all(b"again").await.unwrap();
        assert!(stream.out.bytes.capacity() >= 1460);
        stream.flush().await.unwrap();
        assert_eq!(sends.lock().unwrap().sizes, [22, 5]);
    }

    #[tokio::test]
    async fn writes_keep_their_order_around_the_buffer_and_through_partial_sends() {
        let (mut stream, sends) = recorded(100);
        let mut expected = Vec::new();
        for (i, len) in [10, 95, 3, 2500, 40, 60, 99, 100, 1]
            .into_iter()
            .enumerate()
        {
            let chunk = vec![b'a' + i as u8; len];
            stream.write_all(&chunk).await.unwrap();
            expected.extend_from_slice(&chunk);
        }
        let slices = [b"5\r\n".as_slice(), b"hello", b"\r\n"];
        let ios: Vec<io::IoSlice<'_>> = slices.iter().map(|s| io::IoSlice::new(s)).collect();
        assert!(stream.is_write_vectored());
        let n = stream.write_vectored(&ios).await.unwrap();
        assert_eq!(n, 10);
        expected.extend_from_slice(b"5\r\nhello\r\n");
        Shutdown::shutdown(&mut stream).await;
        let sends = sends.lock().unwrap();
        assert_eq!(sends.bytes, expected);
        // 2500 bytes went straight through, a thousand at a time.
        assert!(sends.sizes.contains(&1000), "{:?}", sends.sizes);
    }

    #[tokio::test]
    async fn a_head_and_a_large_body_leave_in_one_send() {
        let (mut stream, sends) = recorded(100);
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n";
        stream.write_all(head).await.unwrap();
        stream.write_all(&[b'x'; 500]).await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(sends.lock().unwrap().sizes, [head.len() + 500]);
        assert_eq!(stream.out.bytes.capacity(), 0);

        // Larger than one send takes: the rest follows, in order.
        let (mut stream, sends) = recorded(100);
        stream.write_all(head).await.unwrap();
        stream.write_all(&[b'y'; 2500]).await.unwrap();
        let sends = sends.lock().unwrap();
        assert_eq!(sends.sizes, [1000, 1000, head.len() + 500]);
        assert_eq!(&sends.bytes[..head.len()], head);
        assert!(sends.bytes[head.len()..].iter().all(|&b| b == b'y'));
    }

    #[tokio::test]
    async fn what_is_buffered_is_sent_when_the_stream_is_dropped() {
        let (mut stream, sends) = recorded(1460);
        stream
            .write_all(b"HTTP/1.1 200 OK\r\n\r\npart of a body")
            .await
            .unwrap();
        assert!(sends.lock().unwrap().bytes.is_empty());
        drop(stream);
        assert_eq!(
            sends.lock().unwrap().bytes,
            b"HTTP/1.1 200 OK\r\n\r\npart of a body"
        );
    }

    #[tokio::test]
    async fn with_no_buffer_every_write_goes_straight_through() {
        let (mut stream, sends) = recorded(0);
        stream.write_all(b"head").await.unwrap();
        stream.write_all(b"body").await.unwrap();
        assert_eq!(sends.lock().unwrap().sizes, [4, 4]);
        assert_eq!(stream.out.bytes.capacity(), 0);
    }

    #[tokio::test]
    async fn the_flushes_of_one_turn_leave_in_one_send_before_the_session_waits() {
        let (stream, sends) = recorded(1460);
        let conn = SharedStream::new(stream);
        let mut session = conn.clone();
        let (more, wait_for_more) = tokio::sync::oneshot::channel::<()>();
        // A chunked response as Pingora writes it: the head, flushed because it has
        // no length; a chunk, flushed; then the wait for the upstream's next read.
        let served = async move {
            session.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
            session.flush().await?;
            session.write_all(b"5\r\nhello\r\n").await?;
            session.flush().await?;
            let _ = wait_for_more.await;
            session.write_all(b"0\r\n\r\n").await?;
            session.flush().await?;
            io::Result::Ok(())
        };
        let mut turns = pin!(in_turns(&conn, served));
        let first = poll_fn(|cx| Poll::Ready(turns.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        {
            let sends = sends.lock().unwrap();
            assert_eq!(sends.sizes, [29], "both flushes made in one send");
            assert_eq!(sends.bytes, b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n");
        }
        more.send(()).unwrap();
        turns.await.unwrap();
        assert_eq!(
            sends.lock().unwrap().sizes,
            [29, 5],
            "sent as the turn ended"
        );
        assert!(send_the_rest(&conn).await);
        assert_eq!(sends.lock().unwrap().sizes, [29, 5], "nothing left to send");
    }

    #[tokio::test]
    async fn the_session_hears_of_a_deferred_send_that_failed_at_its_next_write() {
        let (stream, sends) = recorded(1460);
        let conn = SharedStream::new(stream);
        let mut session = conn.clone();
        session.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        session.flush().await.unwrap();
        assert!(
            sends.lock().unwrap().sizes.is_empty(),
            "the flush is deferred"
        );

        sends.lock().unwrap().broken = true;
        let owed = poll_fn(|cx| conn.lock().poll_owed_flush(cx)).await;
        assert_eq!(owed.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(
            conn.lock().out.bytes.capacity(),
            0,
            "what was unsent is let go"
        );
        let next = session.write_all(b"more").await;
        assert_eq!(next.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(
            session.flush().await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        assert!(!send_the_rest(&conn).await, "the connection is not kept");
    }

    #[tokio::test]
    async fn a_chunked_page_written_in_one_turn_leaves_in_one_send() {
        let (stream, sends) = recorded(1460);
        sends.lock().unwrap().most = usize::MAX;
        let conn = SharedStream::new(stream);
        let mut session = conn.clone();
        let page = vec![b'p'; 16 * 1024];
        let size_line = format!("{:X}\r\n", page.len());
        let served = async {
            session.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
            session.flush().await?;
            let chunk = [
                io::IoSlice::new(size_line.as_bytes()),
                io::IoSlice::new(&page),
                io::IoSlice::new(b"\r\n"),
            ];
            assert_eq!(session.write_vectored(&chunk).await?, page.len() + 8);
            session.flush().await?;
            session.write_all(b"0\r\n\r\n").await?;
            session.flush().await
        };
        in_turns(&conn, served).await.unwrap();
        assert!(send_the_rest(&conn).await);
        {
            let sends = sends.lock().unwrap();
            assert_eq!(sends.sizes, [19 + 16 * 1024 + 8 + 5]);
            assert!(sends.bytes.ends_with(b"pp\r\n0\r\n\r\n"));
        }

        // Without a flush owed, a large write still goes straight through.
        let (mut stream, sends) = recorded(1460);
        sends.lock().unwrap().most = usize::MAX;
        stream.defer_flushes = true;
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        stream.write_all(&page).await.unwrap();
        assert_eq!(sends.lock().unwrap().sizes, [19 + 16 * 1024]);
    }

    #[tokio::test]
    async fn a_complete_response_is_sent_when_the_proxy_says_so() {
        let (stream, sends) = recorded(1460);
        let conn = SharedStream::new(stream);
        let mut session = conn.clone();
        session
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        session.flush().await.unwrap();
        assert!(
            sends.lock().unwrap().sizes.is_empty(),
            "the flush is deferred"
        );

        // As the proxy's logging hook sees it: the session's stream, boxed.
        let boxed: Stream = Box::new(session);
        send_owed(Some(&boxed));
        assert_eq!(sends.lock().unwrap().sizes, [27]);
        send_owed(Some(&boxed));
        assert_eq!(sends.lock().unwrap().sizes, [27], "nothing more was owed");

        // Other streams flush themselves; asking changes nothing.
        let (other, sends) = recorded(1460);
        let mut other: Stream = Box::new(other);
        other
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        send_owed(Some(&other));
        send_owed(None);
        assert!(sends.lock().unwrap().sizes.is_empty());
    }
}
