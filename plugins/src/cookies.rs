//! Reading and removing request cookies, by name.

/// Removes cookie `name` from the request, keeping every other cookie.
pub fn strip_cookie(req: &mut crate::RequestHeader, name: &str) {
    if cookie(req, name).is_none() {
        return;
    }
    let kept: Vec<String> = req
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').map_or(*pair, |(n, _)| n) != name)
        .map(str::to_string)
        .collect();
    req.remove_header(&http::header::COOKIE);
    if !kept.is_empty() {
        let _ = req.insert_header(http::header::COOKIE, kept.join("; "));
    }
}

/// Removes every cookie named in `names` from the `Cookie` headers in `headers`, keeping
/// the others. Names compare exactly, after the spaces around them (which servers
/// drop) are trimmed. Nothing is rewritten, or allocated, when none of them is there.
pub fn remove_cookies(headers: &mut http::HeaderMap, names: &[String]) {
    let named = |pair: &[u8]| {
        let name = pair
            .split(|b| *b == b'=')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        names.iter().any(|n| n.as_bytes() == name)
    };
    let cookies = headers.get_all(http::header::COOKIE);
    if !cookies
        .iter()
        .any(|v| v.as_bytes().split(|b| *b == b';').any(named))
    {
        return;
    }
    let mut kept = Vec::new();
    for value in cookies {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() || named(pair) {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    headers.remove(http::header::COOKIE);
    // The kept bytes come from valid header values, joined by "; ": always valid.
    if let Ok(value) = http::HeaderValue::from_bytes(&kept) {
        if !kept.is_empty() {
            headers.insert(http::header::COOKIE, value);
        }
    }
}

/// The value of the request's cookie `name`, if any.
///
/// Two copies with different values (one planted by a sibling domain, say) make the
/// request ambiguous: the answer is then an empty value, which never verifies, rather
/// than whichever copy happens to come first. The same value twice is one cookie.
pub fn cookie<'r>(req: &'r crate::RequestHeader, name: &str) -> Option<&'r str> {
    let mut values = req
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (n, value) = pair.trim().split_once('=')?;
            (n.trim() == name).then_some(value.trim())
        });
    let first = values.next()?;
    if values.any(|other| other != first) {
        return Some("");
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_cookies_are_removed_from_every_cookie_header() {
        let names = ["gatewarden".to_string(), "__Host-gatewarden".to_string()];
        let mut headers = http::HeaderMap::new();
        headers.append("cookie", "a=1; gatewarden=tok".parse().unwrap());
        headers.append(
            "cookie",
            " gatewarden = tok2 ;b=2;__Host-gatewarden=x"
                .parse()
                .unwrap(),
        );
        remove_cookies(&mut headers, &names);
        let left: Vec<_> = headers.get_all("cookie").iter().collect();
        assert_eq!(left, ["a=1; b=2"]);
        let mut only = http::HeaderMap::new();
        only.append("cookie", "gatewarden=tok".parse().unwrap());
        remove_cookies(&mut only, &names);
        assert!(only.get("cookie").is_none());
        // Untouched, in their own order and spacing, when no gateway cookie is there.
        let mut others = http::HeaderMap::new();
        others.append("cookie", "a=1;b=2".parse().unwrap());
        others.append("cookie", "gatewardenx=3".parse().unwrap());
        remove_cookies(&mut others, &names);
        let left: Vec<_> = others.get_all("cookie").iter().collect();
        assert_eq!(left, ["a=1;b=2", "gatewardenx=3"]);
    }
}
