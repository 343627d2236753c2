//! `router::normalize`: the one path the gateway matches on and sends upstream.
//!
//! Properties, for every input:
//! - it never panics;
//! - an accepted path is absolute, holds no NUL, control byte or backslash, no `//`,
//!   no `.` or `..` segment (also not behind `;parameters`), and no percent-escape
//!   that the normaliser promises to decode or refuse (unreserved characters, `/`,
//!   `\`, control bytes); every remaining escape is `%` and two upper-case hex digits;
//! - it is a fixed point: normalising it again gives it back unchanged;
//! - a WHATWG URL parser (what browsers and many upstream frameworks use) sees the
//!   same segments in it, so gateway and upstream cannot disagree about dot segments;
//! - it is never longer than the input, and keeps a trailing slash iff the input had
//!   one (or it is `/`);
//! - a path that needs no work is returned borrowed and equal to the input.
#![no_main]

use std::borrow::Cow;

use gatewarden::router::normalize;
use libfuzzer_sys::fuzz_target;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes every `%XX`, as an upstream that decodes once would.
fn decode_all(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn check(input: &str) {
    let Ok(out) = normalize(input) else {
        return;
    };
    let n: &str = &out;
    let b = n.as_bytes();

    assert!(n.starts_with('/'), "not absolute: {n:?}");
    assert!(!n.contains("//"), "double slash: {input:?} -> {n:?}");
    assert!(
        !b.iter().any(|&c| c < 0x20 || c == 0x7f || c == b'\\'),
        "control byte or backslash: {input:?} -> {n:?}"
    );
    for segment in n.split('/').skip(1) {
        let bare = segment.split(';').next().unwrap_or("");
        assert!(
            !matches!(segment, "." | "..") && !matches!(bare, "." | ".."),
            "dot segment {segment:?}: {input:?} -> {n:?}"
        );
    }
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (hi, lo) = (b.get(i + 1).copied(), b.get(i + 2).copied());
            let (Some(hi), Some(lo)) = (hi, lo) else {
                panic!("truncated escape: {input:?} -> {n:?}");
            };
            assert!(
                matches!(hi, b'0'..=b'9' | b'A'..=b'F') && matches!(lo, b'0'..=b'9' | b'A'..=b'F'),
                "escape not upper-case hex: {input:?} -> {n:?}"
            );
            let v = hex(hi).unwrap() << 4 | hex(lo).unwrap();
            assert!(
                !is_unreserved(v) && !matches!(v, b'/' | b'\\' | 0..=0x1f | 0x7f),
                "escape %{:02X} left in: {input:?} -> {n:?}",
                v
            );
            i += 3;
        } else {
            i += 1;
        }
    }

    // A fixed point.
    let again = normalize(n).unwrap_or_else(|e| panic!("{n:?} from {input:?} refused: {e}"));
    assert_eq!(again, n, "not idempotent: {input:?} -> {n:?} -> {again:?}");

    // Decoding what is left reveals no new structure either.
    let decoded = decode_all(n);
    assert!(
        !decoded.iter().any(|&c| c == b'\\' || c < 0x20 || c == 0x7f),
        "decoding reveals a control byte or backslash: {n:?}"
    );
    assert_eq!(
        decoded.iter().filter(|&&c| c == b'/').count(),
        b.iter().filter(|&&c| c == b'/').count(),
        "decoding reveals a slash: {n:?}"
    );

    // What a WHATWG parser makes of the path: the same segments, at most with more
    // characters percent-encoded.
    // `?`, `#` and spaces cannot reach the normaliser raw (the request line's parser
    // splits or refuses them), but a fuzzer can pass them; keep them in the path for
    // the URL parser, which would otherwise split at them or trim a trailing space.
    let escaped = n
        .replace('?', "%3F")
        .replace('#', "%23")
        .replace(' ', "%20");
    let url = url::Url::parse(&format!("http://gw.test{escaped}"))
        .unwrap_or_else(|e| panic!("WHATWG refuses {n:?}: {e}"));
    assert_eq!(
        decode_all(url.path()),
        decoded,
        "WHATWG resolves {n:?} to {:?}",
        url.path()
    );

    assert!(n.len() <= input.len(), "grew: {input:?} -> {n:?}");
    assert_eq!(
        n.ends_with('/'),
        input.ends_with('/') || n == "/",
        "trailing slash changed: {input:?} -> {n:?}"
    );
    if let Cow::Borrowed(s) = &out {
        assert_eq!(*s, input);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check(s);
        // Most fuzz inputs do not start with '/'; look at them as paths too.
        if !s.starts_with('/') {
            check(&format!("/{s}"));
        }
    }
});
