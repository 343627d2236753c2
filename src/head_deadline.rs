//! A deadline for the first request head of every client connection (slowloris).
//!
//! Pingora times out each read from a client (60 s), not the request head as a whole,
//! so a client that sends a byte every few seconds keeps a connection forever. Every
//! client stream carries a [`HeadDeadline`] ([`crate::plumbing::ClientStream`]):
//! from the first byte, the head must arrive (up to the blank line that ends it)
//! within [`HEAD_DEADLINE`], or the read fails and the connection is closed without an
//! answer, as Pingora closes one that goes silent. Once the head is in, bytes pass
//! through.
//!
//! Only the first request of a connection is covered: the stream cannot tell where a
//! body ends and the next head starts. Later requests on a kept-alive connection have
//! Pingora's per-read timeouts.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Sleep;

/// How long a client may take over its first request head, from its first byte (the
/// default of nginx's `client_header_timeout`).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(60);

/// Where a connection's first request head stands.
#[derive(Debug)]
pub struct HeadDeadline {
    limit: Duration,
    head: Head,
}

#[derive(Debug)]
enum Head {
    /// No byte yet: an idle connection has other timeouts.
    Waiting,
    /// Reading the head; `end` tracks the line breaks that end it.
    Reading {
        deadline: Pin<Box<Sleep>>,
        end: EndOfHead,
    },
    /// The head is in: bytes pass through.
    Done,
}

impl HeadDeadline {
    pub fn new(limit: Duration) -> Self {
        HeadDeadline {
            limit,
            head: Head::Waiting,
        }
    }

    /// Whether the head is complete and nothing more is watched.
    pub fn done(&self) -> bool {
        matches!(self.head, Head::Done)
    }

    /// True once the head has been read for longer than the limit; otherwise the
    /// task is woken when it will be.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.head {
            Head::Reading { deadline, .. } => deadline.as_mut().poll(cx).is_ready(),
            Head::Waiting | Head::Done => false,
        }
    }

    /// Moves on by the bytes just read.
    pub fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if matches!(self.head, Head::Waiting) {
            self.head = Head::Reading {
                deadline: Box::pin(tokio::time::sleep(self.limit)),
                end: EndOfHead::default(),
            };
        }
        if let Head::Reading { end, .. } = &mut self.head {
            if end.feed(bytes) {
                self.head = Head::Done;
            }
        }
    }
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
}
