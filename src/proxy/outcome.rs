//! What a finished request leaves behind: route metrics and the console's window, the
//! chain's logging hooks, usage, the trace span, the access log line, and the log line
//! of an error.

use std::sync::Arc;

use pingora::prelude::*;

use super::{client_went_away, RequestCtx, UNROUTED};

/// Records a request that has ended, with the status written (0 for none) and its
/// error, if any.
pub(super) fn record(session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let took = ctx.started.elapsed();
    let elapsed = took.as_secs_f64();
    match &ctx.route {
        Some(route) => {
            route.metrics.requests.inc(status);
            route.metrics.duration.observe(elapsed);
            route
                .chain
                .on_logging(session.req_header(), &ctx.plugin, status);
            let shared = ctx.snapshot.as_ref().is_some_and(|s| s.redis.is_some());
            crate::usage::record(
                crate::usage::Row {
                    day: crate::usage::today(),
                    route: route.name.clone(),
                    subject: ctx
                        .plugin
                        .identity
                        .as_ref()
                        .map_or_else(|| Arc::from("-"), |i| i.subject.clone()),
                    key: ctx.plugin.key_id.clone().unwrap_or_else(|| Arc::from("-")),
                },
                crate::usage::Counts::of_request(
                    status,
                    ctx.body_bytes,
                    session.body_bytes_sent() as u64,
                    ctx.plugin.llm_tokens,
                ),
                shared,
            );
            route.metrics.window.record(status, took);
        }
        None => {
            UNROUTED.requests.inc(status);
            UNROUTED.duration.observe(elapsed);
        }
    }
    let tracer = ctx.snapshot.as_ref().and_then(|s| s.tracing.as_ref());
    if let (Some(tracer), Some(trace)) = (tracer, &ctx.trace) {
        let req = session.req_header();
        let identity = ctx.plugin.identity.as_ref();
        tracer.end(
            trace,
            &crate::trace::Outcome {
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                route: ctx.plugin.route.as_deref(),
                upstream: ctx.plugin.upstream.as_deref(),
                // A backend that refused the connection was moved to `tried`.
                backend: ctx.backend.or_else(|| ctx.tried.last().copied()),
                client: ctx.plugin.client_ip,
                subject: identity.map(|i| &*i.subject),
                auth_method: identity.map(|i| i.method),
                auth_failure: ctx.plugin.auth_failure,
                request_id: ctx.plugin.request_id.as_str(),
            },
        );
    }
    if let Some((_, log)) = ctx.snapshot.as_ref().and_then(|s| s.access_log.as_ref()) {
        log.write(
            gatewarden_plugins::audit::record(session.req_header(), &ctx.plugin, status)
                .to_string(),
        );
    }
    let Some(e) = e else {
        return;
    };
    if client_went_away(e) {
        let metrics = ctx.route.as_ref().map_or(&*UNROUTED, |r| &r.metrics);
        metrics.client_disconnects.inc();
        log::debug!(
            "route {}: the client went away: {e} (request {})",
            ctx.plugin.route.as_deref().unwrap_or("-"),
            ctx.plugin.request_id.as_str()
        );
    } else if let Some(route) = &ctx.route {
        log::warn!(
            "route {} upstream {}{}: {} (request {})",
            route.name,
            route.pool.name,
            ctx.backend
                .map(|b| format!(" backend {b}"))
                .unwrap_or_default(),
            e,
            ctx.plugin.request_id.as_str()
        );
    }
}
