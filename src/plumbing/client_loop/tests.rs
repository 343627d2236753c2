use super::*;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(start_paused = true)]
async fn an_idle_wait_past_pingoras_limit_takes_tokios_timer() {
    // Paused time moves tokio's timers only. On Pingora's clock this wait would take
    // 16 real minutes, and the bound would end the test first.
    let wait = Duration::from_secs(16 * 60);
    let ended = tokio::time::timeout(wait + Duration::from_secs(1), idle_timer(wait)).await;
    assert!(ended.is_ok());
}

#[tokio::test]
async fn a_short_idle_wait_ends_on_pingoras_timers() {
    let wait = idle_timer(Duration::from_millis(20));
    assert!(tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .is_ok());
}

#[tokio::test]
async fn a_trickled_head_fails_at_the_deadline_and_a_prompt_one_passes() {
    let limit = Duration::from_millis(300);
    let (client, server) = tokio::io::duplex(1024);
    let mut stream = ClientStream::new(Box::new(server), limit, 0);
    let started = tokio::time::Instant::now();
    let mut client = client;
    let trickle = tokio::spawn(async move {
        for b in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa" {
            if client.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut buf = [0u8; 64];
    let err = loop {
        match stream.read(&mut buf).await {
            Ok(0) => panic!("the client closed"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    trickle.abort();

    let (mut client, server) = tokio::io::duplex(1024);
    let mut stream = ClientStream::new(Box::new(server), limit, 0);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(n, 27);
    // A body or stream that follows may take as long as it likes.
    tokio::time::sleep(limit * 2).await;
    client.write_all(b"later").await.unwrap();
    assert_eq!(stream.read(&mut buf).await.unwrap(), 5);
}

#[tokio::test]
async fn a_request_read_ahead_is_served_to_the_next_reads_and_then_let_go() {
    let (mut client, server) = tokio::io::duplex(8192);
    let mut stream = ClientStream::new(Box::new(server), Duration::from_secs(1), 0);

    // Nothing sent yet: waiting holds no buffer.
    let waiting = poll_fn(|cx| Poll::Ready(stream.poll_read_ahead(cx))).await;
    assert!(waiting.is_pending());
    assert_eq!(stream.ahead.bytes.capacity(), 0);

    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    client.write_all(request).await.unwrap();
    let n = poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap();
    assert_eq!(n, request.len());
    // Asked again, it reports what is waiting without reading more.
    assert_eq!(poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap(), n);

    // Served in parts to a reader with little room, then from the socket again.
    let mut first = [0u8; 10];
    assert_eq!(stream.read(&mut first).await.unwrap(), 10);
    let mut rest = vec![0u8; 100];
    let m = stream.read(&mut rest).await.unwrap();
    assert_eq!([&first[..], &rest[..m]].concat(), request);
    assert_eq!(stream.ahead.bytes.capacity(), 0, "let go once read");
    client.write_all(b"more").await.unwrap();
    assert_eq!(stream.read(&mut rest).await.unwrap(), 4);

    // A client that closes reads ahead nothing.
    drop(client);
    assert_eq!(poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap(), 0);
    assert_eq!(stream.ahead.bytes.capacity(), 0);
}

#[tokio::test]
async fn debug_output_shows_no_request_or_response_bytes() {
    let (mut client, server) = tokio::io::duplex(1024);
    let mut stream = ClientStream::new(Box::new(server), Duration::from_secs(1), 1460);
    client
        .write_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer sk-secret\r\n\r\n")
        .await
        .unwrap();
    poll_fn(|cx| stream.poll_read_ahead(cx)).await.unwrap();
    stream
        .write_all(b"set-cookie: gw_session=secret")
        .await
        .unwrap();
    let shown = format!("{stream:?}");
    // Neither as text nor as the numbers a derived `Debug` prints for bytes.
    let as_numbers = format!("{:?}", b"secret");
    let as_numbers = as_numbers.trim_matches(|c| c == '[' || c == ']');
    assert!(!shown.contains("secret"), "{shown}");
    assert!(!shown.contains(as_numbers), "{shown}");
    assert!(shown.contains("bytes unread"), "{shown}");
}

/// A peer that records the size of every write it is handed.
#[derive(Debug, Default)]
struct Sends {
    sizes: Vec<usize>,
    bytes: Vec<u8>,
    /// The peer is gone: every send fails.
    broken: bool,
    /// Most bytes one send takes.
    most: usize,
}

#[derive(Debug)]
struct Recorder(Arc<std::sync::Mutex<Sends>>);

impl AsyncRead for Recorder {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Takes few bytes a call (1000 unless a test says otherwise), so partial
        // sends are exercised too.
        let mut sends = self.0.lock().unwrap();
        if sends.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut n = 0;
        for slice in data {
            let take = slice.len().min(sends.most - n);
            sends.bytes.extend_from_slice(&slice[..take]);
            n += take;
        }
        sends.sizes.push(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// What a `Stream` must be besides readable and writable; nothing of it is used.
#[async_trait]
impl Shutdown for Recorder {
    async fn shutdown(&mut self) {}
}
impl UniqueID for Recorder {
    fn id(&self) -> UniqueIDType {
        0
    }
}
impl Ssl for Recorder {}
impl GetTimingDigest for Recorder {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}
impl GetProxyDigest for Recorder {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}
impl GetSocketDigest for Recorder {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}
impl Peek for Recorder {}

fn recorded(capacity: usize) -> (ClientStream, Arc<std::sync::Mutex<Sends>>) {
    let sends = Arc::new(std::sync::Mutex::new(Sends {
        most: 1000,
        ..Sends::default()
    }));
    let stream = ClientStream::new(
        Box::new(Recorder(sends.clone())),
        Duration::from_secs(1),
        capacity,
    );
    (stream, sends)
}

#[tokio::test]
async fn small_writes_leave_in_one_send_and_the_buffer_is_let_go_once_sent() {
    let (mut stream, sends) = recorded(1460);
    stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    stream.write_all(b"ok\n").await.unwrap();
    assert!(sends.lock().unwrap().sizes.is_empty());
    assert!(stream.out.bytes.capacity() >= 1460);
    stream.flush().await.unwrap();
    assert_eq!(sends.lock().unwrap().sizes, [22]);
    assert_eq!(sends.lock().unwrap().bytes, b"HTTP/1.1 200 OK\r\n\r\nok\n");
    assert_eq!(stream.out.bytes.capacity(), 0, "held while idle");

    // The next response takes the buffer back from this thread's spares.
    stream.write_all(b"again").await.unwrap();
    assert!(stream.out.bytes.capacity() >= 1460);
    stream.flush().await.unwrap();
    assert_eq!(sends.lock().unwrap().sizes, [22, 5]);
}

#[tokio::test]
async fn writes_keep_their_order_around_the_buffer_and_through_partial_sends() {
    let (mut stream, sends) = recorded(100);
    let mut expected = Vec::new();
    for (i, len) in [10, 95, 3, 2500, 40, 60, 99, 100, 1]
        .into_iter()
        .enumerate()
    {
        let chunk = vec![b'a' + i as u8; len];
        stream.write_all(&chunk).await.unwrap();
        expected.extend_from_slice(&chunk);
    }
    let slices = [b"5\r\n".as_slice(), b"hello", b"\r\n"];
    let ios: Vec<io::IoSlice<'_>> = slices.iter().map(|s| io::IoSlice::new(s)).collect();
    assert!(stream.is_write_vectored());
    let n = stream.write_vectored(&ios).await.unwrap();
    assert_eq!(n, 10);
    expected.extend_from_slice(b"5\r\nhello\r\n");
    Shutdown::shutdown(&mut stream).await;
    let sends = sends.lock().unwrap();
    assert_eq!(sends.bytes, expected);
    // 2500 bytes went straight through, a thousand at a time.
    assert!(sends.sizes.contains(&1000), "{:?}", sends.sizes);
}

#[tokio::test]
async fn a_head_and_a_large_body_leave_in_one_send() {
    let (mut stream, sends) = recorded(100);
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n";
    stream.write_all(head).await.unwrap();
    stream.write_all(&[b'x'; 500]).await.unwrap();
    stream.flush().await.unwrap();
    assert_eq!(sends.lock().unwrap().sizes, [head.len() + 500]);
    assert_eq!(stream.out.bytes.capacity(), 0);

    // Larger than one send takes: the rest follows, in order.
    let (mut stream, sends) = recorded(100);
    stream.write_all(head).await.unwrap();
    stream.write_all(&[b'y'; 2500]).await.unwrap();
    let sends = sends.lock().unwrap();
    assert_eq!(sends.sizes, [1000, 1000, head.len() + 500]);
    assert_eq!(&sends.bytes[..head.len()], head);
    assert!(sends.bytes[head.len()..].iter().all(|&b| b == b'y'));
}

#[tokio::test]
async fn what_is_buffered_is_sent_when_the_stream_is_dropped() {
    let (mut stream, sends) = recorded(1460);
    stream
        .write_all(b"HTTP/1.1 200 OK\r\n\r\npart of a body")
        .await
        .unwrap();
    assert!(sends.lock().unwrap().bytes.is_empty());
    drop(stream);
    assert_eq!(
        sends.lock().unwrap().bytes,
        b"HTTP/1.1 200 OK\r\n\r\npart of a body"
    );
}

#[tokio::test]
async fn with_no_buffer_every_write_goes_straight_through() {
    let (mut stream, sends) = recorded(0);
    stream.write_all(b"head").await.unwrap();
    stream.write_all(b"body").await.unwrap();
    assert_eq!(sends.lock().unwrap().sizes, [4, 4]);
    assert_eq!(stream.out.bytes.capacity(), 0);
}

#[tokio::test]
async fn the_flushes_of_one_turn_leave_in_one_send_before_the_session_waits() {
    let (stream, sends) = recorded(1460);
    let conn = SharedStream::new(stream);
    let mut session = conn.clone();
    let (more, wait_for_more) = tokio::sync::oneshot::channel::<()>();
    // A chunked response as Pingora writes it: the head, flushed because it has
    // no length; a chunk, flushed; then the wait for the upstream's next read.
    let served = async move {
        session.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
        session.flush().await?;
        session.write_all(b"5\r\nhello\r\n").await?;
        session.flush().await?;
        let _ = wait_for_more.await;
        session.write_all(b"0\r\n\r\n").await?;
        session.flush().await?;
        io::Result::Ok(())
    };
    let mut turns = pin!(in_turns(&conn, served));
    let first = poll_fn(|cx| Poll::Ready(turns.as_mut().poll(cx))).await;
    assert!(first.is_pending());
    {
        let sends = sends.lock().unwrap();
        assert_eq!(sends.sizes, [29], "both flushes made in one send");
        assert_eq!(sends.bytes, b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n");
    }
    more.send(()).unwrap();
    turns.await.unwrap();
    assert_eq!(
        sends.lock().unwrap().sizes,
        [29, 5],
        "sent as the turn ended"
    );
    assert!(send_the_rest(&conn).await);
    assert_eq!(sends.lock().unwrap().sizes, [29, 5], "nothing left to send");
}

#[tokio::test]
async fn the_session_hears_of_a_deferred_send_that_failed_at_its_next_write() {
    let (stream, sends) = recorded(1460);
    let conn = SharedStream::new(stream);
    let mut session = conn.clone();
    session.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    session.flush().await.unwrap();
    assert!(
        sends.lock().unwrap().sizes.is_empty(),
        "the flush is deferred"
    );

    sends.lock().unwrap().broken = true;
    let owed = poll_fn(|cx| conn.lock().poll_owed_flush(cx)).await;
    assert_eq!(owed.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    assert_eq!(
        conn.lock().out.bytes.capacity(),
        0,
        "what was unsent is let go"
    );
    let next = session.write_all(b"more").await;
    assert_eq!(next.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    assert_eq!(
        session.flush().await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
    assert!(!send_the_rest(&conn).await, "the connection is not kept");
}

#[tokio::test]
async fn a_chunked_page_written_in_one_turn_leaves_in_one_send() {
    let (stream, sends) = recorded(1460);
    sends.lock().unwrap().most = usize::MAX;
    let conn = SharedStream::new(stream);
    let mut session = conn.clone();
    let page = vec![b'p'; 16 * 1024];
    let size_line = format!("{:X}\r\n", page.len());
    let served = async {
        session.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
        session.flush().await?;
        let chunk = [
            io::IoSlice::new(size_line.as_bytes()),
            io::IoSlice::new(&page),
            io::IoSlice::new(b"\r\n"),
        ];
        assert_eq!(session.write_vectored(&chunk).await?, page.len() + 8);
        session.flush().await?;
        session.write_all(b"0\r\n\r\n").await?;
        session.flush().await
    };
    in_turns(&conn, served).await.unwrap();
    assert!(send_the_rest(&conn).await);
    {
        let sends = sends.lock().unwrap();
        assert_eq!(sends.sizes, [19 + 16 * 1024 + 8 + 5]);
        assert!(sends.bytes.ends_with(b"pp\r\n0\r\n\r\n"));
    }

    // Without a flush owed, a large write still goes straight through.
    let (mut stream, sends) = recorded(1460);
    sends.lock().unwrap().most = usize::MAX;
    stream.defer_flushes = true;
    stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    stream.write_all(&page).await.unwrap();
    assert_eq!(sends.lock().unwrap().sizes, [19 + 16 * 1024]);
}

#[tokio::test]
async fn a_complete_response_is_sent_when_the_proxy_says_so() {
    let (stream, sends) = recorded(1460);
    let conn = SharedStream::new(stream);
    let mut session = conn.clone();
    session
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    session.flush().await.unwrap();
    assert!(
        sends.lock().unwrap().sizes.is_empty(),
        "the flush is deferred"
    );

    // As the proxy's logging hook sees it: the session's stream, boxed.
    let boxed: Stream = Box::new(session);
    send_owed(Some(&boxed));
    assert_eq!(sends.lock().unwrap().sizes, [27]);
    send_owed(Some(&boxed));
    assert_eq!(sends.lock().unwrap().sizes, [27], "nothing more was owed");

    // Other streams flush themselves; asking changes nothing.
    let (other, sends) = recorded(1460);
    let mut other: Stream = Box::new(other);
    other
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    send_owed(Some(&other));
    send_owed(None);
    assert!(sends.lock().unwrap().sizes.is_empty());
}
