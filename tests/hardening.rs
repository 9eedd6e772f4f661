//! Hostile and idle clients, measured: slow-loris connections must not starve everyone else,
//! idle connections close after `idle_timeout` (heads after `header_read_timeout`), requests in
//! flight are never cut by either, and a client that does not read its response is closed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLOW_CLIENTS: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_loris_connections_do_not_starve_a_normal_client() {
    let gw = TestGateway::start(config(
        "header_read_timeout = \"20s\"",
        "[[routes]]\nprefix = \"/\"\nauth = false\nrespond = { status = 200, body = \"ok\" }\n",
    ))
    .await;
    let addr = gw.addr;

    // Each slow client sends an incomplete head and then one more header byte every 200 ms.
    let mut slow = Vec::with_capacity(SLOW_CLIENTS);
    for _ in 0..SLOW_CLIENTS {
        let mut stream = TcpStream::connect(addr).await.expect("connect slow client");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..50 {
            for stream in slow.iter_mut() {
                let _ = stream.write_all(b"a").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slow
    });

    let mut latencies = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        let reply = get(addr, "/", &[]).await;
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 200);
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    println!("with {SLOW_CLIENTS} slow-loris connections open: p50 {p50:?}, p99 {p99:?}");
    assert!(
        p99 < Duration::from_millis(50),
        "p99 {p99:?} with {SLOW_CLIENTS} slow clients"
    );
    trickle.abort();
}

// ---- Idle keep-alive connections, started heads, and requests in flight ----

const FIXED_ROUTE: &str =
    "[[routes]]\nprefix = \"/\"\nauth = false\nrespond = { status = 200, body = \"ok\" }\n";

/// Sends a keep-alive `GET path` on `stream` and reads exactly one response.
async fn exchange(stream: &mut TcpStream, path: &str) -> Reply {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_one_response(stream).await
}

async fn read_one_response(stream: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(reply) = parse_reply(&buf) {
            return reply;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a response within 10s")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How long until the gateway closes `stream` (EOF or reset), reading and discarding data.
async fn time_until_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
    read_until_closed(stream, limit).await.0
}

/// How long until the gateway closes `stream` (EOF or reset), and what it wrote until then.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut chunk = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(started.elapsed()),
            stream.read(&mut chunk),
        )
        .await
        {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `got` is one 408 `request_timeout` envelope that closes the connection.
#[track_caller]
fn assert_head_timeout_reply(got: &[u8]) {
    let reply = parse_reply(got)
        .unwrap_or_else(|| panic!("no response in {:?}", String::from_utf8_lossy(got)));
    assert_eq!(reply.status, 408, "{}", reply.shown());
    assert_eq!(reply.header("connection"), Some("close"));
    let v = reply.json();
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert_generated_id(reply.header("x-request-id").expect("X-Request-Id"));
    assert_eq!(v["request_id"], reply.header("x-request-id").unwrap());
}

/// `closed` (time until the gateway closed the connection) is within the bound: not before
/// `early_ms`, and before `late_ms`.
#[track_caller]
fn assert_closed_between(closed: Duration, early_ms: u64, late_ms: u64) {
    assert!(
        closed >= Duration::from_millis(early_ms),
        "closed early: {closed:?}"
    );
    assert!(
        closed < Duration::from_millis(late_ms),
        "closed late: {closed:?}"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_idle_timeout_not_header_read_timeout() {
    // Longer idle than header bound: hyper's own header timer used to close it at 200 ms.
    let gw = TestGateway::start(config(
        "header_read_timeout = \"200ms\"\nidle_timeout = \"800ms\"",
        FIXED_ROUTE,
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(exchange(&mut stream, "/").await.status, 200);
    let closed = time_until_closed(&mut stream, Duration::from_secs(5)).await;
    println!("idle_timeout 800ms, header_read_timeout 200ms: closed after {closed:?}");
    assert_closed_between(closed, 750, 1_800);

    // Shorter idle than header bound.
    let gw = TestGateway::start(config(
        "header_read_timeout = \"5s\"\nidle_timeout = \"300ms\"",
        FIXED_ROUTE,
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(exchange(&mut stream, "/").await.status, 200);
    let closed = time_until_closed(&mut stream, Duration::from_secs(5)).await;
    println!("idle_timeout 300ms, header_read_timeout 5s: closed after {closed:?}");
    assert_closed_between(closed, 250, 1_300);
}

#[tokio::test]
async fn a_head_started_on_a_kept_alive_connection_gets_header_read_timeout() {
    let gw = TestGateway::start(config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"",
        FIXED_ROUTE,
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(exchange(&mut stream, "/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Idle for longer than the header bound, and still open: a second request is served.
    assert_eq!(exchange(&mut stream, "/").await.status, 200);
    stream
        .write_all(b"GET /slow-head HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let (closed, got) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    println!("a started head, header_read_timeout 300ms: closed after {closed:?}");
    assert_closed_between(closed, 250, 1_300);
    assert_head_timeout_reply(&got);
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_gets_header_read_timeout() {
    let gw = TestGateway::start(config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"",
        FIXED_ROUTE,
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let (closed, got) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    println!("silent new connection, header_read_timeout 300ms: closed after {closed:?}");
    assert_closed_between(closed, 250, 1_300);
    // No 408 to a connection that asked nothing (browsers open spare ones).
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

/// An upstream whose `/slow…` answers take `SLOW_UPSTREAM`.
const SLOW_UPSTREAM: Duration = Duration::from_millis(1_200);

async fn slow_upstream_gateway(server_extra: &str) -> TestGateway {
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path().starts_with("/slow") {
            tokio::time::sleep(SLOW_UPSTREAM).await;
        }
        Response::new(Full::new(Bytes::from_static(b"upstream")))
    })
    .await;
    TestGateway::start(config(
        server_extra,
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\ntimeout = \"5s\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await
}

#[tokio::test]
async fn a_slow_request_in_flight_is_not_cut_by_idle_timeout() {
    let gw =
        slow_upstream_gateway("header_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"").await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let reply = exchange(&mut stream, "/slow").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "upstream");
    assert!(started.elapsed() >= SLOW_UPSTREAM);
    // The same connection serves the next request, then idles out.
    assert_eq!(exchange(&mut stream, "/fast").await.status, 200);
    let closed = time_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        closed >= Duration::from_millis(250),
        "closed early: {closed:?}"
    );
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// An h2c (prior knowledge) client connection; the handle resolves when the connection ends.
/// With `ping`, the client sends HTTP/2 PINGs every 100 ms, also while idle.
async fn h2c(addr: std::net::SocketAddr, ping: bool) -> (H2Sender, tokio::task::JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if ping {
        builder
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true);
    }
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    let ended = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, ended)
}

async fn h2_get(sender: &mut H2Sender, addr: std::net::SocketAddr, path: &str) -> (u16, Bytes) {
    let request = Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("h2 response");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

#[tokio::test]
async fn h2c_idle_connections_close_after_idle_timeout_and_pings_do_not_keep_them() {
    let gw = TestGateway::start(config(
        "header_read_timeout = \"200ms\"\nidle_timeout = \"700ms\"",
        FIXED_ROUTE,
    ))
    .await;
    for ping in [false, true] {
        let (mut sender, ended) = h2c(gw.addr, ping).await;
        assert_eq!(h2_get(&mut sender, gw.addr, "/").await.0, 200);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("h2c connection closed within 5s")
            .unwrap();
        let closed = started.elapsed();
        println!("h2c idle (client pings: {ping}), idle_timeout 700ms: closed after {closed:?}");
        assert_closed_between(closed, 650, 1_700);
    }
}

#[tokio::test]
async fn h2c_slow_requests_in_flight_are_not_cut_by_idle_timeout() {
    let gw =
        slow_upstream_gateway("header_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"").await;
    let (sender, ended) = h2c(gw.addr, false).await;
    let addr = gw.addr;
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let mut sender = sender.clone();
            tokio::spawn(async move { h2_get(&mut sender, addr, "/slow").await })
        })
        .collect();
    for stream in streams {
        let (status, body) = stream.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(&body[..], b"upstream");
    }
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
}

// ---- Clients that do not read their responses ----

/// An upstream answering every request with `size` bytes, and the number of its connections
/// still open.
async fn big_upstream(size: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let body = Bytes::from(vec![b'x'; size]);
    let open = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            let counter = counter.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

const BIG_BODY: usize = 32 * 1024 * 1024;

async fn big_upstream_gateway() -> (TestGateway, Arc<AtomicUsize>) {
    let (up, open) = big_upstream(BIG_BODY).await;
    let gw = TestGateway::start(config(
        "body_read_timeout = \"500ms\"\nidle_timeout = \"30s\"",
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/big\"\nupstream = \"up\"\nauth = false\n{FIXED_ROUTE}"
        ),
    ))
    .await;
    (gw, open)
}

/// Waits until the upstream has no connection open.
async fn upstream_released(open: &AtomicUsize, limit: Duration) {
    let started = Instant::now();
    while open.load(Ordering::SeqCst) > 0 {
        assert!(
            started.elapsed() < limit,
            "upstream connection still open after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_client_that_never_reads_its_response_is_closed_and_the_upstream_released() {
    let (gw, open) = big_upstream_gateway().await;
    // A small receive window, so the kernel does not soak up the response for the client.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader = socket.connect(gw.addr).await.unwrap();
    reader
        .write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    while open.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "never proxied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Meanwhile everyone else is served.
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    upstream_released(&open, Duration::from_secs(5)).await;
    let released = started.elapsed();
    println!(
        "h1 client never reading (body_read_timeout 500ms): upstream released after {released:?}"
    );
    assert!(released >= Duration::from_millis(450), "{released:?}");

    // The client finds its connection closed before the whole body.
    let mut received = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), reader.read(&mut chunk))
            .await
            .expect("closed, not still streaming")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    println!("it had received {received} of {BIG_BODY} bytes");
    assert!(received < BIG_BODY, "{received}");
    assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn an_h2_client_that_grants_no_window_is_closed_and_the_upstream_released() {
    let (gw, open) = big_upstream_gateway().await;
    let (mut sender, ended) = h2c(gw.addr, false).await;
    let request = Request::get(format!("http://{}/big", gw.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let started = Instant::now();
    // The head arrives; the body is never read, so the client never opens its window.
    let response = sender.send_request(request).await.expect("response head");
    assert_eq!(response.status(), 200);
    upstream_released(&open, Duration::from_secs(5)).await;
    let released = started.elapsed();
    println!(
        "h2 client granting no window (body_read_timeout 500ms): upstream released after {released:?}"
    );
    assert!(released >= Duration::from_millis(450), "{released:?}");
    tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the h2 connection was closed")
        .unwrap();
    drop(response);
    assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn a_trickled_first_head_is_closed_at_header_read_timeout() {
    let gw = TestGateway::start(config(
        "header_read_timeout = \"400ms\"\nidle_timeout = \"10s\"",
        FIXED_ROUTE,
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    // One more byte every 50 ms, as slowloris does; the reads and writes go on until the
    // close, as a client that pays no attention to the answer.
    let mut chunk = [0u8; 256];
    let mut got = Vec::new();
    let mut answered = None;
    let closed = loop {
        let _ = stream.write_all(b"a").await;
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => {
                answered.get_or_insert(started.elapsed());
                got.extend_from_slice(&chunk[..n]);
            }
            Err(_) => assert!(started.elapsed() < Duration::from_secs(5), "still open"),
        }
    };
    println!(
        "trickled first head, header_read_timeout 400ms: answered after {answered:?}, \
         closed after {closed:?}"
    );
    let answered = answered.expect("a 408 before the close");
    assert!(
        answered >= Duration::from_millis(350),
        "answered early: {answered:?}"
    );
    // Not twice the bound: a graceful shutdown would wait for this head to complete.
    assert!(
        answered < Duration::from_millis(750),
        "answered late: {answered:?}"
    );
    assert_head_timeout_reply(&got);
    assert!(
        closed < answered + Duration::from_millis(300),
        "no end of the response: {closed:?}"
    );
    // The gateway goes on reading what the client still sends for a while (so the 408 is
    // not lost to a reset), then drops the connection: within header_read_timeout (at most
    // 1 s). Dropped, its socket answers the next byte with a reset, and a write fails.
    let dropped = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if stream.write_all(b"a").await.is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never dropped");
    };
    println!("dropped after {dropped:?}");
    assert!(
        dropped > answered + Duration::from_millis(300),
        "dropped early (no lingering read): {dropped:?}"
    );
    assert!(
        dropped < answered + Duration::from_millis(800),
        "dropped late: {dropped:?}"
    );
}

/// Reads until the peer closes (EOF or reset), within `limit`; returns when it closed.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the admin listener closes the connection");
    start.elapsed()
}

#[tokio::test]
async fn admin_connections_get_the_head_timeout_and_a_bounded_life() {
    let gw = TestGateway::start(config(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"800ms\"",
        "",
    ))
    .await;
    // Sends nothing: closed at the head timeout.
    let mut silent = TcpStream::connect(gw.admin).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");

    // Busy with a request every 100 ms: closed once its life is over, after a response.
    let mut kept = TcpStream::connect(gw.admin).await.unwrap();
    let opened = Instant::now();
    let mut served = 0;
    let mut buf = [0u8; 1024];
    'requests: loop {
        if kept
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .is_err()
        {
            break;
        }
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nok\n") {
            let read = tokio::time::timeout(Duration::from_secs(5), kept.read(&mut buf))
                .await
                .expect("a response or the close");
            match read {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => {
                    assert!(got.is_empty(), "closed halfway through a response");
                    break 'requests;
                }
            }
        }
        assert!(got.starts_with(b"HTTP/1.1 200 OK"));
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lived = opened.elapsed();
    assert!(served >= 3, "{served} requests served");
    assert!(
        lived >= Duration::from_millis(700) && lived < Duration::from_secs(5),
        "closed after {lived:?}"
    );
}

#[tokio::test]
async fn the_admin_listener_holds_a_bounded_number_of_connections() {
    let gw = TestGateway::start(config("", "")).await;
    let mut held = Vec::new();
    for _ in 0..tollgate::admin::MAX_CONNECTIONS {
        held.push(TcpStream::connect(gw.admin).await.unwrap());
    }
    // One more is closed at once instead of holding a descriptor.
    let mut extra = TcpStream::connect(gw.admin).await.unwrap();
    closed_within(&mut extra, Duration::from_secs(3)).await;
    // The ones held still work, and a freed place is taken again.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    first.read_to_end(&mut response).await.unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let reply = send_raw(
            gw.admin,
            b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        )
        .await;
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no place freed: {}",
            reply.status
        );
    }
}

#[tokio::test]
async fn an_h2_stream_granted_no_window_is_caught_while_its_siblings_flow() {
    let (gw, open) = big_upstream_gateway().await;
    // A connection window far larger than the stream's: the stalled stream holds 64 KiB of
    // it, and the other streams keep flowing.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_connection_window_size(64 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    let ended = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::get(format!("http://{}/big", gw.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let started = Instant::now();
    let response = sender.clone().send_request(request).await.expect("head");
    assert_eq!(response.status(), 200);
    // A small request every 50 ms on the same connection, each read to its end.
    let addr = gw.addr;
    let mut siblings = sender.clone();
    let traffic = tokio::spawn(async move {
        let mut served = 0;
        loop {
            let request = Request::get(format!("http://{addr}/"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let Ok(reply) = siblings.send_request(request).await else {
                return served;
            };
            if reply.into_body().collect().await.is_err() {
                return served;
            }
            served += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    upstream_released(&open, Duration::from_secs(5)).await;
    let released = started.elapsed();
    println!(
        "h2 stream granted no window, siblings flowing (body_read_timeout 500ms): upstream released after {released:?}"
    );
    assert!(released >= Duration::from_millis(450), "{released:?}");
    let served = tokio::time::timeout(Duration::from_secs(5), traffic)
        .await
        .expect("the connection was closed")
        .unwrap();
    assert!(served >= 5, "the siblings flowed: {served}");
    let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
    drop(response);
}
