//! The one `ProxyHttp` implementation: route, run the plugin chain phase by phase,
//! enforce access, forward with the always-on headers, and map failures to statuses.
//!
//! A request's path through the phases (Pingora's hook, then what runs in it):
//!
//! ```text
//! request_filter          health path? -> request_rules (method, framing, host) -> path
//!   |                     normalised -> /.gatewarden/* answered by a plugin's `serve`
//!   |                     -> route found (404) -> body limit (413) -> Chain::run_request:
//!   |                        early hooks (CORS preflights)
//!   |                        request hooks up to the last identity plugin
//!   |                        access check (401 / 302 to login / 403)
//!   |                        the other request hooks (rate limits, ...)
//!   |                     any reply above ends the request here; nothing went upstream
//! request_body_filter     count body bytes against the limit (413), until a 101
//! upstream_peer           pick a backend (balance, health); fail_to_connect retries
//! upstream_request_filter forwarding headers set, spoofed ones and gateway cookies
//!   |                     removed -> upstream_request hooks (identity headers, keys)
//! response_filter         X-Request-Id -> response hooks -> framing (chunked / close)
//! response_body_filter    response_body hooks (css_inject, token counting), streaming
//! logging                 metrics -> logging hooks (audit) -> access log
//! fail_to_proxy           502 / 504 / 413 / 408 as JSON, with gateway-reply hooks
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use gatewarden_plugins::{Ctx, Reply};
use http::header::{self, HeaderValue};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{ErrorSource, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::Snapshot;
use crate::endpoints;
use crate::forwarding::{
    canonical_target, take_from_trusted_proxy, trusted, Forwarding, X_REQUEST_ID,
};
use crate::observe::{new_request_id, InflightGuard, RouteMetrics};
use crate::reload::State;
use crate::request_rules::{self, Refusal};
use crate::router::{normalize, without_params, Route};

mod outcome;

/// Metrics for requests that matched no route (404s, 400s, health checks).
static UNROUTED: LazyLock<RouteMetrics> = LazyLock::new(|| RouteMetrics::new(&Arc::from("-")));

/// Per-request state of the core; the plugins' part is `plugin`.
pub struct RequestCtx {
    pub plugin: Ctx,
    snapshot: Option<Arc<Snapshot>>,
    route: Option<Arc<Route>>,
    /// Set when the upstream must get another path than the client sent (normalised,
    /// or with `strip_prefix` removed).
    upstream_uri: Option<http::Uri>,
    peer_trusted: bool,
    peer_ip: IpAddr,
    body_bytes: u64,
    tried: Vec<SocketAddr>,
    backend: Option<SocketAddr>,
    /// The `X-Request-Id` value, made once for the upstream request and the response.
    request_id_value: Option<HeaderValue>,
    /// The request's trace, when `tracing:` is on.
    trace: Option<crate::trace::RequestTrace>,
    started: Instant,
    _inflight: InflightGuard,
}

impl RequestCtx {
    /// The `X-Request-Id` value for every head the gateway writes: made on first use,
    /// once `request_filter` has settled the id (a trusted proxy may hand one on).
    fn request_id_value(&mut self) -> HeaderValue {
        let id = &self.plugin.request_id;
        self.request_id_value
            .get_or_insert_with(|| id.header_value())
            .clone()
    }
}

/// The proxy service of one listener.
pub struct Gateway {
    pub state: Arc<State>,
    /// True on TLS listeners.
    pub tls: bool,
    /// How long an idle HTTP/1.1 client connection waits for its next request; `None`
    /// closes it after every response.
    pub client_keepalive: Option<u64>,
    /// How long a client may stay silent while sending a body; `None` keeps Pingora's
    /// 60 s.
    pub client_body_timeout: Option<Duration>,
    /// Serves upgrade requests (WebSocket) outside Pingora's proxy loop.
    pub upgrades: Arc<crate::tunnel::Upgrades>,
}

/// True when the error is the client's connection ending: closed, reset, or failing
/// a read or write. Nothing can be sent to it any more.
fn client_went_away(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
        )
}

impl Gateway {
    /// Writes a gateway reply (rejection, redirect, health) and ends the request.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reply: Reply,
    ) -> Result<bool> {
        let head_only = session.req_header().method == http::Method::HEAD;
        let mut resp = http::Response::new(()).into_parts().0;
        resp.status = http::StatusCode::from_u16(reply.status)
            .or_err(ErrorType::InvalidHTTPHeader, "reply status")?;
        let h = &mut resp.headers;
        h.reserve(4 + reply.headers.len());
        if !reply.content_type.is_empty() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(reply.content_type),
            );
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.body.len()));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(X_REQUEST_ID.clone(), ctx.request_id_value());
        for (name, value) in reply.headers {
            h.append(name, value);
        }
        // Browsers can read a rejection only if it carries the CORS headers too.
        if let Some(route) = &ctx.route {
            route.chain.on_gateway_reply(&mut resp, &mut ctx.plugin);
        }
        session
            .write_response_header(Box::new(ResponseHeader::from(resp)), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(reply.body), true).await?;
        }
        Ok(true)
    }
}

/// Gzip/brotli/zstd level for responses the gateway compresses itself: most of the size
/// gain of the maximum at a fraction of its CPU.
const COMPRESSION_LEVEL: u32 = 5;

/// Turns on Pingora's (otherwise idle) downstream compression for this response. It
/// negotiates with the client's `Accept-Encoding`, skips types not worth compressing and
/// bodies already encoded, and adds `Vary: Accept-Encoding`.
fn compress_for_client(session: &mut Session) {
    use pingora::modules::http::compression::ResponseCompression;
    let Some(compression) = session
        .downstream_modules_ctx
        .get_mut::<ResponseCompression>()
    else {
        return;
    };
    if compression.is_header_phase() && !compression.is_enabled() {
        compression.adjust_level(COMPRESSION_LEVEL);
        // The module skipped the request's Accept-Encoding while it was off.
        compression.request_filter(session.downstream_session.req_header());
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            plugin: Ctx::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                new_request_id(),
                self.tls,
            ),
            snapshot: None,
            route: None,
            upstream_uri: None,
            peer_trusted: false,
            peer_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            body_bytes: 0,
            tried: Vec::new(),
            backend: None,
            request_id_value: None,
            trace: None,
            started: Instant::now(),
            _inflight: InflightGuard::enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(timeout) = self.client_body_timeout {
            session.set_read_timeout(Some(timeout));
        }
        // Pingora keeps an idle HTTP/1.1 connection open forever (`Some(0)`); bound that
        // wait by ours. A longer `Some(n)` would come from the client's own `Keep-Alive:
        // timeout=n`, which Pingora 0.9 does not parse yet (a TODO there): never let it
        // exceed ours either. A client's `Connection: close` (`None`) is left alone.
        if let Some(asked) = session.get_keepalive() {
            let ours = self.client_keepalive;
            if asked == 0 || ours.is_none_or(|limit| asked > limit) {
                session.set_keepalive(ours);
            }
        }
        let snapshot = self.state.current();
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip())
            // An IPv4 client of a dual-stack listener arrives as `::ffff:a.b.c.d`; it
            // must meet the IPv4 rules (`trusted_proxies`, `ip_filter`, limits).
            .to_canonical();
        ctx.peer_ip = peer_ip;
        ctx.peer_trusted = trusted(&snapshot.trusted_proxies, peer_ip);
        let req = session.req_header();
        if ctx.peer_trusted {
            take_from_trusted_proxy(req, &snapshot.trusted_proxies, peer_ip, &mut ctx.plugin);
        } else {
            ctx.plugin.client_ip = peer_ip;
        }

        let raw_path = req.uri.path();
        if snapshot.health_path.as_deref() == Some(raw_path)
            && matches!(req.method, http::Method::GET | http::Method::HEAD)
        {
            let reply = endpoints::health_reply(&snapshot);
            ctx.snapshot = Some(snapshot);
            return self.respond(session, ctx, reply).await;
        }

        // Begun only past the health path: probes would be most spans and tell nothing.
        if let Some(tracer) = &snapshot.tracing {
            ctx.trace = Some(tracer.begin(&req.headers, ctx.peer_trusted));
        }

        // Pingora follows RFC 9112 (Transfer-Encoding wins, the connection closes), but
        // a request framed both ways is how smuggling starts; like nginx, refuse it.
        if request_rules::has_content_length_and_transfer_encoding(session) {
            let reply = Reply::error(400, "both Content-Length and Transfer-Encoding");
            ctx.snapshot = Some(snapshot);
            return self.respond(session, ctx, reply).await;
        }
        let checked =
            request_rules::check_request(req).and_then(|()| request_rules::request_host(req));
        let request_host = match checked {
            Ok(host) => host,
            Err(Refusal { status, reason }) => {
                ctx.snapshot = Some(snapshot);
                return self
                    .respond(session, ctx, Reply::error(status, reason))
                    .await;
            }
        };

        let path = match normalize(raw_path) {
            Ok(p) => p,
            Err(e) => {
                let reply = Reply::error(400, &e.to_string());
                ctx.snapshot = Some(snapshot);
                return self.respond(session, ctx, reply).await;
            }
        };
        let host = request_host.as_ref().map_or("", |h| h.host());
        // An absolute-form target (`GET http://host/path`) goes on in origin form, and a
        // host spelled otherwise than normalised is rewritten, so plugins and the
        // upstream see the host the route was chosen by.
        let absolute_form = request_rules::absolute_form_authority(req.raw_path()).is_some();
        let canonical_target = request_host
            .as_ref()
            .filter(|h| h.rewritten() || absolute_form)
            .map(|h| canonical_target(req, &h.authority, absolute_form))
            .transpose()?;
        if let Some(plugin) = endpoints::claimed(&snapshot, host, &path) {
            ctx.snapshot = Some(snapshot);
            let reply = endpoints::serve(&plugin, session, &mut ctx.plugin).await?;
            return self.respond(session, ctx, reply).await;
        }
        let Some(route) = snapshot
            .router
            .find(host, &without_params(&path), &req.method)
            .cloned()
        else {
            ctx.snapshot = Some(snapshot);
            return self
                .respond(session, ctx, Reply::error(404, "no route"))
                .await;
        };

        let upstream_path = route.upstream_path(&path);
        if upstream_path != raw_path {
            let mut target = String::with_capacity(upstream_path.len() + 32);
            target.push_str(upstream_path);
            if let Some(q) = req.uri.query() {
                target.push('?');
                target.push_str(q);
            }
            ctx.upstream_uri = target.parse().ok();
        }
        drop(path);

        // Whatever else the request says (an `Upgrade` among it): a declared body over
        // the limit never reaches an upstream.
        if let Some(len) = req.headers.get(header::CONTENT_LENGTH) {
            let too_large = std::str::from_utf8(len.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_none_or(|n| n > route.max_request_body);
            if too_large {
                ctx.snapshot = Some(snapshot);
                ctx.route = Some(route);
                return self
                    .respond(session, ctx, Reply::error(413, "request body too large"))
                    .await;
            }
        }
        if session.is_upgrade_req() {
            request_rules::drop_foreign_upgrade(session.req_header_mut());
        }
        let req = session.req_header();
        if let Err(Refusal { status, reason }) =
            request_rules::check_upgrade(req, session.is_upgrade_req())
        {
            ctx.snapshot = Some(snapshot);
            ctx.route = Some(route);
            return self
                .respond(session, ctx, Reply::error(status, reason))
                .await;
        }
        if let Some((host, uri)) = canonical_target {
            let req = session.req_header_mut();
            req.insert_header(header::HOST, host)?;
            if let Some(uri) = uri {
                req.set_uri(uri);
            }
        }

        ctx.snapshot = Some(snapshot);
        ctx.plugin.route = Some(route.name.clone());
        let refusal = route
            .chain
            .run_request(
                route.access,
                &route.metrics,
                session.req_header_mut(),
                &mut ctx.plugin,
            )
            .await;
        ctx.route = Some(route);
        match refusal {
            Some(reply) => self.respond(session, ctx, reply).await,
            None if session.is_upgrade_req() => self.serve_upgrade(session, ctx).await,
            None => Ok(false),
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(chunk), Some(route)) = (body.as_ref(), &ctx.route) {
            ctx.body_bytes += chunk.len() as u64;
            // After an upgrade the "body" is WebSocket frames: a session, not an upload.
            // Before the upstream agreed to it, it is an upload like any other.
            if ctx.body_bytes > route.max_request_body && !session.was_upgraded() {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body over the route's limit",
                );
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no route selected");
        };
        let pool = &route.pool;
        let ip_bytes: [u8; 16] = match ctx.plugin.client_ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let key = match &pool.hash_key {
            Some(k) => {
                let path = ctx
                    .upstream_uri
                    .as_ref()
                    .map_or(session.req_header().uri.path(), |u| u.path());
                k.extract(session.req_header(), &ip_bytes, path)
            }
            None => &[],
        };
        let Some(backend) = pool.select(key, &ctx.tried) else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {}: no backend left to try", pool.name),
            );
        };
        ctx.backend = backend.addr.as_inet().copied();
        // Only now is the upstream contacted: the gateway's own replies name none.
        if ctx.plugin.upstream.is_none() {
            ctx.plugin.upstream = Some(pool.name.clone());
        }
        Ok(pool.peer(&backend))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(addr) = ctx.backend.take() {
            ctx.tried.push(addr);
        }
        let retries = ctx.route.as_ref().map_or(0, |r| r.pool.retries);
        let backends = ctx
            .route
            .as_ref()
            .map_or(0, |r| r.pool.backend_addrs().count());
        if ctx.tried.len() <= retries && ctx.tried.len() < backends {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(uri) = ctx.upstream_uri.take() {
            upstream.set_uri(uri);
        }
        let host = session
            .req_header()
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                session
                    .req_header()
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            });
        let forwarding = Forwarding {
            peer_ip: ctx.peer_ip,
            client_ip: ctx.plugin.client_ip,
            peer_trusted: ctx.peer_trusted,
            https: ctx.plugin.https,
            host,
            request_id: ctx.request_id_value(),
            gateway_cookies: ctx
                .snapshot
                .as_ref()
                .map_or(&[][..], |s| &s.gateway_cookies[..]),
        };
        let chain = ctx
            .route
            .as_ref()
            .map(|r| &r.chain)
            .filter(|c| c.edits_upstream_request());
        // The core's six headers, and room for what the chain's plugins set.
        let trace = ctx.trace.as_ref();
        // ... and `traceparent` and `tracestate`.
        let room = if chain.is_some() { 12 } else { 6 } + if trace.is_some() { 2 } else { 0 };
        forwarding.apply(upstream, room, |up| {
            if let Some(trace) = trace {
                trace.propagate(&mut up.headers);
            }
            if let Some(chain) = chain {
                chain.on_upstream_request(up, &ctx.plugin);
            }
        })
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(route), Some(backend)) = (&ctx.route, &ctx.backend) {
            route.pool.count_response(backend, resp.status.as_u16());
        }
        let request_id = ctx.request_id_value();
        let head_request = session.req_header().method == http::Method::HEAD;
        let http10_client = session.req_header().version < http::Version::HTTP_11;
        let chain = ctx
            .route
            .as_ref()
            .map(|r| &r.chain)
            .filter(|c| c.edits_response());
        let plugin_ctx = &mut ctx.plugin;
        if chain.is_none()
            && !plugin_ctx.compress_response
            && crate::plumbing::switches::off().case_map
        {
            // A benchmark's baseline: the same edits through Pingora's own API, which
            // keeps its map of header name spellings in step.
            if http10_client {
                resp.remove_header(&header::TRANSFER_ENCODING);
            }
            resp.insert_header(X_REQUEST_ID.clone(), request_id)?;
            return Ok(());
        }
        crate::plumbing::head_parts::response_without_case_map(resp, |resp| {
            // HTTP/1.0 has no chunked framing: a body without a length is delimited by
            // closing the connection. Pingora frames such bodies as chunked (for an
            // upstream that sent no length) whatever the client speaks.
            if http10_client {
                resp.headers.remove(header::TRANSFER_ENCODING);
            }
            // X-Request-Id and what the chain's plugins set, plus the Date and
            // Connection headers Pingora adds when it writes the head (room left unused
            // when the upstream sent them already).
            let ours = if chain.is_some() { 8 } else { 1 };
            resp.headers.reserve(ours + 2);
            resp.headers.insert(X_REQUEST_ID.clone(), request_id);
            let Some(chain) = chain else { return };
            let had_length = resp.headers.contains_key(header::CONTENT_LENGTH);
            chain.on_response(resp, plugin_ctx);
            // Pingora picks chunked framing before this filter runs; a plugin that
            // rewrites the body and drops Content-Length would otherwise leave an
            // HTTP/1.1 client a body delimited only by closing the connection.
            let no_body = head_request
                || matches!(resp.status.as_u16(), 204 | 304)
                || resp.status.is_informational();
            let unframed = had_length
                && !no_body
                && !http10_client
                && !resp.headers.contains_key(header::CONTENT_LENGTH)
                && !resp.headers.contains_key(header::TRANSFER_ENCODING);
            if unframed {
                resp.headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            // Chunked (ours, or the compressor's) needs HTTP/1.1, as Pingora does when it
            // adds chunked itself; an HTTP/1.0 upstream says 1.0.
            if (unframed || plugin_ctx.compress_response) && resp.version < http::Version::HTTP_11 {
                resp.version = http::Version::HTTP_11;
            }
        });
        // Compressing a body drops its length, which only chunked framing can replace.
        if ctx.plugin.compress_response && !http10_client {
            compress_for_client(session);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(route) = &ctx.route {
            route
                .chain
                .on_response_body(body, end_of_stream, &mut ctx.plugin);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (code, reason) = match e.etype() {
            ErrorType::HTTPStatus(413) => (413, "request body too large"),
            ErrorType::HTTPStatus(code) => (*code, "request failed"),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                (504, "upstream timed out")
            }
            _ if client_went_away(e) => (0, ""),
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "upstream unavailable"),
                ErrorSource::Downstream => match e.etype() {
                    // A client that stopped sending its body (Pingora's 60 s read timeout).
                    ErrorType::ReadTimedout => (408, "request timed out"),
                    _ => (400, "bad request"),
                },
                ErrorSource::Internal | ErrorSource::Unset => (500, "internal error"),
            },
        };
        let code = if e.etype() == &ErrorType::ConnectNoRoute {
            502
        } else {
            code
        };
        if code > 0 && session.response_written().is_none() {
            let reason = if code == 502 {
                "upstream unavailable"
            } else {
                reason
            };
            if let Err(err) = self.respond(session, ctx, Reply::error(code, reason)).await {
                log::debug!("cannot send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // The response is complete: the client gets it before the bookkeeping.
        crate::plumbing::send_owed(session.downstream_session.stream());
        outcome::record(session, e, ctx);
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        // Counted and logged at debug in `logging`: a client that stops reading a
        // stream it has what it wanted from (an SDK at `data: [DONE]`, a browser that
        // reloads) is no error of the gateway's.
        client_went_away(e)
    }
}
