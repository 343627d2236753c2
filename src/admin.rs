//! The internal listener: `/metrics`, `/healthz`, and `/admin/*` behind the admin key.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::reload::State;

pub struct AdminApp {
    pub state: Arc<State>,
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

fn error(status: StatusCode, reason: &str) -> Response<Vec<u8>> {
    json(
        status,
        serde_json::json!({ "error": reason, "status": status.as_u16() }),
    )
}

/// Compares without an early exit, so the time taken says nothing about how much of a
/// guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented_key(session: &ServerSession) -> Option<&[u8]> {
    let auth = session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)?
        .as_bytes();
    let (scheme, token) = auth.split_at(auth.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let snapshot = self.state.current();
        match (method, path.as_str()) {
            (http::Method::GET, "/metrics") => {
                let body = crate::observe::render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            (http::Method::GET, "/healthz") => json(
                StatusCode::OK,
                serde_json::json!({
                    "status": "ok",
                    "version": env!("CARGO_PKG_VERSION"),
                    "config_generation": snapshot.generation,
                }),
            ),
            (method, p) if p.starts_with("/admin/") => {
                let Some(expected) = snapshot.admin_api_key.as_deref() else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "the admin API is off: set admin.api_key",
                    );
                };
                match presented_key(session) {
                    Some(key) if constant_time_eq(key, expected.as_bytes()) => {}
                    _ => {
                        let mut resp = error(StatusCode::UNAUTHORIZED, "admin key required");
                        resp.headers_mut().insert(
                            http::header::WWW_AUTHENTICATE,
                            http::HeaderValue::from_static("Bearer"),
                        );
                        return resp;
                    }
                }
                match (method, p) {
                    (http::Method::POST, "/admin/reload") => match self.state.reload() {
                        Ok(generation) => json(
                            StatusCode::OK,
                            serde_json::json!({ "status": "ok", "config_generation": generation }),
                        ),
                        Err(problems) => json(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            serde_json::json!({ "error": "config rejected, old config kept", "status": 422, "problems": problems }),
                        ),
                    },
                    _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
                }
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
