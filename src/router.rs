//! Path normalisation and most-specific route matching.
//!
//! One normalised path serves both matching and the upstream request, so the gateway
//! and the upstream can never disagree about which resource was asked for.

use std::borrow::Cow;
use std::sync::Arc;

use crate::chain::Chain;
use crate::observe::RouteMetrics;
use crate::upstream::Pool;

/// Why a request path was refused (always 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("control character in path")]
    Control,
    #[error("encoded slash, backslash, semicolon or control character in path")]
    ForbiddenEscape,
    #[error("malformed percent-encoding in path")]
    BadEscape,
    #[error("path escapes the root")]
    EscapesRoot,
    #[error("dot segment with parameters in path")]
    DotParameters,
    #[error("path segment ends in a dot or a space")]
    SegmentEdge,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a request path (without its query): decodes percent-escapes of unreserved
/// characters, resolves `.` and `..`, collapses `//`. Refuses NUL and control characters,
/// `%2F`, `%5C`, `%3B`, raw backslashes, `..` above the root and dot segments hiding
/// behind `;parameters` (which some servers resolve). Borrows when the path is already
/// normal.
///
/// Also refused: a segment that ends in `.` or a space (`/admin./x`, `/admin%2e/x`,
/// `/admin%20/x`), which Windows, IIS and some frameworks read as the segment without
/// them, and `%3B`, which some servlet containers decode before they drop
/// `;parameters`: upstream, either would name another resource than the one matched.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut needs_work = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            0..=0x1f | 0x7f => return Err(PathError::Control),
            b'\\' => return Err(PathError::ForbiddenEscape),
            b'%' => needs_work = true,
            b'/' if bytes.get(i + 1) == Some(&b'/') => needs_work = true,
            b'.' if i > 0 && bytes[i - 1] == b'/' => needs_work = true,
            // A segment ending in a dot.
            b'.' if matches!(bytes.get(i + 1), None | Some(b'/' | b';')) => needs_work = true,
            _ => {}
        }
    }
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(bytes)?;
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = decoded.ends_with('/');
    for segment in decoded.split('/') {
        let bare = segment.split(';').next().unwrap_or("");
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
            }
            _ if bare == "." || bare == ".." => return Err(PathError::DotParameters),
            _ if bare.ends_with('.') || bare.ends_with("%20") => {
                return Err(PathError::SegmentEdge)
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || (trailing_slash && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Decodes `%XX` of unreserved characters; keeps other escapes (uppercased); refuses
/// escapes that would change the path's structure or smuggle control bytes.
fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (hi, lo) = match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => (hi, lo),
                _ => return Err(PathError::BadEscape),
            };
            let value = hi << 4 | lo;
            match value {
                b'/' | b'\\' | b';' | 0..=0x1f | 0x7f => return Err(PathError::ForbiddenEscape),
                v if is_unreserved(v) => out.push(v),
                _ => {
                    out.push(b'%');
                    out.push(bytes[i + 1].to_ascii_uppercase());
                    out.push(bytes[i + 2].to_ascii_uppercase());
                }
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Only ASCII bytes of the input and decoded unreserved ASCII were pushed.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

/// True when `path` is `prefix` or lies below it, ignoring ASCII case. `prefix` has no
/// trailing slash, except the root `/`, which matches everything.
///
/// Case is ignored because many upstreams ignore it (Express and ASP.NET route that
/// way, Windows file systems store that way): were `/ADMIN` not the `/admin` route, a
/// user could reach an admin page past the admin check. The path still goes upstream
/// as sent, so a case-sensitive upstream sees no change.
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    path.len() >= prefix.len()
        && path[..prefix.len()].eq_ignore_ascii_case(prefix)
        && path.get(prefix.len()).is_none_or(|&b| b == b'/')
}

/// The path routes are matched on: `;parameters` removed from every segment.
///
/// Servlet containers (Tomcat, Jetty) and frameworks on them drop path parameters
/// before routing, so `/admin;x/keys` is their `/admin/keys`; it must meet the
/// `/admin` route's access check here too. The upstream still gets the path as sent.
pub fn without_params(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(""));
    }
    Cow::Owned(out)
}

/// Access level of a route, enforced by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// How a route's path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Normalised, no trailing slash except for `/`.
    Prefix(String),
}

/// A host pattern: `chat.example.com` or `*.example.com` (any subdomain).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostMatch {
    Exact(String),
    Suffix(String),
}

impl HostMatch {
    pub fn parse(pattern: &str) -> HostMatch {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(rest) => HostMatch::Suffix(format!(".{rest}")),
            None => HostMatch::Exact(pattern),
        }
    }

    /// `host` is lowercase-insensitive and without port.
    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

/// A compiled route.
pub struct Route {
    pub name: Arc<str>,
    pub hosts: Vec<HostMatch>,
    pub path: PathMatch,
    /// Upper-case method names; empty means any.
    pub methods: Vec<http::Method>,
    /// Removed from the front of the path before it goes upstream.
    pub strip_prefix: Option<String>,
    pub access: Access,
    pub pool: Arc<Pool>,
    pub chain: Chain,
    pub max_request_body: u64,
    pub metrics: RouteMetrics,
}

impl Route {
    /// Sort key: most specific first. A route naming hosts beats one that does not (as
    /// a server block does in nginx), then an exact path beats any prefix, a longer
    /// prefix beats a shorter one, and naming methods beats allowing all.
    pub fn specificity(&self) -> (bool, bool, usize, bool) {
        let (exact, len) = match &self.path {
            PathMatch::Exact(p) => (true, p.len()),
            PathMatch::Prefix(p) => (false, p.len()),
        };
        (!self.hosts.is_empty(), exact, len, !self.methods.is_empty())
    }

    fn matches(&self, host: &str, path: &str, method: &http::Method) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => p.eq_ignore_ascii_case(path),
            PathMatch::Prefix(p) => under_prefix(path, p),
        };
        path_ok
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
            && (self.methods.is_empty() || self.methods.iter().any(|m| Self::serves(m, method)))
    }

    /// True when a route naming `named` serves `method`. A route for GET also takes
    /// HEAD: frameworks answer HEAD with their GET handler, so a HEAD that fell to a
    /// looser route would read the GET route's answer there (status and headers).
    fn serves(named: &http::Method, method: &http::Method) -> bool {
        named == method || (*named == http::Method::GET && *method == http::Method::HEAD)
    }

    /// The path to send upstream: the normalised path with `strip_prefix` removed.
    pub fn upstream_path<'a>(&self, path: &'a str) -> &'a str {
        match &self.strip_prefix {
            Some(prefix) if under_prefix(path, prefix) => {
                let rest = &path[prefix.len()..];
                if rest.is_empty() {
                    "/"
                } else {
                    rest
                }
            }
            _ => path,
        }
    }
}

/// Routes in match order.
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Orders `routes` by specificity; declaration order breaks no ties because compile
    /// refuses two routes with the same match.
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        Router { routes }
    }

    /// The most specific route for a normalised path; `host` without port.
    pub fn find(&self, host: &str, path: &str, method: &http::Method) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(host, path, method))
    }

    /// The plugin that answers a gateway path such as `/.gatewarden/login` for `host`:
    /// from the route the path itself matches, else from the most specific route for
    /// this host whose chain has a plugin claiming it.
    pub fn endpoint(&self, host: &str, path: &str) -> Option<Arc<dyn gatewarden_plugins::Plugin>> {
        let claims = |r: &Arc<Route>| r.chain.serving(path);
        if let Some(p) = self
            .routes
            .iter()
            .find(|r| r.matches(host, path, &http::Method::GET))
            .and_then(claims)
        {
            return Some(p);
        }
        self.routes
            .iter()
            .filter(|r| r.hosts.is_empty() || r.hosts.iter().any(|h| h.matches(host)))
            .find_map(claims)
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalize("/api/v1/chat").unwrap(),
            Cow::Borrowed(_)
        ));
        assert!(matches!(normalize("/a.b/c..d/").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn dots_and_double_slashes_resolve() {
        assert_eq!(normalize("/public/../admin").unwrap(), "/admin");
        assert_eq!(normalize("//admin").unwrap(), "/admin");
        assert_eq!(normalize("/a/./b//c/").unwrap(), "/a/b/c/");
        assert_eq!(normalize("/%2e%2e/admin"), Err(PathError::EscapesRoot));
        assert_eq!(normalize("/x/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(normalize("/a/..").unwrap(), "/");
        assert_eq!(normalize("/%7Euser/%41").unwrap(), "/~user/A");
        assert_eq!(normalize("/a%20b%c3%a9").unwrap(), "/a%20b%C3%A9");
    }

    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(normalize("/a%2Fb"), Err(PathError::ForbiddenEscape));
        assert_eq!(normalize("/a%2fb"), Err(PathError::ForbiddenEscape));
        assert_eq!(normalize("/a%5Cb"), Err(PathError::ForbiddenEscape));
        assert_eq!(normalize("/a%00b"), Err(PathError::ForbiddenEscape));
        assert_eq!(normalize("/a\\b"), Err(PathError::ForbiddenEscape));
        assert_eq!(normalize("/a\0b"), Err(PathError::Control));
        assert_eq!(normalize("/a\tb"), Err(PathError::Control));
        assert_eq!(normalize("/.."), Err(PathError::EscapesRoot));
        assert_eq!(normalize("/a/../.."), Err(PathError::EscapesRoot));
        assert_eq!(
            normalize("/public/..;/admin"),
            Err(PathError::DotParameters)
        );
        assert_eq!(normalize("/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        assert_eq!(
            normalize("/admin%3Bx/keys"),
            Err(PathError::ForbiddenEscape)
        );
    }

    #[test]
    fn segments_ending_in_a_dot_or_space_are_refused() {
        for path in [
            "/admin./x",
            "/admin%2e/x",
            "/admin%2E",
            "/admin../x",
            "/admin%2e%2e/x",
            "/admin%20/x",
            "/admin.;x/keys",
            "/a/b.",
        ] {
            assert_eq!(normalize(path), Err(PathError::SegmentEdge), "{path}");
        }
        for path in ["/a.b/c", "/v1.2/x", "/.well-known/x", "/a%20b/c", "/x/./y"] {
            assert!(normalize(path).is_ok(), "{path}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under_prefix("/admin", "/admin"));
        assert!(under_prefix("/admin/x", "/admin"));
        assert!(!under_prefix("/administrator", "/admin"));
        assert!(under_prefix("/anything", "/"));
    }

    #[test]
    fn prefixes_ignore_case_and_parameters_are_not_part_of_a_match() {
        assert!(under_prefix("/ADMIN", "/admin"));
        assert!(under_prefix("/Admin/keys", "/admin"));
        assert!(!under_prefix("/ADMINISTRATOR", "/admin"));
        assert!(!under_prefix("/adm", "/admin"));
        assert_eq!(without_params("/admin;x=1/keys"), "/admin/keys");
        assert_eq!(without_params("/admin;"), "/admin");
        assert_eq!(without_params("/a;b;c/d/"), "/a/d/");
        assert!(matches!(without_params("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn hosts_match_without_case_and_with_wildcards() {
        assert!(HostMatch::parse("Chat.Example.com").matches("chat.EXAMPLE.com"));
        let wild = HostMatch::parse("*.example.com");
        assert!(wild.matches("a.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
    }
}
