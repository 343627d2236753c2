//! The contract between the core and a plugin.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use pingora_http::RequestHeader;

use crate::{Ctx, Reply, RequestParts, ResponseParts};

/// What a request hook decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on with the next plugin.
    Continue,
    /// Answer now; nothing further runs and nothing reaches the upstream.
    Reply(Reply),
}

/// The result of a request hook: decided on the spot (the common case, and free), or
/// after awaiting something such as Redis.
pub enum RequestFlow<'a> {
    Done(Verdict),
    Wait(Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>),
}

impl RequestFlow<'_> {
    pub const CONTINUE: RequestFlow<'static> = RequestFlow::Done(Verdict::Continue);

    pub fn reply(reply: Reply) -> Self {
        RequestFlow::Done(Verdict::Reply(reply))
    }

    /// Waits for the verdict if it is not known yet.
    pub async fn resolve(self) -> Verdict {
        match self {
            RequestFlow::Done(v) => v,
            RequestFlow::Wait(f) => f.await,
        }
    }
}

/// Which hooks a plugin implements, so the core skips the rest (the body path in
/// particular costs nothing when no plugin of the route needs it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    pub request: bool,
    pub upstream_request: bool,
    pub response: bool,
    pub response_body: bool,
    pub logging: bool,
    /// [`Plugin::on_early_request`]: runs before any request hook, identity or access
    /// check of the chain.
    pub early: bool,
    /// [`Plugin::on_response`] also runs on the replies the gateway writes itself
    /// (rejections, preflights, upstream errors), not only on proxied responses.
    pub gateway_replies: bool,
}

impl Hooks {
    /// Every hook a chain needs, given each plugin's.
    pub fn union(self, other: Hooks) -> Hooks {
        Hooks {
            request: self.request || other.request,
            upstream_request: self.upstream_request || other.upstream_request,
            response: self.response || other.response,
            response_body: self.response_body || other.response_body,
            logging: self.logging || other.logging,
            early: self.early || other.early,
            gateway_replies: self.gateway_replies || other.gateway_replies,
        }
    }
}

/// A plugin type, as the registry knows it: the `type:` that names it in YAML, the
/// settings it takes, and how it is built from them. Building checks the settings and
/// reads the files they name, and does nothing else (no network, no threads): what a
/// plugin needs to serve beyond that, [`Plugin::start`] brings up.
pub trait PluginType: Plugin + Sized {
    /// The YAML `type:`.
    const TYPE: &'static str;
    /// The settings, parsed from the plugin's YAML block (`deny_unknown_fields`, each
    /// field documented: those docs are the reference).
    /// Secret settings are [`crate::secret::Secret`]s, so serializing a config (for
    /// `GET /admin/config`) masks them.
    type Config: serde::de::DeserializeOwned
        + serde::Serialize
        + schemars::JsonSchema
        + Clone
        + PartialEq
        + Send
        + Sync;

    /// Checks `config` and builds the plugin; the error says what is wrong.
    fn build(config: Self::Config, env: &crate::BuildEnv) -> Result<Self, String>;
}

/// A filter in a route's chain. Built once from YAML; shared by every request and every
/// route that names it.
pub trait Plugin: Send + Sync + 'static {
    /// The YAML `type:` of this plugin.
    fn type_name(&self) -> &'static str;

    /// The hooks this plugin implements.
    fn hooks(&self) -> Hooks;

    /// True for plugins that recognise callers (`api_key`, `pin_gate`, `jwt`, `oidc`).
    /// The core enforces the route's access level right after the last of them.
    fn is_identity(&self) -> bool {
        false
    }

    /// The `WWW-Authenticate` challenge this identity plugin offers a caller without
    /// credentials (`Basic realm="..."`); `Bearer` when no plugin of the chain has one.
    fn challenge(&self) -> Option<http::HeaderValue> {
        None
    }

    /// True for identity plugins that offer a browser login page; browser navigations
    /// without an identity are then redirected there instead of answered 401.
    fn has_login_page(&self) -> bool {
        false
    }

    /// Names of the cookies this plugin issues (sessions, login state). They are the
    /// gateway's own: the core removes them from every request it sends upstream, on
    /// every route, whether or not this plugin is in the route's chain.
    fn gateway_cookies(&self) -> Vec<String> {
        Vec::new()
    }

    /// Starts what the plugin needs to serve beyond its settings: a first fetch of
    /// signing keys, threads that follow a file or refresh keys, a provider's discovery.
    /// Called once a config is about to serve (at start, on reload, after daemonizing),
    /// never by `check`, and off the request threads: it may block, for a bounded time.
    /// Idempotent: an instance kept across reloads is started once. An error (a log
    /// file that cannot be opened) keeps the config from serving.
    fn start(&self) -> Result<(), String> {
        Ok(())
    }

    /// How long the sessions this plugin issues last: revoking a subject's sessions
    /// holds that long.
    fn session_lifetime(&self) -> Option<std::time::Duration> {
        None
    }

    /// The browser sessions this plugin issues at its login, for the places outside a
    /// route's chain that accept them (the operator's console).
    fn login_sessions(&self) -> Option<&crate::session::SessionKeys> {
        None
    }

    /// Where this plugin keeps the keys it recognises, which the admin API manages.
    fn key_store(&self) -> Option<crate::key_store::KeyStore> {
        None
    }

    /// True when this plugin answers `path` itself (a login form, a logout, an OIDC
    /// callback under `/.gatewarden/`). The core then reads the request body (up to
    /// 16 KiB) and calls [`Plugin::serve`] instead of proxying.
    fn serves(&self, _path: &str) -> bool {
        false
    }

    /// Answers a path claimed by [`Plugin::serves`].
    fn serve<'a>(
        &'a self,
        _req: &'a RequestHeader,
        _body: Bytes,
        _ctx: &'a mut Ctx,
    ) -> RequestFlow<'a> {
        RequestFlow::reply(Reply::error(404, "not found"))
    }

    /// Runs for every plugin of the chain that sets [`Hooks::early`], in chain order and
    /// before any request hook, identity plugin or access check; may answer at once. For
    /// requests that must be answered without credentials (CORS preflights).
    fn on_early_request(&self, _req: &RequestHeader, _ctx: &mut Ctx) -> Option<Reply> {
        None
    }

    /// Inspect (and edit) the client's request; may answer early.
    fn on_request<'a>(&'a self, _req: &'a mut RequestHeader, _ctx: &'a mut Ctx) -> RequestFlow<'a> {
        RequestFlow::CONTINUE
    }

    /// Edit the request about to be sent upstream (after access passed).
    fn on_upstream_request(&self, _req: &mut RequestParts, _ctx: &Ctx) {}

    /// Edit the response headers about to be sent to the client: the upstream's, and
    /// the gateway's own replies for a plugin that sets [`Hooks::gateway_replies`].
    fn on_response(&self, _resp: &mut ResponseParts, _ctx: &mut Ctx) {}

    /// Edit one response body chunk as it streams; never buffer a whole body.
    fn on_response_body(&self, _body: &mut Option<Bytes>, _end_of_stream: bool, _ctx: &mut Ctx) {}

    /// Called once the request is over, with the status sent to the client.
    fn on_logging(&self, _req: &RequestHeader, _ctx: &Ctx, _status: u16) {}
}
