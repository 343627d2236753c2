//! How identity plugins read credentials from a request: one rule for every plugin.
//!
//! A credential header that comes more than once (`Authorization`, `X-API-Key`) makes
//! the request ambiguous: which copy an upstream framework reads is up to it, so the
//! gateway never picks one and refuses the request instead. A bearer token is read
//! after `Bearer` in any case, separated by spaces or tabs, and is a JWT when it has
//! the shape of one and is not a gateway API key.

use http::{HeaderName, HeaderValue};

use crate::{keys, Reply, RequestHeader};

/// A credential header sent more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated;

/// The one value of header `name`, if any; [`Repeated`] when the request has several.
pub fn only_value<'r>(
    req: &'r RequestHeader,
    name: &HeaderName,
) -> Result<Option<&'r HeaderValue>, Repeated> {
    let mut values = req.headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(Repeated),
    }
}

/// The token of an `Authorization: Bearer <token>` value; `None` for other schemes.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let gap = value.iter().position(|b| matches!(b, b' ' | b'\t'))?;
    let (scheme, token) = value.split_at(gap);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// True when `token` is a `token68` (RFC 9110 section 11.2), the form of every bearer
/// token: a value with commas or spaces (`a, Bearer b`) is two tokens pretending to be
/// one, which an upstream could split and read differently.
pub fn is_token68(token: &[u8]) -> bool {
    let body = token
        .iter()
        .rposition(|b| *b != b'=')
        .map_or(&token[..0], |i| &token[..=i]);
    !body.is_empty()
        && body.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// True for a bearer token shaped like a JWT (three parts separated by dots) that is
/// not a gateway API key; such tokens are a `jwt` plugin's, all others an `api_key`'s.
pub fn looks_like_jwt(token: &[u8]) -> bool {
    !token.starts_with(keys::KEY_PREFIX.as_bytes())
        && token.iter().filter(|b| **b == b'.').count() == 2
}

/// Compares without an early exit, so the time taken says nothing about how much of a
/// guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The answer to a credential that is present but wrong, repeated or in conflict with
/// another: 401, never a fall-through to another method or to anonymous.
pub fn refused(reason: &str) -> Reply {
    Reply::error(401, reason).with_header(
        http::header::WWW_AUTHENTICATE,
        "Bearer error=\"invalid_token\"",
    )
}

/// The refusal of a request whose credentials name two different callers.
pub fn conflicting() -> Reply {
    refused("credentials for different callers in one request")
}

/// The refusal of a request that repeats a credential header.
pub fn repeated(header: &str) -> Reply {
    refused(&format!("{header} sent more than once"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_after_any_spacing() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer\tabc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER   abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn bearer_tokens_are_token68() {
        assert!(is_token68(b"abc.DEF-_~+/9"));
        assert!(is_token68(b"abc=="));
        assert!(!is_token68(b"a.b.c, Bearer d.e.f"));
        assert!(!is_token68(b"a b"));
        assert!(!is_token68(b"=="));
        assert!(!is_token68(b""));
    }

    #[test]
    fn jwts_are_three_dotted_parts_that_are_not_gateway_keys() {
        assert!(looks_like_jwt(b"aaa.bbb.ccc"));
        assert!(!looks_like_jwt(b"gw_aaa.bbb.ccc"));
        assert!(!looks_like_jwt(b"aaa.bbb"));
        assert!(!looks_like_jwt(b"gw_abc"));
    }

    #[test]
    fn a_header_sent_twice_is_repeated() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(only_value(&req, &http::header::AUTHORIZATION), Ok(None));
        req.append_header("Authorization", "a").unwrap();
        assert!(only_value(&req, &http::header::AUTHORIZATION)
            .unwrap()
            .is_some());
        req.append_header("authorization", "b").unwrap();
        assert_eq!(
            only_value(&req, &http::header::AUTHORIZATION),
            Err(Repeated)
        );
    }
}
