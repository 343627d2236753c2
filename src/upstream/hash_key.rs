//! The key a `hash` pool pins a client to a backend by.

use pingora_http::RequestHeader;

/// How a `hash` pool picks the key that pins a client to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

impl HashKey {
    pub(super) fn parse(text: &str) -> Result<HashKey, String> {
        match text {
            "client_ip" => Ok(HashKey::ClientIp),
            "path" => Ok(HashKey::Path),
            _ => {
                if let Some(name) = text.strip_prefix("header:") {
                    let name = http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("{name:?} is not a valid header name"))?;
                    Ok(HashKey::Header(name))
                } else if let Some(name) = text.strip_prefix("cookie:").filter(|n| !n.is_empty()) {
                    Ok(HashKey::Cookie(name.to_string()))
                } else {
                    Err(format!("unknown hash_key {text:?}; use client_ip, header:NAME, cookie:NAME or path"))
                }
            }
        }
    }

    /// The bytes to hash for this request. Requests without the header or cookie all
    /// share the empty key (and so one backend), which is what sticky sessions expect.
    pub fn extract<'a>(
        &self,
        req: &'a RequestHeader,
        client_ip: &'a [u8],
        path: &'a str,
    ) -> &'a [u8] {
        match self {
            HashKey::ClientIp => client_ip,
            HashKey::Path => path.as_bytes(),
            HashKey::Header(name) => req.headers.get(name).map_or(&[], |v| v.as_bytes()),
            HashKey::Cookie(name) => req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii_start();
                    let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                    Some(value)
                })
                .unwrap_or(&[]),
        }
    }
}
