//! The console's sign-in: the admin key, presented once, is exchanged for a signed,
//! expiring session cookie (the HS256 sessions the login plugins issue, with a key of
//! the console's own), and the checks that keep other sites from using that cookie.

use std::time::Duration;

use cookie::{Cookie, SameSite};
use gatewarden_plugins::revocation::Revocations;
use gatewarden_plugins::session::{cross_origin, SecureCookie, SessionKeys};
use gatewarden_plugins::{RequestHeader, Role};

/// The session cookie's name on a plain-HTTP listener.
pub const COOKIE: &str = "gatewarden_admin";
/// A header the console's scripts send with every write. A page of another site cannot
/// send it without a CORS preflight the admin listener never grants.
pub const WRITE_HEADER: &str = "x-gatewarden-console";
/// How long a console session lasts.
const LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// The subject and method the console's sessions carry.
const SUBJECT: &str = "console";
const METHOD: &str = "admin_key";

/// Issues and checks console sessions.
///
/// The signing key is a random secret drawn when the process starts, followed by the
/// admin key in force: a restart, or a new `admin.api_key`, ends every console session.
pub struct ConsoleSessions {
    secret: String,
    lifetime: Duration,
    revocations: Revocations,
}

impl Default for ConsoleSessions {
    fn default() -> Self {
        Self::with_lifetime(LIFETIME)
    }
}

impl ConsoleSessions {
    fn with_lifetime(lifetime: Duration) -> Self {
        ConsoleSessions {
            secret: gatewarden_plugins::keys::random_base62(43),
            lifetime,
            // This process's own list: the signing secret is this process's too.
            revocations: Revocations::default(),
        }
    }

    fn keys(&self, admin_key: &str) -> Option<SessionKeys> {
        let secret = format!("{}{admin_key}", self.secret);
        SessionKeys::new(&secret, &[], self.lifetime, COOKIE, SecureCookie::Never)
            .map_err(|e| log::error!("cannot make the console's session keys: {e}"))
            .ok()
    }

    /// A new session token, for someone who just presented `admin_key`.
    pub fn issue(&self, admin_key: &str) -> Option<String> {
        self.keys(admin_key)?
            .issue(SUBJECT, Role::Admin, METHOD)
            .map_err(|e| log::error!("cannot sign a console session: {e}"))
            .ok()
    }

    /// True when `token` is a live console session under `admin_key`.
    pub fn verify(&self, admin_key: &str, token: &str) -> bool {
        let Some(keys) = self.keys(admin_key) else {
            return false;
        };
        match keys.verify_session(token) {
            Ok(s) => {
                s.identity.role == Role::Admin
                    && &*s.identity.subject == SUBJECT
                    && !self
                        .revocations
                        .revoked_here(&s.id, &s.identity.subject, s.issued)
            }
            Err(_) => false,
        }
    }

    /// Ends the session `token`: a copy of the cookie is refused from now on.
    pub async fn sign_out(&self, admin_key: &str, token: &str) {
        let Some(session) = self
            .keys(admin_key)
            .and_then(|k| k.verify_session(token).ok())
        else {
            return;
        };
        // Local only: it cannot fail.
        let _ = self
            .revocations
            .revoke_session(&session.id, session.expires)
            .await;
    }

    /// The session token the request carries, if any.
    pub fn token<'r>(&self, req: &'r RequestHeader, secure: bool) -> Option<&'r str> {
        gatewarden_plugins::cookies::cookie(req, cookie_name(secure))
    }

    /// The `Set-Cookie` value that stores `token`.
    pub fn set_cookie(&self, token: &str, secure: bool) -> String {
        build_cookie(token, secure, self.lifetime.as_secs() as i64)
    }
}

/// The cookie's name: with `Secure`, the `__Host-` prefix pins it to this host and `/`.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure {
        "__Host-gatewarden_admin"
    } else {
        COOKIE
    }
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    build_cookie("", secure, 0)
}

fn build_cookie(value: &str, secure: bool, max_age: i64) -> String {
    // Strict: the browser sends it only with requests the console itself makes, never
    // with a navigation or form that starts on another site.
    Cookie::build((cookie_name(secure), value.to_string()))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .secure(secure)
        .max_age(cookie::time::Duration::seconds(max_age))
        .build()
        .to_string()
}

/// A write that may be made with the session cookie: from a page of this origin (the
/// browser's `Origin` names this host) and by the console's script (its header).
pub fn console_write(req: &RequestHeader) -> bool {
    let from_here = req.headers.get(http::header::ORIGIN).is_some() && !cross_origin(req);
    let by_script = req
        .headers
        .get(WRITE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    from_here && by_script
}

/// A sign-in form that may be taken: none from another origin (a hostile page must not
/// sign the browser in under its own choosing). Clients without `Origin` (curl) pass.
pub fn sign_in_allowed(req: &RequestHeader) -> bool {
    !cross_origin(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "an-admin-key-of-some-length";

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/admin/keys", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn a_session_verifies_under_the_key_it_was_issued_for_only() {
        let sessions = ConsoleSessions::default();
        let token = sessions.issue(KEY).unwrap();
        assert!(sessions.verify(KEY, &token));
        // A new admin key ends it.
        assert!(!sessions.verify("another-admin-key-0123456", &token));
        // So does a restart: another process's secret.
        assert!(!ConsoleSessions::default().verify(KEY, &token));
        // A token altered by one character is refused.
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(!sessions.verify(KEY, &String::from_utf8(tampered).unwrap()));
        assert!(!sessions.verify(KEY, ""));
    }

    #[test]
    fn a_session_signed_out_is_refused() {
        let sessions = ConsoleSessions::default();
        let (a, b) = (sessions.issue(KEY).unwrap(), sessions.issue(KEY).unwrap());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(sessions.sign_out(KEY, &a));
        assert!(!sessions.verify(KEY, &a));
        assert!(sessions.verify(KEY, &b), "only that session ends");
    }

    #[test]
    fn an_expired_session_is_refused() {
        let sessions = ConsoleSessions::with_lifetime(Duration::ZERO);
        let token = sessions.issue(KEY).unwrap();
        std::thread::sleep(Duration::from_millis(1_100));
        assert!(!sessions.verify(KEY, &token));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_on_https() {
        let sessions = ConsoleSessions::default();
        let plain = sessions.set_cookie("tok", false);
        assert!(plain.starts_with("gatewarden_admin=tok;"), "{plain}");
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
            assert!(plain.contains(attribute), "{attribute} in {plain}");
        }
        assert!(!plain.contains("Secure"), "{plain}");
        let secure = sessions.set_cookie("tok", true);
        assert!(
            secure.starts_with("__Host-gatewarden_admin=tok;"),
            "{secure}"
        );
        assert!(secure.contains("; Secure"), "{secure}");
        let clear = clear_cookie(false);
        assert!(clear.starts_with("gatewarden_admin=;"), "{clear}");
        assert!(clear.contains("Max-Age=0"), "{clear}");

        let req = request("GET", &[("cookie", "a=1; gatewarden_admin=tok")]);
        assert_eq!(sessions.token(&req, false), Some("tok"));
        assert_eq!(sessions.token(&req, true), None);
    }

    #[test]
    fn writes_need_this_origin_and_the_console_header() {
        let host = ("host", "127.0.0.1:9090");
        let ok = request(
            "POST",
            &[
                host,
                ("origin", "http://127.0.0.1:9090"),
                (WRITE_HEADER, "1"),
            ],
        );
        assert!(console_write(&ok));
        for refused in [
            // Another site's page: it could send neither, but each is checked.
            request(
                "POST",
                &[host, ("origin", "http://evil.example"), (WRITE_HEADER, "1")],
            ),
            request("POST", &[host, ("origin", "null"), (WRITE_HEADER, "1")]),
            // A form from this origin, without the script's header.
            request("POST", &[host, ("origin", "http://127.0.0.1:9090")]),
            // No Origin at all.
            request("POST", &[host, (WRITE_HEADER, "1")]),
        ] {
            assert!(!console_write(&refused), "{:?}", refused.headers);
        }
        assert!(sign_in_allowed(&request("POST", &[host])));
        assert!(sign_in_allowed(&request(
            "POST",
            &[host, ("origin", "http://127.0.0.1:9090")]
        )));
        assert!(!sign_in_allowed(&request(
            "POST",
            &[host, ("origin", "http://evil.example")]
        )));
    }
}
