//! Hostile clients: slow-loris connections must not starve everyone else.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
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
