//! The operator's console on the admin listener: a page under `/ui/` (HTML, a script
//! and a stylesheet compiled into the binary), its sign-in with the admin key, and the
//! figures the admin API gives it beyond keys, usage and config (backends' health,
//! routes' recent traffic).

pub mod session;
pub mod window;

use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;

use crate::admin::{error, json};
use crate::config::Snapshot;
use gatewarden_plugins::{credentials, RequestHeader};
use session::ConsoleSessions;

/// Where the console lives on the admin listener.
pub const PREFIX: &str = "/ui";

/// The admin listener serves plain HTTP (it has no TLS settings): a `Secure` cookie
/// would never come back to it.
const SECURE: bool = false;

/// Everything under `/ui/` is the console's own: no inline code, nothing from elsewhere,
/// never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// Largest sign-in form read.
const FORM_LIMIT: usize = 4 * 1024;

/// True for the paths the console answers: `/ui` and everything under `/ui/`.
pub fn serves(path: &str) -> bool {
    path.strip_prefix(PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The console's sessions, for as long as the process runs.
#[derive(Default)]
pub struct Console {
    sessions: ConsoleSessions,
}

/// The bearer token of the one `Authorization` header; none when it is repeated.
fn presented_key(req: &RequestHeader) -> Option<&[u8]> {
    let auth = credentials::only_value(req, &http::header::AUTHORIZATION).ok()??;
    credentials::bearer(auth.as_bytes())
}

fn unauthorized() -> Response<Vec<u8>> {
    let mut resp = error(StatusCode::UNAUTHORIZED, "admin key required");
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    resp
}

impl Console {
    /// Whether a request may use `/admin/*`: `None` when it may, else the refusal. It
    /// may with the admin key as a bearer token, or with a console session. A write
    /// made with the session must come from the console's own page (see
    /// [`session::console_write`]); a bearer token is no cookie a browser sends by
    /// itself, so it needs no such check.
    pub fn refusal(&self, admin_key: &str, req: &RequestHeader) -> Option<Response<Vec<u8>>> {
        if req.headers.contains_key(http::header::AUTHORIZATION) {
            return match presented_key(req) {
                Some(key) if credentials::constant_time_eq(key, admin_key.as_bytes()) => None,
                _ => Some(unauthorized()),
            };
        }
        match self.sessions.token(req, SECURE) {
            Some(token) if self.sessions.verify(admin_key, token) => {
                let read = matches!(req.method, http::Method::GET | http::Method::HEAD);
                (!read && !session::console_write(req)).then(|| {
                    error(
                        StatusCode::FORBIDDEN,
                        "a change made with the console's session must come from the console",
                    )
                })
            }
            _ => Some(unauthorized()),
        }
    }

    /// Answers a request under `/ui`.
    pub async fn serve(
        &self,
        snapshot: &Snapshot,
        session: &mut ServerSession,
    ) -> Response<Vec<u8>> {
        let mut resp = self.route(snapshot, session).await;
        let headers = resp.headers_mut();
        for (name, value) in [
            ("content-security-policy", CSP),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            // Not `no-referrer`: with it a browser sends `Origin: null` on the sign-in form.
            ("referrer-policy", "same-origin"),
            ("cache-control", "no-store"),
        ] {
            headers.insert(name, http::HeaderValue::from_static(value));
        }
        resp
    }

    async fn route(&self, snapshot: &Snapshot, session: &mut ServerSession) -> Response<Vec<u8>> {
        let Some(admin_key) = snapshot.admin_api_key.as_deref() else {
            return error(
                StatusCode::NOT_FOUND,
                "the console is off: set admin.api_key",
            );
        };
        let req = session.req_header();
        let method = req.method.clone();
        match (method, req.uri.path()) {
            (http::Method::GET, "/ui") => redirect("/ui/"),
            (http::Method::GET, "/ui/") => asset("text/html; charset=utf-8", INDEX),
            (http::Method::GET, "/ui/app.js") => asset("text/javascript; charset=utf-8", SCRIPT),
            (http::Method::GET, "/ui/app.css") => asset("text/css; charset=utf-8", STYLE),
            (http::Method::GET, "/ui/session") => {
                let signed_in = self
                    .sessions
                    .token(req, SECURE)
                    .is_some_and(|t| self.sessions.verify(admin_key, t));
                json(
                    StatusCode::OK,
                    serde_json::json!({ "signed_in": signed_in }),
                )
            }
            (http::Method::POST, "/ui/sign-in") => self.sign_in(admin_key, session).await,
            (http::Method::POST, "/ui/sign-out") => {
                if !session::console_write(req) {
                    return error(
                        StatusCode::FORBIDDEN,
                        "sign out from the console's own page",
                    );
                }
                if let Some(token) = self.sessions.token(req, SECURE) {
                    self.sessions.sign_out(admin_key, token).await;
                }
                let mut resp = json(StatusCode::OK, serde_json::json!({ "signed_in": false }));
                set_cookie(&mut resp, &session::clear_cookie(SECURE));
                resp
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// The sign-in form's `POST`: the admin key for a session cookie, then back to the
    /// console. A wrong key gets no cookie and the console says so.
    async fn sign_in(&self, admin_key: &str, session: &mut ServerSession) -> Response<Vec<u8>> {
        if !session::sign_in_allowed(session.req_header()) {
            return error(StatusCode::FORBIDDEN, "sign in from the console's own page");
        }
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = session.read_request_body().await {
            if body.len() + chunk.len() > FORM_LIMIT {
                return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            body.extend_from_slice(&chunk);
        }
        let form = gatewarden_plugins::forms::parse_form(&body);
        let presented = form
            .iter()
            .find(|(name, _)| name == "key")
            .map_or("", |(_, v)| v.trim());
        if !credentials::constant_time_eq(presented.as_bytes(), admin_key.as_bytes()) {
            log::warn!("console: sign-in with a wrong admin key");
            return redirect("/ui/?signin=failed");
        }
        let Some(token) = self.sessions.issue(admin_key) else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot start a session");
        };
        let mut resp = redirect("/ui/");
        set_cookie(&mut resp, &self.sessions.set_cookie(&token, SECURE));
        resp
    }
}

fn set_cookie(resp: &mut Response<Vec<u8>>, value: &str) {
    if let Ok(value) = http::HeaderValue::from_str(value) {
        resp.headers_mut().insert(http::header::SET_COOKIE, value);
    }
}

fn redirect(location: &'static str) -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(http::header::LOCATION, location)
        .header(http::header::CONTENT_LENGTH, 0)
        .body(Vec::new())
        .unwrap_or_default()
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, text.len())
        .body(text.as_bytes().to_vec())
        .unwrap_or_default()
}

/// `GET /admin/backends`: every upstream's backends and whether each is in service.
pub fn backends(snapshot: &Snapshot) -> serde_json::Value {
    let upstreams: Vec<_> = snapshot
        .pools
        .iter()
        .map(|(name, pool)| {
            let backends: Vec<_> = pool
                .backend_health()
                .into_iter()
                .map(|(address, healthy)| {
                    serde_json::json!({ "address": address.to_string(), "healthy": healthy })
                })
                .collect();
            serde_json::json!({
                "name": name,
                "health_check": pool.has_health_check(),
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({ "upstreams": upstreams })
}

/// `GET /admin/stats`: each route's requests, errors and latency over the last minutes.
pub fn stats(snapshot: &Snapshot) -> serde_json::Value {
    let routes: Vec<_> = snapshot
        .router
        .routes()
        .iter()
        .map(|route| {
            let mut figures = route.metrics.window.summary().to_json();
            figures["route"] = serde_json::Value::String(route.name.to_string());
            figures
        })
        .collect();
    serde_json::json!({
        "bucket_seconds": window::BUCKET_SECS,
        "routes": routes,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_console_answers_its_own_paths_only() {
        for path in ["/ui", "/ui/", "/ui/app.js", "/ui/sign-in"] {
            assert!(super::serves(path), "{path}");
        }
        for path in ["/uix", "/u", "/", "/admin/ui/", "/UI/"] {
            assert!(!super::serves(path), "{path}");
        }
    }
}
