//! `pin_gate`: a PIN login page for browsers, with signed session cookies.
//!
//! ```yaml
//! plugins:
//!   pin:
//!     type: pin_gate
//!     pin_hash: ${env:GATEWARDEN_PIN_HASH}        # from `gatewarden hash-pin`
//!     secret: ${env:GATEWARDEN_SESSION_SECRET}    # at least 32 bytes
//!     previous_secrets: []                        # still accepted, never used to sign
//!     session_ttl: 30d
//!     cookie_name: gatewarden
//!     secure_cookie: auto                         # auto | always | never
//!     role: user
//!     subject: pin
//!     totp_secret: ${env:GATEWARDEN_TOTP_SECRET}  # optional, base32
//!     lockout: { max_failures: 5, window: 10m, ban: 15m }
//!     login_css: ""                               # extra CSS for the login page
//! ```
//!
//! `GET /.gatewarden/login` shows a form that needs no JavaScript; `POST` checks the PIN
//! (and the TOTP code when configured; each code works once) and answers 303 to a safe
//! same-origin `next`, with the session cookie. `POST /.gatewarden/logout` clears it.
//! After `max_failures` wrong attempts from one client address within `window`, that
//! address gets 429 with `Retry-After` for `ban`, whatever it sends, a correct PIN too.
//! Each attempt is charged before its PIN is checked, so a burst of concurrent guesses
//! gets no more checks than a patient guesser. PINs are checked in the process's
//! bounded pool ([`crate::password`]); a login that finds it full gets 503.
//! With a top-level `redis:` block, failures and bans are kept in Redis, so every
//! replica sees them; each process also keeps its own count, which stays in force
//! while Redis is unreachable.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::lockout::{Admission, LoginLockout};
use crate::password;
use crate::secret::Secret;
use crate::session::{self, SecureCookie, SessionKeys};
use crate::units::Span;
use crate::{Ctx, Hooks, Plugin, Reply, RequestFlow, RequestHeader, Role, Verdict};

pub use crate::lockout::LockoutConfig;
use crate::revocation::{OnRevocationError, Revocations};
pub use crate::session::{LOGIN_PATH, LOGOUT_PATH};

/// Hashes a PIN with argon2id and a random salt, for `pin_hash`.
pub fn hash_pin(pin: &str) -> Result<String, String> {
    if pin.is_empty() {
        return Err("the PIN is empty".into());
    }
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(pin.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Settings of a `pin_gate` plugin.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PinGateConfig {
    /// argon2id hash of the PIN, as printed by `gatewarden hash-pin`.
    pub pin_hash: Secret,
    /// Signs session cookies; at least 32 bytes.
    pub secret: Secret,
    /// Older secrets whose sessions are still accepted (for rotation); never used to sign.
    #[serde(default)]
    pub previous_secrets: Vec<Secret>,
    /// How long a session lasts (default 30d).
    #[serde(default = "default_ttl")]
    pub session_ttl: Span,
    /// Cookie name (default `gatewarden`; `__Host-gatewarden` over HTTPS).
    #[serde(default = "default_cookie")]
    pub cookie_name: String,
    /// `auto` (Secure over HTTPS), `always` or `never`.
    #[serde(default)]
    pub secure_cookie: SecureCookie,
    /// With `redis:`, what a session check does while Redis cannot say whether the
    /// session was revoked: `deny` (default, 503) or `allow` (its signature suffices).
    #[serde(default)]
    pub on_revocation_error: OnRevocationError,
    /// Role of a logged-in user (default user).
    #[serde(default = "default_role")]
    pub role: String,
    /// Subject of a logged-in user (default `pin`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Base32 TOTP secret; when set, the login form also asks for a 6-digit code.
    pub totp_secret: Option<Secret>,
    /// Lockout of client addresses after repeated failures.
    #[serde(default)]
    pub lockout: LockoutConfig,
    /// Extra CSS appended to the login page's styles.
    #[serde(default)]
    pub login_css: String,
}

fn default_ttl() -> Span {
    Span::from_secs(30 * 86_400)
}
fn default_cookie() -> String {
    "gatewarden".into()
}
fn default_role() -> String {
    "user".into()
}
fn default_subject() -> String {
    "pin".into()
}
/// The runtime form of a `pin_gate` plugin.
pub struct PinGate {
    pin_hash: String,
    sessions: SessionKeys,
    role: Role,
    subject: String,
    totp: Option<Vec<u8>>,
    /// The last TOTP time step accepted; a code for it or an earlier step is refused.
    totp_last_step: AtomicU64,
    lockout: LoginLockout,
    login_css: String,
}

impl PinGate {
    pub fn new(config: PinGateConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        let parsed = PasswordHash::new(config.pin_hash.expose()).map_err(|_| {
            "`pin_hash` is not an argon2 hash; make one with `gatewarden hash-pin`".to_string()
        })?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err("`pin_hash` must be argon2id (from `gatewarden hash-pin`)".into());
        }
        let ttl = config.session_ttl.get();
        let sessions = SessionKeys::new(
            config.secret.expose(),
            &config.previous_secrets,
            ttl,
            &config.cookie_name,
            config.secure_cookie,
        )?
        .with_revocations(Revocations::new(
            env.redis.clone(),
            config.on_revocation_error,
        ));
        let role = Role::parse(&config.role)
            .ok_or_else(|| format!("role: unknown role {:?}; use user or admin", config.role))?;
        let totp = match &config.totp_secret {
            Some(s) => Some(
                crate::totp::decode_base32(s.expose())
                    .filter(|k| k.len() >= 10)
                    .ok_or("totp_secret: not a base32 secret of at least 80 bits")?,
            ),
            None => None,
        };
        let lockout = LoginLockout::new(&config.lockout, env)?;
        if config.login_css.contains("</style") {
            return Err("login_css must not contain </style>".into());
        }
        Ok(PinGate {
            pin_hash: config.pin_hash.expose().to_string(),
            sessions,
            role,
            subject: config.subject,
            totp,
            totp_last_step: AtomicU64::new(0),
            lockout,
            login_css: config.login_css,
        })
    }

    fn page(&self, status: u16, next: &str, message: Option<&str>) -> Reply {
        let html = login_page(next, message, self.totp.is_some(), &self.login_css);
        Reply {
            status,
            content_type: "text/html; charset=utf-8",
            headers: Vec::new(),
            body: Bytes::from(html),
        }
        .with_header(http::header::HeaderName::from_static("x-frame-options"), "DENY")
        .with_header(http::header::HeaderName::from_static("content-security-policy"), "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")
    }

    fn locked(&self, next: &str, seconds: u64) -> Reply {
        let message = format!(
            "Too many attempts. Try again in {} minutes.",
            seconds.div_ceil(60)
        );
        self.page(429, next, Some(&message))
            .with_header(http::header::RETRY_AFTER, &seconds.to_string())
    }

    fn totp_ok(&self, code: &str) -> bool {
        let Some(secret) = &self.totp else {
            return true;
        };
        let Some(step) = crate::totp::matching_step(secret, code, session::now_secs()) else {
            return false;
        };
        // Accept each step once: only a step later than the last accepted one passes.
        self.totp_last_step
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                (step > last).then_some(step)
            })
            .is_ok()
    }

    async fn login(&self, https: bool, client: IpAddr, body: Bytes) -> Reply {
        let form = crate::forms::parse_form(&body);
        let field = |name: &str| {
            form.iter()
                .find(|(n, _)| n == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let next = session::safe_next(field("next")).to_string();
        // Counted per address, an IPv6 client per /64 (see `client_network`).
        let client = crate::client_network(client);
        let charge = match self.lockout.admit(client).await {
            Admission::Admitted(charge) => charge,
            Admission::Banned(seconds) => return self.locked(&next, seconds),
        };
        let pin = field("pin");
        let verdict = password::Pool::shared()
            .verify(&self.pin_hash, pin.as_bytes())
            .await;
        if verdict == password::Verdict::Busy {
            self.lockout.refund(client, charge, false).await;
            return self
                .page(
                    503,
                    &next,
                    Some("Too many sign-ins at once. Try again in a moment."),
                )
                .with_header(http::header::RETRY_AFTER, "1");
        }
        // Check the code even when the PIN is wrong, so timing does not tell which failed.
        let code_ok = self.totp_ok(field("totp"));
        if !(verdict == password::Verdict::Match && code_ok) {
            if charge.started_ban() {
                return self.locked(&next, self.lockout.ban_secs());
            }
            let message = if self.totp.is_some() {
                "Wrong PIN or code."
            } else {
                "Wrong PIN."
            };
            return self.page(401, &next, Some(message));
        }
        self.lockout.refund(client, charge, true).await;
        match self.sessions.issue(&self.subject, self.role, "pin") {
            Ok(token) => Reply::error(303, "logged in")
                .with_header(http::header::LOCATION, &next)
                .with_header(
                    http::header::SET_COOKIE,
                    &self.sessions.set_cookie(&token, https),
                ),
            Err(e) => {
                log::error!("cannot sign a session: {e}");
                Reply::error(500, "cannot create a session")
            }
        }
    }
}

impl crate::PluginType for PinGate {
    const TYPE: &'static str = "pin_gate";
    type Config = PinGateConfig;

    fn build(config: PinGateConfig, env: &crate::BuildEnv) -> Result<Self, String> {
        PinGate::new(config, env)
    }
}

impl Plugin for PinGate {
    fn type_name(&self) -> &'static str {
        <Self as crate::PluginType>::TYPE
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            request: true,
            ..Hooks::default()
        }
    }

    fn is_identity(&self) -> bool {
        true
    }

    fn has_login_page(&self) -> bool {
        true
    }

    fn login_sessions(&self) -> Option<&SessionKeys> {
        Some(&self.sessions)
    }

    fn gateway_cookies(&self) -> Vec<String> {
        self.sessions.cookie_names().map(String::from).to_vec()
    }

    fn session_lifetime(&self) -> Option<std::time::Duration> {
        Some(self.sessions.lifetime())
    }

    fn serves(&self, path: &str) -> bool {
        path == LOGIN_PATH || path == LOGOUT_PATH
    }

    fn serve<'a>(
        &'a self,
        req: &'a RequestHeader,
        body: Bytes,
        ctx: &'a mut Ctx,
    ) -> RequestFlow<'a> {
        let path = req.uri.path();
        let method = &req.method;
        if path == LOGOUT_PATH {
            if *method != http::Method::POST {
                return RequestFlow::reply(
                    Reply::error(405, "use POST to log out")
                        .with_header(http::header::ALLOW, "POST"),
                );
            }
            if session::cross_origin(req) {
                return RequestFlow::reply(Reply::error(403, "cross-origin logout refused"));
            }
            let https = ctx.https;
            return RequestFlow::Wait(Box::pin(async move {
                self.sessions.revoke_presented(req, https).await;
                Verdict::Reply(
                    Reply::error(303, "logged out")
                        .with_header(http::header::LOCATION, LOGIN_PATH)
                        .with_header(http::header::SET_COOKIE, &self.sessions.clear_cookie(https)),
                )
            }));
        }
        let query_next = crate::forms::query_param(req, "next").unwrap_or_default();
        match *method {
            http::Method::GET | http::Method::HEAD => {
                let next = session::safe_next(&query_next).to_string();
                let client = ctx.client_ip;
                RequestFlow::Wait(Box::pin(async move {
                    Verdict::Reply(
                        match self.lockout.banned_for(crate::client_network(client)).await {
                            Some(seconds) => self.locked(&next, seconds),
                            None => self.page(200, &next, None),
                        },
                    )
                }))
            }
            http::Method::POST => {
                if session::cross_origin(req) {
                    return RequestFlow::reply(Reply::error(403, "cross-origin login refused"));
                }
                let (https, client) = (ctx.https, ctx.client_ip);
                RequestFlow::Wait(Box::pin(async move {
                    Verdict::Reply(self.login(https, client, body).await)
                }))
            }
            _ => RequestFlow::reply(
                Reply::error(405, "method not allowed")
                    .with_header(http::header::ALLOW, "GET, POST"),
            ),
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut RequestHeader, ctx: &'a mut Ctx) -> RequestFlow<'a> {
        self.sessions.recognise(req, ctx)
    }
}

pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn login_page(next: &str, message: Option<&str>, with_totp: bool, extra_css: &str) -> String {
    let message = message.map_or(String::new(), |m| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape_html(m))
    });
    let totp = if with_totp {
        "<label for=\"totp\">Authenticator code</label>\n      <input id=\"totp\" name=\"totp\" inputmode=\"numeric\" pattern=\"[0-9]{6}\" autocomplete=\"one-time-code\" maxlength=\"6\" required>"
    } else {
        ""
    };
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>Sign in</title>
<style>
  :root {{ color-scheme: light dark; --accent: #2563eb; }}
  * {{ box-sizing: border-box; }}
  body {{ margin: 0; min-height: 100vh; display: grid; place-items: center; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; background: #f3f4f6; color: #111827; }}
  main {{ width: min(92vw, 360px); padding: 2rem 1.75rem; background: #fff; border-radius: 14px; box-shadow: 0 10px 30px rgb(0 0 0 / .08); }}
  h1 {{ margin: 0 0 1.25rem; font-size: 1.35rem; }}
  label {{ display: block; margin: .75rem 0 .35rem; font-weight: 600; font-size: .9rem; }}
  input {{ width: 100%; padding: .7rem .8rem; font-size: 1.1rem; border: 1px solid #d1d5db; border-radius: 8px; background: inherit; color: inherit; }}
  input:focus {{ outline: 2px solid var(--accent); outline-offset: 1px; }}
  button {{ width: 100%; margin-top: 1.25rem; padding: .75rem; font-size: 1rem; font-weight: 600; color: #fff; background: var(--accent); border: 0; border-radius: 8px; cursor: pointer; }}
  .error {{ margin: 0 0 .5rem; padding: .6rem .8rem; border-radius: 8px; background: #fee2e2; color: #991b1b; font-size: .9rem; }}
  @media (prefers-color-scheme: dark) {{ body {{ background: #111827; color: #f9fafb; }} main {{ background: #1f2937; }} input {{ border-color: #4b5563; }} }}
  {extra_css}
</style>
</head>
<body>
<main>
  <h1>Sign in</h1>
  {message}
  <form method="post" action="{LOGIN_PATH}">
    <input type="hidden" name="next" value="{next}">
    <label for="pin">PIN</label>
    <input id="pin" name="pin" type="password" inputmode="numeric" autocomplete="current-password" autofocus required>
    {totp}
    <button type="submit">Sign in</button>
  </form>
</main>
</body>
</html>
"#,
        next = escape_html(next),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestId;

    fn gate(extra: &str) -> PinGate {
        let hash = hash_pin("1234").unwrap();
        let yaml = format!("{{ pin_hash: '{hash}', secret: '0123456789abcdef0123456789abcdef', lockout: {{ max_failures: 3, window: 1m, ban: 1m }} {extra} }}");
        PinGate::new(
            serde_yaml_ng::from_str(&yaml).unwrap(),
            &crate::BuildEnv::default(),
        )
        .unwrap()
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn the_right_pin_gets_a_session_cookie_and_a_safe_redirect() {
        let g = gate("");
        let r = block_on(g.login(
            false,
            ip(1),
            Bytes::from("pin=1234&next=%2F%2Fevil.example"),
        ));
        assert_eq!(r.status, 303);
        let location = r
            .headers
            .iter()
            .find(|(n, _)| n == http::header::LOCATION)
            .unwrap();
        assert_eq!(location.1, "/");
        let cookie = r
            .headers
            .iter()
            .find(|(n, _)| n == http::header::SET_COOKIE)
            .unwrap()
            .1
            .to_str()
            .unwrap()
            .to_string();
        let token = cookie.split(';').next().unwrap().split_once('=').unwrap().1;
        assert_eq!(&*g.sessions.verify(token).unwrap().subject, "pin");
    }

    #[test]
    fn lockout_bans_an_address_even_for_the_right_pin_and_spares_others() {
        let g = gate("");
        for _ in 0..2 {
            assert_eq!(
                block_on(g.login(false, ip(2), Bytes::from("pin=0000"))).status,
                401
            );
        }
        let banned = block_on(g.login(false, ip(2), Bytes::from("pin=0000")));
        assert_eq!(banned.status, 429);
        assert!(banned
            .headers
            .iter()
            .any(|(n, v)| n == http::header::RETRY_AFTER && v == "60"));
        assert_eq!(
            block_on(g.login(false, ip(2), Bytes::from("pin=1234"))).status,
            429
        );
        assert_eq!(
            block_on(g.login(false, ip(3), Bytes::from("pin=1234"))).status,
            303
        );
    }

    #[test]
    fn a_burst_of_attempts_checks_at_most_max_failures_pins() {
        let g: &'static PinGate = Box::leak(Box::new(gate("")));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Forty logins at once from one address, the right PIN in the middle: every
        // attempt is charged before any PIN is checked, so only the first three are.
        let statuses: Vec<u16> = runtime.block_on(async {
            let logins: Vec<_> = (0..40)
                .map(|i| {
                    let pin = if i == 20 { "pin=1234" } else { "pin=0000" };
                    tokio::spawn(g.login(false, ip(9), Bytes::from(pin)))
                })
                .collect();
            let mut statuses = Vec::new();
            for login in logins {
                statuses.push(login.await.unwrap().status);
            }
            statuses
        });
        let count = |s: u16| statuses.iter().filter(|x| **x == s).count();
        assert_eq!(
            (count(401), count(429), count(303)),
            (2, 38, 0),
            "{statuses:?}"
        );
        assert_eq!(
            block_on(g.login(false, ip(9), Bytes::from("pin=1234"))).status,
            429
        );
    }

    #[test]
    fn a_right_pin_forgives_earlier_failures_but_lifts_no_ban() {
        let g = gate("");
        for _ in 0..2 {
            assert_eq!(
                block_on(g.login(false, ip(10), Bytes::from("pin=0000"))).status,
                401
            );
        }
        assert_eq!(
            block_on(g.login(false, ip(10), Bytes::from("pin=1234"))).status,
            303
        );
        // Forgotten: two more wrong attempts are not a ban.
        for _ in 0..2 {
            assert_eq!(
                block_on(g.login(false, ip(10), Bytes::from("pin=0000"))).status,
                401
            );
        }
    }

    #[test]
    fn totp_codes_work_once() {
        let g = gate(", totp_secret: GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let code = format!(
            "{:06}",
            crate::totp::code(b"12345678901234567890", session::now_secs() / 30)
        );
        assert_eq!(
            block_on(g.login(false, ip(4), Bytes::from("pin=1234"))).status,
            401
        );
        assert_eq!(
            block_on(g.login(false, ip(4), Bytes::from(format!("pin=1234&totp={code}")))).status,
            303
        );
        assert_eq!(
            block_on(g.login(false, ip(4), Bytes::from(format!("pin=1234&totp={code}")))).status,
            401
        );
    }

    #[test]
    fn the_page_escapes_next_and_takes_css() {
        let page = login_page("/\"><script>", Some("<b>"), true, "main { color: red }");
        assert!(!page.contains("<script>") && page.contains("&quot;&gt;&lt;script&gt;"));
        assert!(page.contains("main { color: red }") && page.contains("name=\"totp\""));
    }

    #[test]
    fn bad_or_expired_sessions_are_never_anonymous() {
        let g = gate("");
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.append_header("Cookie", "gatewarden=forged.token.value")
            .unwrap();
        req.append_header("Accept", "application/json").unwrap();
        let mut ctx = Ctx::new(ip(5), RequestId::from_random(0), false);
        let status = match g.on_request(&mut req, &mut ctx) {
            RequestFlow::Done(Verdict::Reply(r)) => r.status,
            _ => 0,
        };
        assert_eq!(status, 401);
    }

    #[test]
    fn settings_are_validated() {
        let bad = |yaml: &str| {
            PinGate::new(
                serde_yaml_ng::from_str(yaml).unwrap(),
                &crate::BuildEnv::default(),
            )
            .is_err()
        };
        assert!(bad(
            "{ pin_hash: plain, secret: '0123456789abcdef0123456789abcdef' }"
        ));
        let hash = hash_pin("1").unwrap();
        assert!(bad(&format!("{{ pin_hash: '{hash}', secret: short }}")));
        assert!(bad(&format!(
            "{{ pin_hash: '{hash}', secret: '0123456789abcdef0123456789abcdef', role: root }}"
        )));
        assert!(bad(&format!("{{ pin_hash: '{hash}', secret: '0123456789abcdef0123456789abcdef', totp_secret: '!!' }}")));
    }
}
