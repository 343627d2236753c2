//! Read-ahead and write buffers that exist only while there is something in them,
//! taken from and given back to per-thread spare lists.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::thread::LocalKey;

use pingora::protocols::Stream;
use tokio::io::AsyncWrite;

/// Most bytes of spare buffers a thread keeps of each kind: 179 write buffers of the
/// default size, 8 of 32 KiB, 64 read-ahead buffers. Larger buffers are freed once
/// used.
pub(super) const SPARE_BYTES: usize = 256 * 1024;

/// Size of the read-ahead buffer: Pingora's first read of a request head.
pub(super) const READ_AHEAD: usize = 4096;

pub(super) type Spares = RefCell<Vec<Vec<u8>>>;

thread_local! {
    /// Buffers between uses. A busy connection takes one for each request or response
    /// and puts it back once done with it, so the heap is not asked per request, and
    /// an idle connection holds none.
    pub(super) static WRITE_SPARES: Spares = const { RefCell::new(Vec::new()) };
    pub(super) static READ_SPARES: Spares = const { RefCell::new(Vec::new()) };
}

/// A spare buffer with room for `capacity` bytes, or a new one.
pub(super) fn take_spare(list: &'static LocalKey<Spares>, capacity: usize) -> Vec<u8> {
    list.try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .filter(|spare| spare.capacity() >= capacity)
        .unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Keeps `spare` for the next use, within [`SPARE_BYTES`]. Its contents stay: a
/// read-ahead buffer is initialized once.
pub(super) fn give_back(list: &'static LocalKey<Spares>, spare: Vec<u8>) {
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
pub(super) struct WriteBuffer {
    /// Unsent bytes; no allocation while empty.
    pub(super) bytes: Vec<u8>,
    /// How many of `bytes` are already sent.
    pub(super) sent: usize,
    /// Most bytes coalesced; 0 passes every write through.
    pub(super) capacity: usize,
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
    pub(super) fn new(capacity: usize) -> Self {
        WriteBuffer {
            bytes: Vec::new(),
            sent: 0,
            capacity,
        }
    }

    /// Buffers `len` more bytes if that makes at most `limit`, taking a buffer if none
    /// is held.
    pub(super) fn room_for(&mut self, len: usize, limit: usize) -> bool {
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
    pub(super) fn poll_write_vectored(
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
    pub(super) fn poll_write_through(
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
    pub(super) fn poll_send(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
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
    pub(super) fn discard(&mut self) {
        self.bytes.clear();
        self.release();
    }

    /// Puts the buffer, all of it sent, back among this thread's spares.
    pub(super) fn release(&mut self) {
        self.sent = 0;
        give_back(&WRITE_SPARES, std::mem::take(&mut self.bytes));
    }
}

/// Bytes of a request read while parked, waiting for Pingora to ask for them.
#[derive(Default)]
pub(super) struct ReadAhead {
    /// `READ_AHEAD` initialized bytes while anything is unread; no allocation else.
    pub(super) bytes: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

// A request read ahead may carry credentials: debug output shows only how much is
// there.
impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadAhead({} bytes unread)", self.unread().len())
    }
}

impl ReadAhead {
    pub(super) fn unread(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// Moves `n` bytes on, letting the buffer go once all is read.
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            give_back(&READ_SPARES, std::mem::take(&mut self.bytes));
            (self.start, self.end) = (0, 0);
        }
    }
}
