//! Browser sessions shared by the login plugins: HS256 JWTs in a cookie, and the
//! `next` parameter that says where to go after logging in.

use std::sync::Arc;
use std::time::Duration;

use cookie::{Cookie, SameSite};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::cookies::{cookie, strip_cookie};
use crate::forms::{encode_query, percent_decode};
use crate::revocation::Revocations;
use crate::secret::Secret;
use crate::{Identity, RequestFlow, Role, Verdict};

/// The login page every login plugin answers (`pin_gate`'s form, `oidc`'s redirect to the
/// provider); the core sends browser navigations without an identity here.
pub const LOGIN_PATH: &str = "/.gatewarden/login";
/// `POST` here ends the session.
pub const LOGOUT_PATH: &str = "/.gatewarden/logout";

/// Minimum length of a session secret.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Claims {
    sub: String,
    role: String,
    /// Which mechanism logged the user in (`pin`, `oidc`).
    amr: String,
    /// The session's id, by which its logout revokes it.
    #[serde(default)]
    sid: String,
    iat: u64,
    exp: u64,
}

/// A verified session: who, and which session.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: Identity,
    pub id: String,
    /// Unix seconds it was issued and expires.
    pub issued: u64,
    pub expires: u64,
}

/// What [`SessionKeys::presented`] found in a request.
#[derive(Debug)]
pub enum Presented {
    /// No session cookie.
    None,
    /// A live session, and whether it came in the `Secure` cookie.
    Valid {
        session: Session,
        https: bool,
    },
    Refused(SessionError),
    /// Redis could not say whether the session was revoked, and the settings deny then.
    Unavailable(String),
}

/// Signs with the current secret; verifies with it and with previous secrets, so a
/// secret can be rotated without logging everyone out.
pub struct SessionKeys {
    signing: EncodingKey,
    verifying: Vec<DecodingKey>,
    validation: Validation,
    pub ttl: Duration,
    cookie_name: String,
    secure_name: String,
    secure: SecureCookie,
    revocations: Revocations,
}

/// When the cookie gets `Secure` and the `__Host-` prefix.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SecureCookie {
    /// When the client came over HTTPS (a TLS listener, or https from a trusted proxy).
    #[default]
    Auto,
    Always,
    Never,
}

/// Why a session cookie was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError {
    Expired,
    Invalid,
    /// Logged out, or its subject signed out everywhere.
    Revoked,
}

impl SessionKeys {
    pub fn new(
        secret: &str,
        previous: &[Secret],
        ttl: Duration,
        cookie_name: &str,
        secure: SecureCookie,
    ) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!("`secret` must be at least {MIN_SECRET_LEN} bytes"));
        }
        if let Some(short) = previous
            .iter()
            .position(|s| s.expose().len() < MIN_SECRET_LEN)
        {
            return Err(format!(
                "previous_secrets[{short}] must be at least {MIN_SECRET_LEN} bytes"
            ));
        }
        if cookie_name.is_empty()
            || !cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err("`cookie_name` may use letters, digits, '-' and '_' only".into());
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let verifying = std::iter::once(secret)
            .chain(previous.iter().map(Secret::expose))
            .map(|s| DecodingKey::from_secret(s.as_bytes()))
            .collect();
        Ok(SessionKeys {
            signing: EncodingKey::from_secret(secret.as_bytes()),
            verifying,
            validation,
            ttl,
            cookie_name: cookie_name.to_string(),
            secure_name: format!("__Host-{cookie_name}"),
            secure,
            revocations: Revocations::default(),
        })
    }

    /// Checks sessions against (and logs out into) `revocations`.
    pub fn with_revocations(mut self, revocations: Revocations) -> Self {
        self.revocations = revocations;
        self
    }

    /// Whether cookies get `Secure` (and the `__Host-` prefix) on this connection.
    pub fn secure_for(&self, https: bool) -> bool {
        match self.secure {
            SecureCookie::Auto => https,
            SecureCookie::Always => true,
            SecureCookie::Never => false,
        }
    }

    /// The cookie name used on this connection.
    pub fn cookie_name(&self, https: bool) -> &str {
        if self.secure_for(https) {
            &self.secure_name
        } else {
            &self.cookie_name
        }
    }

    /// Both names the session cookie may have: plain, and with the `__Host-` prefix.
    pub fn cookie_names(&self) -> [&str; 2] {
        [&self.cookie_name, &self.secure_name]
    }

    /// A signed session for `subject`.
    pub fn issue(&self, subject: &str, role: Role, method: &str) -> Result<String, String> {
        let now = now_secs();
        let claims = Claims {
            sub: subject.to_string(),
            role: role.as_str().to_string(),
            amr: method.to_string(),
            sid: crate::keys::random_base62(22),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.signing)
            .map_err(|e| e.to_string())
    }

    /// Verifies a session token; expiry is checked here, on the server.
    pub fn verify(&self, token: &str) -> Result<Identity, SessionError> {
        self.verify_session(token).map(|s| s.identity)
    }

    /// Verifies a session token and says which session it is.
    pub fn verify_session(&self, token: &str) -> Result<Session, SessionError> {
        let mut expired = false;
        for key in &self.verifying {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let role = Role::parse(&claims.role).ok_or(SessionError::Invalid)?;
                    return Ok(Session {
                        identity: Identity {
                            subject: Arc::from(claims.sub),
                            role,
                            method: "session",
                        },
                        id: claims.sid,
                        issued: claims.iat,
                        expires: claims.exp,
                    });
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                    expired = true
                }
                Err(_) => {}
            }
        }
        Err(if expired {
            SessionError::Expired
        } else {
            SessionError::Invalid
        })
    }

    /// Revokes the session the request carries, if it carries a valid one: a copy of
    /// its cookie is refused from now on, on every replica that shares the list.
    pub async fn revoke_presented(&self, req: &crate::RequestHeader, https: bool) {
        let Some(session) = self
            .token_from(req, https)
            .and_then(|token| self.verify_session(token).ok())
        else {
            return;
        };
        if let Err(e) = self
            .revocations
            .revoke_session(&session.id, session.expires)
            .await
        {
            // This replica's own list has it; the others learn of it when Redis is back.
            log::warn!("logout: the session is revoked here only: {}", e.0);
        }
    }

    /// The session a request's cookie carries, checked in full (signature, expiry,
    /// revocations, waiting for Redis when the list is shared), for places outside a
    /// route's chain that accept these sessions. Either cookie name is taken: a listener
    /// without TLS still gets the `Secure` one from a browser that sends it there.
    pub async fn presented(&self, req: &crate::RequestHeader) -> Presented {
        let found = [false, true]
            .into_iter()
            .find_map(|https| self.token_from(req, https).map(|token| (token, https)));
        let Some((token, https)) = found else {
            return Presented::None;
        };
        let session = match self.verify_session(token) {
            Ok(session) => session,
            Err(e) => return Presented::Refused(e),
        };
        let checked = self
            .revocations
            .revoked(&session.id, &session.identity.subject, session.issued)
            .await;
        match checked {
            Ok(false) => Presented::Valid { session, https },
            Ok(true) => Presented::Refused(SessionError::Revoked),
            Err(e) => Presented::Unavailable(e.0),
        }
    }

    /// How long a session lasts at most.
    pub fn lifetime(&self) -> Duration {
        self.ttl
    }

    /// The `Set-Cookie` value that stores `token`.
    pub fn set_cookie(&self, token: &str, https: bool) -> String {
        let secure = self.secure_for(https);
        Cookie::build((self.cookie_name(https).to_string(), token.to_string()))
            .http_only(true)
            .same_site(SameSite::Lax)
            .path("/")
            .secure(secure)
            .max_age(cookie::time::Duration::seconds(self.ttl.as_secs() as i64))
            .build()
            .to_string()
    }

    /// The `Set-Cookie` value that deletes the session.
    pub fn clear_cookie(&self, https: bool) -> String {
        Cookie::build((self.cookie_name(https).to_string(), String::new()))
            .http_only(true)
            .same_site(SameSite::Lax)
            .path("/")
            .secure(self.secure_for(https))
            .max_age(cookie::time::Duration::ZERO)
            .build()
            .to_string()
    }

    /// Removes the session cookie from the request, keeping every other cookie, so the
    /// upstream never sees (and can never replay) the gateway's session.
    pub fn strip_cookie(&self, req: &mut crate::RequestHeader, https: bool) {
        strip_cookie(req, self.cookie_name(https));
    }

    /// The session token in the request's cookies, if any.
    ///
    /// Two session cookies with different values (one planted by a sibling domain, say)
    /// make the request ambiguous: the answer is then an empty token, which never
    /// verifies, rather than whichever copy happens to come first.
    pub fn token_from<'r>(&self, req: &'r crate::RequestHeader, https: bool) -> Option<&'r str> {
        cookie(req, self.cookie_name(https))
    }
}

impl SessionKeys {
    /// Recognises the caller by the session cookie: sets the identity and strips the
    /// cookie so the upstream never sees it. A bad, expired or revoked session is never
    /// anonymous: the answer (a 302 to the login page for browsers, 401 otherwise,
    /// clearing the cookie) ends the request. With a shared revocation list the check
    /// waits for Redis; while Redis cannot answer, `on_revocation_error` decides.
    pub fn recognise<'a>(
        &'a self,
        req: &'a mut crate::RequestHeader,
        ctx: &'a mut crate::Ctx,
    ) -> RequestFlow<'a> {
        let Some(token) = self.token_from(req, ctx.https) else {
            return RequestFlow::CONTINUE;
        };
        let session = match self.verify_session(token) {
            Ok(session) => session,
            Err(e) => return RequestFlow::reply(self.refuse(req, ctx, e)),
        };
        let subject = &session.identity.subject;
        if self
            .revocations
            .revoked_here(&session.id, subject, session.issued)
        {
            return RequestFlow::reply(self.refuse(req, ctx, SessionError::Revoked));
        }
        if !self.revocations.shared() {
            return RequestFlow::Done(self.accept(req, ctx, session.identity));
        }
        RequestFlow::Wait(Box::pin(async move {
            let checked = self
                .revocations
                .revoked(&session.id, &session.identity.subject, session.issued)
                .await;
            match checked {
                Ok(false) => self.accept(req, ctx, session.identity),
                Ok(true) => Verdict::Reply(self.refuse(req, ctx, SessionError::Revoked)),
                Err(e) => {
                    ctx.auth_failure = Some("session_store_unavailable");
                    Verdict::Reply(
                        crate::Reply::error(503, &e.0).with_header(http::header::RETRY_AFTER, "5"),
                    )
                }
            }
        }))
    }

    fn accept(
        &self,
        req: &mut crate::RequestHeader,
        ctx: &mut crate::Ctx,
        identity: Identity,
    ) -> Verdict {
        if ctx.identify(identity).is_err() {
            return Verdict::Reply(crate::credentials::conflicting());
        }
        self.strip_cookie(req, ctx.https);
        Verdict::Continue
    }

    fn refuse(
        &self,
        req: &crate::RequestHeader,
        ctx: &mut crate::Ctx,
        error: SessionError,
    ) -> crate::Reply {
        ctx.auth_failure = Some(match error {
            SessionError::Expired => "session_expired",
            SessionError::Revoked => "session_revoked",
            SessionError::Invalid => "invalid_session",
        });
        let clear = self.clear_cookie(ctx.https);
        let reply = if is_browser_navigation(req) {
            let next = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let location = format!("{LOGIN_PATH}?next={}", encode_query(next));
            crate::Reply::error(302, "session expired or invalid")
                .with_header(http::header::LOCATION, &location)
        } else {
            crate::Reply::error(401, "session expired or invalid")
                .with_header(http::header::WWW_AUTHENTICATE, "Bearer")
        };
        reply.with_header(http::header::SET_COOKIE, &clear)
    }
}

/// True when an `Origin` header names another site than the request's `Host`, or
/// comes more than once: such logins and logouts are refused.
pub fn cross_origin(req: &crate::RequestHeader) -> bool {
    let Ok(origin) = crate::credentials::only_value(req, &http::header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.map(|o| o.to_str().unwrap_or("null")) else {
        return false;
    };
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    origin == "null" || !origin_host.eq_ignore_ascii_case(host)
}

/// A browser loading a page: GET with `text/html` in `Accept`. Such requests are sent
/// to the login page rather than answered 401.
pub fn is_browser_navigation(req: &crate::RequestHeader) -> bool {
    req.method == http::Method::GET
        && req
            .headers
            .get(http::header::ACCEPT)
            .is_some_and(|a| memchr::memmem::find(a.as_bytes(), b"text/html").is_some())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where to send a user after login: only same-origin relative paths; anything else
/// (other hosts, schemes, protocol-relative `//host`, backslashes that browsers read
/// as slashes, control characters, encoded versions of those) goes to `/`.
pub fn safe_next(next: &str) -> &str {
    let bytes = next.as_bytes();
    let looks_safe = bytes.first() == Some(&b'/')
        && bytes.len() <= 2048
        && !matches!(bytes.get(1), Some(b'/') | Some(b'\\'))
        && !bytes.iter().any(|b| *b < 0x20 || *b == 0x7f || *b == b'\\');
    if !looks_safe {
        return "/";
    }
    // Decode once and look again: `/%2f%2fevil` must not become `//evil` downstream.
    let decoded = percent_decode(next);
    let d = decoded.as_bytes();
    if matches!(d.get(1), Some(b'/') | Some(b'\\'))
        || d.iter().any(|b| *b < 0x20 || *b == 0x7f || *b == b'\\')
    {
        return "/";
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys(previous: &[Secret]) -> SessionKeys {
        signed_with(SECRET, previous)
    }

    /// Sessions of one minute in the `gatewarden` cookie, signed with `secret`.
    fn signed_with(secret: &str, previous: &[Secret]) -> SessionKeys {
        SessionKeys::new(
            secret,
            previous,
            Duration::from_secs(60),
            "gatewarden",
            SecureCookie::Auto,
        )
        .unwrap()
    }

    #[test]
    fn sessions_round_trip_and_resist_tampering() {
        let k = keys(&[]);
        let token = k.issue("pin", Role::User, "pin").unwrap();
        assert_eq!(&*k.verify(&token).unwrap().subject, "pin");
        let parts: Vec<&str> = token.split('.').collect();
        // A changed payload, a changed signature, a truncated one.
        let forged_payload = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
        assert_eq!(k.verify(&forged_payload), Err(SessionError::Invalid));
        let mut sig = parts[2].to_string();
        sig.replace_range(0..1, if &sig[0..1] == "A" { "B" } else { "A" });
        assert_eq!(
            k.verify(&format!("{}.{}.{}", parts[0], parts[1], sig)),
            Err(SessionError::Invalid)
        );
        assert_eq!(
            k.verify(&format!("{}.{}.{}", parts[0], parts[1], &parts[2][..10])),
            Err(SessionError::Invalid)
        );
        assert_eq!(k.verify("garbage"), Err(SessionError::Invalid));
    }

    #[test]
    fn previous_secrets_verify_but_never_sign() {
        let old = signed_with("an-old-secret-that-is-long-enough!!", &[]);
        let token = old.issue("pin", Role::User, "pin").unwrap();
        let rotated = keys(&[Secret::new("an-old-secret-that-is-long-enough!!")]);
        assert!(rotated.verify(&token).is_ok());
        assert!(keys(&[]).verify(&token).is_err());
        assert!(old
            .verify(&rotated.issue("pin", Role::User, "pin").unwrap())
            .is_err());
    }

    #[test]
    fn expired_sessions_are_refused() {
        let k = SessionKeys::new(
            SECRET,
            &[],
            Duration::ZERO,
            "gatewarden",
            SecureCookie::Auto,
        )
        .unwrap();
        let token = k.issue("pin", Role::User, "pin").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(k.verify(&token), Err(SessionError::Expired));
    }

    #[test]
    fn cookies_are_hardened_and_prefixed_on_https() {
        let k = keys(&[]);
        let plain = k.set_cookie("t", false);
        assert!(plain.starts_with("gatewarden=t"));
        for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=60"] {
            assert!(plain.contains(attr), "{plain}");
        }
        assert!(!plain.contains("Secure"));
        let tls = k.set_cookie("t", true);
        assert!(
            tls.starts_with("__Host-gatewarden=t") && tls.contains("Secure"),
            "{tls}"
        );
        assert!(SessionKeys::new("short", &[], Duration::ZERO, "g", SecureCookie::Auto).is_err());
    }

    #[test]
    fn only_the_session_cookie_is_stripped() {
        let k = keys(&[]);
        let mut req = crate::RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Cookie", "a=1; gatewarden=tok").unwrap();
        req.append_header("Cookie", "b=2").unwrap();
        assert_eq!(k.token_from(&req, false), Some("tok"));
        k.strip_cookie(&mut req, false);
        assert_eq!(req.headers.get("cookie").unwrap(), "a=1; b=2");
        let mut only = crate::RequestHeader::build("GET", b"/", None).unwrap();
        only.append_header("Cookie", "gatewarden=tok").unwrap();
        k.strip_cookie(&mut only, false);
        assert!(only.headers.get("cookie").is_none());
    }

    #[test]
    fn two_different_session_cookies_are_ambiguous() {
        let k = keys(&[]);
        let token_of = |cookies: &[&str]| {
            let mut req = crate::RequestHeader::build("GET", b"/", None).unwrap();
            for c in cookies {
                req.append_header("Cookie", *c).unwrap();
            }
            k.token_from(&req, false).map(str::to_string)
        };
        assert_eq!(
            token_of(&["gatewarden=a; x=1; gatewarden=a"]).as_deref(),
            Some("a")
        );
        assert_eq!(
            token_of(&["gatewarden=a; gatewarden=b"]).as_deref(),
            Some("")
        );
        assert_eq!(
            token_of(&["gatewarden=a", "gatewarden=b"]).as_deref(),
            Some("")
        );
        assert_eq!(token_of(&["x=1"]), None);
    }

    #[test]
    fn next_accepts_only_same_origin_paths() {
        for good in ["/", "/chat?id=1", "/a/b#frag", "/%E2%9C%93"] {
            assert_eq!(safe_next(good), good);
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/%2f%2fevil.example",
            "/%2F%2Fevil.example",
            "/%5cevil.example",
            "https://evil.example",
            "javascript:alert(1)",
            "/a\r\nSet-Cookie: x=1",
            "/a%0d%0aSet-Cookie:x",
            "",
            "evil.example",
            "\\\\evil.example",
        ] {
            assert_eq!(safe_next(bad), "/", "{bad:?}");
        }
    }

    #[test]
    fn a_presented_session_is_checked_in_full_under_either_cookie_name() {
        let k = keys(&[]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let run = |req: &crate::RequestHeader| runtime.block_on(k.presented(req));
        let request = |cookie: &str| {
            let mut req = crate::RequestHeader::build("GET", b"/", None).unwrap();
            if !cookie.is_empty() {
                req.insert_header("cookie", cookie).unwrap();
            }
            req
        };
        let token = k.issue("ops", Role::Admin, "pin").unwrap();
        for (cookie, https) in [
            (format!("a=1; gatewarden={token}"), false),
            (format!("__Host-gatewarden={token}"), true),
        ] {
            match run(&request(&cookie)) {
                Presented::Valid {
                    session,
                    https: found,
                } => {
                    assert_eq!(&*session.identity.subject, "ops");
                    assert_eq!(session.identity.role, Role::Admin);
                    assert_eq!(found, https, "{cookie}");
                }
                other => panic!("{cookie}: {other:?}"),
            }
        }
        assert!(matches!(run(&request("")), Presented::None));
        assert!(matches!(run(&request("other=1")), Presented::None));
        assert!(matches!(
            run(&request("gatewarden=forged")),
            Presented::Refused(SessionError::Invalid)
        ));
        let other_secret = signed_with("another-secret-of-32-bytes-or-more!", &[])
            .issue("ops", Role::Admin, "pin")
            .unwrap();
        assert!(matches!(
            run(&request(&format!("gatewarden={other_secret}"))),
            Presented::Refused(SessionError::Invalid)
        ));
        // Logged out: refused from then on.
        let cookie = format!("gatewarden={token}");
        runtime.block_on(k.revoke_presented(&request(&cookie), false));
        assert!(matches!(
            run(&request(&cookie)),
            Presented::Refused(SessionError::Revoked)
        ));
    }
}
