//! `session::safe_next`: where the login page sends the browser afterwards.
//!
//! Properties, for every input:
//! - the answer is the input itself or `/` (it never invents a target);
//! - it starts with exactly one `/`: never `//` or `/\`, never a scheme, so it is never
//!   an absolute or protocol-relative URL;
//! - it holds no control byte or backslash, raw or percent-encoded (browsers drop tabs
//!   and newlines and read `\` as `/`, which would turn `/\t/evil` into `//evil`);
//! - it is a valid `Location` header value;
//! - a WHATWG URL parser resolving it against the gateway's origin stays on that
//!   origin, and so does the target after one more percent-decoding (a client or
//!   upstream that decodes again must not find `//evil` in it).
//!
//! The input is also run through the login form's decoder first (`parse_form`), as
//! the real `next` field and query parameter are.
#![no_main]

use gatewarden_plugins::forms::{parse_form, percent_decode};
use gatewarden_plugins::session::safe_next;
use libfuzzer_sys::fuzz_target;

const BASE: &str = "https://gw.example:8443/.gatewarden/login?next=x";

fn same_origin(target: &str, what: &str) {
    let base = url::Url::parse(BASE).unwrap();
    if let Ok(joined) = base.join(target) {
        assert_eq!(
            joined.origin(),
            base.origin(),
            "{what} {target:?} leaves the origin: {joined}"
        );
    }
}

fn check(next: &str) {
    let out = safe_next(next);
    assert!(out == next || out == "/", "invented {out:?} from {next:?}");
    let b = out.as_bytes();
    assert_eq!(b.first(), Some(&b'/'), "{out:?} is not a path");
    assert!(
        !matches!(b.get(1), Some(b'/') | Some(b'\\')),
        "{out:?} is protocol-relative"
    );
    assert!(
        !b.iter().any(|&c| c < 0x20 || c == 0x7f || c == b'\\'),
        "control byte or backslash in {out:?}"
    );
    assert!(b.len() <= 2048);
    let decoded = percent_decode(out);
    let d = decoded.as_bytes();
    assert!(
        !matches!(d.get(1), Some(b'/') | Some(b'\\')),
        "{out:?} decodes to a protocol-relative {decoded:?}"
    );
    assert!(
        !d.iter().any(|&c| c < 0x20 || c == 0x7f || c == b'\\'),
        "{out:?} decodes to a control byte or backslash"
    );
    assert!(
        http::HeaderValue::from_str(out).is_ok(),
        "{out:?} is not a valid Location value"
    );
    same_origin(out, "target");
    same_origin(&decoded, "decoded target");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text);
    // As the login form and the query string deliver it: form-decoded once.
    let body = format!("pin=1&next={text}");
    for (name, value) in parse_form(body.as_bytes()) {
        if name == "next" {
            check(&value);
        }
    }
});
