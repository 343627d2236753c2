//! The gateway's performance plumbing: the pieces that reach into how Pingora serves a
//! connection or writes a head, rather than using its proxy API as documented. Each
//! was measured on and off in one run of the load bench (BENCHMARKS.md, "the plumbing
//! that pays") and can still be turned off for a benchmark ([`switches`]).
//!
//! | piece | what it buys | off in that run |
//! |---|---|---|
//! | [`client_loop`]: plain HTTP/1 clients served by a keep-alive loop of our own | idle connections cost a fraction of Pingora's; one send per turn | −2 % req/s small, −8 % on 64 KiB |
//! | write gathering, in [`ClientStream`] | small writes and deferred flushes leave in one send | −8 % small, −6 % on 64 KiB |
//! | [`head_parts`]: heads edited as `http`'s parts, without the spelling map | the form plugins edit anyway; one path instead of two | within noise (0 %, −3 %) |
//!
//! The first two pay and stay. The third is the plugin API's own form (plugins edit
//! [`http`] parts); only a response that no plugin edits could skip it, and there it
//! gains nothing measurable either way, so every head takes the one path.
//!
//! # The Pingora internals this relies on
//!
//! A Pingora upgrade must keep these, or this module must follow it. The tests named
//! catch a break.
//!
//! - [`pingora::apps::ServerApp::process_new`] gets every accepted stream, and a
//!   `None` answer ends Pingora's task for it while ours goes on serving it.
//! - [`pingora::apps::HttpServerApp::process_new_http`] serves one request of a
//!   [`pingora::protocols::http::ServerSession::new_http1`] session we build, and on
//!   keep-alive hands back the same boxed stream (recovered with `into_any` and a
//!   downcast) with its [`pingora::apps::HttpPersistentSettings`], which we apply to the
//!   next session as Pingora does (`consume`, `apply_to_session`).
//! - A session's first request defaults mirrored from Pingora's loop: keep-alive 60 s,
//!   none while shutting down, `keepalive_request_limit`; and which connections its
//!   loop serves (`server_options().h2c`, `force_custom`, TLS and ALPN).
//! - The session reads the head through the stream's `AsyncRead`, so bytes read ahead
//!   while parked are its first read; every other trait of
//!   [`pingora::protocols::Stream`] (`Shutdown`, `UniqueID`, `Ssl`, the digests, `Peek`)
//!   is delegated unchanged.
//! - Pingora flushes after a response head without a length, after each chunk and after
//!   the last one, and its client write buffer is 1,460 bytes: write gathering defers
//!   those flushes to the end of the turn and keeps that default size.
//!   [`send_owed`] is called from the proxy's `logging` through
//!   `session.downstream_session.stream()`.
//! - `RequestHeader`/`ResponseHeader` convert to and from `http`'s parts, dropping the
//!   spelling map; the raw request target, HTTP/2 `send_end_stream` and a response's
//!   own reason phrase do not survive the trip and are put back.
//! - `pingora::time`'s fast-timeout threshold, below which the idle wait uses Pingora's
//!   timer wheel.
//!
//! Tests: `client_loop::tests` (the idle timers, the head deadline, read-ahead, write
//! gathering and deferred flushes through a real Pingora session), `head_parts::tests`,
//! `tests/it/switches.rs`, which serves traffic with every piece off, and the whole
//! `tests/it` suite, which runs with every piece on.

pub mod client_loop;
pub mod head_parts;
pub mod switches;

pub use client_loop::{
    send_owed, ClientConnections, ClientSettings, ClientStream, DEFAULT_WRITE_BUFFER,
};
