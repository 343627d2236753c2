//! W3C Trace Context: reading a `traceparent` (version 00), writing the one the upstream
//! gets, and deciding whether a trace is sampled.
//!
//! The gateway continues a caller's trace only when the peer is a trusted proxy; anyone
//! else could otherwise pick trace ids (to collide with or pollute other traces) and
//! force sampling on. Everything else starts a new trace.

use http::HeaderValue;

/// The sampled bit of the trace flags.
const SAMPLED: u8 = 0x01;
/// The longest `tracestate` passed on (the W3C limit: 32 members of up to 256 bytes
/// would be 8 KiB; vendors agree on 512 as what must be propagated).
const MAX_TRACESTATE: usize = 512;

/// The trace a request joins, as read from a trusted peer's `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl Parent {
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

fn hex_value(c: u8) -> Option<u8> {
    // Lowercase only: the specification forbids uppercase hex in version 00.
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex into `out`; `None` unless `text` is exactly twice `out`'s length.
fn decode_hex(text: &[u8], out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Some(())
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Parses a `traceparent` value: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
/// Anything else is refused: another version this gateway does not know (`ff` is
/// forbidden outright), uppercase hex, an all-zero id, a wrong length or separator.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    // Version 00 is exactly 55 bytes; later versions may append fields, but the
    // gateway only continues what it fully understands.
    if value.len() != 55 {
        return None;
    }
    if &value[..3] != b"00-" || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    let mut flags = [0u8; 1];
    decode_hex(&value[3..35], &mut trace_id)?;
    decode_hex(&value[36..52], &mut span_id)?;
    decode_hex(&value[53..55], &mut flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        flags: flags[0],
    })
}

/// A `tracestate` worth passing on: printable ASCII within the size limit. Its members
/// are the business of the vendors that wrote them; the gateway does not rewrite them.
pub fn usable_tracestate(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TRACESTATE
        && bytes.iter().all(|b| (0x20..0x7f).contains(b))
}

/// The `traceparent` the upstream gets: this request's trace, with the gateway's span as
/// the parent.
pub fn format_traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
    let mut text = String::with_capacity(55);
    text.push_str("00-");
    push_hex(&mut text, trace_id);
    text.push('-');
    push_hex(&mut text, span_id);
    text.push_str(if sampled { "-01" } else { "-00" });
    // Only hex digits and dashes: always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Decides from the trace id alone whether a new trace is sampled, so that every
/// service using the same rule and ratio agrees on the same traces: the id's last 8
/// bytes, as a 63-bit number, below `ratio` of the range.
pub fn sample_by_ratio(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let value = u64::from_be_bytes(low) >> 1;
    // Exact enough: 2^63 * ratio fits in a u64 for ratio < 1.
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    value < bound
}

/// A random id that is not all zeros (which the specification reserves for "invalid").
pub fn random_trace_id() -> [u8; 16] {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random span id that is not all zeros.
pub fn random_span_id() -> [u8; 8] {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses() {
        let p = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        let unsampled = VALID.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled());
        // Flags other than sampled are carried but do not make a trace sampled.
        let other = VALID.replace("-01", "-02");
        let p = parse_traceparent(other.as_bytes()).unwrap();
        assert_eq!(p.flags, 2);
        assert!(!p.sampled());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let bad = [
            // Version ff is forbidden, other versions are not understood.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            // Wrong lengths.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-0f067aa0ba902b7-01",
            // Separators and stray characters.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "",
        ];
        for text in bad {
            assert_eq!(parse_traceparent(text.as_bytes()), None, "{text:?}");
        }
    }

    #[test]
    fn the_propagated_traceparent_round_trips() {
        let trace = random_trace_id();
        let span = random_span_id();
        for sampled in [true, false] {
            let value = format_traceparent(&trace, &span, sampled);
            let p = parse_traceparent(value.as_bytes()).unwrap();
            assert_eq!((p.trace_id, p.span_id, p.sampled()), (trace, span, sampled));
        }
    }

    #[test]
    fn tracestate_is_passed_on_only_when_printable_and_bounded() {
        assert!(usable_tracestate(&HeaderValue::from_static(
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        )));
        assert!(!usable_tracestate(&HeaderValue::from_static("")));
        let long = HeaderValue::from_str(&"a".repeat(MAX_TRACESTATE + 1)).unwrap();
        assert!(!usable_tracestate(&long));
        let tab = HeaderValue::from_bytes(b"a=b\tc").unwrap();
        assert!(!usable_tracestate(&tab));
    }

    #[test]
    fn the_ratio_sampler_follows_the_ratio_and_the_id_alone() {
        let id = |low: u64| {
            let mut t = [0xabu8; 16];
            t[8..].copy_from_slice(&low.to_be_bytes());
            t
        };
        assert!(!sample_by_ratio(&id(0), 0.0));
        assert!(sample_by_ratio(&id(u64::MAX), 1.0));
        assert!(sample_by_ratio(&id(0), 0.5));
        assert!(!sample_by_ratio(&id(u64::MAX), 0.5));
        assert!(!sample_by_ratio(&id(0), f64::NAN));
        // Deterministic: the same id gets the same answer.
        let t = random_trace_id();
        assert_eq!(sample_by_ratio(&t, 0.3), sample_by_ratio(&t, 0.3));
        // Roughly the ratio over many random ids.
        let sampled = (0..20_000)
            .filter(|_| sample_by_ratio(&random_trace_id(), 0.25))
            .count();
        assert!((4_000..6_000).contains(&sampled), "{sampled}");
        // Monotonic: what is sampled at a ratio is sampled at any higher one.
        for _ in 0..1000 {
            let t = random_trace_id();
            if sample_by_ratio(&t, 0.1) {
                assert!(sample_by_ratio(&t, 0.2));
            }
        }
    }

    #[test]
    fn random_ids_are_never_zero() {
        for _ in 0..1000 {
            assert_ne!(random_trace_id(), [0; 16]);
            assert_ne!(random_span_id(), [0; 8]);
        }
    }
}
