//! Upgraded connections (WebSocket and any other HTTP/1.1 `Upgrade`): the gateway
//! relays them itself once the request has passed its route's chain.
//!
//! Pingora 0.9's proxy loop can end an upgraded connection right after its 101. Its
//! upstream half reads the upstream's answer and the client's (empty) request body
//! from one `select!`, and when the 101 is read first, the end of that empty body
//! arriving next is taken for the end of the tunnel: the gateway sends FIN both ways
//! and the client's next frame meets a reset. Servers that speak first after the 101
//! (Socket.IO, Jupyter kernels) make the upstream's answer early enough to lose that
//! race a few times in ten thousand connections, more on a busy machine.
//!
//! Here an upgrade request never enters that loop. The upstream connection comes from
//! Pingora's HTTP/1 connector, and every hook the proxy loop would call runs as it
//! would there (backend choice and retries, the upstream request edits, the response
//! edits, body accounting), so the route's chain sees an upgrade as it sees any other
//! request. The relay itself knows the request body is empty (an upgrade with a body
//! is refused earlier), so only a closed or failed connection ends it.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName};
use pingora::connectors::http::v1::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::ALPN;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora_http::RequestHeader;

use crate::proxy::{Gateway, RequestCtx};

/// Connects upgrade requests to their upstreams. Its connections are never pooled: an
/// upgraded connection ends closed.
pub struct Upgrades {
    connector: Connector,
}

impl Upgrades {
    /// The same TLS and socket settings the proxy's own connector takes.
    pub fn new(conf: &ServerConf) -> Arc<Self> {
        Arc::new(Upgrades {
            connector: Connector::new(Some(ConnectorOptions::from_server_conf(conf))),
        })
    }
}

/// Why a relay ended, for the debug log.
enum End {
    ClientClosed,
    UpstreamClosed,
    Client(Box<Error>),
    Upstream(Box<Error>),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("the client closed"),
            End::UpstreamClosed => f.write_str("the upstream closed"),
            End::Client(e) => write!(f, "client side: {e}"),
            End::Upstream(e) => write!(f, "upstream side: {e}"),
        }
    }
}

/// Fields that end at the gateway (RFC 9110 §7.6.1), removed before the request goes
/// upstream, as Pingora's default request policy removes them from the requests its
/// proxy loop sends: the fields the client named in `Connection` (except `Host`, which
/// the request needs), and the standard hop-by-hop fields, among them a
/// `Proxy-Authorization` meant for a proxy, never for the upstream. The handshake then
/// goes on as `Connection: Upgrade` and `Upgrade: websocket`, the only upgrade the
/// gateway relays (`request_rules::drop_foreign_upgrade`).
fn end_hop_by_hop_fields(req: &mut RequestHeader) -> Result<()> {
    let named: Vec<HeaderName> = crate::request_rules::connection_tokens(req)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|name| name != header::HOST)
        .collect();
    for name in &named {
        req.remove_header(name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "connection",
        "upgrade",
        "http2-settings",
    ] {
        req.remove_header(name);
    }
    req.insert_header(header::CONNECTION, "Upgrade")?;
    req.insert_header(header::UPGRADE, "websocket")?;
    Ok(())
}

impl Gateway {
    /// Serves an upgrade request that passed its chain: connects, forwards the request,
    /// answers the client with the upstream's answer, and after a 101 relays both ways
    /// until either side closes. `Ok(true)`: the request is answered. An error before
    /// anything was sent to the client is answered by `fail_to_proxy`, as Pingora
    /// answers a failed connect.
    pub(crate) async fn serve_upgrade(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let mut upstream = self.connect_for_upgrade(session, ctx).await?;

        let mut req = session.req_header().clone();
        req.set_version(http::Version::HTTP_11);
        end_hop_by_hop_fields(&mut req)?;
        self.upstream_request_filter(session, &mut req, ctx).await?;
        upstream
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| e.into_up())?;
        // The rest of the request is its empty body: nothing more to send until the
        // upstream agrees to switch.
        let mut resp = loop {
            upstream.read_response().await.map_err(|e| e.into_up())?;
            let Some(head) = upstream.resp_header() else {
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response head")
                    .map_err(|e| e.into_up());
            };
            // Other informational answers (100, 103) are not passed on: the client
            // asked to switch protocols, and gets the answer to that.
            if head.status.as_u16() == 101 || !head.status.is_informational() {
                break head.clone();
            }
        };
        if resp.status.as_u16() == 101 && !upstream.was_upgraded() {
            // Only an HTTP/1.1 101 switches: an HTTP/1.0 one cannot be relayed.
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                "the upstream answered 101 in a version that has no upgrade",
            )
            .map_err(|e| e.into_up());
        }
        self.response_filter(session, &mut resp, ctx).await?;
        let switched = upstream.was_upgraded();
        let body_done = !switched && upstream.is_body_done();
        session
            .write_response_header(Box::new(resp), body_done)
            .await?;
        if !switched {
            // The upstream refused the upgrade: its answer is an ordinary response.
            if !body_done {
                self.forward_refusal(session, &mut upstream, ctx).await?;
            }
            upstream.shutdown().await;
            return Ok(true);
        }

        upstream.maybe_upgrade_body_writer();
        let end = self.relay(session, &mut upstream, ctx).await;
        log::debug!(
            "route {}: upgraded connection ended: {end} (request {})",
            ctx.plugin.route.as_deref().unwrap_or("-"),
            ctx.plugin.request_id.as_str()
        );
        upstream.shutdown().await;
        if let Err(e) = session.write_response_body(None, true).await {
            log::debug!("closing an upgraded connection: {e}");
        }
        Ok(true)
    }

    /// A backend for the request, with the same choice and retries as any other
    /// request's; HTTP/1 even where the pool would offer HTTP/2 (it has no upgrade).
    async fn connect_for_upgrade(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<UpstreamSession> {
        loop {
            let mut peer = self.upstream_peer(session, ctx).await?;
            peer.options.alpn = ALPN::H1;
            match self.upgrades.connector.get_http_session(&*peer).await {
                Ok((mut upstream, _reused)) => {
                    // The pool's `read_timeout` and `write_timeout`, as the proxy loop
                    // sets them on its upstream sessions.
                    upstream.read_timeout = peer.options.read_timeout;
                    upstream.write_timeout = peer.options.write_timeout;
                    return Ok(upstream);
                }
                Err(e) => {
                    let e = self.fail_to_connect(session, &peer, ctx, e.into_up());
                    if !e.retry() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Passes on the body of an upstream's refusal to upgrade.
    async fn forward_refusal(
        &self,
        session: &mut Session,
        upstream: &mut UpstreamSession,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        loop {
            let chunk = upstream.read_body_bytes().await.map_err(|e| e.into_up())?;
            let end = chunk.is_none() || upstream.is_body_done();
            let mut chunk = chunk;
            self.response_body_filter(session, &mut chunk, end, ctx)?;
            session.write_response_body(chunk, end).await?;
            if end {
                return Ok(());
            }
        }
    }

    /// Relays bytes both ways until either side closes or fails.
    async fn relay(
        &self,
        session: &mut Session,
        upstream: &mut UpstreamSession,
        ctx: &mut RequestCtx,
    ) -> End {
        loop {
            tokio::select! {
                from_client = session.downstream_session.read_request_body() => {
                    let mut data = match from_client {
                        Ok(Some(data)) => Some(data),
                        Ok(None) => return End::ClientClosed,
                        Err(e) => return End::Client(e),
                    };
                    if let Err(e) = self.request_body_filter(session, &mut data, false, ctx).await {
                        return End::Client(e);
                    }
                    if let Some(data) = data.filter(|d| !d.is_empty()) {
                        if let Err(e) = upstream.write_body(&data).await {
                            return End::Upstream(e);
                        }
                    }
                }
                from_upstream = upstream.read_body_ref() => {
                    let mut data = match from_upstream {
                        Ok(Some(data)) => Some(Bytes::copy_from_slice(data)),
                        Ok(None) => return End::UpstreamClosed,
                        Err(e) => return End::Upstream(e),
                    };
                    if let Err(e) = self.response_body_filter(session, &mut data, false, ctx) {
                        return End::Upstream(e);
                    }
                    if let Err(e) = session.write_response_body(data, false).await {
                        return End::Client(e);
                    }
                }
            }
        }
    }
}
