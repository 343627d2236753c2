//! The browser's side of a login: the redirect to the provider and the callback that
//! turns its answer into a session.

use std::time::Duration;

use bytes::Bytes;

use crate::session::{self, LOGIN_PATH};
use crate::{Ctx, Reply, RequestHeader};

use super::*;

impl Oidc {
    /// Sends the browser to the provider.
    pub(super) fn login(&self, req: &RequestHeader, https: bool, provider: &Provider) -> Reply {
        let next = crate::forms::query_param(req, "next").unwrap_or_default();
        let Some(redirect_uri) = self.redirect_uri(req, https) else {
            return Reply::error(400, "the Host header is not a valid host");
        };
        let state = LoginState {
            s: random_token(),
            n: random_token(),
            v: random_token(),
            r: session::safe_next(&next).to_string(),
            u: redirect_uri,
            e: session::now_secs() + STATE_TTL.as_secs(),
        };
        let location = authorization_url(
            &provider.authorization_endpoint,
            &self.client_id,
            &state.u,
            &self.scope,
            &state,
        );
        let cookie = self.state_cookie(&seal(&self.state_mac, &state), https, STATE_TTL);
        Reply::error(302, "login at the identity provider")
            .with_header(http::header::LOCATION, &location)
            .with_header(http::header::SET_COOKIE, &cookie)
    }

    /// Records a state as used; false when it already was.
    pub(super) fn first_use(&self, state: &str, expires: u64) -> bool {
        let now = session::now_secs();
        let mut used = self.used_states.lock().unwrap_or_else(|p| p.into_inner());
        if used.get(state).is_some_and(|e| *e > now) {
            return false;
        }
        if used.len() >= MAX_USED_STATES {
            used.retain(|_, e| *e > now);
            if used.len() >= MAX_USED_STATES {
                used.clear();
            }
        }
        used.insert(state.to_string(), expires);
        true
    }

    /// A failed login: JSON, or a short page with a way to start again for browsers.
    /// Always clears the login-state cookie: a state serves one callback.
    pub(super) fn failure(
        &self,
        req: &RequestHeader,
        https: bool,
        status: u16,
        message: &str,
    ) -> Reply {
        let clear = self.state_cookie("", https, Duration::ZERO);
        let reply = if session::is_browser_navigation(req) {
            let body = format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"robots\" content=\"noindex\"><title>Sign-in failed</title></head>\n<body><h1>Sign-in failed</h1><p>{}</p><p><a href=\"{LOGIN_PATH}\">Sign in again</a></p></body></html>\n",
                crate::pin_gate::escape_html(message)
            );
            Reply {
                status,
                content_type: "text/html; charset=utf-8",
                headers: Vec::new(),
                body: Bytes::from(body),
            }
            .with_header(
                http::header::HeaderName::from_static("content-security-policy"),
                "default-src 'none'; frame-ancestors 'none'",
            )
        } else {
            Reply::error(status, message)
        };
        reply.with_header(http::header::SET_COOKIE, &clear)
    }

    /// Checks a callback up to the code exchange; the login it belongs to, or the reply.
    pub(super) fn check_callback(
        &self,
        req: &RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<(LoginState, String), Reply> {
        let https = ctx.https;
        let params = crate::forms::parse_form(req.uri.query().unwrap_or("").as_bytes());
        let param = |name: &str| {
            params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let mut refuse = |status: u16, message: &str| {
            ctx.auth_failure = Some("oidc_login_failed");
            self.failure(req, https, status, message)
        };
        if let Some(error) = param("error") {
            let error = printable(error);
            let detail = param("error_description").map(printable);
            let message = match detail {
                Some(d) if !d.is_empty() => {
                    format!("the identity provider refused the login: {error} ({d})")
                }
                _ => format!("the identity provider refused the login: {error}"),
            };
            let status = if error == "access_denied" { 403 } else { 400 };
            return Err(refuse(status, &message));
        }
        let (Some(code), Some(state)) = (param("code"), param("state")) else {
            return Err(refuse(400, "the callback lacks `code` or `state`"));
        };
        let Some(cookie) = crate::cookies::cookie(req, self.state_cookie_name(https)) else {
            return Err(refuse(
                400,
                "no login is in progress in this browser (its login-state cookie is missing or expired); start again",
            ));
        };
        let login = open(&self.state_mac, cookie, session::now_secs()).map_err(|why| {
            refuse(
                400,
                &format!("the login-state cookie is not valid ({why}); start again"),
            )
        })?;
        // Both are public to the browser; equality is all that is asked.
        if login.s != state {
            return Err(refuse(
                400,
                "the `state` does not belong to this browser's login; start again",
            ));
        }
        // RFC 9207: a provider that names itself must be the configured one.
        if param("iss").is_some_and(|iss| iss != self.issuer) {
            return Err(refuse(400, "the callback comes from another issuer"));
        }
        if !self.first_use(&login.s, login.e) {
            return Err(refuse(400, "this login was already completed; start again"));
        }
        Ok((login, code.to_string()))
    }

    pub(super) async fn callback(&self, req: &RequestHeader, ctx: &mut Ctx) -> Reply {
        let https = ctx.https;
        // Before the state is used up: a login that cannot finish yet can be retried.
        let Some(provider) = self.provider().await else {
            return Self::not_discovered();
        };
        let (login, code) = match self.check_callback(req, ctx) {
            Ok(checked) => checked,
            Err(reply) => return reply,
        };
        let exchange = Exchange {
            agent: self.token_agent.clone(),
            endpoint: provider.token_endpoint.clone(),
            client_auth: provider.client_auth,
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            code,
            redirect_uri: login.u.clone(),
            verifier: login.v.clone(),
        };
        // Blocking I/O: never on the proxy's threads.
        let exchanged = tokio::task::spawn_blocking(move || exchange.run()).await;
        let mut fail = |status: u16, message: &str| {
            ctx.auth_failure = Some("oidc_login_failed");
            self.failure(req, https, status, message)
        };
        let id_token = match exchanged {
            Ok(Ok(token)) => token,
            Ok(Err(ExchangeError::Refused(error))) => {
                // `invalid_client` means the client ID or secret is wrong: worth a log.
                log::warn!("oidc: the provider refused the code exchange: {error}");
                return fail(
                    400,
                    &format!("the identity provider refused the code ({error}); start again"),
                );
            }
            Ok(Err(ExchangeError::Unreachable(why))) => {
                log::warn!(
                    "oidc: code exchange at {} failed: {why}",
                    provider.token_endpoint
                );
                return fail(502, "the identity provider's token endpoint did not answer");
            }
            Err(e) => {
                log::error!("oidc: code exchange task failed: {e}");
                return fail(502, "the code exchange failed");
            }
        };
        let identity = match accept_id_token(
            &provider.id_tokens,
            &self.client_id,
            &id_token,
            &login.n,
        )
        .await
        {
            Ok(identity) => identity,
            Err(reason) => {
                log::warn!("oidc: {reason}");
                return fail(401, &reason);
            }
        };
        let token = match self
            .sessions
            .issue(&identity.subject, identity.role, "oidc")
        {
            Ok(token) => token,
            Err(e) => {
                log::error!("oidc: cannot sign a session: {e}");
                return Reply::error(500, "cannot create a session");
            }
        };
        Reply::error(303, "logged in")
            .with_header(http::header::LOCATION, session::safe_next(&login.r))
            .with_header(
                http::header::SET_COOKIE,
                &self.sessions.set_cookie(&token, https),
            )
            .with_header(
                http::header::SET_COOKIE,
                &self.state_cookie("", https, Duration::ZERO),
            )
    }
}
