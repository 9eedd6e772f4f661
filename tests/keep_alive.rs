//! Keep-alive clients after an early answer: a request answered before its body was read (an
//! error, a fixed response, a dead upstream) leaves the connection usable for the next
//! request, or its answer says `Connection: close` and the close is clean, never a reset.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tollgate::body::DISCARD_BODY_BYTES;

/// A gateway with routes that answer before reading a body: a dead upstream, a route that
/// needs a key, a fixed response; `/echo/` reaches a live upstream, and bodies over 1 MiB are
/// refused.
async fn gateway() -> TestGateway {
    let dead = refusing_addr();
    let echo = echo_upstream().await;
    TestGateway::start(config(
        "max_body_bytes = \"1MiB\"",
        &format!(
            r#"
[[upstreams]]
name = "dead"
url = "http://{dead}"
[[upstreams]]
name = "echo"
url = "http://{echo}"

[[routes]]
prefix = "/dead/"
upstream = "dead"
auth = false
[[routes]]
prefix = "/private/"
upstream = "echo"
[[routes]]
prefix = "/fixed/"
auth = false
respond = {{ status = 201, body = "made" }}
[[routes]]
prefix = "/echo/"
upstream = "echo"
auth = false
"#
        ),
    ))
    .await
}

fn post(path: &str, body_len: usize) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {body_len}\r\n\r\n")
            .into_bytes();
    request.resize(request.len() + body_len, b'x');
    request
}

fn chunked_post(path: &str, body_len: usize) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for _ in 0..body_len / 1024 {
        request.extend_from_slice(b"400\r\n");
        request.extend_from_slice(&[b'y'; 1024]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

const NEXT: &[u8] = b"GET /echo/next HTTP/1.1\r\nHost: gateway.test\r\n\r\n";

/// The repro of the report: one socket, an upload answered early, then a GET on the same
/// socket. Bodies up to the discard bound are read and dropped and the connection carries the
/// GET; larger ones get `Connection: close`, and the client can still send its whole body
/// and read the answer, then sees a clean close.
#[tokio::test]
async fn an_upload_answered_early_leaves_the_connection_usable_or_says_close() {
    let gw = gateway().await;
    let bound = DISCARD_BODY_BYTES as usize;
    let cases: [(&str, Vec<u8>, u16, &str, bool); 11] = [
        (
            "502, 64 KiB",
            post("/dead/x", 64 * 1024),
            502,
            "bad_gateway",
            true,
        ),
        ("502, 64 B", post("/dead/x", 64), 502, "bad_gateway", true),
        (
            "502, 64 KiB chunked",
            chunked_post("/dead/x", 63 * 1024),
            502,
            "bad_gateway",
            true,
        ),
        (
            "401, 64 KiB",
            post("/private/x", 64 * 1024),
            401,
            "authentication_error",
            true,
        ),
        (
            "404, 64 KiB",
            post("/nowhere", 64 * 1024),
            404,
            "not_found",
            true,
        ),
        ("201 fixed, 64 KiB", post("/fixed/x", bound), 201, "", true),
        (
            "502, 900 KiB",
            post("/dead/x", 900 * 1024),
            502,
            "bad_gateway",
            false,
        ),
        (
            "401, 900 KiB",
            post("/private/x", 900 * 1024),
            401,
            "authentication_error",
            false,
        ),
        (
            "502, 900 KiB chunked",
            chunked_post("/dead/x", 900 * 1024),
            502,
            "bad_gateway",
            false,
        ),
        (
            "413, 1.5 MiB",
            post("/echo/x", 1536 * 1024),
            413,
            "payload_too_large",
            false,
        ),
        (
            "201 fixed, just over the bound",
            post("/fixed/x", bound + 1),
            201,
            "",
            false,
        ),
    ];
    for (case, request, status, code, kept) in cases {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let reply = exchange_on(&mut stream, &request)
            .await
            .unwrap_or_else(|e| panic!("{case}: the upload and its answer: {e}"));
        if code.is_empty() {
            assert_eq!(reply.status, status, "{case}: {reply:?}");
        } else {
            assert_envelope(&reply, status, code);
        }
        let close = reply
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if kept {
            assert!(!close, "{case}: the connection should stay open: {reply:?}");
            let next = exchange_on(&mut stream, NEXT)
                .await
                .unwrap_or_else(|e| panic!("{case}: the next request on the connection: {e}"));
            assert_eq!(next.status, 200, "{case}: {next:?}");
        } else {
            assert!(
                close,
                "{case}: the answer should say Connection: close: {reply:?}"
            );
            assert_clean_close(&mut stream).await;
        }
    }
}

/// A client that waits for `100 Continue` is not told to send a body that is refused
/// already: it gets the answer with `Connection: close`.
#[tokio::test]
async fn an_upload_waiting_for_100_continue_is_answered_without_it() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = b"POST /private/x HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 65536\r\nExpect: 100-continue\r\n\r\n";
    let reply = exchange_on(&mut stream, head).await.unwrap();
    assert_envelope(&reply, 401, "authentication_error");
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    assert_clean_close(&mut stream).await;
}

/// A keep-alive client whose upstream is down: alternating uploads and GETs on one
/// connection all get their answer (502), none a connection error.
#[tokio::test]
async fn uploads_and_gets_alternate_on_one_connection_while_the_upstream_is_down() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    for round in 0..20 {
        let request = if round % 2 == 0 {
            post("/dead/x", 60 * 1024)
        } else {
            b"GET /dead/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n".to_vec()
        };
        let reply = exchange_on(&mut stream, &request)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_envelope(&reply, 502, "bad_gateway");
        assert_eq!(reply.header("connection"), None, "round {round}: {reply:?}");
    }
}

/// An upstream that answers before it reads the body (its own early answer): the client gets
/// that answer with `Connection: close` (nobody reads the rest of its body, so the connection
/// cannot carry another request), and a clean close after it has sent the whole body.
#[tokio::test]
async fn an_upstream_that_answers_early_costs_the_client_no_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    // Reads the head only, answers 413 and closes, as a server that refuses the upload.
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = socket.read(&mut head).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let reply = exchange_on(&mut stream, &post("/x", 900 * 1024))
        .await
        .expect("the upload and the upstream's answer");
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    assert_clean_close(&mut stream).await;
}

/// HTTP/2: an upload answered early ends its own stream only; the connection carries the
/// next request.
#[tokio::test]
async fn an_h2_upload_answered_early_ends_only_its_stream() {
    let gw = gateway().await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    let authority = gw.addr.to_string();
    for path in ["/private/x", "/dead/x", "/fixed/x"] {
        let upload = Request::post(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::from(vec![b'z'; 900 * 1024])))
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), sender.send_request(upload))
            .await
            .expect("answered within 10s")
            .expect("the upload's answer");
        assert!(
            [401, 502, 201].contains(&answer.status().as_u16()),
            "{path}: {}",
            answer.status()
        );
        let next = Request::get(format!("http://{authority}/echo/next"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let next = sender.send_request(next).await.expect("the next stream");
        assert_eq!(next.status(), 200, "{path}");
        next.into_body().collect().await.unwrap();
    }
}
