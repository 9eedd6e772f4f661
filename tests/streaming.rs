//! Bodies stream through in both directions: chunk by chunk to the client, a large upload to
//! the upstream, and `max_body_bytes` enforced while a chunked body streams.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[tokio::test]
async fn body_over_limit_while_streaming_is_413() {
    let up = echo_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "max_body_bytes = \"1KiB\"").await;
    // Chunked: no Content-Length to check up front.
    let mut req = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'z'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = send_raw(gw.addr, &req).await;
    assert_status_and_request_id(&r, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");

    // Under the limit, chunked passes through.
    let mut req = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(b"100\r\n");
    req.extend_from_slice(&[b'z'; 0x100]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = send_raw(gw.addr, &req).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["body_len"], 256);
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
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
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
    let gw = proxy_gateway(&format!("http://{up}"), "", "max_body_bytes = \"64MiB\"").await;
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
