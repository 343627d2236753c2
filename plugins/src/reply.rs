//! Answers the gateway gives itself, without asking an upstream.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// A complete response written by the gateway: a rejection, a redirect, a login page.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Reply {
    /// The error body every gateway rejection uses: `{"error": reason, "status": N}`.
    pub fn error(status: u16, reason: &str) -> Self {
        let body = serde_json::json!({ "error": reason, "status": status }).to_string();
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: Bytes::from(body),
        }
    }

    /// Adds a header; values that are not valid header values are dropped, never sent.
    pub fn with_header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.push((name, value));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_json_with_status() {
        let r = Reply::error(403, "forbidden \"x\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"], "forbidden \"x\"");
        assert_eq!(v["status"], 403);
        assert_eq!(r.content_type, "application/json");
    }

    #[test]
    fn invalid_header_values_are_dropped() {
        let r = Reply::error(302, "x").with_header(http::header::LOCATION, "/a\r\nb");
        assert!(r.headers.is_empty());
    }
}
