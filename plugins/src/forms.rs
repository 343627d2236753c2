//! Query strings and `application/x-www-form-urlencoded` bodies: reading them, and
//! percent-encoding values into them.

/// The value of query parameter `name`, decoded.
pub fn query_param(req: &crate::RequestHeader, name: &str) -> Option<String> {
    parse_form(req.uri.query()?.as_bytes())
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

/// Percent-encodes a value for a query string.
pub fn encode_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes and `+` (form encoding); invalid escapes are kept as they are.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses an `application/x-www-form-urlencoded` body into (name, value) pairs.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(n), percent_decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_percent_encoded() {
        assert_eq!(encode_query("/a b?x=1&y=2"), "/a%20b%3Fx%3D1%26y%3D2");
    }

    #[test]
    fn forms_decode() {
        let form = parse_form(b"pin=12%2034&next=%2Fchat%3Fa%3D1&empty=&x");
        assert_eq!(form[0], ("pin".into(), "12 34".into()));
        assert_eq!(form[1], ("next".into(), "/chat?a=1".into()));
        assert_eq!(form[2], ("empty".into(), "".into()));
        assert_eq!(form[3], ("x".into(), "".into()));
    }
}
