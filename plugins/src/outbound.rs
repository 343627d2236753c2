//! Requests the gateway makes itself (a JWKS, OIDC discovery and token exchange): one
//! policy for the URLs it fetches trusted documents from, and one way to build the
//! client that fetches them.

use std::time::Duration;

/// Where a checked URL points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub https: bool,
    pub loopback: bool,
}

/// Checks a URL the gateway fetches trusted documents from: http(s) with a host, and
/// plain http only to loopback. `setting` names it in errors.
pub fn check_url(setting: &str, url: &str) -> Result<Destination, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{setting}: {url:?} is not a URL"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{setting}: {url:?} has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(Destination {
            https: true,
            loopback,
        }),
        Some("http") if loopback => Ok(Destination {
            https: false,
            loopback,
        }),
        Some("http") => Err(format!(
            "{setting}: use https; what is fetched over plain http could be replaced by anyone on the network"
        )),
        _ => Err(format!("{setting}: {url:?} must start with https://")),
    }
}

/// A client for `to`: every request bounded by `timeout`, at most `redirects` of them
/// followed and none from https to http, `HTTPS_PROXY`/`NO_PROXY` honoured except for
/// loopback (which no proxy can reach for us). Statuses are the caller's to judge.
pub fn agent(to: Destination, timeout: Duration, redirects: u32) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .https_only(to.https)
        .max_redirects(redirects)
        .http_status_as_error(false)
        .user_agent(concat!("gatewarden/", env!("CARGO_PKG_VERSION")));
    if to.loopback {
        config = config.proxy(None);
    }
    config.build().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert_eq!(
            check_url("u", "https://idp.example/jwks"),
            Ok(Destination {
                https: true,
                loopback: false
            })
        );
        assert_eq!(
            check_url("u", "http://127.0.0.1:8080/jwks"),
            Ok(Destination {
                https: false,
                loopback: true
            })
        );
        assert!(check_url("u", "http://[::1]/x").is_ok_and(|d| d.loopback));
        assert!(check_url("u", "http://localhost/x").is_ok());
        for bad in [
            "http://idp.example/jwks",
            "ftp://idp.example/",
            "not a url",
            "/jwks",
        ] {
            assert!(check_url("u", bad).is_err(), "{bad}");
        }
    }
}
