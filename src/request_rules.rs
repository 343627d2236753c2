//! What a request must look like before it is routed: one reading of its host, method
//! and body framing, so that the gateway and the upstream behind it never read the
//! same request two ways.
//!
//! - **Host.** The authority of an absolute-form target (and HTTP/2's `:authority`)
//!   wins over `Host`, as RFC 9112 section 3.2.2 says. HTTP/1.1 without a host is
//!   400 (section 3.2), and so is a host that is not a DNS name, IPv4 address or
//!   bracketed IPv6 address, optionally with a port of 1-5 digits up to 65535. The
//!   host is matched lowercase without its trailing dot (`Admin.Internal.` is
//!   `admin.internal`), and that spelling is what plugins and the upstream see.
//! - **Method.** Methods are case-sensitive tokens, but many frameworks upper-case
//!   them: `delete` would miss a route for `DELETE` here and be a DELETE upstream. A
//!   method with a lower-case letter is refused, as nginx does.
//! - **Headers that count once.** A request with two `Origin` or `Sec-Fetch-Site`
//!   headers is refused: the checks that read them and the application behind could
//!   each pick another copy.
//! - **Framing.** `Content-Length` must be one plain decimal number (`05`, `+5` and
//!   `5, 5` are refused, never passed on for the upstream to read its own way), and
//!   `Transfer-Encoding` can only be `chunked` (others get 501, as in nginx). An
//!   upgrade request carries no body, and only HTTP/1.1 can ask for one.

use std::borrow::Cow;
use std::net::Ipv6Addr;

use http::header::{self, HeaderName, HeaderValue};
use pingora::proxy::Session;
use pingora_http::RequestHeader;

static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Why a request was refused before routing: its status and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason,
    }
}

/// The host a request is for, normalised: lowercase, without a trailing dot, with the
/// port as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHost<'r> {
    /// `host` or `host:port`.
    pub authority: Cow<'r, str>,
    /// Where the host ends in `authority` (the port follows).
    host_end: usize,
}

impl RequestHost<'_> {
    /// The host without port (an IPv6 address without brackets), for matching.
    pub fn host(&self) -> &str {
        let host = &self.authority[..self.host_end];
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// True when the client spelled it otherwise: the request's `Host` (and, on
    /// HTTP/2, its `:authority`) must be rewritten to this spelling.
    pub fn rewritten(&self) -> bool {
        matches!(self.authority, Cow::Owned(_))
    }
}

/// The request's host, normalised; `None` for an HTTP/1.0 request that names none.
pub fn request_host(req: &RequestHeader) -> Result<Option<RequestHost<'_>>, Refusal> {
    let host = req.headers.get(header::HOST);
    // HTTP/2 carries `:authority` in the URI; HTTP/1.1 must send `Host` even with an
    // absolute-form target (RFC 9112 section 3.2), whose authority then wins.
    let text = match req.uri.authority() {
        Some(authority) => authority.as_str(),
        None if host.is_none() && req.version >= http::Version::HTTP_11 => {
            return Err(bad("Host header required"))
        }
        None => match absolute_form_authority(req.raw_path()) {
            Some(authority) => authority,
            None => match host {
                Some(host) => host.to_str().map_err(|_| bad("Host is not a host name"))?,
                None => return Ok(None),
            },
        },
    };
    normalise_authority(text).map(Some)
}

/// The authority of an absolute-form request target (`http://host:port/path`), which
/// Pingora keeps out of the request's URI.
pub fn absolute_form_authority(target: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(target).ok()?;
    let (scheme, rest) = text.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Checks and normalises `host[:port]`.
pub fn normalise_authority(text: &str) -> Result<RequestHost<'_>, Refusal> {
    const MALFORMED: Refusal = bad("Host is not a host name");
    if text.is_empty() {
        return Err(bad("empty Host"));
    }
    let (host, port) = if text.starts_with('[') {
        let close = text.find(']').ok_or(MALFORMED)?;
        let address = &text[1..close];
        // Zone identifiers and anything else `Ipv6Addr` does not read are refused.
        address.parse::<Ipv6Addr>().map_err(|_| MALFORMED)?;
        match &text[close + 1..] {
            "" => (&text[..=close], None),
            rest => (
                &text[..=close],
                Some(rest.strip_prefix(':').ok_or(MALFORMED)?),
            ),
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if let Some(port) = port {
        let digits_ok = (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok || port.parse::<u32>().map_or(true, |p| p > 65535) {
            return Err(bad("Host has an invalid port"));
        }
    }
    if host.starts_with('[') {
        let lower = host.to_ascii_lowercase();
        return Ok(with_port(host, lower, port, text));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        });
    if !labels_ok {
        return Err(MALFORMED);
    }
    Ok(with_port(host, name.to_ascii_lowercase(), port, text))
}

/// Puts a normalised host and the port back together, borrowing `text` when nothing
/// changed.
fn with_port<'t>(
    host: &str,
    normal_host: String,
    port: Option<&str>,
    text: &'t str,
) -> RequestHost<'t> {
    let host_end = normal_host.len();
    let authority = if normal_host == host {
        Cow::Borrowed(text)
    } else {
        let mut out = normal_host;
        if let Some(port) = port {
            out.push(':');
            out.push_str(port);
        }
        Cow::Owned(out)
    };
    RequestHost {
        authority,
        host_end,
    }
}

/// The method, headers and framing rules above, for a request that will be routed.
pub fn check_request(req: &RequestHeader) -> Result<(), Refusal> {
    if req.method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(bad("method names are upper case"));
    }
    for (name, reason) in [
        (&header::ORIGIN, "Origin sent more than once"),
        (&SEC_FETCH_SITE, "Sec-Fetch-Site sent more than once"),
        (
            &header::CONTENT_LENGTH,
            "Content-Length sent more than once",
        ),
        (
            &header::TRANSFER_ENCODING,
            "Transfer-Encoding sent more than once",
        ),
    ] {
        let mut values = req.headers.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(bad(reason));
        }
    }
    let length = req.headers.get(header::CONTENT_LENGTH);
    if length.is_some_and(|v| !is_plain_length(v.as_bytes())) {
        return Err(bad("malformed Content-Length"));
    }
    let coding = req.headers.get(header::TRANSFER_ENCODING);
    if coding.is_some_and(|c| !c.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")) {
        return Err(Refusal {
            status: 501,
            reason: "unsupported Transfer-Encoding",
        });
    }
    Ok(())
}

/// The tokens of every `Connection` field, trimmed, empty ones skipped.
pub fn connection_tokens(req: &RequestHeader) -> impl Iterator<Item = &str> {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Drops an HTTP/1.1 `Upgrade` to anything but WebSocket, so the request goes on as an
/// ordinary one (as nginx drops `Upgrade` unless told otherwise). Above all `h2c`: an
/// upstream connection switched to HTTP/2 would take requests for any path from the
/// client, past every route's checks. `curl --http2` asks for `h2c` on plain HTTP and
/// gets its answer over HTTP/1.1.
pub fn drop_foreign_upgrade(req: &mut RequestHeader) {
    let mut offered = req.headers.get_all(header::UPGRADE).iter();
    let websocket = offered
        .next()
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
        && offered.next().is_none();
    if websocket {
        return;
    }
    req.remove_header(&header::UPGRADE);
    req.remove_header("HTTP2-Settings");
    let rest: Vec<String> = connection_tokens(req)
        .filter(|t| !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case("http2-settings"))
        .map(str::to_string)
        .collect();
    req.remove_header(&header::CONNECTION);
    if !rest.is_empty() {
        // Tokens joined with ", " are a valid header value: each came from one.
        if let Ok(value) = HeaderValue::from_str(&rest.join(", ")) {
            let _ = req.insert_header(header::CONNECTION, value);
        }
    }
}

/// An upgrade request carries no body, and only HTTP/1.1 can ask for one (`upgrade`:
/// the request is an HTTP/1.1 upgrade). Checked after the body limit, so a body over
/// it is 413 whatever came with it.
pub fn check_upgrade(req: &RequestHeader, upgrade: bool) -> Result<(), Refusal> {
    if !req.headers.contains_key(header::UPGRADE) {
        return Ok(());
    }
    if !upgrade {
        return Err(bad("Upgrade needs HTTP/1.1"));
    }
    let chunked = req.headers.contains_key(header::TRANSFER_ENCODING);
    let length = req.headers.get(header::CONTENT_LENGTH);
    if chunked || length.is_some_and(|v| v.as_bytes() != b"0") {
        return Err(bad("an upgrade request cannot carry a body"));
    }
    Ok(())
}

/// True when the request came with both `Transfer-Encoding` and `Content-Length`.
/// Pingora drops the `Content-Length` when it parses such a request, so the raw head
/// is asked; it is only read for requests with a `Transfer-Encoding`.
pub fn has_content_length_and_transfer_encoding(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .contains_key(header::TRANSFER_ENCODING)
        && session
            .as_http1()
            .is_some_and(|h1| head_has_content_length(&h1.get_headers_raw_bytes()))
}

/// True when a raw request head has a `Content-Length` line (the parser allows no
/// space before the colon).
pub fn head_has_content_length(head: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length:";
    head.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
}

/// One decimal number without sign, spaces or leading zeros, of at most 18 digits.
fn is_plain_length(value: &[u8]) -> bool {
    match value {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.len() < 18 && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> Result<(String, String, bool), Refusal> {
        normalise_authority(text)
            .map(|h| (h.authority.to_string(), h.host().to_string(), h.rewritten()))
    }

    #[test]
    fn hosts_are_lowercase_without_the_trailing_dot() {
        assert_eq!(
            host("chat.example.com"),
            Ok(("chat.example.com".into(), "chat.example.com".into(), false))
        );
        assert_eq!(
            host("Chat.Example.COM.:8080"),
            Ok((
                "chat.example.com:8080".into(),
                "chat.example.com".into(),
                true
            ))
        );
        assert_eq!(
            host("admin.internal."),
            Ok(("admin.internal".into(), "admin.internal".into(), true))
        );
        assert_eq!(
            host("127.0.0.1:8080"),
            Ok(("127.0.0.1:8080".into(), "127.0.0.1".into(), false))
        );
        assert_eq!(
            host("[::1]:8080"),
            Ok(("[::1]:8080".into(), "::1".into(), false))
        );
        assert_eq!(
            host("[FE80::1]"),
            Ok(("[fe80::1]".into(), "fe80::1".into(), true))
        );
        assert_eq!(
            host("my_host"),
            Ok(("my_host".into(), "my_host".into(), false))
        );
        // What routes match on: the host without port.
        assert_eq!(host("h.example:8080").unwrap().1, "h.example");
        assert_eq!(host("[::1]:8080").unwrap().1, "::1");
        assert_eq!(host("h.example").unwrap().1, "h.example");
    }

    #[test]
    fn absolute_form_targets_name_their_authority() {
        assert_eq!(
            absolute_form_authority(b"http://a.example:8080/x?q"),
            Some("a.example:8080")
        );
        assert_eq!(
            absolute_form_authority(b"https://a.example"),
            Some("a.example")
        );
        assert_eq!(absolute_form_authority(b"/x"), None);
        assert_eq!(absolute_form_authority(b"/x?u=http://y/"), None);
        assert_eq!(absolute_form_authority(b"*"), None);
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for text in [
            "",
            "a:abc",
            "a:",
            "a:99999",
            "a:123456",
            "a:8080:80",
            "a..",
            ".a",
            "a..b",
            "a%2e",
            "a\\",
            "[::1",
            "[zz]",
            "[::1]x",
            "[::1]:",
            "user@a",
            "a b",
            "a/b",
            "[fe80::1%25eth0]",
        ] {
            assert!(host(text).is_err(), "{text:?}");
        }
    }

    fn request(lines: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        for (n, v) in lines {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn framing_must_be_plain() {
        for good in ["0", "5", "123456789"] {
            assert_eq!(check_request(&request(&[("Content-Length", good)])), Ok(()));
        }
        for bad in ["05", "+5", "5, 5", "0x5", " 5", "", "1234567890123456789"] {
            assert_eq!(
                check_request(&request(&[("Content-Length", bad)])).map_err(|r| r.status),
                Err(400),
                "{bad:?}"
            );
        }
        assert!(check_request(&request(&[("Transfer-Encoding", "Chunked")])).is_ok());
        for coding in ["gzip, chunked", "chunked, chunked", "identity"] {
            assert_eq!(
                check_request(&request(&[("Transfer-Encoding", coding)])).map_err(|r| r.status),
                Err(501)
            );
        }
    }

    #[test]
    fn upgrades_carry_no_body_and_need_http11() {
        let ws = |extra: &[(&str, &str)]| {
            let mut lines = vec![("Upgrade", "websocket")];
            lines.extend_from_slice(extra);
            request(&lines)
        };
        assert!(check_upgrade(&ws(&[]), true).is_ok());
        assert!(check_upgrade(&ws(&[("Content-Length", "0")]), true).is_ok());
        assert!(check_upgrade(&ws(&[("Content-Length", "10")]), true).is_err());
        assert!(check_upgrade(&ws(&[("Transfer-Encoding", "chunked")]), true).is_err());
        assert!(check_upgrade(&ws(&[]), false).is_err());
    }

    #[test]
    fn content_length_lines_are_found_in_a_raw_head() {
        assert!(head_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\nCONTENT-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!head_has_content_length(
            b"POST / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!head_has_content_length(
            b"POST /content-length: HTTP/1.1\r\n\r\n"
        ));
    }

    #[test]
    fn lower_case_methods_and_repeated_origins_are_refused() {
        let req = RequestHeader::build("delete", b"/", None).unwrap();
        assert_eq!(check_request(&req).map_err(|r| r.status), Err(400));
        let two = request(&[("Origin", "http://a"), ("Origin", "http://b")]);
        assert!(check_request(&two).is_err());
    }
}
