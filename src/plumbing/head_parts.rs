//! Editing a request or response head as `http`'s own parts, without Pingora's second
//! map of header name spellings.
//!
//! Plugins edit heads as [`http::request::Parts`] and [`http::response::Parts`], so the
//! chain's hooks need the round trip anyway; the gateway's own edits (forwarding
//! headers, `X-Request-Id`) ride on the same one. Pingora's `insert_header` parses the
//! name it is given (copying any name outside the standard set) and updates both maps,
//! growing each as needed; editing the `http` map inserts prebuilt names without a copy,
//! into room reserved once. The spelling map is dropped rather than kept in step. What
//! changes on the wire is the spelling: Pingora then writes a dozen common names in
//! Title-Case and all others in lowercase, as HAProxy and Envoy do (field names are
//! case-insensitive, RFC 9110 section 5.1).

use gatewarden_plugins::{RequestParts, ResponseParts};
use pingora::prelude::*;
use pingora_http::{RequestHeader, ResponseHeader};

/// Runs `edit` on the upstream request as `http`'s own head, and leaves the request
/// without Pingora's map of the client's header name spellings.
pub(crate) fn without_case_map(
    upstream: &mut RequestHeader,
    edit: impl FnOnce(&mut RequestParts),
) -> Result<()> {
    // The URI is all that survives the trip through `http`'s parts; a target it does not
    // reproduce (absolute-form, or not UTF-8) is kept aside and put back.
    let from_uri = upstream
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str().as_bytes() == upstream.raw_path());
    let target = (!from_uri).then(|| upstream.raw_path().to_vec());
    let send_end_stream = upstream.send_end_stream();
    let blank = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = http::request::Parts::from(std::mem::replace(upstream, blank));
    edit(&mut parts);
    *upstream = RequestHeader::from(parts);
    if let Some(target) = target {
        upstream.set_raw_path(&target)?;
    }
    if let Some(end) = send_end_stream {
        upstream.set_send_end_stream(end);
    }
    Ok(())
}

/// [`without_case_map`] for the response to the client: its header names go out in
/// the same spelling (clients of HTTP/2 already get every name in lowercase).
pub(crate) fn response_without_case_map(
    resp: &mut ResponseHeader,
    edit: impl FnOnce(&mut ResponseParts),
) {
    // `http`'s parts have no reason phrase; an upstream's own one is put back.
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let blank = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(resp, blank));
    edit(&mut parts);
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        // Never fails: Pingora does not check the phrase.
        let _ = resp.set_reason_phrase(reason.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarding::{X_REAL_IP, X_REQUEST_ID};
    use http::header::HeaderValue;

    fn wire(req: &RequestHeader) -> String {
        let mut buf = Vec::new();
        req.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn editing_without_the_case_map_keeps_everything_but_the_spelling() {
        let mut req = RequestHeader::build("POST", b"/a/b?c=%2F&d", None).unwrap();
        req.append_header("Content-Type", "text/plain").unwrap();
        req.append_header("X-Client-Thing", "1").unwrap();
        req.append_header("X-Client-Thing", "2").unwrap();
        req.extensions_mut().insert(7u32);
        without_case_map(&mut req, |h| {
            h.headers
                .insert(X_REAL_IP.clone(), HeaderValue::from_static("192.0.2.1"));
        })
        .unwrap();
        assert!(!req.has_case());
        assert_eq!(req.method, http::Method::POST);
        assert_eq!(req.raw_path(), b"/a/b?c=%2F&d");
        assert_eq!(req.extensions.get::<u32>(), Some(&7));
        assert_eq!(
            wire(&req),
            "Content-Type: text/plain\r\nx-client-thing: 1\r\nx-client-thing: 2\r\n\
             x-real-ip: 192.0.2.1\r\n"
        );
        // Later edits through Pingora's own calls still work.
        req.insert_header("X-Later", "yes").unwrap();
        assert_eq!(req.headers["x-later"], "yes");
    }

    #[test]
    fn a_target_the_uri_cannot_reproduce_survives_the_edit() {
        for target in [&b"http://example.com/a/../b?q"[..], b"/caf\xe9?x=\xff"] {
            let mut req = RequestHeader::build("GET", target, None).unwrap();
            let uri_before = req.uri.clone();
            without_case_map(&mut req, |_| {}).unwrap();
            assert_eq!(req.raw_path(), target);
            assert_eq!(req.uri, uri_before);
        }
    }

    #[test]
    fn a_response_keeps_its_own_reason_phrase_through_the_edit() {
        for (status, reason) in [(200, "Fine By Me"), (404, "Not Found")] {
            let mut resp = ResponseHeader::build(status, None).unwrap();
            resp.set_reason_phrase(Some(reason)).unwrap();
            resp.append_header("Server", "up").unwrap();
            response_without_case_map(&mut resp, |h| {
                h.headers
                    .insert(X_REQUEST_ID.clone(), HeaderValue::from_static("r1"));
            });
            assert!(!resp.has_case());
            assert_eq!(resp.status, status);
            assert_eq!(resp.get_reason_phrase(), Some(reason));
            assert_eq!(resp.headers["server"], "up");
            assert_eq!(resp.headers["x-request-id"], "r1");
        }
    }

    #[test]
    fn http2_end_of_stream_choice_survives_the_edit() {
        let mut req = RequestHeader::build_no_case("GET", b"/", None).unwrap();
        req.set_version(http::Version::HTTP_2);
        req.set_send_end_stream(false);
        without_case_map(&mut req, |_| {}).unwrap();
        assert_eq!(req.send_end_stream(), Some(false));
        assert_eq!(req.version, http::Version::HTTP_2);
    }
}
