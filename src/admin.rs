//! The internal listener: `/metrics`, `/healthz`, `/admin/*` behind the admin key (or
//! a console session), and the console under `/ui/`.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::reload::State;
use gatewarden_plugins::key_store::KeyStore;
use gatewarden_plugins::keys::{KeyRecord, KeysError, NewKey};
use gatewarden_plugins::Role;

pub struct AdminApp {
    pub state: Arc<State>,
    pub console: crate::console::Console,
}

pub(crate) fn json(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(body)
        .unwrap_or_default()
}

pub(crate) fn error(status: StatusCode, reason: &str) -> Response<Vec<u8>> {
    json(
        status,
        serde_json::json!({ "error": reason, "status": status.as_u16() }),
    )
}

/// Reads a small JSON body; `None` when over 64 KiB.
async fn read_body(session: &mut ServerSession) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = session.read_request_body().await {
        if body.len() + chunk.len() > 64 * 1024 {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

/// A key as the API shows it: never the hash.
fn key_json(k: &KeyRecord, last_used: Option<&chrono::DateTime<chrono::Utc>>) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "role": k.role.as_str(),
        "subject": k.subject,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "last_used_at": last_used,
        "status": k.status(chrono::Utc::now()),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyRequest {
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    /// A lifetime such as `30d`.
    #[serde(default)]
    expires: Option<String>,
}

/// `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&subject=S`: usage per day, route,
/// subject and key, from Redis when it is shared, else as this gateway counted it.
async fn usage(
    snapshot: &crate::config::Snapshot,
    req: &http::request::Parts,
) -> Response<Vec<u8>> {
    use crate::usage;
    let params: Vec<(String, String)> = req
        .uri
        .query()
        .map(|q| gatewarden_plugins::forms::parse_form(q.as_bytes()))
        .unwrap_or_default();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let query = match usage::Query::parse(param("from"), param("to"), param("subject")) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let rows = match &snapshot.redis {
        Some(redis) => match usage::shared(redis, &query).await {
            Ok(rows) => rows,
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("the shared usage is unavailable: {e}"),
                )
            }
        },
        None => usage::local(&query),
    };
    json(StatusCode::OK, usage::to_json(&query, &rows))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    subject: String,
}

/// `POST /admin/sessions/revoke` `{"subject": ...}`: ends every session of a subject
/// issued up to now, on every replica that shares the revocation list.
async fn revoke_sessions(snapshot: &crate::config::Snapshot, body: &[u8]) -> Response<Vec<u8>> {
    let Some(lifetime) = snapshot.session_lifetime else {
        return error(StatusCode::NOT_FOUND, "no plugin issues sessions");
    };
    let req: RevokeRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    if req.subject.is_empty() {
        return error(StatusCode::BAD_REQUEST, "subject must not be empty");
    }
    let revocations = gatewarden_plugins::revocation::Revocations::new(
        snapshot.redis.clone(),
        gatewarden_plugins::revocation::OnRevocationError::Deny,
    );
    match revocations.revoke_subject(&req.subject, lifetime).await {
        Ok(()) => json(
            StatusCode::OK,
            serde_json::json!({ "status": "ok", "subject": req.subject }),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.0),
    }
}

/// The answer to a key store's refusal or failure.
fn store_error(e: &KeysError) -> Response<Vec<u8>> {
    let status = match e {
        KeysError::LastAdmin => StatusCode::CONFLICT,
        KeysError::NotFound(_) | KeysError::Ambiguous(_) => StatusCode::NOT_FOUND,
        KeysError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

/// `GET /admin/keys`, `POST /admin/keys`, `DELETE /admin/keys/{id or prefix}`.
fn keys_api(store: &KeyStore, method: &http::Method, rest: &str, body: &[u8]) -> Response<Vec<u8>> {
    match (method, rest) {
        (&http::Method::GET, "" | "/") => match store.list() {
            Ok((f, used)) => {
                let list: Vec<_> = f
                    .keys
                    .iter()
                    .map(|k| key_json(k, used.get(&k.id)))
                    .collect();
                json(StatusCode::OK, serde_json::json!({ "keys": list }))
            }
            Err(e) => store_error(&e),
        },
        (&http::Method::POST, "" | "/") => {
            let req: NewKeyRequest = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
            };
            let role = match req.role.as_deref().map_or(Some(Role::User), Role::parse) {
                Some(r) => r,
                None => return error(StatusCode::BAD_REQUEST, "role must be user or admin"),
            };
            let expires_at = match req
                .expires
                .as_deref()
                .map(crate::config::units::parse_duration)
            {
                None => None,
                Some(Ok(d)) => match chrono::Duration::from_std(d) {
                    Ok(d) => Some(chrono::Utc::now() + d),
                    Err(_) => return error(StatusCode::BAD_REQUEST, "expires is too long"),
                },
                Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &format!("expires: {e}")),
            };
            if req.name.trim().is_empty() {
                return error(StatusCode::BAD_REQUEST, "name must not be empty");
            }
            let new = NewKey {
                name: req.name,
                role,
                subject: req.subject,
                expires_at,
            };
            match store.create(new) {
                Ok((record, plaintext)) => {
                    let mut body = key_json(&record, None);
                    body["key"] = serde_json::Value::String(plaintext);
                    json(StatusCode::CREATED, body)
                }
                Err(e) => store_error(&e),
            }
        }
        (&http::Method::DELETE, id) if id.len() > 1 => match store.revoke(&id[1..]) {
            Ok(record) => json(StatusCode::OK, key_json(&record, None)),
            Err(e) => store_error(&e),
        },
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET or POST /admin/keys, DELETE /admin/keys/{id}",
        ),
    }
}

impl AdminApp {
    /// Answers an `/admin/*` request its caller may make.
    async fn admin_api(
        &self,
        snapshot: &crate::config::Snapshot,
        session: &mut ServerSession,
        method: http::Method,
        p: &str,
    ) -> Response<Vec<u8>> {
        match (method, p) {
            (http::Method::GET, "/admin/config") => {
                json(StatusCode::OK, snapshot.masked_config.clone())
            }
            (method, p) if p == "/admin/keys" || p.starts_with("/admin/keys/") => {
                let store =
                    match snapshot.key_stores.as_slice() {
                        [one] => one.clone(),
                        [] => {
                            return error(
                                StatusCode::NOT_FOUND,
                                "no api_key plugin with a keys_file or store: redis is configured",
                            )
                        }
                        _ => return error(
                            StatusCode::CONFLICT,
                            "several key stores are configured; manage them with `gatewarden key`",
                        ),
                    };
                let body = match read_body(session).await {
                    Some(b) => b,
                    None => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
                };
                // File locks and Redis round trips block: off the async workers.
                let rest = p.strip_prefix("/admin/keys").unwrap_or("").to_string();
                tokio::task::spawn_blocking(move || keys_api(&store, &method, &rest, &body))
                    .await
                    .unwrap_or_else(|_| {
                        error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "the key operation failed",
                        )
                    })
            }
            (http::Method::GET, "/admin/backends") => {
                json(StatusCode::OK, crate::console::backends(snapshot))
            }
            (http::Method::GET, "/admin/stats") => {
                json(StatusCode::OK, crate::console::stats(snapshot))
            }
            (http::Method::GET, "/admin/usage") => usage(snapshot, session.req_header()).await,
            (http::Method::POST, "/admin/sessions/revoke") => {
                let Some(body) = read_body(session).await else {
                    return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
                };
                revoke_sessions(snapshot, &body).await
            }
            (http::Method::POST, "/admin/reload") => match self.state.reload_off_thread().await {
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
}

/// One line in the gateway's log for every change made through the admin API: what,
/// by whom, and how it ended. A key is named by the id in the answer, never by what
/// the request named it with (someone may paste a whole key there), and a path that
/// is no endpoint is not repeated either; key names and plaintexts are never in it.
fn log_change(
    method: &http::Method,
    path: &str,
    caller: &crate::console::Caller,
    resp: &Response<Vec<u8>>,
) {
    let status = resp.status().as_u16();
    let id = serde_json::from_slice::<serde_json::Value>(resp.body())
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .filter(|_| resp.status().is_success());
    let path = match (path.strip_prefix("/admin/keys/"), &id) {
        (Some(_), Some(id)) => format!("/admin/keys/{id}"),
        (Some(_), None) => "/admin/keys/…".to_string(),
        (None, _)
            if matches!(
                path,
                "/admin/keys" | "/admin/reload" | "/admin/sessions/revoke"
            ) =>
        {
            path.to_string()
        }
        (None, _) => "/admin/…".to_string(),
    };
    let made = match (status, &id) {
        (201, Some(id)) => format!(" (key {id})"),
        _ => String::new(),
    };
    log::info!("admin: {method} {path} by {caller}: {status}{made}");
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
            (_, p) if crate::console::serves(p) => self.console.serve(&snapshot, session).await,
            (method, p) if p.starts_with("/admin/") => {
                if snapshot.admin_api_key.is_none() && snapshot.console_login.is_none() {
                    return error(
                        StatusCode::NOT_FOUND,
                        "the admin API is off: set admin.api_key",
                    );
                }
                let caller = match self
                    .console
                    .authorize(&snapshot, session.req_header())
                    .await
                {
                    Ok(caller) => caller,
                    Err(refused) => return refused,
                };
                let write = !matches!(method, http::Method::GET | http::Method::HEAD);
                let resp = self.admin_api(&snapshot, session, method.clone(), p).await;
                if write {
                    log_change(&method, p, &caller, &resp);
                }
                resp
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}
