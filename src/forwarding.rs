//! What the upstream is told about the client, and what it is never told: the
//! forwarding headers the gateway sets (believed only from trusted proxies), the
//! client's copies it removes, and the request target and host it passes on.

use std::net::IpAddr;

use gatewarden_plugins::{spelling, value, IpText, RequestParts};
use http::header::{HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::prelude::*;
use pingora_error::ErrorType;
use pingora_http::RequestHeader;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// Headers some upstream frameworks take as the "real" URL; a client must never pick it.
pub(crate) static X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");
pub(crate) static X_REWRITE_URL: HeaderName = HeaderName::from_static("x-rewrite-url");
/// Headers some frameworks take as the "real" method. The gateway matched routes and
/// checked origins on the request's own method, so the upstream must act on that one.
pub(crate) static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

pub(crate) fn trusted(nets: &[IpNet], ip: IpAddr) -> bool {
    !nets.is_empty() && nets.iter().any(|n| n.contains(&ip))
}

/// The client behind a trusted proxy: the right-most address in `X-Forwarded-For` that
/// is not itself a trusted proxy. Unparsable entries stop the walk, since everything to
/// their left was written by someone we cannot vouch for.
pub(crate) fn client_behind_proxies(req: &RequestHeader, nets: &[IpNet], peer: IpAddr) -> IpAddr {
    let mut client = peer;
    for value in req.headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for entry in text.rsplit(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = ip.to_canonical();
                    client = ip;
                    if !trusted(nets, ip) {
                        return ip;
                    }
                }
                Err(_) => return client,
            }
        }
    }
    client
}

/// What a trusted proxy in front says about the request it hands on: the client behind
/// it, the request id it gave, and whether the client spoke HTTPS to it.
pub(crate) fn take_from_trusted_proxy(
    req: &RequestHeader,
    nets: &[IpNet],
    peer: IpAddr,
    ctx: &mut gatewarden_plugins::Ctx,
) {
    ctx.client_ip = client_behind_proxies(req, nets, peer);
    if let Some(id) = req
        .headers
        .get(&X_REQUEST_ID)
        .and_then(|v| gatewarden_plugins::RequestId::from_trusted(v.as_bytes()))
    {
        ctx.request_id = id;
    }
    if let Some(proto) = req.headers.get(&X_FORWARDED_PROTO) {
        ctx.https = proto.as_bytes().eq_ignore_ascii_case(b"https");
    }
}

/// `X-Forwarded-*`, with `_` for `-` anywhere (header names are lowercase here).
pub(crate) fn is_forwarding_header(name: &str) -> bool {
    spelling::has_variable_prefix(name.as_bytes(), b"x-forwarded-")
}

/// Whether a client's header (by its lowercase name) is removed before the upstream:
/// the ones the gateway sets itself, URL and method overrides, and, from an untrusted
/// peer, `Forwarded` and every other `X-Forwarded-*`: upstreams that trust the gateway
/// as their proxy believe them (Port, Prefix, Scheme, Ssl and Server build their links
/// and redirects). Each in every spelling that CGI, WSGI, PHP and Rack read as the same
/// header (`X-Forwarded_For` is their `X-Forwarded-For`).
pub(crate) fn must_not_pass(name: &str, peer_trusted: bool) -> bool {
    let gateway_sets = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &X_REAL_IP,
        &X_REQUEST_ID,
        &X_ORIGINAL_URL,
        &X_REWRITE_URL,
    ]
    .into_iter()
    .chain(&METHOD_OVERRIDES)
    .any(|n| spelling::same_variable(n.as_str().as_bytes(), name.as_bytes()));
    gateway_sets || (!peer_trusted && (name == FORWARDED.as_str() || is_forwarding_header(name)))
}

/// The `Host` value a request goes on with, and its new target when that changes too:
/// origin form for an absolute-form target, or an HTTP/2 `:authority` respelled.
pub(crate) fn canonical_target(
    req: &RequestHeader,
    authority: &str,
    absolute_form: bool,
) -> Result<(HeaderValue, Option<http::Uri>)> {
    let host =
        HeaderValue::from_str(authority).or_err(ErrorType::InvalidHTTPHeader, "normalised Host")?;
    let uri = if absolute_form {
        let origin_form = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        Some(
            http::Uri::try_from(origin_form)
                .or_err(ErrorType::InvalidHTTPHeader, "origin-form target")?,
        )
    } else if req.uri.authority().is_some() {
        let mut parts = http::uri::Parts::default();
        parts.scheme = req.uri.scheme().cloned();
        parts.authority = Some(
            http::uri::Authority::try_from(authority)
                .or_err(ErrorType::InvalidHTTPHeader, "normalised authority")?,
        );
        parts.path_and_query = req.uri.path_and_query().cloned();
        Some(http::Uri::from_parts(parts).or_err(ErrorType::InvalidHTTPHeader, "request target")?)
    } else {
        None
    };
    Ok((host, uri))
}

/// What the gateway tells the upstream about one request.
pub(crate) struct Forwarding<'a> {
    pub peer_ip: IpAddr,
    /// The client as derived with `trusted_proxies`.
    pub client_ip: IpAddr,
    pub peer_trusted: bool,
    pub https: bool,
    /// The request's (normalised) host, for `Host` and `X-Forwarded-Host`.
    pub host: Option<HeaderValue>,
    pub request_id: HeaderValue,
    /// The gateway's own cookies, removed whatever the route.
    pub gateway_cookies: &'a [String],
}

impl Forwarding<'_> {
    /// Sets the forwarding headers on `upstream`, after removing every copy the client
    /// sent that the upstream must not see, then runs `then` on the request (the
    /// chain's upstream hooks). `room` is how many headers are about to be added.
    pub fn apply(
        self,
        upstream: &mut RequestHeader,
        room: usize,
        then: impl FnOnce(&mut RequestParts),
    ) -> Result<()> {
        let h = &upstream.headers;
        // Believed only from trusted proxies, otherwise replaced.
        let peer = IpText::new(self.peer_ip);
        let priors = self.peer_trusted.then(|| h.get_all(&X_FORWARDED_FOR));
        let prior_texts = || {
            priors
                .iter()
                .flat_map(|all| all.iter())
                .filter_map(|v| v.to_str().ok())
        };
        let xff_len = prior_texts().map(|p| p.len() + 2).sum::<usize>() + peer.as_bytes().len();
        // (`or_err_with`: Pingora's `or_err` on an `Option` builds its error, one
        // allocation, even when there is a value.)
        let xff = value::header_value_with(xff_len, |out| {
            for prior in prior_texts() {
                out.extend_from_slice(prior.as_bytes());
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(peer.as_bytes());
        })
        .or_err_with(ErrorType::InvalidHTTPHeader, || "X-Forwarded-For")?;
        let real_ip = if self.client_ip == self.peer_ip {
            peer
        } else {
            IpText::new(self.client_ip)
        };
        let real_ip = value::header_value(real_ip.as_bytes())
            .or_err_with(ErrorType::InvalidHTTPHeader, || "X-Real-IP")?;
        let proto = if self.https { "https" } else { "http" };
        let forwarded_host = match (self.peer_trusted, h.get(&X_FORWARDED_HOST)) {
            (true, Some(v)) => Some(v.clone()),
            _ => self.host.clone(),
        };
        let (peer_trusted, gateway_cookies) = (self.peer_trusted, self.gateway_cookies);
        let (host, request_id) = (self.host, self.request_id);
        crate::plumbing::head_parts::without_case_map(upstream, |up| {
            let h = &mut up.headers;
            // One pass over the client's header names finds every copy the upstream must
            // not see; nothing is collected (or allocated) unless one is there.
            let spoofed: Vec<HeaderName> = h
                .keys()
                .filter(|n| must_not_pass(n.as_str(), peer_trusted))
                .cloned()
                .collect();
            for name in &spoofed {
                h.remove(name);
            }
            // The gateway's sessions are its own, whatever route this is.
            if !gateway_cookies.is_empty() {
                gatewarden_plugins::cookies::remove_cookies(h, gateway_cookies);
            }
            h.reserve(room);
            h.insert(X_FORWARDED_FOR.clone(), xff);
            h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
            if let Some(fh) = forwarded_host {
                h.insert(X_FORWARDED_HOST.clone(), fh);
            }
            h.insert(X_REAL_IP.clone(), real_ip);
            h.insert(X_REQUEST_ID.clone(), request_id);
            if let (false, Some(host)) = (h.contains_key(http::header::HOST), host) {
                h.insert(http::header::HOST, host);
            }
            then(up);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("X-Forwarded-For", "6.6.6.6, 203.0.113.9")
            .unwrap();
        req.append_header("X-Forwarded-For", "10.0.0.2").unwrap();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let client = client_behind_proxies(&req, &nets(&["10.0.0.0/8"]), peer);
        assert_eq!(client, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_address() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("X-Forwarded-For", "::ffff:203.0.113.9, ::ffff:10.0.0.2")
            .unwrap();
        let client =
            client_behind_proxies(&req, &nets(&["10.0.0.0/8"]), "10.0.0.1".parse().unwrap());
        assert_eq!(client, "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbage_in_forwarded_for_stops_the_walk() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("X-Forwarded-For", "6.6.6.6, junk, 10.0.0.3")
            .unwrap();
        let client =
            client_behind_proxies(&req, &nets(&["10.0.0.0/8"]), "10.0.0.1".parse().unwrap());
        assert_eq!(client, "10.0.0.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn every_forwarding_header_is_recognised() {
        for name in ["x-forwarded-port", "x-forwarded-prefix", "x_forwarded_ssl"] {
            assert!(is_forwarding_header(name), "{name}");
        }
        assert!(!is_forwarding_header("x-forwardedfor"));
        assert!(!is_forwarding_header("forwarded"));
    }
}
