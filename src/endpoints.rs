//! What the gateway answers itself, before any route: the health path, and the paths
//! under `/.gatewarden/` that plugins claim (login and logout pages, OIDC callbacks).

use std::sync::Arc;

use bytes::Bytes;
use gatewarden_plugins::{Ctx, Plugin, Reply, RequestFlow, Verdict};
use pingora::prelude::*;

use crate::config::Snapshot;

/// Paths the gateway answers itself (login, logout, callbacks), claimed by plugins.
const GATEWAY_PATHS: &str = "/.gatewarden/";
/// Largest body read for a gateway endpoint (a login form).
const ENDPOINT_BODY_LIMIT: usize = 16 * 1024;

/// The answer to the health path: the version and the config generation in force.
pub fn health_reply(snapshot: &Snapshot) -> Reply {
    let body = serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "config_generation": snapshot.generation,
    });
    Reply {
        status: 200,
        content_type: "application/json",
        headers: Vec::new(),
        body: Bytes::from(body.to_string()),
    }
}

/// The plugin that answers `path` (already normalised) on `host`, if one claims it.
pub fn claimed(snapshot: &Snapshot, host: &str, path: &str) -> Option<Arc<dyn Plugin>> {
    if !path.starts_with(GATEWAY_PATHS) {
        return None;
    }
    snapshot.router.endpoint(host, path)
}

/// Lets `plugin` answer the request, its body read whole first (a login form): 413
/// over the limit, 404 when the plugin lets it pass after all.
pub async fn serve(
    plugin: &Arc<dyn Plugin>,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Result<Reply> {
    let verdict = match read_small_body(session).await? {
        Some(body) => match plugin.serve(session.req_header(), body, ctx) {
            RequestFlow::Done(v) => v,
            wait => wait.resolve().await,
        },
        None => Verdict::Reply(Reply::error(413, "request body too large")),
    };
    Ok(match verdict {
        Verdict::Reply(r) => r,
        Verdict::Continue => Reply::error(404, "not found"),
    })
}

/// Reads a small request body whole; `None` when it is over the limit.
async fn read_small_body(session: &mut Session) -> Result<Option<Bytes>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > ENDPOINT_BODY_LIMIT {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(body)))
}
