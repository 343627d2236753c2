//! A deadline for the first request head of every client connection (slowloris).
//!
//! Pingora times out each read from a client (60 s), not the request head as a whole,
//! so a client that sends a byte every few seconds keeps a connection forever. Every
//! accepted stream is wrapped here: from the first byte, the head must arrive (up to
//! the blank line that ends it) within [`HEAD_DEADLINE`], or the read fails and the
//! connection is closed without an answer, as Pingora closes one that goes silent.
//! Once the head is in, the wrapper only passes bytes through.
//!
//! Only the first request of a connection is covered: the wrapper cannot tell where a
//! body ends and the next head starts. Later requests on a kept-alive connection have
//! Pingora's per-read timeouts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a client may take over its first request head, from its first byte (the
/// default of nginx's `client_header_timeout`).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(60);

/// A [`ServerApp`] whose streams get a request-head deadline.
pub struct HeadDeadline<A> {
    app: Arc<A>,
    limit: Duration,
}

impl<A> HeadDeadline<A> {
    pub fn new(app: A, limit: Duration) -> Self {
        HeadDeadline {
            app: Arc::new(app),
            limit,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeadDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = Box::new(Timed::new(stream, self.limit));
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// Where the first request head stands.
#[derive(Debug)]
enum Head {
    /// No byte yet: an idle connection is Pingora's to time out.
    Waiting,
    /// Reading the head; `end` tracks the line breaks that end it.
    Reading {
        deadline: Pin<Box<Sleep>>,
        end: EndOfHead,
    },
    /// The head is in: bytes pass through.
    Done,
}

/// Finds the blank line that ends a head across reads: `\r\n\r\n`, or `\n\n` and
/// `\n\r\n`, which Pingora's parser accepts too.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EndOfHead {
    #[default]
    InLine,
    AfterLf,
    AfterLfCr,
}

impl EndOfHead {
    /// Feeds bytes; true once the blank line has been seen.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            *self = match (*self, b) {
                (EndOfHead::AfterLf | EndOfHead::AfterLfCr, b'\n') => return true,
                (EndOfHead::AfterLf, b'\r') => EndOfHead::AfterLfCr,
                (_, b'\n') => EndOfHead::AfterLf,
                _ => EndOfHead::InLine,
            };
        }
        false
    }
}

/// A client stream with a deadline on its first request head.
#[derive(Debug)]
pub struct Timed {
    inner: Stream,
    limit: Duration,
    head: Head,
}

impl Timed {
    pub fn new(inner: Stream, limit: Duration) -> Self {
        Timed {
            inner,
            limit,
            head: Head::Waiting,
        }
    }
}

/// Moves `head` on by the bytes just read.
fn saw(head: &mut Head, limit: Duration, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if matches!(head, Head::Waiting) {
        *head = Head::Reading {
            deadline: Box::pin(tokio::time::sleep(limit)),
            end: EndOfHead::default(),
        };
    }
    if let Head::Reading { end, .. } = head {
        if end.feed(bytes) {
            *head = Head::Done;
        }
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Head::Reading { deadline, .. } = &mut this.head {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not complete within the deadline",
                )));
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(this.head, Head::Done) && matches!(result, Poll::Ready(Ok(()))) {
            saw(&mut this.head, this.limit, &buf.filled()[before..]);
        }
        result
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// Everything else is the wrapped stream's: TLS details (ALPN picks HTTP/2), the socket
// digest (the client address), timings, the connection id.

#[async_trait]
impl Shutdown for Timed {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Timed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Timed {
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

impl GetTimingDigest for Timed {
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

impl GetProxyDigest for Timed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Timed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Timed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(chunks: &[&[u8]]) -> bool {
        let mut end = EndOfHead::default();
        chunks.iter().any(|c| end.feed(c))
    }

    #[test]
    fn the_blank_line_is_found_across_reads_and_line_endings() {
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r", b"\n", b"\r", b"\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\nHost: a\n\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: a\n\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\nX: a\r\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\n", b"X-Slow: ", b"a", b"a"]));
    }

    #[tokio::test]
    async fn a_trickled_head_fails_at_the_deadline_and_a_prompt_one_passes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limit = Duration::from_millis(300);
        let (client, server) = tokio::io::duplex(1024);
        let mut timed = Timed::new(Box::new(server), limit);
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
            match timed.read(&mut buf).await {
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
        let mut timed = Timed::new(Box::new(server), limit);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let n = timed.read(&mut buf).await.unwrap();
        assert_eq!(n, 27);
        // A body or stream that follows may take as long as it likes.
        tokio::time::sleep(limit * 2).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(timed.read(&mut buf).await.unwrap(), 5);
    }
}
