//! Header names as CGI-style servers read them.
//!
//! CGI, WSGI, PHP and Rack turn a request header's name into a variable by upper-casing
//! it and replacing every `-` with `_` (`X-Webauth-User` becomes `HTTP_X_WEBAUTH_USER`).
//! `X_Webauth_User`, `X-Webauth_User` and every other mix of the two reach such an
//! application as the same header, merged with or standing in for the real one. A
//! header the gateway vouches for (an identity, an injected key, a forwarding header)
//! must therefore leave the client's request in every one of those spellings.

use http::{HeaderMap, HeaderName};

/// True when `a` and `b` (lowercase, as `http` stores names) are one header to a
/// CGI-style server: equal once every `_` is read as `-`.
pub fn same_variable(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || matches!((x, y), (b'-', b'_') | (b'_', b'-')))
}

/// True when `name` begins with `prefix` once every `_` is read as `-`.
pub fn has_variable_prefix(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len() && same_variable(&name[..prefix.len()], prefix)
}

/// The names in `headers` that a CGI-style server reads as one of `wanted`, in any
/// spelling (the exact names included). Allocates only when one is there.
pub fn spellings_of(headers: &HeaderMap, wanted: &[HeaderName]) -> Vec<HeaderName> {
    headers
        .keys()
        .filter(|name| {
            wanted
                .iter()
                .any(|w| same_variable(name.as_str().as_bytes(), w.as_str().as_bytes()))
        })
        .cloned()
        .collect()
}

/// Removes every spelling of every name in `wanted` from `headers`.
pub fn remove_every_spelling(headers: &mut HeaderMap, wanted: &[HeaderName]) {
    for name in spellings_of(headers, wanted) {
        headers.remove(&name);
    }
}

/// [`remove_every_spelling`] for the client's request as Pingora holds it (its map of
/// header name spellings is kept in step).
pub fn remove_every_spelling_from(req: &mut crate::RequestHeader, wanted: &[HeaderName]) {
    for name in spellings_of(&req.headers, wanted) {
        req.remove_header(&name);
    }
}

/// Removes from the client's request every spelling of `name` but `name` itself: the
/// copies a plugin that reads `name` never looks at, so never verifies.
pub fn remove_other_spellings_from(req: &mut crate::RequestHeader, name: &HeaderName) {
    for other in spellings_of(&req.headers, std::slice::from_ref(name)) {
        if other != *name {
            req.remove_header(&other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashes_and_underscores_are_one_character() {
        assert!(same_variable(b"x-webauth-user", b"x_webauth_user"));
        assert!(same_variable(b"x-webauth_user", b"x-webauth-user"));
        assert!(same_variable(b"x_webauth-user", b"x-webauth_user"));
        assert!(!same_variable(b"x-webauth-users", b"x-webauth-user"));
        assert!(!same_variable(b"x-webauthxuser", b"x-webauth-user"));
        assert!(has_variable_prefix(b"x_forwarded-prefix", b"x-forwarded-"));
        assert!(!has_variable_prefix(b"x-forwardedxprefix", b"x-forwarded-"));
    }

    #[test]
    fn every_spelling_is_removed_and_nothing_else() {
        let mut headers = HeaderMap::new();
        for name in [
            "x-upstream-key",
            "x_upstream_key",
            "x-upstream_key",
            "x-upstream-keys",
        ] {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "v".parse().unwrap(),
            );
        }
        remove_every_spelling(&mut headers, &[HeaderName::from_static("x-upstream-key")]);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-upstream-keys"]);
    }
}
