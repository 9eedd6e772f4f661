//! Upstreams with several targets: requests spread by weight (smooth weighted round robin)
//! or to the target with the fewest in flight.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

/// A gateway with one upstream `up` of `targets` (TOML array text) and `extra` lines.
async fn targets_gateway(targets: &str, extra: &str) -> TestGateway {
    TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\ntargets = {targets}\n{extra}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await
}

/// Three counting targets.
async fn three() -> Vec<(SocketAddr, Arc<AtomicUsize>)> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(counting_upstream().await);
    }
    out
}

#[tokio::test]
async fn round_robin_spreads_requests_by_weight() {
    let ups = three().await;
    let gw = targets_gateway(
        &format!(
            "[\"http://{}\", {{ url = \"http://{}\" }}, {{ url = \"http://{}\", weight = 2 }}]",
            ups[0].0, ups[1].0, ups[2].0
        ),
        "",
    )
    .await;
    let addr = gw.addr;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..500 {
                    let reply = get(addr, "/", &[]).await;
                    assert_eq!(reply.status, 200, "{}", reply.text());
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let counts: Vec<usize> = ups.iter().map(|(_, n)| n.load(Ordering::SeqCst)).collect();
    assert_eq!(counts.iter().sum::<usize>(), 4000);
    for (count, want) in counts.iter().zip([1000.0, 1000.0, 2000.0]) {
        let off = (*count as f64 - want).abs() / want;
        assert!(
            off <= 0.02,
            "counts {counts:?}, want 1000:1000:2000 within 2%"
        );
    }
}

#[tokio::test]
async fn least_inflight_sends_to_the_idle_target_while_one_is_slow() {
    // Target 0 holds every request it gets for 3 s; target 1 answers at once.
    let slow_seen = Arc::new(AtomicUsize::new(0));
    let seen = slow_seen.clone();
    let slow = upstream(move |_req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(Full::new(Bytes::from_static(b"slow")))
        }
    })
    .await;
    let (fast, fast_seen) = counting_upstream().await;
    let gw = targets_gateway(
        &format!("[\"http://{slow}\", \"http://{fast}\"]"),
        "balance = \"least_inflight\"",
    )
    .await;
    let addr = gw.addr;
    // Requests one at a time until one reaches the slow target and stays there.
    let mut held = Vec::new();
    while slow_seen.load(Ordering::SeqCst) == 0 {
        let before = fast_seen.load(Ordering::SeqCst);
        held.push(tokio::spawn(async move { get(addr, "/", &[]).await }));
        let (slow_seen, fast_seen) = (slow_seen.clone(), fast_seen.clone());
        eventually("the request reached a target", || {
            let (slow_seen, fast_seen) = (slow_seen.clone(), fast_seen.clone());
            async move {
                slow_seen.load(Ordering::SeqCst) + fast_seen.load(Ordering::SeqCst) > before
            }
        })
        .await;
    }
    let fast_before = fast_seen.load(Ordering::SeqCst);
    for _ in 0..20 {
        let reply = get(addr, "/", &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "ok", "sent to the busy target");
    }
    assert_eq!(slow_seen.load(Ordering::SeqCst), 1);
    assert_eq!(fast_seen.load(Ordering::SeqCst), fast_before + 20);
    for reply in held {
        assert_eq!(reply.await.unwrap().status, 200);
    }
}
