//! Graceful shutdown: requests in flight are drained within `shutdown_grace`, heads already
//! owed are answered, idle keep-alive connections closed, and new clients refused.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn graceful_shutdown_drains_an_in_flight_request() {
    let (entered_tx, entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let up = upstream(move |_req: Request<Incoming>| {
        let entered = entered_tx.clone();
        async move {
            let _ = entered.send(());
            tokio::time::sleep(Duration::from_millis(600)).await;
            Response::new(Full::new(Bytes::from_static(b"slow but complete")))
        }
    })
    .await;
    let mut gw = proxy_gateway(&format!("http://{up}"), "", "shutdown_grace = \"10s\"").await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    let mut entered_rx = entered_rx;
    entered_rx.recv().await.expect("upstream got the request");

    let started = Instant::now();
    let serve = gw.begin_shutdown();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slow but complete");
    serve
        .await
        .unwrap()
        .expect("serve returns Ok after draining");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Listeners are closed: new clients are refused.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let up = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(Full::new(Bytes::new()))
    })
    .await;
    let mut gw = proxy_gateway(&format!("http://{up}"), "", "shutdown_grace = \"300ms\"").await;
    let addr = gw.addr;
    let _stuck = tokio::spawn(async move { get(addr, "/stuck", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    gw.begin_shutdown().await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_shutdown_answers_requests_already_owed_and_closes_idle_keep_alive_connections() {
    let mut gw = TestGateway::start(styled_config("envelope", "")).await;
    // Idle keep-alive: served once, nothing since.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Accepted, nothing sent yet.
    let mut fresh = TcpStream::connect(gw.addr).await.unwrap();
    // Half a head sent.
    let mut half = TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(b"GET /status HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let serving = gw.begin_shutdown();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut out))
        .await
        .expect("the idle keep-alive connection is closed at once")
        .unwrap();
    assert!(out.is_empty());
    let started = Instant::now();
    while TcpStream::connect(gw.addr).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still accepting new connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The two connections that owe a head get it answered, then closed.
    fresh
        .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    half.write_all(b"Host: t\r\n\r\n").await.unwrap();
    for (name, stream) in [("fresh", &mut fresh), ("half", &mut half)] {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed after its answer"))
            .unwrap();
        let reply = parse_reply(&out).unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(reply.status, 200, "{name}");
        assert_eq!(reply.text(), "up", "{name}");
        assert_eq!(reply.header("connection"), Some("close"), "{name}");
    }
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
}
