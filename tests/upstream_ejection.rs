//! Targets that fail: passive ejection and its return, the 503 when every target is out, and
//! retries on another target (only when safe, never to the same target, never a body twice).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A config with one upstream `up` of `targets` (and `extra` lines) behind a public route.
fn targets_config(targets: &[SocketAddr], extra: &str) -> tollgate::Config {
    let list: Vec<String> = targets.iter().map(|a| format!("\"http://{a}\"")).collect();
    config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\ntargets = [{}]\n{extra}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n",
            list.join(", ")
        ),
    )
}

/// A gateway with [`targets_config`].
async fn targets_gateway(targets: &[SocketAddr], extra: &str) -> TestGateway {
    TestGateway::start(targets_config(targets, extra)).await
}

/// A counting upstream that can be killed (listener and every connection closed) and
/// started again on the same port.
struct Killable {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Killable {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let task = Some(tokio::spawn(serve_counting(listener, seen.clone())));
        Self { addr, seen, task }
    }

    fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    async fn revive(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind the port");
        self.task = Some(tokio::spawn(serve_counting(listener, self.seen.clone())));
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Answers `ok` to every request, counting them; aborted, it closes every connection.
async fn serve_counting(listener: TcpListener, seen: Arc<AtomicUsize>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        connections.spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                seen.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// A raw target that reads each request head and closes the connection (a reset before the
/// response head); returns its address and its accepted connections.
async fn resetting() -> (SocketAddr, Arc<AtomicUsize>) {
    fault_upstream(|mut stream| async move {
        read_head(&mut stream).await;
    })
    .await
}

#[tokio::test]
async fn a_killed_target_is_ejected_and_gets_requests_again_after_eject_for() {
    let mut a = Killable::start().await;
    let b = Killable::start().await;
    let gw = targets_gateway(&[a.addr, b.addr], "eject_after = 2\neject_for = \"3s\"").await;
    for _ in 0..4 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    assert_eq!((a.seen(), b.seen()), (2, 2));

    a.kill();
    // Its failures are retried on b: the clients see none.
    for n in 0..6 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(
            reply.status,
            200,
            "GET {n} while a is down: {}",
            reply.text()
        );
    }
    // Back up at once, but ejected: no request reaches it for eject_for.
    a.revive().await;
    let ejected_at = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    assert!(
        ejected_at.elapsed() < Duration::from_millis(2500),
        "too slow to tell"
    );
    assert_eq!(a.seen(), 2, "an ejected target got requests");
    let series = |name: &str, target: SocketAddr| {
        format!("tollgate_upstream_{name}{{upstream=\"up\",target=\"{target}\"}}")
    };
    assert_eq!(
        metric(gw.admin, &series("ejections_total", a.addr)).await,
        1.0
    );
    assert_eq!(
        metric(gw.admin, &series("ejections_total", b.addr)).await,
        0.0
    );
    let text = get(gw.admin, "/metrics", &[]).await.text();
    assert_eq!(
        metric_in(&text, &series("target_healthy", a.addr)),
        Some(0.0)
    );
    assert_eq!(
        metric_in(&text, &series("target_healthy", b.addr)),
        Some(1.0)
    );
    let retried = "tollgate_upstream_retries_total{upstream=\"up\",outcome=\"ok\"}";
    assert!(
        metric_in(&text, retried).unwrap_or(0.0) >= 2.0,
        "the GETs that failed on a went on to b"
    );

    tokio::time::sleep_until((ejected_at + Duration::from_millis(3100)).into()).await;
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    assert!(
        a.seen() >= 6,
        "a got {} requests after its ejection",
        a.seen() - 2
    );
    assert_eq!(
        metric(gw.admin, &series("target_healthy", a.addr)).await,
        1.0
    );
}

#[tokio::test]
async fn every_target_out_is_503_no_healthy_target_with_retry_after_and_no_connect() {
    let (a, a_accepted) = resetting().await;
    let (b, b_accepted) = resetting().await;
    let gw = targets_gateway(
        &[a, b],
        "eject_after = 1\neject_for = \"30s\"\nmax_ejected_percent = 100\nretries = 0",
    )
    .await;
    for _ in 0..2 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 502);
    }
    let accepted = a_accepted.load(Ordering::SeqCst) + b_accepted.load(Ordering::SeqCst);
    assert!(accepted >= 2);
    for _ in 0..3 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_envelope(&reply, 503, "service_unavailable");
        let retry_after = assert_retry_after(&reply);
        assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    }
    let now = a_accepted.load(Ordering::SeqCst) + b_accepted.load(Ordering::SeqCst);
    assert_eq!(now, accepted, "a connect attempt with every target out");
    assert_eq!(
        metric(
            gw.admin,
            "tollgate_upstream_failures_total{upstream=\"up\",kind=\"no_healthy_target\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn a_retry_never_goes_to_the_same_target() {
    let mut ups = Vec::new();
    for _ in 0..3 {
        ups.push(resetting().await);
    }
    let addrs: Vec<SocketAddr> = ups.iter().map(|(a, _)| *a).collect();
    let gw = targets_gateway(&addrs, "eject_after = 0\nretries = 3").await;
    for n in 1..=4 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        let counts: Vec<usize> = ups.iter().map(|(_, c)| c.load(Ordering::SeqCst)).collect();
        // Three targets: the first try and two retries, one on each.
        assert_eq!(counts.iter().sum::<usize>(), 3 * n, "{counts:?}");
        assert!(
            counts.iter().all(|c| *c == n),
            "a target tried twice: {counts:?}"
        );
    }
}

#[tokio::test]
async fn a_post_with_a_body_is_never_sent_twice_but_one_that_never_connected_goes_on() {
    let (a, a_accepted) = resetting().await;
    let (b, b_accepted) = resetting().await;
    let gw = targets_gateway(&[a, b], "eject_after = 0\nretries = 3").await;
    for n in 1..=4 {
        let reply = request(gw.addr, "POST", "/", &[], b"hello").await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        let sent = a_accepted.load(Ordering::SeqCst) + b_accepted.load(Ordering::SeqCst);
        assert_eq!(sent, n, "a POST with a body sent twice");
    }

    // The connection was never established: the upstream saw nothing, the body goes on.
    let echo = echo_upstream().await;
    let gw = targets_gateway(&[refusing_addr(), echo], "eject_after = 0").await;
    for _ in 0..4 {
        let reply = request(gw.addr, "POST", "/", &[], b"hello").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["body_len"], 5);
    }
}

#[tokio::test]
async fn one_target_killed_under_load_fails_no_get() {
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(Killable::start().await);
    }
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
    let gw = targets_gateway(&addrs, "").await;
    let addr = gw.addr;
    let clients: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for _ in 0..150 {
                    let reply = get(addr, "/", &[]).await;
                    if reply.status != 200 {
                        failed.push(reply.shown());
                    }
                }
                failed
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    targets[1].kill();
    let mut failed = Vec::new();
    for client in clients {
        failed.extend(client.await.unwrap());
    }
    assert!(
        targets[1].seen() > 0,
        "the killed target took no load first"
    );
    assert!(
        failed.is_empty(),
        "{} failed GETs: {failed:#?}",
        failed.len()
    );
}

#[tokio::test]
async fn a_reload_keeps_an_ejected_target_out() {
    let mut a = Killable::start().await;
    let b = Killable::start().await;
    let extra = "eject_after = 2\neject_for = \"5s\"";
    let gw = targets_gateway(&[a.addr, b.addr], extra).await;
    for _ in 0..2 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    a.kill();
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    a.revive().await;
    let ejected_at = std::time::Instant::now();
    // The same upstream, one setting changed: its targets stay, and so does their health.
    gw.gateway.reload(targets_config(
        &[a.addr, b.addr],
        &format!("{extra}\ntimeout = \"20s\""),
    ));
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/", &[]).await.status, 200);
    }
    assert!(
        ejected_at.elapsed() < Duration::from_secs(4),
        "too slow to tell"
    );
    assert_eq!(a.seen(), 1, "the reload put an ejected target back");
    let healthy = format!(
        "tollgate_upstream_target_healthy{{upstream=\"up\",target=\"{}\"}}",
        a.addr
    );
    assert_eq!(metric(gw.admin, &healthy).await, 0.0);
}
