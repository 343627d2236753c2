//! The stream a client connection is read and written through, and its shared handle
//! that the keep-alive loop and Pingora's session both hold.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::head_deadline::HeadDeadline;

use super::buffers::{give_back, take_spare, ReadAhead, WriteBuffer, READ_AHEAD, READ_SPARES};
use super::OWED_GATHER;

/// A client connection's stream: a deadline on the first request head, and read and
/// write buffers that exist only while there is something in them.
#[derive(Debug)]
pub struct ClientStream {
    inner: Stream,
    head: HeadDeadline,
    pub(super) ahead: ReadAhead,
    pub(super) out: WriteBuffer,
    /// Flushes only note that a send is owed: the keep-alive loop sends once the
    /// session waits (`in_turns` in the keep-alive loop).
    pub(super) defer_flushes: bool,
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
    pub(super) fn gather_limit(&self) -> usize {
        if self.flush_owed && self.out.capacity > 0 {
            self.out.capacity.max(OWED_GATHER)
        } else {
            self.out.capacity
        }
    }

    /// The error a deferred send met, for the session's next write.
    pub(super) fn failure(&self) -> Option<io::Error> {
        self.failed.map(io::Error::from)
    }

    /// Sends everything buffered and flushes the socket.
    pub(super) fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    pub(super) fn poll_owed_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    pub(super) fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
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
/// once the session waits (`in_turns` in the keep-alive loop). Both live in one task,
/// so the lock is never contended.
#[derive(Debug, Clone)]
pub(super) struct SharedStream(Arc<Mutex<ClientStream>>);

impl SharedStream {
    pub(super) fn new(mut stream: ClientStream) -> Self {
        stream.defer_flushes = true;
        SharedStream(Arc::new(Mutex::new(stream)))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, ClientStream> {
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
