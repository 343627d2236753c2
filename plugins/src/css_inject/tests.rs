use super::*;
use crate::RequestId;

const TAG: &str = "<style>body{color:red}</style>";

fn plugin() -> CssInject {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("theme.css"), "body{color:red}").unwrap();
    let env = BuildEnv {
        base_dir: dir.path().to_path_buf(),
        ..BuildEnv::default()
    };
    CssInject::new(
        CssInjectConfig {
            file: Some("theme.css".into()),
            href: None,
        },
        &env,
    )
    .unwrap()
}

fn ctx() -> Ctx {
    Ctx::new(
        "127.0.0.1".parse().unwrap(),
        RequestId::from_random(9),
        false,
    )
}

fn html_response(status: u16, content_type: &str) -> ResponseParts {
    let mut resp = http::Response::new(()).into_parts().0;
    resp.status = http::StatusCode::from_u16(status).unwrap();
    set(&mut resp, "Content-Type", content_type);
    set(&mut resp, "Content-Length", "1234");
    resp
}

fn set(resp: &mut ResponseParts, name: &str, value: &str) {
    resp.headers.insert(
        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        http::HeaderValue::from_str(value).unwrap(),
    );
}

/// The request as the upstream-request hook leaves it.
fn upstream_of(p: &CssInject, req: &RequestHeader, c: &Ctx) -> RequestParts {
    let mut up = RequestParts::from(req.clone());
    p.on_upstream_request(&mut up, c);
    up
}

/// Runs a whole response through the plugin, chunk by chunk; returns the headers and
/// the body the client would get.
fn run(p: &CssInject, resp: &mut ResponseParts, chunks: &[&[u8]]) -> Vec<u8> {
    let mut c = ctx();
    p.on_response(resp, &mut c);
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut body = Some(Bytes::copy_from_slice(chunk));
        p.on_response_body(&mut body, i + 1 == chunks.len(), &mut c);
        out.extend_from_slice(&body.unwrap_or_default());
        assert!(c.ext.get::<CssState>().unwrap().carry_len as usize <= NEEDLE.len());
    }
    out
}

fn inject(chunks: &[&[u8]]) -> String {
    let mut resp = html_response(200, "text/html; charset=utf-8");
    String::from_utf8(run(&plugin(), &mut resp, chunks)).unwrap()
}

#[test]
fn the_style_goes_right_before_head_split_at_every_position() {
    let page = "<!doctype html><html><head><title>x</title></head><body>hi</head></body></html>";
    let expected = page.replacen("</head>", &format!("{TAG}</head>"), 1);
    for split in 0..=page.len() {
        let (a, b) = page.as_bytes().split_at(split);
        assert_eq!(inject(&[a, b]), expected, "split at {split}");
    }
    // One byte at a time: every boundary at once.
    let bytes: Vec<&[u8]> = page.as_bytes().chunks(1).collect();
    assert_eq!(inject(&bytes), expected);
    let threes: Vec<&[u8]> = page.as_bytes().chunks(3).collect();
    assert_eq!(inject(&threes), expected);
}

#[test]
fn any_case_and_any_tag_end_counts() {
    for close in ["</HEAD>", "</Head >", "</head\n>", "</hEaD\t>", "</head/>"] {
        let page = format!("<html><head>{close}<body></body>");
        let expected = page.replacen(close, &format!("{TAG}{close}"), 1);
        assert_eq!(inject(&[page.as_bytes()]), expected, "{close:?}");
    }
}

#[test]
fn lookalikes_are_not_the_head() {
    let page = "<head></header><heading></headx></ head></head>";
    let expected = "<head></header><heading></headx></ head><style>body{color:red}</style></head>";
    assert_eq!(inject(&[page.as_bytes()]), expected);
    // `</header>` split right after `</head`: the carried bytes must still go out.
    assert_eq!(
        inject(&[b"a</head", b"er>b</head>"]),
        format!("a</header>b{TAG}</head>")
    );
}

#[test]
fn pages_without_head_pass_byte_for_byte() {
    let cases: [&[&[u8]]; 4] = [
        &[b"<p>no head here</p>"],
        &[b"<p>ends with </hea", b"d"],
        &[b"<p>ends with </head"],
        &[b"<", b"/", b"h", b"e"],
    ];
    for chunks in cases {
        let want: Vec<u8> = chunks.concat();
        let mut resp = html_response(200, "text/html");
        assert_eq!(run(&plugin(), &mut resp, chunks), want);
    }
}

/// The first `</head` + delimiter in a whole body, as a reference.
fn reference(body: &[u8]) -> Vec<u8> {
    let at = (0..body.len().saturating_sub(NEEDLE.len())).find(|&i| {
        body[i..i + NEEDLE.len()].eq_ignore_ascii_case(NEEDLE)
            && ends_tag_name(body[i + NEEDLE.len()])
    });
    match at {
        Some(i) => [&body[..i], TAG.as_bytes(), &body[i..]].concat(),
        None => body.to_vec(),
    }
}

#[test]
fn random_pages_in_random_chunks_match_the_reference() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let pieces: [&[u8]; 12] = [
        b"<", b"/", b"h", b"E", b"a", b"D", b">", b" ", b"</head", b"</HEA", b"x", b"</",
    ];
    let p = plugin();
    for _ in 0..3000 {
        let body: Vec<u8> = (0..rng.gen_range(0..40))
            .flat_map(|_| pieces[rng.gen_range(0..pieces.len())].iter().copied())
            .collect();
        let mut chunks = Vec::new();
        let mut rest = &body[..];
        while !rest.is_empty() {
            let n = rng.gen_range(0..=rest.len().min(9));
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
        chunks.push(&[]);
        let mut resp = html_response(200, "text/html");
        assert_eq!(
            run(&p, &mut resp, &chunks),
            reference(&body),
            "{:?} in {chunks:?}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn held_bytes_come_out_when_the_stream_ends_without_data() {
    let p = plugin();
    let mut c = ctx();
    p.on_response(&mut html_response(200, "text/html"), &mut c);
    let mut body = Some(Bytes::from_static(b"abc</he"));
    p.on_response_body(&mut body, false, &mut c);
    assert_eq!(body.as_deref(), Some(&b"abc"[..]));
    let mut end = None;
    p.on_response_body(&mut end, true, &mut c);
    assert_eq!(end.as_deref(), Some(&b"</he"[..]));
}

#[test]
fn other_statuses_and_types_are_untouched() {
    let page: &[u8] = b"<html><head></head></html>";
    for (status, content_type) in [
        (404, "text/html"),
        (500, "text/html"),
        (206, "text/html"),
        (200, "application/json"),
        (200, "text/event-stream"),
        (200, "image/png"),
        (200, "text/htmlx"),
        (200, "text/plain"),
    ] {
        let mut resp = html_response(status, content_type);
        assert_eq!(
            run(&plugin(), &mut resp, &[page]),
            page,
            "{status} {content_type}"
        );
        assert_eq!(
            resp.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"1234"[..]),
            "{status} {content_type}"
        );
    }
}

#[test]
fn compressed_pages_are_passed_untouched() {
    let mut resp = html_response(200, "text/html");
    set(&mut resp, "Content-Encoding", "gzip");
    let body: &[u8] = b"\x1f\x8b</head>";
    assert_eq!(run(&plugin(), &mut resp, &[body]), body);
    assert!(resp.headers.get("content-length").is_some());

    let mut resp = html_response(200, "text/html");
    set(&mut resp, "Content-Encoding", "identity");
    assert_eq!(
        run(&plugin(), &mut resp, &[b"<head></head>"]),
        format!("<head>{TAG}</head>").as_bytes()
    );
}

#[test]
fn headers_of_a_rewritten_page_no_longer_promise_its_length() {
    let mut resp = html_response(200, "TEXT/HTML;charset=utf-8");
    set(&mut resp, "ETag", "\"v1\"");
    set(&mut resp, "Accept-Ranges", "bytes");
    run(&plugin(), &mut resp, &[b"<head></head>"]);
    assert!(resp.headers.get("content-length").is_none());
    assert!(resp.headers.get("accept-ranges").is_none());
    assert_eq!(resp.headers.get("etag").unwrap(), "W/\"v1\"");
}

#[test]
fn page_loads_ask_for_an_uncompressed_body_and_get_compressed_again() {
    let p = plugin();
    let mut c = ctx();
    let mut req = RequestHeader::build("GET", b"/", None).unwrap();
    req.insert_header("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .unwrap();
    req.insert_header("Accept-Encoding", "gzip, br").unwrap();
    let _ = p.on_request(&mut req, &mut c);
    let up = upstream_of(&p, &req, &c);
    assert_eq!(up.headers.get("accept-encoding").unwrap(), "identity");
    p.on_response(&mut html_response(200, "text/html"), &mut c);
    assert!(c.compress_response);

    // A client that offers no coding gets the page as it is: nothing to compress.
    for offer in [None, Some("identity"), Some(" identity;q=1 ")] {
        let mut plain = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(offer) = offer {
            plain.insert_header("Accept-Encoding", offer).unwrap();
        }
        let mut c = ctx();
        let _ = p.on_request(&mut plain, &mut c);
        let up = upstream_of(&p, &plain, &c);
        assert_eq!(up.headers.get("accept-encoding").unwrap(), "identity");
        p.on_response(&mut html_response(200, "text/html"), &mut c);
        assert!(!c.compress_response, "{offer:?}");
    }

    // Neither is an SSE answer to the same kind of request, nor a byte range.
    for (status, content_type) in [(200, "text/event-stream"), (206, "text/html")] {
        let mut c = ctx();
        let _ = p.on_request(&mut req, &mut c);
        p.on_response(&mut html_response(status, content_type), &mut c);
        assert!(!c.compress_response, "{status} {content_type}");
    }
}

#[test]
fn other_requests_keep_their_accept_encoding() {
    let p = plugin();
    for (method, headers) in [
        ("POST", &[("Accept", "text/html")][..]),
        ("GET", &[("Accept", "application/json")][..]),
        (
            "GET",
            &[("Upgrade", "websocket"), ("Connection", "Upgrade")][..],
        ),
    ] {
        let mut c = ctx();
        let mut req = RequestHeader::build(method, b"/", None).unwrap();
        req.insert_header("Accept-Encoding", "gzip").unwrap();
        for (n, v) in headers {
            req.insert_header(*n, *v).unwrap();
        }
        let _ = p.on_request(&mut req, &mut c);
        let up = upstream_of(&p, &req, &c);
        assert_eq!(
            up.headers.get("accept-encoding").unwrap(),
            "gzip",
            "{method} {headers:?}"
        );
        p.on_response(&mut html_response(200, "text/html"), &mut c);
        assert!(!c.compress_response);
    }
}

#[test]
fn with_two_in_a_chain_only_the_first_injects() {
    let (first, second) = (plugin(), plugin());
    let mut c = ctx();
    let mut resp = html_response(200, "text/html");
    first.on_response(&mut resp, &mut c);
    second.on_response(&mut resp, &mut c);
    let mut body = Some(Bytes::from_static(b"<head></head>"));
    first.on_response_body(&mut body, true, &mut c);
    second.on_response_body(&mut body, true, &mut c);
    assert_eq!(body.unwrap(), format!("<head>{TAG}</head>").as_bytes());
}

#[test]
fn links_are_attribute_escaped() {
    let p = CssInject::new(
        CssInjectConfig {
            file: None,
            href: Some("/t.css?a=1&b=\"><script>".into()),
        },
        &BuildEnv::default(),
    )
    .unwrap();
    assert_eq!(
        &p.tag[..],
        b"<link rel=\"stylesheet\" href=\"/t.css?a=1&amp;b=&quot;&gt;&lt;script&gt;\">"
    );
}

#[test]
fn bad_settings_are_refused() {
    let env = BuildEnv::default();
    let build = |file: Option<&str>, href: Option<&str>| {
        CssInject::new(
            CssInjectConfig {
                file: file.map(Into::into),
                href: href.map(Into::into),
            },
            &env,
        )
        .err()
        .unwrap()
    };
    assert!(build(None, None).contains("file"));
    assert!(build(Some("a.css"), Some("/a.css")).contains("not both"));
    assert!(build(Some("/nonexistent/theme.css"), None).contains("/nonexistent/theme.css"));
    assert!(build(None, Some(" ")).contains("empty"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.css");
    std::fs::write(&path, "a{}</STYLE><script>x</script>").unwrap();
    assert!(build(Some(path.to_str().unwrap()), None).contains("</style"));
    assert!(serde_yaml_ng::from_str::<CssInjectConfig>("{ fil: a.css }").is_err());
}
