//! The benchmark switches (`GATEWARDEN_BENCH_OFF`): with each piece of plumbing off the
//! gateway still serves what it served, and `case_map` keeps the upstream's spelling of
//! header names, which shows the switch took effect.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::harness::*;

/// An upstream that answers every request on a connection with a header whose name
/// is spelled in mixed case, and `ok`.
fn mixed_case_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    // One head, without a body, per request.
                    let mut blank = false;
                    while !blank {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        blank = line.trim_end().is_empty();
                    }
                    let answer =
                        "HTTP/1.1 200 OK\r\nX-Mixed-Case: 1\r\nContent-Length: 2\r\n\r\nok";
                    if writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn spelling_of(resp: &RawResponse) -> String {
    resp.headers
        .iter()
        .map(|(n, _)| n.clone())
        .find(|n| n.eq_ignore_ascii_case("x-mixed-case"))
        .unwrap_or_else(|| panic!("no x-mixed-case in {resp:?}"))
}

#[test]
fn case_map_off_keeps_the_upstreams_spelling() {
    let upstream = mixed_case_upstream();
    let config = Config::new()
        .with_admin()
        .upstream("app", Upstream::to(upstream))
        .route(Route::public("app", "app"));
    let on = Gateway::start(&config);
    let off = Gateway::start_with(&config, &[("GATEWARDEN_BENCH_OFF", "case_map")]);
    assert_eq!(spelling_of(&get(on.addr, "/", &[])), "x-mixed-case");
    let resp = get(off.addr, "/", &[]);
    assert_eq!(spelling_of(&resp), "X-Mixed-Case");
    assert!(resp.header("x-request-id").is_some(), "{resp:?}");
    assert!(
        off.output()
            .contains("benchmark switches turned off case_map"),
        "{}",
        off.output()
    );
}

#[test]
fn with_every_switch_off_the_gateway_still_serves() {
    let up = Upstreams::start(1);
    let gw = Gateway::start_with(public(up.addr(0)), &[("GATEWARDEN_BENCH_OFF", "all")]);
    poll_until("the switches are logged", Duration::from_secs(5), || {
        gw.output()
            .contains("turned off client_loop, write_gathering, case_map")
    });
    // Two requests on one kept-alive connection, the second a POST with a body.
    let stream = TcpStream::connect(gw.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut conn = BufReader::new(stream);
    conn.get_mut()
        .write_all(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let first = read_response(&mut conn).unwrap();
    assert_eq!(first.status, 200);
    assert!(first.header("x-request-id").is_some());
    conn.get_mut()
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    let second = read_response(&mut conn).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["body"], "hello", "{second:?}");
    // A streamed response, event by event, then the connection closes.
    let sse = get(gw.addr, "/sse?n=3&interval_ms=50", &[]);
    assert_eq!(sse.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&sse.body).matches("data:").count(),
        3
    );
    // A large body, whole.
    let mut big = TcpStream::connect(gw.addr).unwrap();
    big.write_all(b"GET /bytes/1000000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = Vec::new();
    big.read_to_end(&mut all).unwrap();
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(all.len() - head_end, 1_000_000);
}
