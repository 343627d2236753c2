//! Header values made per request, without an allocation each.
//!
//! An `http::HeaderValue` owns its bytes, so every value the gateway makes for a
//! request (`X-Forwarded-For`, `X-Request-Id`, a rendered `headers` template, the
//! `RateLimit-*` numbers) used to cost one allocation. Here they are cut from a block
//! of [`BLOCK`] bytes that each thread keeps: a value is a reference-counted slice of
//! the block, and a new block is taken only when the current one is used up. A block
//! is freed once the last value cut from it is dropped, on whatever thread that is.
//!
//! A value pins its whole block while it lives. Values live as long as their request,
//! so a long-lived request (a WebSocket, an event stream) holds at most one block
//! alive; values longer than [`LONGEST_CUT`] get storage of their own.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// Bytes in one thread's block: a request of the full chain uses about a hundred.
pub const BLOCK: usize = 2048;

/// Longer values are not cut from the block, so that one cannot use most of it up.
pub const LONGEST_CUT: usize = 256;

thread_local! {
    static CURRENT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `bytes` as a header value; `None` if they are not a valid one (a control
/// character, say).
pub fn header_value(bytes: &[u8]) -> Option<HeaderValue> {
    header_value_with(bytes.len(), |out| out.extend_from_slice(bytes))
}

/// A header value of about `len` bytes, written by `fill` (which must not make header
/// values itself); `None` if what it wrote is not a valid value. Writing more than
/// `len` is correct, only slower.
pub fn header_value_with(len: usize, fill: impl FnOnce(&mut BytesMut)) -> Option<HeaderValue> {
    let bytes = if len > LONGEST_CUT {
        let mut own = BytesMut::with_capacity(len);
        fill(&mut own);
        own.freeze()
    } else {
        CURRENT.with_borrow_mut(|block| {
            // What is left of the block is its spare capacity: each cut splits off the
            // front.
            if block.capacity() < len {
                *block = BytesMut::with_capacity(BLOCK);
            }
            fill(block);
            block.split().freeze()
        })
    };
    HeaderValue::from_maybe_shared(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_bytes_as_the_block_is_used_up_and_replaced() {
        let values: Vec<(String, HeaderValue)> = (0..400)
            .map(|i| {
                let text = format!("10.0.{}.{}, 192.0.2.{}", i / 256, i % 256, i % 7);
                let value = header_value(text.as_bytes()).unwrap();
                (text, value)
            })
            .collect();
        // 400 values of ~20 bytes take several blocks; each still reads as written.
        for (text, value) in &values {
            assert_eq!(value.as_bytes(), text.as_bytes());
        }
    }

    /// What is left of this thread's block.
    fn spare() -> usize {
        CURRENT.with_borrow(|block| block.capacity())
    }

    #[test]
    fn values_are_cut_from_one_block_until_it_is_used_up() {
        let _first = header_value(b"warm").unwrap();
        let left = spare();
        let _ip = header_value(b"192.0.2.1").unwrap();
        assert_eq!(spare(), left - 9);
        // Used up: the next value that does not fit takes a fresh block.
        let filler = [b'f'; LONGEST_CUT];
        let mut held = Vec::new();
        while spare() >= 8 {
            held.push(header_value(&filler[..spare().min(LONGEST_CUT)]).unwrap());
        }
        let next = header_value(b"10.1.2.3").unwrap();
        assert_eq!(next, "10.1.2.3");
        assert_eq!(spare(), BLOCK - 8);
        // The values of the old block are unchanged.
        assert!(held.iter().all(|v| v.as_bytes().iter().all(|&b| b == b'f')));
    }

    #[test]
    fn a_long_value_gets_storage_of_its_own() {
        let _first = header_value(b"warm").unwrap();
        let left = spare();
        let long = "v".repeat(LONGEST_CUT + 1);
        let value = header_value(long.as_bytes()).unwrap();
        assert_eq!(value.as_bytes(), long.as_bytes());
        assert_eq!(spare(), left, "the block was not touched");
    }

    #[test]
    fn an_invalid_value_is_refused_and_the_next_one_is_whole() {
        assert!(header_value(b"bad\nvalue").is_none());
        assert!(header_value(b"nul\0").is_none());
        let written = header_value_with(6, |out| {
            out.extend_from_slice(b"abc");
            out.extend_from_slice(b", 1");
        })
        .unwrap();
        assert_eq!(written, "abc, 1");
        // Writing past the announced length is slower, never wrong.
        let past = header_value_with(1, |out| out.extend_from_slice(&[b'z'; 3000])).unwrap();
        assert_eq!(past.len(), 3000);
        assert_eq!(header_value(b"next").unwrap(), "next");
    }
}
