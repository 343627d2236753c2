//! `css_inject`: put a theme into the HTML pages of an app you cannot change.
//!
//! ```yaml
//! plugins:
//!   theme:
//!     type: css_inject
//!     file: conf/theme.css             # inlined as <style>...</style>
//!   # or, to link a stylesheet instead:
//!   theme_link:
//!     type: css_inject
//!     href: /static/theme.css          # <link rel="stylesheet" href="/static/theme.css">
//! ```
//!
//! On `200` responses with `Content-Type: text/html`, the style goes in right before the
//! first `</head>`, in any letter case (`</HEAD>`, `</Head >`), wherever the upstream's
//! chunks happen to split it, exactly once. Every other byte of the page is passed on as
//! it came, chunk by chunk: a page of any size streams through in bounded memory (at most
//! six bytes are held back between chunks). A page without `</head>` passes unchanged.
//! SSE, WebSocket, JSON, images, other types and other statuses are never touched.
//!
//! The page grows, so `Content-Length` is dropped (HTTP/1.1 clients get it chunked), a
//! strong `ETag` is weakened and `Accept-Ranges` removed (byte ranges of the upstream's
//! page would not match). To see the page uncompressed, page loads (GET and HEAD that
//! accept `text/html`, not WebSocket upgrades) ask the upstream for
//! `Accept-Encoding: identity`; the gateway then compresses those responses itself when
//! the client accepts gzip, brotli or zstd. An upstream that compresses anyway gets its
//! page passed on untouched.
//!
//! `file` is read once, when the config is loaded or reloaded; a relative path is taken
//! from the gateway's working directory. Pages with a Content-Security-Policy that
//! forbids inline styles ignore a `<style>` element: use `href` for those.

use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use http::header;
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};

use crate::registry::BuildEnv;
use crate::{Ctx, Hooks, Plugin, RequestFlow, RequestHeader, RequestParts, ResponseParts};

/// Settings of a `css_inject` plugin: exactly one of `file` or `href`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CssInjectConfig {
    /// A CSS file whose content is inlined in a `<style>` element. Read when the config
    /// is loaded; relative paths start from the working directory.
    pub file: Option<String>,
    /// A stylesheet URL, linked with `<link rel="stylesheet" href="...">`.
    pub href: Option<String>,
}

/// Largest CSS file accepted: it is copied into every page.
const MAX_CSS: u64 = 1024 * 1024;

/// What a head-closing tag starts with; compared without regard to case.
const NEEDLE: &[u8; 6] = b"</head";
/// Bytes needed to decide a match: the needle and the byte after it.
const MATCH_LEN: usize = NEEDLE.len() + 1;

/// `css_inject`'s progress through one response, kept in [`Ctx::ext`].
#[derive(Debug, Default)]
struct CssState {
    /// The request may get a page, so the upstream was asked for an uncompressed body.
    asked_identity: bool,
    /// The client offered a content coding other than `identity`, so a page the
    /// upstream was asked not to compress is worth compressing here.
    client_compresses: bool,
    /// Still looking for `</head` in this response's body.
    scanning: bool,
    /// Which `css_inject` plugin owns this response, when a chain has several.
    owner: usize,
    /// The tail of the previous chunk that may be the start of `</head`.
    carry: [u8; NEEDLE.len()],
    carry_len: u8,
}

impl CssState {
    fn carry(&self) -> &[u8] {
        &self.carry[..self.carry_len as usize]
    }

    fn set_carry(&mut self, bytes: &[u8]) {
        self.carry[..bytes.len()].copy_from_slice(bytes);
        self.carry_len = bytes.len() as u8;
    }
}

/// The runtime form of a `css_inject` plugin.
pub struct CssInject {
    /// The `<style>` or `<link>` element, built once.
    tag: Bytes,
    /// Find `</h` and `</H`: every candidate starts with one of them, and both are far
    /// rarer in markup than `<` or `</` alone.
    lower: Finder<'static>,
    upper: Finder<'static>,
}

impl std::fmt::Debug for CssInject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CssInject")
            .field("tag_len", &self.tag.len())
            .finish()
    }
}

impl CssInject {
    pub fn new(config: CssInjectConfig, env: &BuildEnv) -> Result<Self, String> {
        let tag = match (config.file, config.href) {
            (Some(file), None) => style_tag(&read_css(&env.base_dir.join(&file), &file)?)?,
            (None, Some(href)) => link_tag(&href)?,
            (Some(_), Some(_)) => return Err("set `file` or `href`, not both".into()),
            (None, None) => {
                return Err("set `file` (a CSS file to inline) or `href` (a stylesheet URL)".into())
            }
        };
        Ok(CssInject {
            tag: Bytes::from(tag),
            lower: Finder::new(b"</h").into_owned(),
            upper: Finder::new(b"</H").into_owned(),
        })
    }

    fn id(&self) -> usize {
        self as *const Self as usize
    }

    /// The offset of the first complete `</head` + delimiter in `hay`.
    fn find_close(&self, hay: &[u8]) -> Option<usize> {
        // The next place of each spelling; one is searched again only once passed, so the
        // scan stays linear whichever spelling the page uses.
        let next = |finder: &Finder, from: usize| finder.find(&hay[from..]).map(|i| from + i);
        let (mut lower, mut upper) = (next(&self.lower, 0), next(&self.upper, 0));
        loop {
            let at = match (lower, upper) {
                (Some(l), Some(u)) => l.min(u),
                (Some(at), None) | (None, Some(at)) => at,
                (None, None) => return None,
            };
            let closes = hay.get(at + 3..at + MATCH_LEN).is_some_and(|rest| {
                rest[..3].eq_ignore_ascii_case(b"ead") && ends_tag_name(rest[3])
            });
            if closes {
                return Some(at);
            }
            if lower == Some(at) {
                lower = next(&self.lower, at + 1);
            } else {
                upper = next(&self.upper, at + 1);
            }
        }
    }

    /// Rewrites one body chunk; returns what to send in its place.
    fn filter(&self, state: &mut CssState, data: &[u8], chunk: Option<&Bytes>) -> Option<Bytes> {
        let carry_len = state.carry_len as usize;
        if carry_len > 0 && data.len() < MATCH_LEN {
            // A tiny chunk: join it to the carry on the stack and start over without one.
            let mut joined = [0u8; NEEDLE.len() + MATCH_LEN];
            joined[..carry_len].copy_from_slice(state.carry());
            joined[carry_len..carry_len + data.len()].copy_from_slice(data);
            state.carry_len = 0;
            let joined = &joined[..carry_len + data.len()];
            return self.filter(state, joined, None);
        }
        if carry_len > 0 {
            // A match starting in the carry is decided by the chunk's first bytes.
            let mut window = [0u8; NEEDLE.len() + MATCH_LEN];
            window[..carry_len].copy_from_slice(state.carry());
            window[carry_len..carry_len + MATCH_LEN].copy_from_slice(&data[..MATCH_LEN]);
            if let Some(at) = self.find_close(&window[..carry_len + MATCH_LEN]) {
                if at < carry_len {
                    state.scanning = false;
                    let carry = state.carry();
                    let mut out =
                        BytesMut::with_capacity(carry.len() + self.tag.len() + data.len());
                    out.put_slice(&carry[..at]);
                    out.put_slice(&self.tag);
                    out.put_slice(&carry[at..]);
                    out.put_slice(data);
                    state.carry_len = 0;
                    return Some(out.freeze());
                }
            }
        }
        let mut prefix = [0u8; NEEDLE.len()];
        prefix[..carry_len].copy_from_slice(state.carry());
        let prefix = &prefix[..carry_len];
        state.carry_len = 0;

        if let Some(at) = self.find_close(data) {
            state.scanning = false;
            let mut out = BytesMut::with_capacity(prefix.len() + data.len() + self.tag.len());
            out.put_slice(prefix);
            out.put_slice(&data[..at]);
            out.put_slice(&self.tag);
            out.put_slice(&data[at..]);
            return Some(out.freeze());
        }
        let keep = partial_suffix(data);
        state.set_carry(&data[data.len() - keep..]);
        let emit = data.len() - keep;
        match chunk {
            // The common case: nothing was carried in, so the chunk goes on (less any
            // bytes now held back) without a copy.
            Some(chunk) if prefix.is_empty() => Some(chunk.slice(..emit)),
            _ => {
                let mut out = BytesMut::with_capacity(prefix.len() + emit);
                out.put_slice(prefix);
                out.put_slice(&data[..emit]);
                Some(out.freeze())
            }
        }
    }
}

/// True for the bytes that can end the tag name in `</head`: whitespace, `/` or `>`.
fn ends_tag_name(b: u8) -> bool {
    matches!(b, b'>' | b'/' | b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

/// How many bytes at the end of `data` could begin `</head` (0 to 6).
fn partial_suffix(data: &[u8]) -> usize {
    (1..=NEEDLE.len().min(data.len()))
        .rev()
        .find(|&n| data[data.len() - n..].eq_ignore_ascii_case(&NEEDLE[..n]))
        .unwrap_or(0)
}

fn read_css(path: &Path, as_written: &str) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("`file`: cannot read {as_written}: {e}"))?;
    if meta.len() > MAX_CSS {
        return Err(format!(
            "`file`: {as_written} is {} bytes; a theme copied into every page must stay under 1 MiB",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("`file`: cannot read {as_written}: {e}"))
}

fn style_tag(css: &str) -> Result<Vec<u8>, String> {
    // The HTML parser ends a <style> element at the first `</style`, wherever it is.
    let lower = css.to_ascii_lowercase();
    if lower.contains("</style") {
        return Err(
            "`file`: the CSS contains `</style`, which would end the <style> element early".into(),
        );
    }
    let mut tag = Vec::with_capacity(css.len() + 16);
    tag.extend_from_slice(b"<style>");
    tag.extend_from_slice(css.as_bytes());
    tag.extend_from_slice(b"</style>");
    Ok(tag)
}

fn link_tag(href: &str) -> Result<Vec<u8>, String> {
    if href.trim().is_empty() {
        return Err("`href` is empty".into());
    }
    if href.chars().any(char::is_control) {
        return Err("`href` contains control characters".into());
    }
    let mut tag = String::with_capacity(href.len() + 40);
    tag.push_str("<link rel=\"stylesheet\" href=\"");
    for c in href.chars() {
        match c {
            '&' => tag.push_str("&amp;"),
            '"' => tag.push_str("&quot;"),
            '\'' => tag.push_str("&#39;"),
            '<' => tag.push_str("&lt;"),
            '>' => tag.push_str("&gt;"),
            c => tag.push(c),
        }
    }
    tag.push_str("\">");
    Ok(tag.into_bytes())
}

/// True when a request may be answered with a page: GET or HEAD that accepts HTML (or
/// says nothing), and not a protocol upgrade.
fn may_get_page(req: &RequestHeader) -> bool {
    if !matches!(req.method, http::Method::GET | http::Method::HEAD)
        || req.headers.contains_key(header::UPGRADE)
    {
        return false;
    }
    let mut accepts = req.headers.get_all(header::ACCEPT).iter().peekable();
    accepts.peek().is_none()
        || accepts.any(|v| {
            v.as_bytes()
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"text/html"))
        })
}

/// `Accept-Encoding` names a coding other than `identity` (Pingora's compressor does the
/// negotiation proper; without an offer, turning it on would only cost time).
fn offers_coding(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|item| {
            let coding = item
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity")
        })
}

/// The media type of `resp` is `text/html` (parameters such as charset allowed).
fn is_html(resp: &ResponseParts) -> bool {
    resp.headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes().trim_ascii_start();
        v.len() >= 9
            && v[..9].eq_ignore_ascii_case(b"text/html")
            && v.get(9).is_none_or(|b| matches!(b, b';' | b' ' | b'\t'))
    })
}

fn is_event_stream(resp: &ResponseParts) -> bool {
    resp.headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes().trim_ascii_start();
        v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream")
    })
}

/// The body is compressed (any coding but `identity`).
fn is_encoded(resp: &ResponseParts) -> bool {
    resp.headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
}

impl crate::PluginType for CssInject {
    const TYPE: &'static str = "css_inject";
    type Config = CssInjectConfig;

    fn build(config: CssInjectConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        CssInject::new(config, env)
    }
}

impl Plugin for CssInject {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            upstream_request: true,
            response: true,
            response_body: true,
            ..Hooks::default()
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        if may_get_page(req) {
            let state = ctx.ext.get_or_default::<CssState>();
            state.asked_identity = true;
            state.client_compresses = offers_coding(req);
        }
        RequestFlow::CONTINUE
    }

    fn on_upstream_request(&self, req: &mut RequestParts, ctx: &Ctx) {
        if ctx.ext.get::<CssState>().is_some_and(|s| s.asked_identity) {
            // Replaces every copy the client sent.
            req.headers.insert(
                header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
        }
    }

    fn on_response(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        let state = ctx.ext.get_or_default::<CssState>();
        if state.owner != 0 && state.owner != self.id() {
            return;
        }
        state.owner = self.id();
        let status = resp.status.as_u16();
        let encoded = is_encoded(resp);
        // What the upstream would have compressed, the gateway compresses instead (never
        // a stream of events, whose every event must reach the client at once).
        if state.asked_identity
            && state.client_compresses
            && !encoded
            && !matches!(status, 101 | 204 | 206 | 304)
            && !is_event_stream(resp)
        {
            ctx.compress_response = true;
        }
        if status != 200 || encoded || !is_html(resp) {
            return;
        }
        state.scanning = true;
        resp.headers.remove(header::CONTENT_LENGTH);
        resp.headers.remove(header::ACCEPT_RANGES);
        // The page is no longer byte for byte the upstream's: a strong validator would
        // let a client splice ranges of two different representations.
        if let Some(etag) = resp.headers.get(header::ETAG) {
            if etag.as_bytes().starts_with(b"\"") {
                let mut weak = Vec::with_capacity(etag.len() + 2);
                weak.extend_from_slice(b"W/");
                weak.extend_from_slice(etag.as_bytes());
                if let Ok(weak) = http::HeaderValue::from_bytes(&weak) {
                    resp.headers.insert(header::ETAG, weak);
                }
            }
        }
    }

    fn on_response_body(&self, body: &mut Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
        let Some(state) = ctx.ext.get_mut::<CssState>() else {
            return;
        };
        if !state.scanning || state.owner != self.id() {
            return;
        }
        if let Some(chunk) = body.take() {
            *body = self.filter(state, &chunk, Some(&chunk));
        }
        if end_of_stream && state.scanning {
            // No `</head>` in the whole page: hand back what was held, unchanged.
            state.scanning = false;
            if state.carry_len > 0 {
                let held = state.carry();
                let out = match body.take() {
                    Some(b) if !b.is_empty() => {
                        let mut out = BytesMut::with_capacity(b.len() + held.len());
                        out.put_slice(&b);
                        out.put_slice(held);
                        out.freeze()
                    }
                    _ => Bytes::copy_from_slice(held),
                };
                *body = Some(out);
                state.carry_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests;
