//! A route's plugins, `global_plugins` first, then the route's own, kept as one list
//! per phase: each phase runs exactly the plugins that hook it, and a phase no plugin
//! hooks costs an empty loop. The request phase holds the core's access check, right
//! after the chain's last identity plugin, and the login redirect that goes with it.

use std::sync::Arc;

use bytes::Bytes;
use gatewarden_plugins::{
    session, Ctx, Plugin, Reply, RequestFlow, RequestHeader, RequestParts, ResponseParts, Role,
    Verdict,
};
use http::header;

use crate::observe::RouteMetrics;
use crate::router::Access;

/// A plugin with its name under `plugins:`, for metrics and logs.
pub struct Link {
    pub name: Arc<str>,
    pub plugin: Arc<dyn Plugin>,
}

type Plugins = Vec<Arc<dyn Plugin>>;

pub struct Chain {
    /// Every plugin, in chain order.
    all: Plugins,
    early: Plugins,
    /// Request hooks in chain order.
    request: Vec<Link>,
    /// How many of `request` run before the access check: up to and including the last
    /// identity plugin. Later plugins (rate limits per identity, key injection) only
    /// ever see requests that passed.
    access_check_after: usize,
    upstream_request: Plugins,
    response: Plugins,
    /// Response hooks that also edit the gateway's own replies (CORS headers on a 401).
    gateway_replies: Plugins,
    response_body: Plugins,
    logging: Plugins,
    /// An identity plugin offers a login page: browsers without an identity go there.
    has_login_page: bool,
    /// `WWW-Authenticate` for a caller without credentials: each identity plugin's own
    /// challenge, else `Bearer`.
    challenges: Vec<http::HeaderValue>,
    has_identity: bool,
}

impl Chain {
    pub fn new(links: Vec<Link>) -> Self {
        let with = |hooked: fn(&gatewarden_plugins::Hooks) -> bool| -> Plugins {
            links
                .iter()
                .filter(|l| hooked(&l.plugin.hooks()))
                .map(|l| l.plugin.clone())
                .collect()
        };
        let early = with(|h| h.early);
        let upstream_request = with(|h| h.upstream_request);
        let response = with(|h| h.response);
        let gateway_replies = with(|h| h.response && h.gateway_replies);
        let response_body = with(|h| h.response_body);
        let logging = with(|h| h.logging);
        let all: Plugins = links.iter().map(|l| l.plugin.clone()).collect();
        let has_login_page = all.iter().any(|p| p.has_login_page());
        let mut challenges: Vec<http::HeaderValue> =
            all.iter().filter_map(|p| p.challenge()).collect();
        if challenges.is_empty() {
            challenges.push(http::HeaderValue::from_static("Bearer"));
        }
        let request: Vec<Link> = links
            .into_iter()
            .filter(|l| l.plugin.hooks().request)
            .collect();
        let last_identity = request.iter().rposition(|l| l.plugin.is_identity());
        Chain {
            has_identity: all.iter().any(|p| p.is_identity()),
            access_check_after: last_identity.map_or(0, |i| i + 1),
            all,
            early,
            request,
            upstream_request,
            response,
            gateway_replies,
            response_body,
            logging,
            has_login_page,
            challenges,
        }
    }

    /// How many plugins the chain has.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// True when the chain has no plugin.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// True when an identity plugin is in the chain.
    pub fn has_identity(&self) -> bool {
        self.has_identity
    }

    /// The plugin of this chain that answers a gateway path itself, if any.
    pub fn serving(&self, path: &str) -> Option<Arc<dyn Plugin>> {
        self.all.iter().find(|p| p.serves(path)).cloned()
    }

    /// The request phase: early hooks, then request hooks in chain order with the
    /// access check after the last identity plugin. Returns the reply that ends the
    /// request, if any.
    pub async fn run_request(
        &self,
        access: Access,
        metrics: &RouteMetrics,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Option<Reply> {
        for plugin in &self.early {
            if let Some(reply) = plugin.on_early_request(req, ctx) {
                return Some(reply);
            }
        }
        if self.access_check_after == 0 {
            if let Some(reply) = self.check_access(access, metrics, req, ctx) {
                return Some(reply);
            }
        }
        for (i, link) in self.request.iter().enumerate() {
            let verdict = match link.plugin.on_request(req, ctx) {
                RequestFlow::Done(v) => v,
                wait => wait.resolve().await,
            };
            if let Verdict::Reply(reply) = verdict {
                if let Some(reason) = ctx.auth_failure {
                    metrics.auth_failure(reason);
                }
                if ctx.rate_limited {
                    metrics.rate_limited(&link.name);
                }
                return Some(reply);
            }
            if i + 1 == self.access_check_after {
                if let Some(reply) = self.check_access(access, metrics, req, ctx) {
                    return Some(reply);
                }
            }
        }
        None
    }

    /// The core's access check: no identity on a `user` or `admin` route is 401 (or, for
    /// a browser on a route with a login page, a redirect there); a user on an `admin`
    /// route is 403.
    fn check_access(
        &self,
        access: Access,
        metrics: &RouteMetrics,
        req: &RequestHeader,
        ctx: &Ctx,
    ) -> Option<Reply> {
        let identity = match (access, &ctx.identity) {
            (Access::Public, _) => return None,
            (_, Some(identity)) => identity,
            (_, None) => {
                metrics.auth_failure("missing_credentials");
                if self.has_login_page && session::is_browser_navigation(req) {
                    let next = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
                    let location = format!(
                        "{}?next={}",
                        session::LOGIN_PATH,
                        gatewarden_plugins::forms::encode_query(next)
                    );
                    return Some(
                        Reply::error(302, "login required")
                            .with_header(header::LOCATION, &location),
                    );
                }
                let mut reply = Reply::error(401, "authentication required");
                for challenge in &self.challenges {
                    reply
                        .headers
                        .push((header::WWW_AUTHENTICATE, challenge.clone()));
                }
                return Some(reply);
            }
        };
        if access == Access::Admin && identity.role != Role::Admin {
            metrics.auth_failure("forbidden_role");
            return Some(Reply::error(403, "admin role required"));
        }
        None
    }

    /// True when some plugin edits the request sent upstream.
    pub fn edits_upstream_request(&self) -> bool {
        !self.upstream_request.is_empty()
    }

    pub fn on_upstream_request(&self, up: &mut RequestParts, ctx: &Ctx) {
        for plugin in &self.upstream_request {
            plugin.on_upstream_request(up, ctx);
        }
    }

    /// True when some plugin edits the response head.
    pub fn edits_response(&self) -> bool {
        !self.response.is_empty()
    }

    pub fn on_response(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        for plugin in &self.response {
            plugin.on_response(resp, ctx);
        }
    }

    /// The response hooks that also edit the gateway's own replies.
    pub fn on_gateway_reply(&self, resp: &mut ResponseParts, ctx: &mut Ctx) {
        for plugin in &self.gateway_replies {
            plugin.on_response(resp, ctx);
        }
    }

    pub fn on_response_body(&self, body: &mut Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
        for plugin in &self.response_body {
            plugin.on_response_body(body, end_of_stream, ctx);
        }
    }

    pub fn on_logging(&self, req: &RequestHeader, ctx: &Ctx, status: u16) {
        for plugin in &self.logging {
            plugin.on_logging(req, ctx, status);
        }
    }
}
