//! Redis Sentinel (SPEC.md "Redis"): a primary, a replica and three sentinels on loopback,
//! two gateways finding the primary through them. Under steady load the primary is killed
//! and the replica promoted: the decisions that fell back are counted, the time to recover is
//! measured, and the limits are exact before and after.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis_server::{RedisProc, redis_cli, try_redis_cli, write_file};
use common::*;

const MASTER: &str = "tollgate-main";
const KEY_BEFORE: &str = "tg_test_sentinel_before_0123456789ab";
const KEY_LOAD: &str = "tg_test_sentinel_load_0123456789abcd";
const KEY_AFTER: &str = "tg_test_sentinel_after_0123456789abc";

/// A primary, its replica, and three sentinels (quorum 2) watching it.
struct Deployment {
    primary: RedisProc,
    replica: RedisProc,
    sentinels: Vec<RedisProc>,
    _dir: tempfile::TempDir,
}

impl Deployment {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            d
        };
        let (primary_dir, replica_dir) = (data("primary"), data("replica"));
        let primary = RedisProc::start(|port| {
            let mut args = RedisProc::base_args(&primary_dir);
            args.extend(["--port".into(), port.to_string()]);
            args
        });
        let replica = RedisProc::start(|port| {
            let mut args = RedisProc::base_args(&replica_dir);
            args.extend(
                [
                    "--port",
                    &port.to_string(),
                    "--replicaof",
                    "127.0.0.1",
                    &primary.port.to_string(),
                    "--repl-diskless-sync",
                    "yes",
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                .map(String::from),
            );
            args
        });
        let sentinels = (0..3)
            .map(|i| {
                let conf_dir = data(&format!("sentinel{i}"));
                RedisProc::start(|port| {
                    // Sentinel rewrites its config file: one each, written fresh per port.
                    let conf = write_file(
                        &conf_dir,
                        "sentinel.conf",
                        &format!(
                            "bind 127.0.0.1\nport {port}\ndir {}\n\
                             sentinel monitor {MASTER} 127.0.0.1 {} 2\n\
                             sentinel down-after-milliseconds {MASTER} 400\n\
                             sentinel failover-timeout {MASTER} 3000\n",
                            conf_dir.display(),
                            primary.port
                        ),
                    );
                    vec![conf.display().to_string(), "--sentinel".into()]
                })
            })
            .collect::<Vec<_>>();
        let deployment = Self {
            primary,
            replica,
            sentinels,
            _dir: dir,
        };
        deployment.wait_until_ready();
        deployment
    }

    /// Until the replica is in sync and every sentinel knows the replica and the other
    /// sentinels (a failover needs both).
    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let ready = || {
            redis_cli(self.replica.port, &["INFO", "replication"]).contains("master_link_status:up")
                && self.sentinels.iter().all(|s| {
                    redis_cli(s.port, &["SENTINEL", "CKQUORUM", MASTER]).starts_with("OK 3")
                        && !redis_cli(s.port, &["SENTINEL", "REPLICAS", MASTER]).is_empty()
                })
        };
        while !ready() {
            assert!(Instant::now() < deadline, "sentinels never ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The primary's port as the first sentinel reports it.
    fn primary_port(&self) -> u16 {
        let reply = redis_cli(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER],
        );
        reply.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    fn sentinel_list(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("\"127.0.0.1:{}\"", s.port))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A gateway on the sentinels; Redis down means 503 (every fallback is visible); the load key
/// has a bucket no test drains.
async fn gateway(deployment: &Deployment) -> TestGateway {
    let up = echo_upstream().await;
    TestGateway::start(config(
        "",
        &format!(
            r#"
[limits]
backend = "redis"
backend_timeout = "250ms"
on_backend_error = "deny"
[redis]
sentinels = [{sentinels}]
master_name = "{MASTER}"
[plans.exact]
requests_per_minute = 1
burst = 20
[plans.roomy]
requests_per_minute = 1000000
[[keys]]
id = "before"
key = "{before}"
plan = "exact"
[[keys]]
id = "after"
key = "{after}"
plan = "exact"
[[keys]]
id = "load"
key = "{load}"
plan = "roomy"
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
            sentinels = deployment.sentinel_list(),
            before = digest(KEY_BEFORE),
            after = digest(KEY_AFTER),
            load = digest(KEY_LOAD),
        ),
    ))
    .await
}

/// 30 requests of `key`, alternating between the gateways, concurrently: how many passed.
async fn admitted_across(gateways: [SocketAddr; 2], key: &'static str) -> usize {
    let tasks: Vec<_> = (0..30)
        .map(|i| tokio::spawn(async move { with_key(gateways[i % 2], "/v1/x", key).await.status }))
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    statuses.iter().filter(|s| **s == 200).count()
}

fn keys_in(port: u16, id: &str) -> String {
    redis_cli(port, &["KEYS", &format!("tollgate:{{{id}}}:*")])
}

fn errors_of(gw: &TestGateway, kind: &str) -> f64 {
    metric_in(
        &gw.gateway.metrics().encode(),
        &format!("tollgate_limiter_backend_errors_total{{kind=\"{kind}\"}}"),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_primary_is_replaced_by_the_promoted_replica_with_exact_limits_around_it() {
    let mut deployment = Deployment::start();
    let one = gateway(&deployment).await;
    let two = gateway(&deployment).await;
    let addrs = [one.addr, two.addr];
    assert_eq!(admitted_across(addrs, KEY_BEFORE).await, 20, "exact before");
    assert!(!keys_in(deployment.primary.port, "before").is_empty());
    assert_eq!(
        metric_in(
            &one.gateway.metrics().encode(),
            "tollgate_redis_info{mode=\"sentinel\",tls=\"false\"}"
        ),
        Some(1.0)
    );

    // Steady load: each gateway one request at a time, as fast as it answers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let load: Vec<_> = addrs
        .into_iter()
        .map(|addr| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = with_key(addr, "/v1/x", KEY_LOAD).await.status;
                    seen.push((started.elapsed(), status));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let old_port = deployment.primary.port;
    let killed_at = started.elapsed();
    deployment.primary.kill();
    // The sentinels' own view: when the replica became the primary.
    let promoted_at = loop {
        let port = tokio::task::spawn_blocking({
            let sentinel = deployment.sentinels[0].port;
            move || {
                redis_cli(sentinel, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER])
                    .lines()
                    .nth(1)
                    .map(|p| p.trim().parse::<u16>().unwrap())
            }
        })
        .await
        .unwrap();
        if port != Some(old_port) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < killed_at + Duration::from_secs(15),
            "no failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(deployment.primary_port(), deployment.replica.port);
    // Load goes on until both gateways have had a second of Redis decisions after the
    // promotion (or gives up: the assertions below say why).
    let deadline = started.elapsed() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fallbacks = |gw: &TestGateway| {
            metric_in(
                &gw.gateway.metrics().encode(),
                "tollgate_limiter_fallbacks_total{on_backend_error=\"deny\"}",
            )
            .unwrap()
        };
        let before = fallbacks(&one) + fallbacks(&two);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if fallbacks(&one) + fallbacks(&two) == before && started.elapsed() > promoted_at {
            break;
        }
        if started.elapsed() > deadline {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for task in load {
        seen.extend(task.await.unwrap());
    }
    seen.sort_by_key(|(at, _)| *at);

    let fell_back: Vec<_> = seen.iter().filter(|(_, s)| *s == 503).collect();
    let total = seen.len();
    let first = fell_back.first().map(|(at, _)| *at);
    let last = fell_back.last().map(|(at, _)| *at);
    let recovered_at = last.and_then(|last| {
        seen.iter()
            .find(|(at, s)| *at > last && *s == 200)
            .map(|(at, _)| *at)
    });
    eprintln!(
        "sentinel failover: {total} decisions under load, {} fell back (503); killed at {:?}, \
         promoted {:?} later, first fallback {:?} after the kill, last {:?} after the kill, \
         recovered {:?} after the kill ({:?} after the promotion); readonly errors {}, io {}, \
         timeout {}",
        fell_back.len(),
        killed_at,
        promoted_at - killed_at,
        first.map(|f| f.saturating_sub(killed_at)),
        last.map(|l| l.saturating_sub(killed_at)),
        recovered_at.map(|r| r.saturating_sub(killed_at)),
        recovered_at.map(|r| r.saturating_sub(promoted_at)),
        errors_of(&one, "readonly") + errors_of(&two, "readonly"),
        errors_of(&one, "io") + errors_of(&two, "io"),
        errors_of(&one, "timeout") + errors_of(&two, "timeout"),
    );
    assert!(
        seen.iter().all(|(_, s)| [200, 503].contains(s)),
        "only Redis decisions or fallbacks"
    );
    assert!(!fell_back.is_empty(), "the outage was seen");
    assert!(
        fell_back.iter().all(|(at, _)| *at >= killed_at),
        "nothing fell back before the kill"
    );
    let recovered_at = recovered_at.expect("Redis decides again");
    // The gateways find the new primary within a probe interval (1 s) and a timeout of the
    // promotion, not later.
    assert!(
        recovered_at < promoted_at + Duration::from_millis(1250) + Duration::from_millis(250),
        "recovered {recovered_at:?}, promoted {promoted_at:?}"
    );
    assert!(
        seen.iter()
            .filter(|(at, _)| *at > recovered_at)
            .all(|(_, s)| *s == 200),
        "no fallback after recovery"
    );

    // Exact after, in the new primary.
    assert_eq!(admitted_across(addrs, KEY_AFTER).await, 20, "exact after");
    assert!(!keys_in(deployment.replica.port, "after").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_is_followed_at_the_sentinels_announcement() {
    // No crash: the old primary stays up and writable until Sentinel demotes it (up to its
    // 10 s INFO period later). The gateway must not wait for that: it hears `+switch-master`
    // and goes to the new primary at once.
    let deployment = Deployment::start();
    let gw = gateway(&deployment).await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_LOAD).await.status, 200);
    let old_port = deployment.primary.port;
    redis_cli(
        deployment.sentinels[0].port,
        &["SENTINEL", "FAILOVER", MASTER],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while deployment.primary_port() == old_port {
        assert!(Instant::now() < deadline, "no failover");
        std::thread::sleep(Duration::from_millis(10));
    }
    let promoted = Instant::now();
    let mut statuses = Vec::new();
    // The slow key's bucket (the load key's expires within a millisecond) shows where the
    // decisions go.
    while keys_in(deployment.replica.port, "after").is_empty() {
        assert!(
            promoted.elapsed() < Duration::from_secs(2),
            "still deciding on the old primary: {statuses:?}"
        );
        statuses.push(with_key(gw.addr, "/v1/x", KEY_AFTER).await.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old_still_primary =
        try_redis_cli(old_port, &["ROLE"]).is_ok_and(|role| role.starts_with("master"));
    eprintln!(
        "manual failover: decisions in the new primary {:?} after the promotion ({} requests, \
         statuses {statuses:?}); the old primary still a primary then: {old_still_primary}",
        promoted.elapsed(),
        statuses.len(),
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_readonly_and_the_probe_waits_until_it_is_promoted() {
    // A gateway pointed straight at a replica (as a demoted primary is): every charge is a
    // write, refused READONLY; the breaker's probe runs the same script, so it stays open
    // until the node is promoted, then closes within a probe interval.
    let dir = tempfile::tempdir().unwrap();
    let primary = RedisProc::start(|port| {
        let mut args = RedisProc::base_args(dir.path());
        args.extend(["--port".into(), port.to_string()]);
        args
    });
    let replica = RedisProc::start(|port| {
        let mut args = RedisProc::base_args(dir.path());
        args.extend(
            [
                "--port",
                &port.to_string(),
                "--replicaof",
                "127.0.0.1",
                &primary.port.to_string(),
            ]
            .map(String::from),
        );
        args
    });
    let up = echo_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            r#"
[limits]
backend = "redis"
backend_timeout = "250ms"
on_backend_error = "deny"
[redis]
url = "redis://127.0.0.1:{port}"
[plans.roomy]
requests_per_minute = 1000000
[[keys]]
id = "load"
key = "{load}"
plan = "roomy"
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
            port = replica.port,
            load = digest(KEY_LOAD),
        ),
    ))
    .await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_LOAD).await.status, 503);
    assert_eq!(errors_of(&gw, "readonly"), 1.0);
    // Probes (at 100, 300, 700 ms) keep failing on the replica.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_LOAD).await.status, 503);
    redis_cli(replica.port, &["REPLICAOF", "NO", "ONE"]);
    let promoted = Instant::now();
    while with_key(gw.addr, "/v1/x", KEY_LOAD).await.status != 200 {
        assert!(
            promoted.elapsed() < Duration::from_secs(3),
            "the probe never noticed the promotion"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(promoted.elapsed() < Duration::from_millis(1300));
    assert_eq!(
        errors_of(&gw, "readonly"),
        1.0,
        "requests skip Redis while open"
    );
}

#[test]
fn the_compose_sentinel_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/tollgate.compose-sentinel.toml");
    let config = tollgate::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.redis.target,
        tollgate::config::RedisTarget::Sentinel {
            sentinels: (1..=3).map(|i| (format!("sentinel-{i}"), 26379)).collect(),
            master_name: "tollgate".into()
        }
    );
}
