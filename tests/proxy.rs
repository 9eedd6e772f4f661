//! Proxying and upstream failures (SPEC.md "Proxying", "Error envelopes"), over real sockets
//! against fault upstreams written here with raw tokio sockets: each failure's status, code,
//! request ID, and that nothing of the upstream leaks.

mod common;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// A gateway with one upstream `up` at `url` (plus `upstream_extra` lines) behind a public
/// catch-all route.
async fn gateway(url: &str, upstream_extra: &str, server_extra: &str) -> TestGateway {
    TestGateway::start(config(
        server_extra,
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"{url}\"\n{upstream_extra}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await
}

/// Asserts that `/metrics` counts `n` failures of `kind` for upstream `up`.
async fn assert_failures_counted(gw: &TestGateway, kind: &str, n: u64) {
    let metrics = get(gw.admin, "/metrics", &[]).await.text();
    let series =
        format!("tollgate_upstream_failures_total{{upstream=\"up\",kind=\"{kind}\"}} {n}\n");
    assert!(metrics.contains(&series), "no {series:?} in\n{metrics}");
}

/// An address nothing listens on: bound but not listening for the rest of the test
/// ([`refusing_addr`]), so no one else can take the port and answer.
fn closed_port() -> SocketAddr {
    refusing_addr()
}

/// A raw upstream: every accepted connection is handed to `behave`; returns its address and
/// the number of connections accepted so far.
async fn fault_upstream<F, Fut>(behave: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(behave(stream));
        }
    });
    (addr, accepted)
}

/// Answers `ok` to every request on one keep-alive upstream connection.
async fn serve_ok(stream: TcpStream) {
    let service = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Reads one request head (up to the blank line).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Text only the upstream knows; it must never reach the client in an error.
const UPSTREAM_SECRET: &str = "db-primary.internal stack trace";

/// Checks an upstream-failure envelope and returns its request ID: status, code, JSON, the
/// same ID in header and body, and nothing of the upstream (its body, its address).
fn assert_failure(reply: &Reply, status: u16, code: &str, upstream: SocketAddr) -> String {
    assert_eq!(reply.status, status, "{}", reply.shown());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let v = reply.json();
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let id = reply
        .header("x-request-id")
        .expect("X-Request-Id")
        .to_owned();
    assert_eq!(v["request_id"], id.as_str(), "same ID in header and body");
    let text = reply.text();
    for leak in [
        UPSTREAM_SECRET,
        "<html",
        &upstream.ip().to_string(),
        &format!(":{}", upstream.port()),
    ] {
        assert!(!text.contains(leak), "{leak:?} leaked in {text}");
        for (name, value) in &reply.headers {
            assert!(!value.contains(leak), "{leak:?} leaked in header {name}");
        }
    }
    id
}

#[tokio::test]
async fn refused_upstream_is_502_bad_gateway() {
    let dead = closed_port();
    let gw = gateway(&format!("http://{dead}"), "", "").await;
    let reply = get(gw.addr, "/v1/x", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", dead);
}

#[tokio::test]
async fn accept_and_hang_is_504_after_timeout() {
    let (up, accepted) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "timeout = \"300ms\"", "").await;
    let started = Instant::now();
    let reply = get(gw.addr, "/v1/x", &[]).await;
    let took = started.elapsed();
    assert_failure(&reply, 504, "gateway_timeout", up);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a timeout is not retried"
    );
}

/// Sends a chunked POST whose body arrives in `chunks` five-byte pieces `gap` apart, and
/// returns the reply (the gateway closes after it).
async fn slow_upload(gw: SocketAddr, chunks: usize, gap: Duration) -> Reply {
    let mut stream = TcpStream::connect(gw).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n",
        )
        .await
        .unwrap();
    for _ in 0..chunks {
        tokio::time::sleep(gap).await;
        stream.write_all(b"5\r\nhello\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    parse_reply(&seen).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&seen)))
}

#[tokio::test]
async fn an_upload_longer_than_timeout_that_keeps_moving_is_not_cut_off() {
    let up = echo_upstream().await;
    let gw = gateway(&format!("http://{up}"), "timeout = \"1s\"", "").await;
    // Six chunks 300 ms apart: the body takes 1.8 s, nearly twice the upstream's `timeout`,
    // and the upstream reads each chunk as it comes. (Gaps well under `timeout`, so a busy
    // machine's scheduling delays do not make one look like a stall.)
    let started = Instant::now();
    let reply = slow_upload(gw.addr, 6, Duration::from_millis(300)).await;
    assert!(started.elapsed() >= Duration::from_millis(1800));
    assert_eq!(reply.status, 200, "{}", reply.shown());
    assert_eq!(reply.json()["body_len"], 30);
}

#[tokio::test]
async fn the_head_is_due_within_timeout_of_the_last_body_bytes() {
    // Reads the whole body, then never answers.
    let (up, _) = fault_upstream(|mut stream| async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"0\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "timeout = \"1s\"", "").await;
    let started = Instant::now();
    let reply = slow_upload(gw.addr, 6, Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert_failure(&reply, 504, "gateway_timeout", up);
    assert!(
        took >= Duration::from_millis(1800 + 1000) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

#[tokio::test]
async fn slow_head_past_timeout_is_504() {
    let (up, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Ty").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = stream
            .write_all(b"pe: text/plain\r\nContent-Length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "timeout = \"300ms\"", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 504, "gateway_timeout", up);
}

#[tokio::test]
async fn reset_or_close_before_the_head_is_502() {
    // Reset: a zero SO_LINGER makes the close send RST.
    let (reset, reset_count) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    // Plain close (FIN) after reading the request.
    let (closed, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        drop(stream);
    })
    .await;
    for (up, method) in [(reset, "GET"), (closed, "GET"), (reset, "POST")] {
        let gw = gateway(&format!("http://{up}"), "", "").await;
        let reply = request(gw.addr, method, "/", &[], b"").await;
        assert_failure(&reply, 502, "bad_gateway", up);
    }
    // The request bytes reached the upstream: never replayed, whatever the method.
    assert_eq!(reset_count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn garbage_instead_of_http_is_502() {
    let (up, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"SSH-2.0-OpenSSH_9.6 db-primary.internal stack trace\r\n\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
}

/// Sends a GET with `Connection: close` and returns everything the client received until
/// the gateway closed the connection.
async fn raw_exchange(gw: SocketAddr, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(gw).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the gateway closes the connection");
    buf
}

/// An upstream that sends the head, some of the body, then nothing (its connection open): the
/// upstream's `timeout` also bounds the wait for its next body bytes, as nginx's
/// `proxy_read_timeout` does; the client's stream is cut, never ended cleanly.
#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_after_timeout() {
    let (up, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "timeout = \"400ms\"", "").await;
    let started = std::time::Instant::now();
    let raw = raw_exchange(gw.addr, "/").await;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "{text}");
    assert!(
        parse_reply(&raw).is_none(),
        "a short body, not a complete one"
    );
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_failures_counted(&gw, "timeout", 1).await;
}

#[tokio::test]
async fn reset_mid_body_aborts_the_client_stream() {
    // Content-Length 1000, then 10 bytes, then the upstream goes away.
    let (sized, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
    })
    .await;
    let gw = gateway(&format!("http://{sized}"), "", "").await;
    let raw = raw_exchange(gw.addr, "/").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 1000"),
        "{text}"
    );
    assert!(
        parse_reply(&raw).is_none(),
        "the client must see a short body, not a complete one: {text}"
    );
    let body = &raw[raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    assert!(body.len() < 1000, "{} body bytes", body.len());
    // Counted as an upstream failure like a reset before the head.
    assert_failures_counted(&gw, "reset", 1).await;

    // Chunked: one chunk, then the upstream goes away. The client's stream must end without
    // the terminating zero-length chunk.
    let (chunked, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
    })
    .await;
    let gw = gateway(&format!("http://{chunked}"), "", "").await;
    let raw = raw_exchange(gw.addr, "/").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("first"),
        "the first chunk was forwarded: {text}"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a clean end was faked: {text:?}"
    );
    assert!(parse_reply(&raw).is_none(), "{text:?}");
}

#[tokio::test]
async fn upstream_gateway_errors_get_the_envelope_others_pass_through() {
    let page = |status: &str, extra: &str| {
        let body = format!("<html><body><h1>{status}</h1>{UPSTREAM_SECRET}</body></html>");
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nServer: nginx/1.2.3 ({UPSTREAM_SECRET})\r\n\
             {extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (up, _) = fault_upstream(move |mut stream| async move {
        loop {
            let head = read_head(&mut stream).await;
            if head.is_empty() {
                return;
            }
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let response = match path.as_str() {
                "/502" => page("502 Bad Gateway", ""),
                "/503" => page("503 Service Unavailable", "Retry-After: 120\r\n"),
                "/503-bare" => page("503 Service Unavailable", ""),
                "/504" => page("504 Gateway Timeout", ""),
                "/500" => page("500 Internal Server Error", ""),
                _ => page("404 Not Found", ""),
            };
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "retry_after = \"45s\"", "").await;
    for (path, status, code, retry) in [
        ("/502", 502, "bad_gateway", None),
        // The upstream's own Retry-After is kept...
        ("/503", 503, "service_unavailable", Some("120")),
        // ...and a 503 without one gets the upstream's `retry_after`, as every 503 does.
        ("/503-bare", 503, "service_unavailable", Some("45")),
        ("/504", 504, "gateway_timeout", None),
    ] {
        let reply = get(gw.addr, path, &[]).await;
        assert_failure(&reply, status, code, up);
        assert!(
            reply.header("server").is_none(),
            "upstream Server header kept"
        );
        assert_eq!(reply.header("retry-after"), retry, "{path}");
    }
    for (path, status) in [("/500", 500), ("/404", 404)] {
        let reply = get(gw.addr, path, &[]).await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.header("content-type"), Some("text/html"));
        assert!(
            reply.text().contains(UPSTREAM_SECRET),
            "{path} passed through"
        );
    }

    // Turned off, the upstream's own pages pass through too.
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[errors]\nnormalize_upstream_5xx = false\n[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    let reply = get(gw.addr, "/503", &[]).await;
    assert_eq!(reply.status, 503);
    assert!(reply.text().contains("<html>"));
}

#[tokio::test]
async fn a_chunked_body_streams_chunk_by_chunk() {
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let (up, _) = fault_upstream(move |mut stream| {
        let release = release_rx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .await;
            // The last chunk only exists once the client has read the first.
            let _ = release.lock().await.recv().await;
            let _ = stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await;
        }
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "", "").await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(b"GET /stream HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("first") {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
            .await
            .expect("the first chunk arrives before the last is produced")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(!String::from_utf8_lossy(&seen).contains("last"));
    release_tx.send(()).unwrap();
    client.read_to_end(&mut seen).await.unwrap();
    let reply = parse_reply(&seen).expect("complete chunked response");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "firstlast");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_streams_through() {
    const SIZE: usize = 50 * 1024 * 1024;
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map(|f| f.into_data()) {
                    let len = data.map_or(0, |d| d.len());
                    total += len;
                    counter.fetch_add(len, Ordering::SeqCst);
                }
            }
            Response::new(Full::new(Bytes::from(total.to_string())))
        }
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "", "max_body_bytes = \"64MiB\"").await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT /upload HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: {SIZE}\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let block = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    let mut saw_streaming = false;
    while sent < SIZE {
        client.write_all(&block).await.unwrap();
        sent += block.len();
        // Streaming, not buffering: the upstream has bytes before the client is done.
        if !saw_streaming && sent >= SIZE / 2 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Ordering::SeqCst) == 0 {
                assert!(Instant::now() < deadline, "nothing reached the upstream");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            saw_streaming = true;
        }
    }
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = parse_reply(&buf).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), SIZE.to_string());
}

#[tokio::test]
async fn websocket_upgrade_passes_through_as_a_byte_stream() {
    let (heads_tx, mut heads_rx) = mpsc::unbounded_channel::<String>();
    let (up, _) = fault_upstream(move |mut stream| {
        let heads = heads_tx.clone();
        async move {
            let head = read_head(&mut stream).await;
            let _ = heads.send(head);
            let _ = stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                )
                .await;
            // Echo until the client goes away.
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "", "").await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut client))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(lower.contains("sec-websocket-accept"), "{head}");
    let upstream_head = heads_rx.recv().await.unwrap().to_ascii_lowercase();
    assert!(
        upstream_head.contains("upgrade: websocket"),
        "{upstream_head}"
    );
    assert!(
        upstream_head.contains("connection: upgrade"),
        "{upstream_head}"
    );
    assert!(
        upstream_head.contains("sec-websocket-key"),
        "{upstream_head}"
    );

    for message in [&b"hello"[..], b"\x81\x05bytes", &[0u8; 3000]] {
        client.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
            .await
            .expect("echo within 5s")
            .unwrap();
        assert_eq!(back, message);
    }
}

/// A tunnel that carries nothing for `idle_timeout` is closed and gives its `max_inflight`
/// slot back: a peer that vanished without a FIN cannot hold it forever.
#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed_and_frees_its_slot() {
    let up = websocket_upstream(Switch::Always).await;
    let gw = gateway(
        &format!("http://{up}"),
        "max_inflight = 1",
        "idle_timeout = \"400ms\"",
    )
    .await;
    let mut client = open_tunnel(gw.addr).await;
    // Traffic keeps it open past the idle timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_echoes(&mut client).await;
    }
    // ...silence closes it.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("closed within 5s")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(350), "{took:?}");
    // The one slot is free again: a new tunnel opens instead of a 503.
    open_tunnel(gw.addr).await;
}

/// Which requests [`websocket_upstream`] answers with 101.
#[derive(Clone, Copy, PartialEq)]
enum Switch {
    /// Every request, asked or not.
    Always,
    /// Upgrade requests; others get 200.
    Asked,
}

/// An upstream that switches protocols (101) and then echoes the tunnel's bytes.
async fn websocket_upstream(switch: Switch) -> SocketAddr {
    let (up, _) = fault_upstream(move |mut stream| async move {
        let head = read_head(&mut stream).await;
        if switch == Switch::Asked && !head.to_ascii_lowercase().contains("upgrade: websocket") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    up
}

/// A client connection upgraded through `gw` to a tunnel, checked with one echo.
async fn open_tunnel(gw: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(gw).await.unwrap();
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut client))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_echoes(&mut client).await;
    client
}

async fn assert_echoes(client: &mut TcpStream) {
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
        .await
        .expect("echo within 5s")
        .unwrap();
    assert_eq!(&back, b"ping");
}

/// A 101 to a request that asked for no upgrade is not relayed (it would switch the client's
/// connection to nothing): 502 `bad_gateway`, counted as an invalid response.
#[tokio::test]
async fn an_unasked_101_from_the_upstream_is_a_502() {
    let up = websocket_upstream(Switch::Always).await;
    let gw = gateway(&format!("http://{up}"), "", "").await;
    let reply = get(gw.addr, "/plain", &[]).await;
    assert_eq!(reply.status, 502, "{}", reply.shown());
    assert_eq!(reply.json()["error"]["code"], "bad_gateway");
    assert!(reply.header("x-request-id").is_some());
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_failures_counted(&gw, "invalid_response", 1).await;
}

/// A response whose framing two parsers could read differently (RFC 9112 6.3) is not relayed
/// as hyper happened to read it: 502, as nginx refuses "Content-Length and Transfer-Encoding
/// at the same time" and unknown transfer codings. A plain chunked response still passes.
#[tokio::test]
async fn an_upstream_response_with_ambiguous_framing_is_a_502() {
    for (framing, ok) in [
        ("Content-Length: 1\r\nTransfer-Encoding: chunked", false),
        ("Transfer-Encoding: gzip, chunked", false),
        ("Transfer-Encoding: chunked", true),
    ] {
        let response = format!("HTTP/1.1 200 OK\r\n{framing}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        // The same answer to every request on a kept-alive connection.
        let (up, accepted) = fault_upstream(move |mut stream| {
            let response = response.clone();
            async move {
                while !read_head(&mut stream).await.is_empty() {
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.flush().await;
                }
            }
        })
        .await;
        let gw = gateway(&format!("http://{up}"), "", "").await;
        for _ in 0..2 {
            let reply = get(gw.addr, "/x", &[]).await;
            if ok {
                assert_eq!((reply.status, reply.text().as_str()), (200, "hello"));
            } else {
                assert_failure(&reply, 502, "bad_gateway", up);
            }
        }
        if !ok {
            assert_failures_counted(&gw, "invalid_response", 2).await;
        }
        // A connection whose response was refused takes no further request (as nginx closes
        // it): nothing more is read from a socket two parsers could frame differently.
        let connections = if ok { 1 } else { 2 };
        assert_eq!(accepted.load(Ordering::SeqCst), connections, "{framing}");
    }
}

/// An upgraded connection is still a client connection: it holds its `max_connections` place
/// until the tunnel closes, as any other connection does.
#[tokio::test]
async fn an_open_tunnel_counts_against_max_connections() {
    let up = websocket_upstream(Switch::Asked).await;
    let gw = gateway(&format!("http://{up}"), "", "max_connections = 1").await;
    let tunnel = open_tunnel(gw.addr).await;
    // A second client waits in the backlog while the tunnel is open...
    let waiting = tokio::spawn(get(gw.addr, "/plain", &[]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served beside an open tunnel");
    // ...and is served once it closes.
    drop(tunnel);
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served after the tunnel closed")
        .unwrap();
    assert_eq!(reply.status, 200);
}

/// A stopping server lets open tunnels carry on within `shutdown_grace`, and stops as soon as
/// the last one closes.
#[tokio::test]
async fn a_stopping_server_waits_for_open_tunnels() {
    let up = websocket_upstream(Switch::Asked).await;
    let mut gw = gateway(&format!("http://{up}"), "", "shutdown_grace = \"20s\"").await;
    let mut tunnel = open_tunnel(gw.addr).await;
    let stopped = gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopped.is_finished(), "stopped with a tunnel open");
    assert_echoes(&mut tunnel).await;
    drop(tunnel);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("stopped once the tunnel closed")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn keep_alive_connections_to_the_upstream_are_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_ok(stream));
        }
    });
    let gw = gateway(&format!("http://{up}"), "", "").await;
    for _ in 0..100 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "ok");
    }
    let n = accepted.load(Ordering::SeqCst);
    assert!(
        n <= 3,
        "100 sequential requests opened {n} upstream connections"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    // Each connection answers one request as keep-alive, then the upstream closes it (as an
    // upstream's own idle timeout does). The next request must get a fresh connection, not
    // a 502 from the dead one.
    let (up, accepted) = fault_upstream(|mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
    let gw = gateway(&format!("http://{up}"), "", "").await;
    for n in 1..=5 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "request {n}: {}", reply.text());
        assert_eq!(reply.text(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), n);
        // The close reaches the gateway's connection task (it has its own task); a request
        // racing the close itself is the keep-alive race every proxy has.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn max_inflight_answers_503_with_retry_after_until_the_body_is_done() {
    let (entered_tx, mut entered_rx) = mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let (up, accepted) = fault_upstream(move |mut stream| {
        let entered = entered_tx.clone();
        let release = release_rx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            // The head goes out at once; the body's end waits for the test.
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .await;
            let _ = entered.send(());
            let _ = release.lock().await.recv().await;
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    })
    .await;
    let gw = gateway(
        &format!("http://{up}"),
        "max_inflight = 1\nretry_after = \"7s\"",
        "",
    )
    .await;
    let addr = gw.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    entered_rx.recv().await.unwrap();
    // The first response's head has been sent, but its body is still streaming: the slot
    // is still taken.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = get(gw.addr, "/second", &[]).await;
    assert_failure(&reply, 503, "service_unavailable", up);
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "overload never reaches the upstream"
    );

    release_tx.send(()).unwrap();
    let first = slow.await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "first");
    // The slot is free again once the body has ended.
    let again = tokio::spawn(async move { get(addr, "/third", &[]).await });
    entered_rx.recv().await.unwrap();
    release_tx.send(()).unwrap();
    assert_eq!(again.await.unwrap().status, 200);
}

#[tokio::test]
async fn maintenance_answers_503_without_contacting_the_upstream() {
    let (up, accepted) = fault_upstream(|_stream| async {}).await;
    let gw = gateway(
        &format!("http://{up}"),
        "maintenance = true\nretry_after = \"90s\"",
        "",
    )
    .await;
    for method in ["GET", "POST"] {
        let reply = request(gw.addr, method, "/", &[], b"payload").await;
        assert_failure(&reply, 503, "service_unavailable", up);
        assert_eq!(reply.header("retry-after"), Some("90"));
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("90s")
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs
/// until the connector's `connect_timeout`.
async fn blackhole() -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // Fill the queue: connects that complete without an accept. Stop at the first that hangs.
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    (listener, fillers)
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let (listener, _fillers) = blackhole().await;
    let up = listener.local_addr().unwrap();
    let gw = gateway(
        &format!("http://{up}"),
        "connect_timeout = \"200ms\"\ntimeout = \"5s\"",
        "",
    )
    .await;
    let started = Instant::now();
    let reply = request(gw.addr, "POST", "/", &[], b"x").await;
    assert_failure(&reply, 504, "gateway_timeout", up);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{took:?}: connect_timeout, not timeout"
    );
}

/// An https upstream that accepts the connection and never answers the TLS handshake: the
/// handshake is part of connecting, so `connect_timeout` bounds it, not `timeout`.
#[tokio::test]
async fn a_stalled_tls_handshake_is_a_connect_timeout() {
    let (up, _) = fault_upstream(|stream| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    let gw = gateway(
        &format!("https://{up}"),
        "connect_timeout = \"200ms\"\ntimeout = \"10s\"",
        "",
    )
    .await;
    let started = Instant::now();
    let reply = request(gw.addr, "POST", "/", &[], b"x").await;
    assert_failure(&reply, 504, "gateway_timeout", up);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "{took:?}: connect_timeout, not timeout"
    );
    assert_failures_counted(&gw, "connect_timeout", 1).await;
}

#[tokio::test]
async fn a_get_that_could_not_connect_is_sent_again_on_a_new_connection() {
    // A plain-http upstream. The first connect hangs (accept queue full, SYN dropped) until
    // connect_timeout; meanwhile the queue is drained and the upstream starts serving, so
    // the one retry connects. A POST with a body is never replayed: 504.
    for (method, body, status) in [("GET", &b""[..], 200), ("POST", &b"x"[..], 504)] {
        let (listener, fillers) = blackhole().await;
        let up = listener.local_addr().unwrap();
        let gw = gateway(
            &format!("http://{up}"),
            "connect_timeout = \"400ms\"\ntimeout = \"5s\"",
            "",
        )
        .await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(fillers);
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_ok(stream));
            }
        });
        let started = Instant::now();
        let reply = request(gw.addr, method, "/", &[], body).await;
        assert_eq!(reply.status, status, "{method}: {}", reply.text());
        if status == 200 {
            assert_eq!(reply.text(), "ok");
        } else {
            assert_failure(&reply, status, "gateway_timeout", up);
        }
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{method}: the first connect ran into connect_timeout"
        );
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, and its PEM in a file.
struct TestCert {
    config: Arc<rustls::ServerConfig>,
    _dir: tempfile::TempDir,
    pem_path: std::path::PathBuf,
}

fn test_cert() -> TestCert {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem_path = dir.path().join("upstream-ca.pem");
    std::fs::write(&pem_path, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestCert {
        config: Arc::new(config),
        _dir: dir,
        pem_path,
    }
}

/// An https upstream (HTTP/1.1 and h2 by ALPN) answering with the HTTP version it saw.
/// The first `drop_first` connections are closed before the TLS handshake completes.
async fn tls_upstream(cert: &TestCert, drop_first: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.config.clone());
    let (addr, accepted) = fault_upstream(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(|req: Request<Incoming>| async move {
                let version = format!("{:?}", req.version());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(version))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await;
    if drop_first == 0 {
        return (addr, accepted);
    }
    // Put a gate in front: the first connections are closed at once (a failed handshake,
    // no request byte sent), later ones are relayed to the TLS server.
    let gate = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate_addr = gate.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = gate.accept().await {
            if counter.fetch_add(1, Ordering::SeqCst) < drop_first {
                drop(stream);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut inner) = TcpStream::connect(addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut inner).await;
                }
            });
        }
    });
    (gate_addr, seen)
}

#[tokio::test]
async fn https_upstream_with_ca_file_negotiates_h2() {
    let cert = test_cert();
    let (up, _) = tls_upstream(&cert, 0).await;
    let ca = cert.pem_path.display().to_string();
    let gw = gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    for _ in 0..3 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.shown());
        assert_eq!(reply.text(), "HTTP/2.0", "h2 negotiated by ALPN");
    }
    // An upgrade needs HTTP/1.1: it goes over a connection that offered only that.
    let reply = get(
        gw.addr,
        "/",
        &[("Connection", "upgrade"), ("Upgrade", "websocket")],
    )
    .await;
    assert_eq!(reply.text(), "HTTP/1.1");

    // Without the CA the certificate is not trusted: 502, nothing leaked.
    let gw = gateway(&format!("https://127.0.0.1:{}", up.port()), "", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
}

/// A `ca_file` rewritten in place is read again on reload: the upstream's clients are rebuilt
/// when the file's bytes changed, though its path did not.
#[tokio::test]
async fn a_reload_reads_a_ca_file_rewritten_in_place() {
    let cert = test_cert();
    let other = test_cert();
    let (up, _) = tls_upstream(&cert, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // First the wrong CA: the upstream's certificate is not trusted.
    std::fs::copy(&other.pem_path, &ca).unwrap();
    let text = format!(
        "[[upstreams]]\nname = \"up\"\nurl = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n",
        up.port(),
        ca.display()
    );
    let gw = TestGateway::start(config("", &text)).await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
    // The right CA, same path, then a reload of the same config text.
    std::fs::copy(&cert.pem_path, &ca).unwrap();
    gw.gateway.reload(config("", &text));
    let reply = get(gw.addr, "/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.shown());
    assert_eq!(reply.text(), "HTTP/2.0");
}

#[tokio::test]
async fn idempotent_requests_are_retried_once_after_a_connect_failure() {
    // The upstream's first connection fails during the TLS handshake: no request byte was
    // sent, so the GET is replayed on a fresh connection.
    let cert = test_cert();
    let ca = cert.pem_path.display().to_string();
    for (method, status, connections) in [
        ("GET", 200, 2),
        ("DELETE", 200, 2),
        ("POST", 502, 1),
        ("PATCH", 502, 1),
    ] {
        let (up, seen) = tls_upstream(&cert, 1).await;
        let gw = gateway(
            &format!("https://127.0.0.1:{}", up.port()),
            &format!("ca_file = \"{ca}\""),
            "",
        )
        .await;
        let reply = request(gw.addr, method, "/", &[], b"").await;
        assert_eq!(reply.status, status, "{method}: {}", reply.text());
        if status != 200 {
            assert_failure(&reply, status, "bad_gateway", up);
        }
        assert_eq!(seen.load(Ordering::SeqCst), connections, "{method}");
    }
    // Twice refused: one retry only, then 502.
    let (up, seen) = tls_upstream(&cert, 5).await;
    let gw = gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    // A PUT with a body cannot be replayed.
    let (up, seen) = tls_upstream(&cert, 1).await;
    let gw = gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    let reply = request(gw.addr, "PUT", "/", &[], b"body").await;
    assert_eq!(reply.status, 502);
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn rate_limit_headers_stay_on_upstream_failures() {
    let dead = closed_port();
    let digest = {
        use sha2::Digest;
        use std::fmt::Write;
        let sum = sha2::Sha256::digest(b"tg_test_key_upstream_failures");
        sum.iter().fold(String::from("sha256:"), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[plans.pro]\nrequests_per_minute = 300\n\
             [[keys]]\nid = \"k\"\nkey = \"{digest}\"\nplan = \"pro\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{dead}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\n"
        ),
    ))
    .await;
    let reply = get(
        gw.addr,
        "/",
        &[("X-API-Key", "tg_test_key_upstream_failures")],
    )
    .await;
    assert_failure(&reply, 502, "bad_gateway", dead);
    assert_eq!(reply.header("x-ratelimit-limit"), Some("300"));
    assert!(reply.header("x-ratelimit-remaining").is_some());
}

/// Runs the real binary with JSON logs, collecting its stderr lines.
struct Process {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn start(config: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                sink.lock().unwrap().push(line.unwrap_or_default());
            }
        });
        let process = Self { child, lines };
        process.wait_for(|l| l.contains("admin listening"));
        process
    }

    fn wait_for(&self, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| found(l)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no such log line in:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_log_lines_carry_the_kind_and_the_request_id() {
    let dead = closed_port();
    let (hang, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (cut, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
    })
    .await;
    // Speaks plain HTTP where TLS is expected: the handshake fails.
    let (plain, _) = fault_upstream(|mut stream| async move {
        let mut hello = [0u8; 512];
        let _ = stream.read(&mut hello).await;
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    })
    .await;
    // The process binds port 0 and logs where it listens: a port picked here and released
    // for it to bind could be taken by another test in between.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"dead\"\nurl = \"http://{dead}\"\n\
             [[upstreams]]\nname = \"hang\"\nurl = \"http://{hang}\"\ntimeout = \"300ms\"\n\
             [[upstreams]]\nname = \"cut\"\nurl = \"http://{cut}\"\n\
             [[upstreams]]\nname = \"plain\"\nurl = \"https://{plain}\"\n\
             [[routes]]\nprefix = \"/dead/\"\nupstream = \"dead\"\nauth = false\n\
             [[routes]]\nprefix = \"/hang/\"\nupstream = \"hang\"\nauth = false\n\
             [[routes]]\nprefix = \"/cut/\"\nupstream = \"cut\"\nauth = false\n\
             [[routes]]\nprefix = \"/plain/\"\nupstream = \"plain\"\nauth = false\n"
        ),
    )
    .unwrap();
    let process = Process::start(&path);
    let listening = process.wait_for(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["message"] == "listening")
    });
    let addr: SocketAddr = serde_json::from_str::<serde_json::Value>(&listening).unwrap()["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr in {listening}"))
        .parse()
        .unwrap();
    for (path, status, code, kind) in [
        ("/dead/x", 502, "bad_gateway", "connect_refused"),
        ("/hang/x", 504, "gateway_timeout", "timeout"),
    ] {
        let reply = get(addr, path, &[]).await;
        let upstream = if kind == "timeout" { hang } else { dead };
        let id = assert_failure(&reply, status, code, upstream);
        let line = process.wait_for(|l| l.contains(&id) && l.contains("upstream failure"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], kind, "{}", redact(&line.to_string()));
        assert_eq!(v["level"], "WARN", "{}", redact(&line.to_string()));
        assert_eq!(
            v["span"]["request_id"],
            id.as_str(),
            "{}",
            redact(&line.to_string())
        );
    }

    // A failed TLS handshake is `connect_refused` too; its reason is in a warning of its own.
    let reply = get(addr, "/plain/x", &[]).await;
    let id = assert_failure(&reply, 502, "bad_gateway", plain);
    let line = process.wait_for(|l| l.contains(&id) && l.contains("could not connect"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "WARN", "{}", redact(&line.to_string()));
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt message")),
        "{}",
        redact(&line.to_string())
    );
    let line = process.wait_for(|l| l.contains(&id) && l.contains("upstream failure"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v["kind"],
        "connect_refused",
        "{}",
        redact(&line.to_string())
    );

    // After the head: the 200 is already out, so the abort is logged from the body.
    let raw = String::from_utf8_lossy(&raw_exchange(addr, "/cut/x").await).into_owned();
    let id = raw
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("x-request-id"))
        .map(|(_, value)| value.trim().to_owned())
        .expect("X-Request-Id on the 200");
    let line = process.wait_for(|l| l.contains(&id) && l.contains("client stream aborted"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["kind"], "reset", "{}", redact(&line.to_string()));
    assert_eq!(
        v["span"]["request_id"],
        id.as_str(),
        "{}",
        redact(&line.to_string())
    );
}

/// Overload and maintenance 503s come in floods (every request while an upstream is saturated
/// or switched off): the warning is written at most once a second per kind and upstream, each
/// line counting the ones left out before it (`suppressed`), so the lines still account for
/// every failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_upstream_failures_log_one_line_a_second_with_a_count() {
    // Holds every request: with max_inflight = 1 the first one keeps the only slot.
    let (slow, accepted) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"busy\"\nurl = \"http://{slow}\"\nmax_inflight = 1\n\
             timeout = \"60s\"\n\
             [[upstreams]]\nname = \"off\"\nurl = \"http://{slow}\"\nmaintenance = true\n\
             [[routes]]\nprefix = \"/busy/\"\nupstream = \"busy\"\nauth = false\n\
             [[routes]]\nprefix = \"/off/\"\nupstream = \"off\"\nauth = false\n"
        ),
    )
    .unwrap();
    let process = Process::start(&path);
    let listening = process.wait_for(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["message"] == "listening")
    });
    let addr: SocketAddr = serde_json::from_str::<serde_json::Value>(&listening).unwrap()["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr in {listening}"))
        .parse()
        .unwrap();
    // Takes the slot: the request is sent, its answer never awaited.
    let mut holder = TcpStream::connect(addr).await.unwrap();
    holder
        .write_all(b"GET /busy/hold HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot is never taken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 2.5 s of both floods, then after a quiet second one more of each: its line carries the
    // count of the last second of the flood.
    let flood_started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut failed = 0;
                while flood_started.elapsed() < Duration::from_millis(2_500) {
                    for path in ["/busy/x", "/off/x"] {
                        assert_eq!(get(addr, path, &[]).await.status, 503, "{path}");
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let mut each = 0;
    for task in tasks {
        each += task.await.unwrap() / 2;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for path in ["/busy/x", "/off/x"] {
        assert_eq!(get(addr, path, &[]).await.status, 503, "{path}");
    }
    each += 1;
    let span = flood_started.elapsed();

    // (lines, failures they account for) of `kind` on `upstream`.
    let logged = |kind: &str, upstream: &str| {
        let lines = process.lines.lock().unwrap();
        let mine: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "upstream failure" && v["upstream"] == upstream)
            .collect();
        for v in &mine {
            assert_eq!(v["kind"], kind, "{v}");
            assert_eq!(v["level"], "WARN", "{v}");
            assert!(v["span"]["request_id"].is_string(), "{v}");
        }
        let accounted: u64 = mine
            .iter()
            .map(|v| 1 + v["suppressed"].as_u64().unwrap_or(0))
            .sum();
        (mine.len(), accounted)
    };
    for (kind, upstream) in [("overloaded", "busy"), ("maintenance", "off")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while logged(kind, upstream).1 < each && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (lines, accounted) = logged(kind, upstream);
        eprintln!("{upstream}: {each} failures in {span:?}, {lines} lines");
        assert!(each >= 50, "a flood of {each} failures only");
        assert_eq!(
            accounted, each,
            "{upstream}: the lines' counts add up to the failures"
        );
        assert!(
            lines as u64 <= span.as_secs() + 2,
            "{lines} lines for {each} {kind} failures in {span:?}: more than one a second"
        );
    }
}
