//! Active health checks and hostname targets: a target failing its health path takes no
//! requests until it passes again; a hostname is one target per address it resolves to,
//! re-resolved every `dns_refresh`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls_upstream::{cert_for, tls_upstream};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tollgate::Gateway;
use tollgate::proxy::Resolver;

/// A target that counts client requests, answers `/healthz` with the status in `health`, and
/// records the `User-Agent` of its probes and the `Host` of its requests.
struct Target {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
    health: Arc<AtomicU16>,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn target() -> Target {
    let requests = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    let health = Arc::new(AtomicU16::new(200));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (r, p, h, s) = (
        requests.clone(),
        probes.clone(),
        health.clone(),
        seen.clone(),
    );
    let addr = upstream(move |req: Request<Incoming>| {
        let (r, p, h, s) = (r.clone(), p.clone(), h.clone(), s.clone());
        async move {
            let header = |name| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            if req.uri().path() == "/healthz" {
                p.fetch_add(1, Ordering::SeqCst);
                s.lock()
                    .unwrap()
                    .push(format!("probe {}", header("user-agent")));
                let mut response = Response::new(Full::new(Bytes::from_static(b"health")));
                *response.status_mut() = StatusCode::from_u16(h.load(Ordering::SeqCst)).unwrap();
                return response;
            }
            r.fetch_add(1, Ordering::SeqCst);
            s.lock().unwrap().push(format!("host {}", header("host")));
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    Target {
        addr,
        requests,
        probes,
        health,
        seen,
    }
}

/// A config with one upstream `up` of `targets` (TOML array text) and `extra` lines.
fn targets_config(targets: &str, extra: &str) -> tollgate::Config {
    config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\ntargets = {targets}\n{extra}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    )
}

const CHECK: &str = "[upstreams.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\n\
                     timeout = \"1s\"\nunhealthy_after = 3\nhealthy_after = 2\n";

fn healthy_series(addr: SocketAddr) -> String {
    format!("tollgate_upstream_target_healthy{{upstream=\"up\",target=\"{addr}\"}}")
}

/// Sends `n` GETs, each answered 200.
async fn send(gw: &TestGateway, n: usize) {
    for _ in 0..n {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

fn counts(targets: &[Target]) -> Vec<usize> {
    targets
        .iter()
        .map(|t| t.requests.load(Ordering::SeqCst))
        .collect()
}

#[tokio::test]
async fn a_target_failing_its_health_path_takes_no_requests_until_it_passes_again() {
    let targets = [target().await, target().await, target().await];
    let list = format!(
        "[\"http://{}\", \"http://{}\", \"http://{}\"]",
        targets[0].addr, targets[1].addr, targets[2].addr
    );
    let gw = TestGateway::start(targets_config(&list, CHECK)).await;
    let sick = &targets[2];
    eventually("every target probed", || async {
        targets.iter().all(|t| t.probes.load(Ordering::SeqCst) >= 2)
    })
    .await;
    assert!(
        sick.seen.lock().unwrap()[0] == "probe tollgate-health-check",
        "probes say who they are: {:?}",
        sick.seen.lock().unwrap()
    );
    send(&gw, 30).await;
    assert_eq!(counts(&targets), [10, 10, 10], "new targets start healthy");

    // 500 on its health path: out within unhealthy_after x interval (plus one interval for
    // the probe in progress, and slack for a loaded machine).
    sick.health.store(500, Ordering::SeqCst);
    let failing_since = Instant::now();
    eventually("the failing target is out", || async {
        metric(gw.admin, &healthy_series(sick.addr)).await == 0.0
    })
    .await;
    let took = failing_since.elapsed();
    assert!(
        took < Duration::from_millis(3 * 100 + 100 + 600),
        "out after {took:?}; unhealthy_after x interval is 300 ms"
    );
    let before = counts(&targets);
    send(&gw, 40).await;
    let after = counts(&targets);
    assert_eq!(after[2], before[2], "no request to the failing target");
    assert_eq!(after[0] + after[1], before[0] + before[1] + 40);

    // Good again: back after healthy_after good probes.
    sick.health.store(204, Ordering::SeqCst);
    eventually("the target is back", || async {
        metric(gw.admin, &healthy_series(sick.addr)).await == 1.0
    })
    .await;
    let before = counts(&targets);
    send(&gw, 30).await;
    let after = counts(&targets);
    assert_eq!(
        after[2] - before[2],
        10,
        "back in rotation: {before:?} -> {after:?}"
    );
}

#[tokio::test]
async fn every_target_failing_its_probes_is_503_no_healthy_target_without_a_connect() {
    let targets = [target().await, target().await];
    for t in &targets {
        t.health.store(503, Ordering::SeqCst);
    }
    let list = format!(
        "[\"http://{}\", \"http://{}\"]",
        targets[0].addr, targets[1].addr
    );
    let gw = TestGateway::start(targets_config(&list, CHECK)).await;
    for t in &targets {
        eventually("the target is out", || async {
            metric(gw.admin, &healthy_series(t.addr)).await == 0.0
        })
        .await;
    }
    let reply = get(gw.addr, "/", &[]).await;
    assert_envelope(&reply, 503, "service_unavailable");
    // Back at the earliest after healthy_after good probes (200 ms): at least 1 s.
    assert_eq!(assert_retry_after(&reply), 1);
    assert_eq!(counts(&targets), [0, 0], "no request reached a target");
    let failures = "tollgate_upstream_failures_total{upstream=\"up\",kind=\"no_healthy_target\"}";
    assert_eq!(metric(gw.admin, failures).await, 1.0);
}

#[tokio::test]
async fn a_probe_that_times_out_fails() {
    let hang = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/healthz" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Response::new(Full::new(Bytes::from_static(b"ok")))
    })
    .await;
    let ok = target().await;
    let list = format!("[\"http://{hang}\", \"http://{}\"]", ok.addr);
    let check = CHECK.replace("timeout = \"1s\"", "timeout = \"50ms\"");
    let gw = TestGateway::start(targets_config(&list, &check)).await;
    eventually("the hanging target is out", || async {
        metric(gw.admin, &healthy_series(hang)).await == 0.0
    })
    .await;
    assert_eq!(metric(gw.admin, &healthy_series(ok.addr)).await, 1.0);
    let before = ok.requests.load(Ordering::SeqCst);
    send(&gw, 10).await;
    assert_eq!(ok.requests.load(Ordering::SeqCst), before + 10);
}

/// A resolver that answers `api.test` with what `answer` holds (an error when empty).
fn test_resolver(answer: Arc<Mutex<Vec<SocketAddr>>>) -> Resolver {
    Resolver::new(move |host, _port| {
        let answer = answer.clone();
        let host = host.to_owned();
        Box::pin(async move {
            let addresses = answer.lock().unwrap().clone();
            if host != "api.test" || addresses.is_empty() {
                return Err(std::io::Error::other("no such host"));
            }
            Ok(addresses)
        })
    })
}

#[tokio::test]
async fn a_hostname_is_one_target_per_address_and_follows_its_dns() {
    let targets = [target().await, target().await, target().await];
    let answer = Arc::new(Mutex::new(vec![targets[0].addr, targets[1].addr]));
    let config = targets_config(
        "[\"http://api.test:8080\"]",
        "dns_refresh = \"100ms\"\neject_after = 0",
    );
    let gateway = Arc::new(Gateway::with_resolver(
        config.clone(),
        test_resolver(answer.clone()),
    ));
    let gw = TestGateway::start_with(config, gateway.clone(), gateway).await;
    eventually("both addresses are targets", || async {
        metric(gw.admin, &healthy_series(targets[1].addr)).await == 1.0
    })
    .await;
    send(&gw, 20).await;
    assert_eq!(counts(&targets), [10, 10, 0], "two addresses, two targets");
    assert!(
        targets[0]
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "host api.test:8080"),
        "Host stays the configured name: {:?}",
        targets[0].seen.lock().unwrap()
    );

    // The name moves to another address: within dns_refresh, every request goes there.
    *answer.lock().unwrap() = vec![targets[2].addr];
    eventually("the new address is the target", || async {
        let text = get(gw.admin, "/metrics", &[]).await.text();
        metric_in(&text, &healthy_series(targets[2].addr)) == Some(1.0)
            && metric_in(&text, &healthy_series(targets[0].addr)).is_none()
    })
    .await;
    let before = counts(&targets);
    send(&gw, 10).await;
    let after = counts(&targets);
    assert_eq!(after[2], before[2] + 10, "{before:?} -> {after:?}");

    // Resolution fails: the last addresses stay.
    answer.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(350)).await;
    send(&gw, 5).await;
    assert_eq!(counts(&targets)[2], after[2] + 5);
}

#[tokio::test]
async fn a_hostname_target_is_resolved_by_the_system_resolver() {
    let t = target().await;
    let gw = TestGateway::start(targets_config(
        &format!("[\"http://localhost:{}\"]", t.addr.port()),
        "",
    ))
    .await;
    // localhost resolves at least to 127.0.0.1 (where the target listens): it becomes a
    // target of its own, named by its address.
    eventually("localhost resolved", || async {
        metric(gw.admin, &healthy_series(t.addr)).await == 1.0
    })
    .await;
    send(&gw, 4).await;
    assert_eq!(t.requests.load(Ordering::SeqCst), 4);
    assert!(
        t.seen
            .lock()
            .unwrap()
            .contains(&format!("host localhost:{}", t.addr.port()))
    );
}

#[tokio::test]
async fn an_https_hostname_is_one_target_per_address_verified_by_its_name() {
    let cert = cert_for(&["api.test"]);
    let (a, a_connections) = tls_upstream(&cert, 0).await;
    let (b, b_connections) = tls_upstream(&cert, 0).await;
    let answer = Arc::new(Mutex::new(vec![a, b]));
    // No port in the URL: each address keeps its own (a DNS answer carries the URL's).
    let config = targets_config(
        "[\"https://api.test\"]",
        &format!(
            "ca_file = \"{}\"\ndns_refresh = \"100ms\"\neject_after = 0",
            cert.pem_path.display()
        ),
    );
    let gateway = Arc::new(Gateway::with_resolver(
        config.clone(),
        test_resolver(answer),
    ));
    let gw = TestGateway::start_with(config, gateway.clone(), gateway).await;
    eventually("both addresses are targets", || async {
        metric(gw.admin, &healthy_series(b)).await == 1.0
    })
    .await;
    for _ in 0..6 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.shown());
        assert_eq!(reply.text(), "HTTP/2.0");
    }
    assert!(
        a_connections.load(Ordering::SeqCst) >= 1 && b_connections.load(Ordering::SeqCst) >= 1,
        "each address was connected to, the certificate verified for api.test"
    );
}

#[tokio::test]
async fn a_reload_keeps_a_target_out_that_fails_its_probes() {
    let targets = [target().await, target().await];
    targets[1].health.store(500, Ordering::SeqCst);
    let list = format!(
        "[\"http://{}\", \"http://{}\"]",
        targets[0].addr, targets[1].addr
    );
    let config = targets_config(&list, CHECK);
    let gw = TestGateway::start(config.clone()).await;
    eventually("the failing target is out", || async {
        metric(gw.admin, &healthy_series(targets[1].addr)).await == 0.0
    })
    .await;
    gw.gateway.reload(config);
    send(&gw, 10).await;
    assert_eq!(
        counts(&targets),
        [10, 0],
        "out before the reload, out after it"
    );
    assert_eq!(
        metric(gw.admin, &healthy_series(targets[1].addr)).await,
        0.0
    );
}
