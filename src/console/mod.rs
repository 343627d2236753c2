//! The operator's console on the admin listener: a page under `/ui/` (HTML, a script
//! and a stylesheet compiled into the binary), its sign-in (with the admin key, or an
//! admin's session from a login plugin), and the figures the admin API gives it beyond
//! keys, usage and config (backends' health, routes' recent traffic).

pub mod session;
pub mod window;

use std::sync::Arc;

use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;

use crate::admin::{error, json};
use crate::config::Snapshot;
use gatewarden_plugins::session::Presented;
use gatewarden_plugins::{credentials, RequestHeader, Role};
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

/// Who made an admin API request, as its log of changes names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin key as a bearer token.
    AdminKey,
    /// The console's own session, got with the admin key.
    ConsoleSession,
    /// An admin's session of the login `admin.console.login` names.
    Login { login: String, subject: Arc<str> },
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::AdminKey => f.write_str("the admin key"),
            Caller::ConsoleSession => f.write_str("a console session (admin key)"),
            // The subject comes from a login (an identity provider's claim): quoted, so
            // no value can break the log line.
            Caller::Login { login, subject } => write!(f, "{subject:?} through login {login}"),
        }
    }
}

/// Who a request to the console or the admin API is, by its cookies.
enum SignedIn {
    /// The console's own session, or an admin's session of the login named by
    /// `admin.console.login`.
    As(Caller),
    /// A session of that login whose role is not admin.
    NotAdmin(Arc<str>),
    /// Redis could not say whether the login session was revoked.
    Unavailable,
    No,
}

impl Console {
    /// Who may use `/admin/*` with this request, else the refusal. It may with the
    /// admin key as a bearer token, or with a session: the console's own or an admin's
    /// from the login `admin.console.login` names. A write made with a session must come
    /// from the console's own page (see [`session::console_write`]); a bearer token is
    /// no cookie a browser sends by itself, so it needs no such check.
    pub async fn authorize(
        &self,
        snapshot: &Snapshot,
        req: &RequestHeader,
    ) -> Result<Caller, Response<Vec<u8>>> {
        if req.headers.contains_key(http::header::AUTHORIZATION) {
            return match (presented_key(req), snapshot.admin_api_key.as_deref()) {
                (Some(key), Some(admin_key))
                    if credentials::constant_time_eq(key, admin_key.as_bytes()) =>
                {
                    Ok(Caller::AdminKey)
                }
                _ => Err(unauthorized()),
            };
        }
        let caller = match self.signed_in(snapshot, req).await {
            SignedIn::As(caller) => caller,
            SignedIn::NotAdmin(_) => {
                return Err(error(StatusCode::FORBIDDEN, "this login is not an admin's"))
            }
            SignedIn::Unavailable => return Err(session_store_unavailable()),
            SignedIn::No => return Err(unauthorized()),
        };
        let read = matches!(req.method, http::Method::GET | http::Method::HEAD);
        if !read && !session::console_write(req) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "a change made with the console's session must come from the console",
            ));
        }
        Ok(caller)
    }

    async fn signed_in(&self, snapshot: &Snapshot, req: &RequestHeader) -> SignedIn {
        if let Some(admin_key) = snapshot.admin_api_key.as_deref() {
            let token = self.sessions.token(req, SECURE);
            if token.is_some_and(|t| self.sessions.verify(admin_key, t)) {
                return SignedIn::As(Caller::ConsoleSession);
            }
        }
        let Some((login, sessions)) = snapshot
            .console_login
            .as_ref()
            .and_then(|l| Some((l, l.sessions()?)))
        else {
            return SignedIn::No;
        };
        match sessions.presented(req).await {
            Presented::Valid { session, .. } if session.identity.role == Role::Admin => {
                SignedIn::As(Caller::Login {
                    login: login.name.clone(),
                    subject: session.identity.subject,
                })
            }
            Presented::Valid { session, .. } => SignedIn::NotAdmin(session.identity.subject),
            Presented::Unavailable(_) => SignedIn::Unavailable,
            Presented::None | Presented::Refused(_) => SignedIn::No,
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
        if snapshot.admin_api_key.is_none() && snapshot.console_login.is_none() {
            return error(
                StatusCode::NOT_FOUND,
                "the console is off: set admin.api_key or admin.console.login",
            );
        }
        let req = session.req_header();
        let method = req.method.clone();
        match (method, req.uri.path()) {
            (http::Method::GET, "/ui") => redirect("/ui/"),
            (http::Method::GET, "/ui/") => asset("text/html; charset=utf-8", INDEX),
            (http::Method::GET, "/ui/app.js") => asset("text/javascript; charset=utf-8", SCRIPT),
            (http::Method::GET, "/ui/app.css") => asset("text/css; charset=utf-8", STYLE),
            (http::Method::GET, "/ui/session") => {
                let signed_in = self.signed_in(snapshot, req).await;
                json(StatusCode::OK, session_view(snapshot, &signed_in))
            }
            (http::Method::POST, "/ui/sign-in") => match snapshot.admin_api_key.as_deref() {
                Some(admin_key) => self.sign_in(admin_key, session).await,
                None => error(
                    StatusCode::NOT_FOUND,
                    "signing in with the admin key is off: set admin.api_key",
                ),
            },
            (http::Method::POST, "/ui/sign-out") => self.sign_out(snapshot, req).await,
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// Ends whichever sessions the request carries: the console's, and the login's (which
    /// signs the browser out of the gateway's routes too, as its logout would).
    async fn sign_out(&self, snapshot: &Snapshot, req: &RequestHeader) -> Response<Vec<u8>> {
        if !session::console_write(req) {
            return error(
                StatusCode::FORBIDDEN,
                "sign out from the console's own page",
            );
        }
        let mut resp = json(StatusCode::OK, serde_json::json!({ "signed_in": false }));
        if let (Some(admin_key), Some(token)) = (
            snapshot.admin_api_key.as_deref(),
            self.sessions.token(req, SECURE),
        ) {
            self.sessions.sign_out(admin_key, token).await;
            append_cookie(&mut resp, &session::clear_cookie(SECURE));
        }
        if let Some(sessions) = snapshot.console_login.as_ref().and_then(|l| l.sessions()) {
            if let Presented::Valid { https, .. } = sessions.presented(req).await {
                sessions.revoke_presented(req, https).await;
                append_cookie(&mut resp, &sessions.clear_cookie(https));
            }
        }
        resp
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
        append_cookie(&mut resp, &self.sessions.set_cookie(&token, SECURE));
        resp
    }
}

/// `GET /ui/session`: whether the browser is signed in and as whom, and the ways in
/// the sign-in page offers.
fn session_view(snapshot: &Snapshot, signed_in: &SignedIn) -> serde_json::Value {
    let login = snapshot
        .console_login
        .as_ref()
        .map(|l| serde_json::json!({ "name": l.name, "url": l.url }));
    let mut view = serde_json::json!({
        "signed_in": matches!(signed_in, SignedIn::As(_)),
        "key_sign_in": snapshot.admin_api_key.is_some(),
        "login": login,
    });
    match signed_in {
        SignedIn::As(Caller::AdminKey | Caller::ConsoleSession) => {
            view["as"] = "the admin key".into()
        }
        SignedIn::As(Caller::Login { subject, .. }) => view["as"] = subject.to_string().into(),
        SignedIn::NotAdmin(subject) => {
            view["refused"] = format!("{subject} is signed in, but not as an admin").into()
        }
        SignedIn::Unavailable => {
            view["refused"] = "the session store is unavailable; try again shortly".into()
        }
        SignedIn::No => {}
    }
    view
}

fn session_store_unavailable() -> Response<Vec<u8>> {
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the session store is unavailable",
    );
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("5"),
    );
    resp
}

fn append_cookie(resp: &mut Response<Vec<u8>>, value: &str) {
    if let Ok(value) = http::HeaderValue::from_str(value) {
        resp.headers_mut().append(http::header::SET_COOKIE, value);
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
