//! The `css_inject` body filter: throughput over HTML pages from 1 KiB to 10 MiB, cut
//! into the chunk sizes an upstream connection delivers.
//!
//! Two shapes per size: `head_first`, a real page whose `</head>` comes early, so the
//! filter injects and then passes the rest through without looking at it; and
//! `no_head`, the worst case, a page without `</head>` that is scanned to its last byte
//! (with a `</` every 30-odd bytes, as in real markup).
//!
//! Quick run: `cargo bench --bench css_inject -- --warm-up-time 1 --measurement-time 3`.
//! Results are recorded in BENCHMARKS.md.

// Test and bench code: an unexpected failure should stop it loudly.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gatewarden_plugins::css_inject::{CssInject, CssInjectConfig};
use gatewarden_plugins::{BuildEnv, Ctx, Plugin, RequestId};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn plugin() -> CssInject {
    let dir = std::env::temp_dir().join(format!("gw-css-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("theme.css"),
        ":root { --accent: #0f766e } body { accent-color: var(--accent) }",
    )
    .expect("theme");
    let env = BuildEnv {
        base_dir: dir.clone(),
        ..BuildEnv::default()
    };
    let p = CssInject::new(
        CssInjectConfig {
            file: Some("theme.css".into()),
            href: None,
        },
        &env,
    )
    .expect("plugin");
    let _ = std::fs::remove_dir_all(&dir);
    p
}

/// `size` bytes of markup; with `head_first`, a `</head>` after the first 600 bytes.
fn page(size: usize, head_first: bool) -> Vec<u8> {
    let line: &[u8] = b"<p class=\"msg\">lorem ipsum dolor sit amet, <b>consectetur</b></p>\n";
    let mut page = Vec::with_capacity(size);
    page.extend_from_slice(b"<!doctype html><html><head><meta charset=utf-8><title>t</title>");
    while page.len() < 600 {
        page.extend_from_slice(b"<link rel=stylesheet href=/a.css>\n");
    }
    if head_first {
        page.extend_from_slice(b"</head><body>");
    }
    while page.len() < size {
        page.extend_from_slice(line);
    }
    page.truncate(size);
    page
}

/// Cuts `page` into `chunk`-sized pieces, as Pingora hands them to the filter.
fn chunks(page: &[u8], chunk: usize) -> Vec<Bytes> {
    page.chunks(chunk).map(Bytes::copy_from_slice).collect()
}

fn run(p: &CssInject, chunks: &[Bytes]) -> usize {
    let mut ctx = Ctx::new([127, 0, 0, 1].into(), RequestId::from_random(1), false);
    let mut resp = http::Response::new(()).into_parts().0;
    resp.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    p.on_response(&mut resp, &mut ctx);
    let mut out = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let mut body = Some(chunk.clone());
        p.on_response_body(&mut body, i + 1 == chunks.len(), &mut ctx);
        out += body.map_or(0, |b| b.len());
    }
    out
}

fn body_filter(c: &mut Criterion) {
    let p = plugin();
    for (shape, head_first) in [("head_first", true), ("no_head", false)] {
        let mut group = c.benchmark_group(format!("css_inject/{shape}"));
        for size in [KIB, 64 * KIB, MIB, 10 * MIB] {
            let page = page(size, head_first);
            group.throughput(Throughput::Bytes(size as u64));
            for chunk in [KIB, 16 * KIB, 64 * KIB] {
                if chunk > size && chunk != KIB {
                    continue;
                }
                let pieces = chunks(&page, chunk);
                let id = BenchmarkId::new(format!("{}KiB_chunks", chunk / KIB), label(size));
                group.bench_with_input(id, &pieces, |b, pieces| {
                    b.iter(|| black_box(run(&p, black_box(pieces))))
                });
            }
        }
        group.finish();
    }
}

fn label(size: usize) -> String {
    if size >= MIB {
        format!("{}MiB", size / MIB)
    } else {
        format!("{}KiB", size / KIB)
    }
}

criterion_group!(benches, body_filter);
criterion_main!(benches);
