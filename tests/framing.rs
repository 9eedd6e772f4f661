//! Request framing and heads the parser refuses (SPEC.md, "Hostile clients"): ambiguous
//! framing, TE plus CL, bad chunks, invalid methods and too many headers are refused with an
//! error body and a request ID, and never reach the upstream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn ambiguous_framing_is_refused_and_never_reaches_the_upstream() {
    let (up, seen) = counting_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let cases: [(&str, &[u8]); 12] = [
        ("chunked, chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("two TE headers", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("gzip coding", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ("duplicate differing CL", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
        ("HTTP/1.0 + TE", b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n  b\r\n\r\n"),
        ("control byte in a header", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n"),
        ("Host disagrees with absolute-form target", b"GET http://other.example/ HTTP/1.1\r\nHost: t\r\n\r\n"),
        ("no Host", b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n"),
        ("no Host, absolute-form target", b"GET http://other.example/ HTTP/1.1\r\n\r\n"),
        ("two Host headers", b"GET / HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n"),
        ("an invalid Host", b"GET / HTTP/1.1\r\nHost: t u\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: connection not closed"))
            .unwrap();
        let reply = parse_reply(&buf).unwrap_or_else(|| {
            panic!("{name}: no response in {:?}", String::from_utf8_lossy(&buf))
        });
        assert_eq!(reply.status, 400, "{name}: {}", reply.shown());
        assert_eq!(reply.json()["error"]["code"], "bad_request", "{name}");
        assert_eq!(reply.header("connection"), Some("close"), "{name}");
        let id = reply.header("x-request-id").expect("X-Request-Id");
        assert_eq!(reply.json()["request_id"], id, "{name}");
    }
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );

    // A well-formed absolute-form request whose authority matches Host is fine, and so are
    // an HTTP/1.0 request without Host and a Host with a port or an IPv6 address.
    for raw in [
        &b"GET http://t/ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
        b"GET /ok HTTP/1.0\r\n\r\n",
        b"GET /ok HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    ] {
        let r = send_raw(gw.addr, raw).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(raw));
    }
}

#[tokio::test]
async fn te_plus_cl_is_framed_by_te_alone_and_the_connection_closes() {
    // hyper drops Content-Length when Transfer-Encoding is present and closes the connection
    // after answering (RFC 9112 6.1), so a request smuggled behind the body is never read.
    let (up, seen) = counting_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("connection closed")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {text}"
    );
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the smuggled request never arrived"
    );
}

/// An upstream that counts only requests it received whole: head and complete body.
async fn whole_request_upstream() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let whole = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = whole.clone();
    let addr = upstream(move |req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            if req.into_body().collect().await.is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    (addr, whole)
}

/// Heads hyper refuses before tollgate sees a request (it answers them itself, empty) get
/// tollgate's error body in the configured style and a request ID, like every other error.
#[tokio::test]
async fn heads_the_parser_refuses_get_the_error_style_and_a_request_id() {
    let gw = TestGateway::start(styled_config("detail", "")).await;
    // Far beyond max_header_bytes (16 KiB): more than hyper's read buffer holds.
    let mut huge = b"GET /status HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    huge.resize(huge.len() + 300_000, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let reply = send_raw(gw.addr, &huge).await;
    let id = assert_styled_error(&reply, "detail", 431, "headers_too_large");
    assert_generated_id(&id);

    // A good request, then a malformed one on the same connection: the first is answered as
    // usual, the second with an error body.
    let replies = exchange_raw(
        gw.addr,
        b"GET /status HTTP/1.1\r\nHost: t\r\n\r\nG@T /status HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    let second = replies
        .windows(9)
        .skip(1)
        .position(|w| w == b"HTTP/1.1 ")
        .map(|at| at + 1)
        .unwrap_or_else(|| panic!("one response in {:?}", String::from_utf8_lossy(&replies)));
    let first = parse_reply(&replies[..second]).unwrap();
    assert_eq!(first.status, 200, "{}", first.shown());
    assert_eq!(first.text(), "up");
    let refused = parse_reply(&replies[second..]).unwrap();
    let refused_id = assert_styled_error(&refused, "detail", 400, "bad_request");
    assert_ne!(Some(refused_id.as_str()), first.header("x-request-id"));
    assert!(
        refused.json()["detail"]
            .as_str()
            .is_some_and(|m| m.contains("could not be parsed")),
        "{}",
        refused.shown()
    );
}

#[tokio::test]
async fn bad_chunks_invalid_methods_and_too_many_headers_are_refused() {
    let (up, whole) = whole_request_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let many_headers: Vec<u8> = {
        let mut raw = b"GET / HTTP/1.1\r\nHost: t\r\n".to_vec();
        for i in 0..200 {
            raw.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw
    };
    // (name, request, status, code).
    let cases: [(&str, &[u8], u16, &str); 6] = [
        ("chunk size not hex", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
        ("chunk size overflows", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
        ("chunk shorter than its size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
        ("invalid method token", b"G@T / HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
        ("method with a space", b"GE T / HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
        ("200 headers", &many_headers, 431, "headers_too_large"),
    ];
    for (name, raw, status, code) in cases {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        // The gateway closes the connection (it may reset it after a refusal).
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: connection not closed"));
        let reply = parse_reply(&buf).unwrap_or_else(|| {
            panic!("{name}: no response in {:?}", String::from_utf8_lossy(&buf))
        });
        assert_eq!(reply.status, status, "{name}: {}", reply.shown());
        assert_eq!(reply.json()["error"]["code"], code, "{name}");
        let id = reply.header("x-request-id").expect("X-Request-Id");
        assert_eq!(reply.json()["request_id"], id, "{name}");
        assert!(
            !String::from_utf8_lossy(&buf).contains(" 200 "),
            "{name}: never answered as a success"
        );
    }
    // The upstream received nothing whole; the gateway is still serving.
    let r = send_raw(
        gw.addr,
        b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        whole.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the well-formed request reached the upstream whole"
    );
}
