//! Redis Cluster (SPEC.md "Redis"): three primaries on loopback made with
//! `redis-cli --cluster create`, two gateways on them. Limits are exact for keys on every
//! node, and a slot moved with `redis-cli --cluster reshard` under load gives no wrong
//! decision (the client follows `MOVED` and `ASK`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::redis_server::{RedisProc, redis_cli};
use common::*;

/// Three cluster-enabled primaries, their slots assigned.
struct Cluster {
    nodes: Vec<RedisProc>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<RedisProc> = (0..3)
            .map(|i| {
                let node_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir(&node_dir).unwrap();
                RedisProc::start(|port| {
                    let mut args = RedisProc::base_args(&node_dir);
                    args.extend(
                        [
                            "--port",
                            &port.to_string(),
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            "2000",
                        ]
                        .map(String::from),
                    );
                    args
                })
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli(nodes[0].port, &args);
        let cluster = Self { nodes, _dir: dir };
        cluster.wait_until_ok();
        cluster
    }

    /// Until every node reports the cluster ok and knows all three nodes' slots.
    fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.nodes.iter().all(|n| {
            let info = redis_cli(n.port, &["CLUSTER", "INFO"]);
            info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
        }) {
            assert!(Instant::now() < deadline, "cluster never ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("\"127.0.0.1:{}\"", n.port))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The node (index) holding `slot`, asked of the first node.
    fn owner(&self, slot: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| {
                // Its own line of CLUSTER NODES: id, address, flags (`myself`), ..., slots.
                let nodes = redis_cli(n.port, &["CLUSTER", "NODES"]);
                nodes.lines().any(|l| {
                    l.contains("myself")
                        && l.split_whitespace().skip(8).any(|range| {
                            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                            match (lo.parse::<u16>(), hi.parse::<u16>()) {
                                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                                _ => false,
                            }
                        })
                })
            })
            .expect("some node holds every slot")
    }

    fn id_of(&self, node: usize) -> String {
        redis_cli(self.nodes[node].port, &["CLUSTER", "MYID"])
    }
}

/// The cluster slot of a key id's hash tag `{id}`: CRC16 (XMODEM) mod 16384, as Redis
/// computes it.
fn slot_of(id: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in id.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// A gateway on the cluster with keys `ids` (secret `tg_test_cluster_<id>_...`), each on a
/// plan of one token a minute, `burst` deep; Redis failing means 503.
async fn gateway(cluster: &Cluster, ids: &[String], burst: u32) -> TestGateway {
    let up = echo_upstream().await;
    let mut keys = String::new();
    for id in ids {
        keys.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nkey = \"{}\"\nplan = \"exact\"\n",
            digest(&secret(id))
        ));
    }
    TestGateway::start(config(
        "",
        &format!(
            r#"
[limits]
backend = "redis"
backend_timeout = "2s"
on_backend_error = "deny"
[redis]
cluster = [{seeds}]
[plans.exact]
requests_per_minute = 1
burst = {burst}
{keys}
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
            seeds = cluster.seeds(),
        ),
    ))
    .await
}

fn secret(id: &str) -> String {
    format!("tg_test_cluster_{id}_0123456789abcdefghijkl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_a_cluster_admit_exactly_capacity_for_keys_on_every_node() {
    let cluster = Cluster::start();
    // Key ids whose slots fall on each of the three nodes, two a node.
    let mut ids = Vec::new();
    let mut per_node = [0; 3];
    for i in 0.. {
        let id = format!("k{i}");
        let node = cluster.owner(slot_of(&id));
        if per_node[node] < 2 {
            per_node[node] += 1;
            ids.push(id);
        }
        if ids.len() == 6 {
            break;
        }
    }
    let one = gateway(&cluster, &ids, 10).await;
    let two = gateway(&cluster, &ids, 10).await;
    let addrs: [SocketAddr; 2] = [one.addr, two.addr];
    let mut tasks = Vec::new();
    for id in &ids {
        for i in 0..16 {
            let key = secret(id);
            let addr = addrs[i % 2];
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                (id, with_key(addr, "/v1/x", &key).await.status)
            }));
        }
    }
    let mut admitted = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (id, status) = t.await.unwrap();
        assert!([200, 429].contains(&status), "{id}: {status}");
        *admitted.entry(id).or_default() += usize::from(status == 200);
    }
    for id in &ids {
        assert_eq!(admitted[id], 10, "key {id}: exactly its burst across both");
    }
    for (node, n) in cluster.nodes.iter().enumerate() {
        let keys: u64 = redis_cli(n.port, &["DBSIZE"]).parse().unwrap();
        assert_eq!(keys, 2, "node {node} holds its two keys' buckets");
    }
    assert_eq!(
        metric_in(
            &one.gateway.metrics().encode(),
            "tollgate_redis_info{mode=\"cluster\",tls=\"false\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_resharded_under_load_gives_no_wrong_decision() {
    let cluster = Cluster::start();
    // A key on the first 100 slots of its node: the ones `reshard` moves first.
    let (id, from) = (0..)
        .map(|i| format!("m{i}"))
        .find_map(|id| {
            let slot = slot_of(&id);
            let node = cluster.owner(slot);
            let first = match node {
                // `--cluster create` gives 0-5460, 5461-10922, 10923-16383.
                0 => 0,
                1 => 5461,
                _ => 10923,
            };
            (slot >= first && slot < first + 100).then_some((id, node))
        })
        .unwrap();
    let to = (from + 1) % 3;
    let ids = vec![id.clone()];
    // Deep enough never to run dry: every admission is checked against the count.
    let burst = 100_000;
    let one = gateway(&cluster, &ids, burst).await;
    let two = gateway(&cluster, &ids, burst).await;
    assert_eq!(with_key(one.addr, "/v1/x", &secret(&id)).await.status, 200);

    let done = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = [one.addr, two.addr]
        .into_iter()
        .map(|addr| {
            let done = done.clone();
            let key = secret(&id);
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !done.load(Ordering::Relaxed) || statuses.len() < 50 {
                    statuses.push(with_key(addr, "/v1/x", &key).await.status);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                statuses
            })
        })
        .collect();
    let reshard = {
        let (seed, from_id, to_id) = (
            cluster.nodes[0].port,
            cluster.id_of(from),
            cluster.id_of(to),
        );
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(100));
            let started = Instant::now();
            redis_cli(
                seed,
                &[
                    "--cluster",
                    "reshard",
                    &format!("127.0.0.1:{seed}"),
                    "--cluster-from",
                    &from_id,
                    "--cluster-to",
                    &to_id,
                    "--cluster-slots",
                    "100",
                    "--cluster-yes",
                ],
            );
            started.elapsed()
        })
    };
    let took = reshard.await.unwrap();
    done.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for t in load {
        statuses.extend(t.await.unwrap());
    }
    assert_eq!(cluster.owner(slot_of(&id)), to, "the slot moved");
    let sent = statuses.len() + 1;
    eprintln!(
        "reshard of 100 slots took {took:?}; {} decisions during it, statuses other than 200: {:?}",
        statuses.len(),
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request admitted by Redis, none fell back"
    );
    // Exact: the bucket, now on the other node, holds exactly what was charged (the plan's
    // one token a minute may have added one).
    let r = with_key(two.addr, "/v1/x", &secret(&id)).await;
    assert_eq!(r.status, 200);
    let remaining: usize = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
    let expected = burst as usize - sent - 1;
    assert!(
        remaining == expected || remaining == expected + 1,
        "remaining {remaining}, expected {expected} after {sent} decisions"
    );
    let moved: u64 = redis_cli(
        cluster.nodes[to].port,
        &["CLUSTER", "COUNTKEYSINSLOT", &slot_of(&id).to_string()],
    )
    .parse()
    .unwrap();
    assert_eq!(moved, 1, "the bucket is on its new node");
}
