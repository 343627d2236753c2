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
//! The wait is bounded as Pingora bounds it: the first request of a connection by
//! [`FIRST_REQUEST_WAIT`], each later one by the client keep-alive timeout. A
//! graceful shutdown or upgrade closes parked connections at once. TLS connections
//! (where ALPN may pick HTTP/2) and h2c keep Pingora's own loop.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::thread::LocalKey;
use std::time::Duration;

use async_trait::async_trait;
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

/// How long a new connection may stay silent before its first request: Pingora's
/// wait, and nginx's `client_header_timeout`.
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(60);

/// The client write buffer unless configured: Pingora's size, one Ethernet segment.
pub const DEFAULT_WRITE_BUFFER: usize = 1460;

/// How client connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// The first request head's deadline, from its first byte.
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
    async fn serve(self: Arc<Self>, mut stream: Box<ClientStream>, mut shutdown: ShutdownWatch) {
        let mut carried = None;
        let mut wait = FIRST_REQUEST_WAIT;
        while next_request(&mut stream, wait, &mut shutdown).await {
            let session = self.session(stream, carried.take(), &shutdown);
            let Some(reused) = self.app.process_new_http(session, &shutdown).await else {
                return;
            };
            let (back, settings) = reused.consume();
            // The session hands back the stream it was given.
            let Ok(back) = back.into_any().downcast::<ClientStream>() else {
                log::error!("client connection: the session handed back another stream");
                return;
            };
            (stream, carried) = (back, settings);
            // (Without keep-alive the proxy never hands the stream back.)
            wait = self.settings.keepalive.unwrap_or(FIRST_REQUEST_WAIT);
        }
    }

    /// A session for the next request, set up as Pingora sets one up.
    fn session(
        &self,
        stream: Box<ClientStream>,
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
        let parks = self.parks(&stream);
        // Under TLS, Pingora's own buffer sits below the encryption.
        let write_buffer = if parks { self.settings.write_buffer } else { 0 };
        let stream = Box::new(ClientStream::new(
            stream,
            self.settings.head_limit,
            write_buffer,
        ));
        if !parks {
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }
        // Pingora's task for the connection is sized for a TLS handshake this one did
        // not need, and would be held for the connection's life. A task of our own, a
        // fifth of that, serves it from here, and Pingora's ends.
        tokio::spawn(self.clone().serve(stream, shutdown.clone()));
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// Parks until the client sends something, and reads it ahead. False when the client
/// closed, the wait ran out, the server is shutting down or the socket failed: the
/// connection is then closed without an answer, as Pingora closes an idle one.
async fn next_request(
    stream: &mut ClientStream,
    wait: Duration,
    shutdown: &mut ShutdownWatch,
) -> bool {
    let arrived = poll_fn(|cx| stream.poll_read_ahead(cx));
    tokio::select! {
        biased;
        read = pingora::time::timeout(wait, arrived) => matches!(read, Ok(Ok(n)) if n > 0),
        () = shutting_down(shutdown) => false,
    }
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
        }
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
        let this = self.get_mut();
        this.out.poll_write(&mut this.inner, cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.out.poll_write_vectored(&mut this.inner, cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.out.capacity > 0 || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.out.poll_send(&mut this.inner, cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.out.poll_send(&mut this.inner, cx))?;
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

    /// Buffers `len` more bytes if they fit, taking a buffer if none is held.
    fn room_for(&mut self, len: usize) -> bool {
        if self.bytes.len().saturating_add(len) > self.capacity {
            return false;
        }
        if self.bytes.capacity() == 0 {
            self.bytes = take_spare(&WRITE_SPARES, self.capacity);
            self.bytes.clear();
        }
        true
    }

    fn poll_write(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.room_for(data.len()) {
            self.bytes.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        self.poll_write_through(inner, cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = data
            .iter()
            .fold(0usize, |sum, slice| sum.saturating_add(slice.len()));
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.room_for(len) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            // Takes at most 1000 bytes a call, so partial sends are exercised too.
            let mut sends = self.0.lock().unwrap();
            let mut n = 0;
            for slice in data {
                let take = slice.len().min(1000 - n);
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
        let sends = Arc::new(std::sync::Mutex::new(Sends::default()));
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
}
