//! `css_inject`'s streaming body filter.
//!
//! The contract (plugins/src/css_inject.rs): on a `200 text/html` response, the tag goes
//! in right before the first `</head` (any letter case) that is followed by a byte that
//! ends a tag name (`>`, `/`, space, tab, LF, CR, FF), exactly once; every other byte
//! passes unchanged; a page without one passes unchanged. At most six bytes are held
//! back between chunks.
//!
//! Properties: for any page and any way of cutting it into chunks (empty chunks
//! included, the end of the stream signalled on the last chunk or by a separate empty
//! call), the bytes the client gets equal the reference computed on the whole page, the
//! filter never holds back more than six bytes (what went out is always a prefix of the
//! reference, and at most six bytes short of the input seen so far, plus the tag), and
//! non-HTML or non-200 responses pass byte for byte.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use gatewarden_plugins::css_inject::{CssInject, CssInjectConfig};
use gatewarden_plugins::{BuildEnv, Ctx, Plugin, RequestId, ResponseHeader};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    page: Vec<u8>,
    /// Chunk lengths, taken in turn (modulo what is left); 0 makes an empty chunk.
    cuts: Vec<u8>,
    /// Signal the end with a separate call carrying no data.
    separate_end: bool,
    /// Pass an empty `Some` chunk rather than `None` with the separate end.
    end_with_empty_chunk: bool,
    /// Use a response that must not be touched.
    untouched: Option<u8>,
}

const HREF: &str = "/theme.css?v=\"1\"&x=<y>";

fn ends_tag_name(b: u8) -> bool {
    matches!(b, b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

/// The contract, on the whole page at once, by the simplest possible scan.
fn reference(page: &[u8], tag: &[u8]) -> Vec<u8> {
    for i in 0..page.len() {
        if page.len() >= i + 7
            && page[i..i + 6].eq_ignore_ascii_case(b"</head")
            && ends_tag_name(page[i + 6])
        {
            let mut out = page[..i].to_vec();
            out.extend_from_slice(tag);
            out.extend_from_slice(&page[i..]);
            return out;
        }
    }
    page.to_vec()
}

fn tag() -> Vec<u8> {
    // What `link_tag` writes for HREF: attribute-escaped.
    b"<link rel=\"stylesheet\" href=\"/theme.css?v=&quot;1&quot;&amp;x=&lt;y&gt;\">".to_vec()
}

fuzz_target!(|input: Input| {
    let plugin = CssInject::new(
        CssInjectConfig {
            file: None,
            href: Some(HREF.into()),
        },
        &BuildEnv::default(),
    )
    .expect("plugin");
    let mut ctx = Ctx::new(
        "127.0.0.1".parse().unwrap(),
        RequestId::from_random(1),
        false,
    );
    let (status, content_type) = match input.untouched {
        None => (200, "text/html; charset=utf-8"),
        Some(n) => match n % 4 {
            0 => (404, "text/html"),
            1 => (200, "application/json"),
            2 => (206, "text/html"),
            _ => (200, "text/htmlx"),
        },
    };
    let mut resp = ResponseHeader::build(status, None).unwrap();
    resp.insert_header("Content-Type", content_type).unwrap();
    let mut parts = http::response::Parts::from(resp);
    plugin.on_response(&mut parts, &mut ctx);

    let expected = if input.untouched.is_none() {
        reference(&input.page, &tag())
    } else {
        input.page.clone()
    };
    let tag_len = tag().len();

    let mut out: Vec<u8> = Vec::with_capacity(expected.len());
    let mut fed = 0usize;
    let mut cuts = input.cuts.iter().copied().cycle();
    // Cuts of only zeros would never get through the page: after one round of them,
    // the rest goes in one chunk.
    let all_zero = input.cuts.iter().all(|&c| c == 0);
    let page = &input.page;
    let mut round = 0usize;
    loop {
        let left = page.len() - fed;
        let len = if input.cuts.is_empty() || (all_zero && round >= input.cuts.len()) {
            left
        } else {
            (cuts.next().unwrap() as usize).min(left)
        };
        round += 1;
        let chunk = &page[fed..fed + len];
        fed += len;
        let last = fed == page.len() && !input.separate_end;
        let mut body = Some(Bytes::copy_from_slice(chunk));
        plugin.on_response_body(&mut body, last, &mut ctx);
        if let Some(b) = body {
            out.extend_from_slice(&b);
        }
        assert!(
            expected.starts_with(&out),
            "output is not a prefix of the reference after {fed} bytes"
        );
        if !last {
            // Bounded hold-back: everything but at most six bytes of what came in is out.
            assert!(
                out.len() + 6 >= fed,
                "held back {} bytes after {fed}",
                fed - out.len()
            );
            assert!(out.len() <= fed + tag_len);
        }
        if last {
            break;
        }
        if fed == page.len() {
            let mut body = if input.end_with_empty_chunk {
                Some(Bytes::new())
            } else {
                None
            };
            plugin.on_response_body(&mut body, true, &mut ctx);
            if let Some(b) = body {
                out.extend_from_slice(&b);
            }
            break;
        }
    }
    assert_eq!(
        out,
        expected,
        "chunked output differs from the reference (page {} bytes)",
        page.len()
    );
});
