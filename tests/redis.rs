//! The Redis limiter backend over the wire, against a real `redis-server` started per test on
//! a free loopback port without persistence: one limit across gateways, headers and 429s from
//! Redis, and each `on_backend_error` policy while Redis is down, hung, and back again.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KEY_A: &str = "tg_test_redis_a_0123456789abcdefghi";
const KEY_B: &str = "tg_test_redis_b_0123456789abcdefghi";

/// A `redis-server` child process on a loopback port; killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// The port is a free one picked by binding port 0 and dropping the listener: redis-server
    /// must bind it itself, and `restart` needs the same port again (the gateway's
    /// `redis_url` names it), so it cannot be held for the test. Another process may take it
    /// in between: then redis-server exits at once, and another port is tried.
    fn start() -> Self {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = Self { port, child: None };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and waits until it answers PING.
    fn restart(&mut self) {
        assert!(
            self.spawn(),
            "redis-server exited: port {} taken while it was down",
            self.port
        );
    }

    /// Starts it on `self.port` and waits until it answers PING; false if it exited first
    /// (the port was taken).
    fn spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if let Ok(mut conn) = redis::Client::open(self.url())
                .unwrap()
                .get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return true;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a hung Redis that accepts but never answers.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process would not die of SIGKILL until continued on some systems.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Keys `a` and `b` on plan `tight` (rpm, burst), limited in Redis at `redis`.
fn redis_config(
    redis: &str,
    rpm: u32,
    burst: u32,
    limits: &str,
    up: SocketAddr,
) -> tollgate::Config {
    config(
        "",
        &format!(
            r#"
[limits]
backend = "redis"
redis_url = "{redis}"
{limits}
[plans.tight]
requests_per_minute = {rpm}
burst = {burst}
[[keys]]
id = "a"
key = "{a}"
plan = "tight"
[[keys]]
id = "b"
key = "{b}"
plan = "tight"
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
            a = digest(KEY_A),
            b = digest(KEY_B),
        ),
    )
}

async fn gateway(redis: &RedisServer, rpm: u32, burst: u32, limits: &str) -> TestGateway {
    let up = echo_upstream().await;
    TestGateway::start(redis_config(&redis.url(), rpm, burst, limits, up)).await
}

/// A gateway on a plan of 60/min, 5 deep, that answers 503 while Redis is down.
async fn deny_gateway(redis: &RedisServer) -> TestGateway {
    gateway(
        redis,
        60,
        5,
        "on_backend_error = \"deny\"\nbackend_timeout = \"2s\"",
    )
    .await
}

/// `n` sequential requests; their statuses and latencies.
async fn burst_of(addr: SocketAddr, n: usize) -> (Vec<u16>, Vec<Duration>) {
    let mut statuses = Vec::new();
    let mut latencies = Vec::new();
    for _ in 0..n {
        let sent = Instant::now();
        statuses.push(with_key(addr, "/v1/x", KEY_A).await.status);
        latencies.push(sent.elapsed());
    }
    (statuses, latencies)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// Backend errors of every kind.
fn backend_errors(gw: &TestGateway) -> u64 {
    let text = gw.gateway.metrics().encode();
    text.lines()
        .filter(|l| l.starts_with("tollgate_limiter_backend_errors_total{"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse::<f64>().unwrap() as u64)
        .sum()
}

/// The value of `series` in the gateway's own metrics (no admin round trip); fails when it is
/// not there.
fn counter(gw: &TestGateway, series: &str) -> u64 {
    let text = gw.gateway.metrics().encode();
    metric_in(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}")) as u64
}

/// The Redis key of key `id`'s `window` bucket, whose name also carries the bucket's limit
/// and burst; `None` while the bucket has no state (it is full).
fn state_key(conn: &mut redis::Connection, id: &str, window: &str) -> Option<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("tollgate:{{{id}}}:{window}:*"))
        .query(conn)
        .unwrap();
    assert!(keys.len() <= 1, "one bucket per window: {keys:?}");
    keys.into_iter().next()
}

/// Waits (breaker probes, reconnect) until a request is decided by Redis again: the key's
/// minute bucket exists in Redis after it. Returns that request's status.
async fn until_redis_decides(redis: &RedisServer, addr: SocketAddr) -> u16 {
    let mut conn = redis.connection();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = with_key(addr, "/v1/x", KEY_A).await.status;
        if state_key(&mut conn, "a", "minute").is_some() {
            return status;
        }
        assert!(Instant::now() < deadline, "Redis never decided again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_sharing_redis_admit_exactly_capacity() {
    let redis = RedisServer::start();
    // Capacity 25, one token a minute: nothing refills during the test. A generous timeout:
    // this test is about exactness, not about a slow CI machine.
    let limits = "backend_timeout = \"2s\"\non_backend_error = \"deny\"";
    let one = gateway(&redis, 1, 25, limits).await;
    let two = gateway(&redis, 1, 25, limits).await;
    let mut tasks = Vec::new();
    for i in 0..48 {
        let addr = if i % 2 == 0 { one.addr } else { two.addr };
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                statuses.push(with_key(addr, "/v1/x", KEY_A).await.status);
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    assert_eq!(statuses.len(), 96);
    assert_eq!(
        count(&statuses, 200),
        25,
        "exactly the capacity, across both"
    );
    assert_eq!(count(&statuses, 429), 71);
    assert_eq!(backend_errors(&one) + backend_errors(&two), 0);
    // The other key is untouched, on either gateway.
    assert_eq!(with_key(two.addr, "/v1/x", KEY_B).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_429_come_from_the_shared_bucket() {
    let redis = RedisServer::start();
    // One token a minute, 3 deep: nothing refills while the bucket is drained and read.
    let one = gateway(&redis, 1, 3, "backend_timeout = \"2s\"").await;
    let two = gateway(&redis, 1, 3, "backend_timeout = \"2s\"").await;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = with_key(one.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    let r = with_key(two.addr, "/v1/x", KEY_A).await;
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("1"),
        "the other gateway sees the same bucket"
    );
    assert_eq!(with_key(one.addr, "/v1/x", KEY_A).await.status, 200);
    let r = with_key(two.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429);
    let v = r.json();
    assert_eq!(v["error"]["code"], "rate_limited");
    // The next token, a minute after the first request (less the whole seconds these
    // requests took); not the 3 minutes until the bucket is full.
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    // Full again 3 minutes after the first request.
    let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        (started + 180..=started + 190).contains(&reset),
        "reset {reset}, started {started}"
    );

    // The key layout, and a TTL of the time until the bucket is full again (about 3 min).
    let mut conn = redis.connection();
    assert_eq!(
        state_key(&mut conn, "a", "minute").as_deref(),
        Some("tollgate:{a}:minute:1:3")
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("tollgate:{a}:minute:1:3")
        .query(&mut conn)
        .unwrap();
    // (More than the minute to the next token: it is the time to full.)
    assert!((120_000..=180_000).contains(&ttl), "PTTL {ttl}");
    assert!(
        state_key(&mut conn, "b", "minute").is_none(),
        "an unused key has no state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moved_to_another_plan_starts_with_a_full_bucket_of_it() {
    // As in process: the old plan's drained state does not carry over into the new bucket.
    // (Read with the new parameters, a bucket 3 deep at 1/min drained is a TAT 3 min ahead:
    // refused for minutes by a plan of 300/min.)
    let redis = RedisServer::start();
    let up = echo_upstream().await;
    let limits = "backend_timeout = \"2s\"";
    let gw = TestGateway::start(redis_config(&redis.url(), 1, 3, limits, up)).await;
    let (statuses, _) = burst_of(gw.addr, 4).await;
    assert_eq!(statuses, [200, 200, 200, 429]);
    gw.gateway
        .reload(redis_config(&redis.url(), 300, 300, limits, up));
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("299"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("300"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_bucket_refills_from_redis_time() {
    let redis = RedisServer::start();
    // 60/min: one token a second, one deep, so a wait never banks more than one token.
    let one = gateway(&redis, 60, 1, "backend_timeout = \"2s\"").await;
    let two = gateway(&redis, 60, 1, "backend_timeout = \"2s\"").await;
    assert_eq!(with_key(one.addr, "/v1/x", KEY_A).await.status, 200);
    // A request slower than a second may find the next token: ask until limited.
    let mut limited = None;
    for _ in 0..50 {
        let r = with_key(two.addr, "/v1/x", KEY_A).await;
        if r.status != 200 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("never limited");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));

    // Refill comes from Redis time: one token a second later, for either gateway. Both ask
    // at once, so they are decided within the second until the token after.
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let (a, b) = tokio::join!(
        with_key(two.addr, "/v1/x", KEY_A),
        with_key(one.addr, "/v1/x", KEY_A)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429], "exactly one token refilled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_and_ip_throttle_work_with_redis() {
    let redis = RedisServer::start();
    // One token a minute: nothing refills between the requests, so the counts are exact.
    let shadow = gateway(&redis, 1, 2, "mode = \"shadow\"\nbackend_timeout = \"2s\"").await;
    for _ in 0..5 {
        assert_eq!(with_key(shadow.addr, "/v1/x", KEY_B).await.status, 200);
    }
    assert_eq!(shadow.gateway.would_limit_count(), 3);

    let throttled = gateway(
        &redis,
        1,
        2,
        "backend_timeout = \"2s\"\n[limits.ip_throttle]\nrejections = 3\nwindow = \"60s\"\nblock_for = \"5m\"",
    )
    .await;
    let (statuses, _) = burst_of(throttled.addr, 6).await;
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429]);
    let r = with_key(throttled.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.json()["error"]["code"], "ip_throttled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_local_policy_falls_back_then_recovers() {
    let mut redis = RedisServer::start();
    // A generous timeout: a slow Redis reply on a loaded host must not trip the fallback.
    let gw = gateway(
        &redis,
        1,
        5,
        "on_backend_error = \"local\"\nbackend_timeout = \"2s\"",
    )
    .await;
    let (statuses, _) = burst_of(gw.addr, 2).await;
    assert_eq!(statuses, [200, 200]);

    redis.kill();
    // The in-process buckets were never charged while Redis decided: a full burst of 5.
    let (statuses, _) = burst_of(gw.addr, 20).await;
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 15);
    assert!(backend_errors(&gw) >= 1);
    assert_eq!(get(gw.admin, "/readyz", &[]).await.status, 200);

    // Redis back (empty: no persistence): it decides again, with its own full bucket.
    redis.restart();
    assert_eq!(until_redis_decides(&redis, gw.addr).await, 200);
    let (statuses, _) = burst_of(gw.addr, 6).await;
    assert_eq!(count(&statuses, 200), 4, "5 in Redis' bucket: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_allow_policy_admits_without_headers() {
    let mut redis = RedisServer::start();
    let gw = gateway(
        &redis,
        1,
        2,
        "on_backend_error = \"allow\"\nbackend_timeout = \"2s\"",
    )
    .await;
    let (statuses, _) = burst_of(gw.addr, 3).await;
    assert_eq!(statuses, [200, 200, 429]);

    redis.kill();
    for _ in 0..20 {
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            None,
            "no decision to report"
        );
    }
    assert!(backend_errors(&gw) >= 1);
    assert_eq!(
        counter(
            &gw,
            "tollgate_limiter_fallbacks_total{on_backend_error=\"allow\"}"
        ),
        20
    );

    redis.restart();
    assert_eq!(until_redis_decides(&redis, gw.addr).await, 200);
    let (statuses, _) = burst_of(gw.addr, 3).await;
    assert_eq!(statuses, [200, 429, 429], "limited by Redis again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_deny_policy_answers_503() {
    let mut redis = RedisServer::start();
    let gw = deny_gateway(&redis).await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);

    redis.kill();
    for _ in 0..20 {
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"]["code"], "service_unavailable");
    }
    assert_eq!(
        get(gw.admin, "/readyz", &[]).await.status,
        200,
        "the gateway still serves"
    );

    redis.restart();
    assert_eq!(until_redis_decides(&redis, gw.addr).await, 200);
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
}

/// A restarted Redis is used at once: the request that finds the old connection dropped is
/// tried again on a new one, not denied; and an instance idle while Redis was down finds it
/// again by itself (background probes), so its next request is not denied either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_decides_at_once_even_for_an_idle_instance() {
    let mut redis = RedisServer::start();
    let gw = deny_gateway(&redis).await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    redis.kill();
    redis.restart();
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "restarted while idle: {}", r.shown());
    assert_eq!(backend_errors(&gw), 0);

    redis.kill();
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 503);
    redis.restart();
    // No requests now: only the background probes can find Redis back.
    tokio::time::sleep(
        tollgate::limit::breaker::MAX_PROBE_INTERVAL * 2 + Duration::from_millis(500),
    )
    .await;
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "idle through the outage: {}", r.shown());
}

/// A 1 s Redis outage under `deny`, the realistic kind (the server killed and started again
/// on the same port), with requests at a steady rate throughout: the 503s end at most one
/// probe interval after Redis answers again, so the first probe after it is back must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_outage_denies_for_at_most_the_outage_and_one_probe_interval() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tollgate::limit::breaker::MAX_PROBE_INTERVAL;

    let mut redis = RedisServer::start();
    // Short, as in production (the default is 20 ms), so the request that finds Redis gone
    // gives up before the connection's own reconnect attempts end; far above a loaded host's
    // scheduling delays, so no healthy reply counts as a failure.
    let gw = gateway(
        &redis,
        60_000,
        60_000,
        "on_backend_error = \"deny\"\nbackend_timeout = \"150ms\"",
    )
    .await;
    let addr = gw.addr;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut sent = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = start.elapsed();
                let status = with_key(addr, "/v1/x", KEY_A).await.status;
                // When the answer came: a request sent just before the kill may meet it.
                sent.push((at, status, start.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        }
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = start.elapsed();
    tokio::task::block_in_place(|| redis.kill());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| redis.restart());
    let back = start.elapsed();
    tokio::time::sleep(MAX_PROBE_INTERVAL + Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();

    let others: Vec<_> = sent
        .iter()
        .filter(|(_, s, _)| *s != 200 && *s != 503)
        .collect();
    assert!(others.is_empty(), "only 200 or 503: {others:?}");
    let denied: Vec<(Duration, Duration)> = sent
        .iter()
        .filter(|(_, s, _)| *s == 503)
        .map(|(at, _, answered)| (*at, *answered))
        .collect();
    let (Some(&(_, first_answered)), Some(&(last, _))) = (denied.first(), denied.last()) else {
        panic!("no 503 at all: the outage went unnoticed");
    };
    assert!(
        first_answered >= killed,
        "a 503 answered before the outage (at {first_answered:?}, the kill at {killed:?})"
    );
    let outage = back - killed;
    let denying = last.saturating_sub(killed);
    eprintln!(
        "outage {outage:?}; 503s for {denying:?} after the kill ({} of {} requests)",
        denied.len(),
        sent.len()
    );
    let slack = Duration::from_millis(300);
    assert!(
        denying <= outage + MAX_PROBE_INTERVAL + slack,
        "503s for {denying:?} after a {outage:?} outage: more than the outage, one probe \
         interval ({MAX_PROBE_INTERVAL:?}) and {slack:?}"
    );
    let after: Vec<u16> = sent
        .iter()
        .filter(|(at, _, _)| *at > last)
        .map(|(_, s, _)| *s)
        .collect();
    assert!(after.len() >= 20 && after.iter().all(|s| *s == 200));
}

/// Shadow mode rejects nothing for rate limits: with Redis down and `deny`, requests pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_deny_policy_in_shadow_mode_rejects_nothing() {
    let mut redis = RedisServer::start();
    let gw = gateway(
        &redis,
        60,
        5,
        "mode = \"shadow\"\non_backend_error = \"deny\"\nbackend_timeout = \"2s\"",
    )
    .await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    redis.kill();
    for _ in 0..5 {
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        assert_eq!(r.status, 200, "{}", r.shown());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_costs_one_timeout_per_cool_off_not_per_request() {
    let redis = RedisServer::start();
    // Far above a loaded host's scheduling delays, so a request counts as slow only when it
    // really waited for Redis.
    let timeout = Duration::from_millis(150);
    let gw = gateway(
        &redis,
        6_000,
        6_000,
        "on_backend_error = \"local\"\nbackend_timeout = \"150ms\"",
    )
    .await;
    let (_, normal) = burst_of(gw.addr, 50).await;

    // Accepts connections, never answers: every call would wait the whole timeout.
    redis.signal("-STOP");
    let started = Instant::now();
    let (statuses, outage) = burst_of(gw.addr, 50).await;
    let elapsed = started.elapsed();
    // Past several probes (in the background): still no request waits.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (later_statuses, later) = burst_of(gw.addr, 20).await;
    assert_eq!(count(&later_statuses, 200), 20);
    let later_slow = later.iter().filter(|l| **l >= timeout).count();
    assert_eq!(
        later_slow, 0,
        "the half-open probe must not make a request wait"
    );
    redis.signal("-CONT");
    assert_eq!(count(&statuses, 200), 50, "local fallback admits");
    let slow = outage.iter().filter(|l| **l >= timeout).count();
    let p = |v: &[Duration], q: f64| {
        let mut v = v.to_vec();
        v.sort();
        v[((v.len() as f64 * q).ceil() as usize).min(v.len()) - 1]
    };
    eprintln!(
        "normal p50 {:?} p99 {:?}; outage p50 {:?} p99 {:?}; 50 requests in {elapsed:?}; {slow} waited the timeout",
        p(&normal, 0.5),
        p(&normal, 0.99),
        p(&outage, 0.5),
        p(&outage, 0.99),
    );
    assert!(
        elapsed < timeout * 10,
        "50 requests took {elapsed:?}: the breaker should skip Redis"
    );
    assert!(slow <= 2, "{slow} requests waited for Redis");
    assert_eq!(backend_errors(&gw), slow as u64);
    assert_eq!(
        counter(
            &gw,
            "tollgate_limiter_fallbacks_total{on_backend_error=\"local\"}"
        ),
        70,
        "every request of the outage was decided in process"
    );

    // Redis answers again: decisions come from it after a probe.
    let mut conn = redis.connection();
    if let Some(key) = state_key(&mut conn, "a", "minute") {
        let _: () = redis::cmd("DEL").arg(key).query(&mut conn).unwrap();
    }
    let back = Instant::now();
    assert_eq!(until_redis_decides(&redis, gw.addr).await, 200);
    eprintln!("Redis decided again {:?} after SIGCONT", back.elapsed());
}

/// A Redis that answers PING but cannot run the script (a read-only replica after a
/// failover): the breaker's probe runs the script itself, so it stays open instead of closing
/// at every probe only for the next request to fail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_answers_but_cannot_write_keeps_the_breaker_open() {
    let redis = RedisServer::start();
    // A generous timeout: the one backend error counted must be the refused write, not a
    // slow reply on a loaded host.
    let gw = gateway(
        &redis,
        6_000,
        6_000,
        "on_backend_error = \"local\"\nbackend_timeout = \"2s\"",
    )
    .await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    assert_eq!(backend_errors(&gw), 0);

    // A replica of a master that does not exist: reads and PING work, writes are refused.
    let mut conn = redis.connection();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg("1")
        .query(&mut conn)
        .unwrap();
    // Several probes' worth of steady traffic, all decided in process.
    let until = Instant::now() + Duration::from_millis(4_600);
    while Instant::now() < until {
        assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        backend_errors(&gw),
        1,
        "one failed request opened the breaker; the probes kept it open"
    );

    // A writable primary again: the next probe closes the breaker.
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut conn)
        .unwrap();
    assert_eq!(until_redis_decides(&redis, gw.addr).await, 200);
}

/// Key `a` on plan `daily` (`plan`: the plan's lines), limited in Redis at `redis`.
async fn daily_plan_gateway(redis: &RedisServer, plan: &str) -> TestGateway {
    let up = echo_upstream().await;
    let text = format!(
        r#"
[limits]
backend = "redis"
redis_url = "{url}"
backend_timeout = "2s"
[plans.daily]
{plan}
[[keys]]
id = "a"
key = "{a}"
plan = "daily"
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
        url = redis.url(),
        a = digest(KEY_A),
    );
    TestGateway::start(config("", &text)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_bucket_charges_no_other_bucket() {
    let redis = RedisServer::start();
    let gw = daily_plan_gateway(&redis, "requests_per_minute = 10\nrequests_per_day = 3").await;
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("2"),
        "the day bucket is the closest to empty"
    );
    let (statuses, _) = burst_of(gw.addr, 2).await;
    assert_eq!(statuses, [200, 200]);
    // Now the minute bucket has tokens and the day bucket none: all or nothing.
    let mut conn = redis.connection();
    let (minute, day) = (
        state_key(&mut conn, "a", "minute").unwrap(),
        state_key(&mut conn, "a", "day").unwrap(),
    );
    let tats = |conn: &mut redis::Connection| -> (i64, i64) {
        redis::cmd("MGET")
            .arg(&minute)
            .arg(&day)
            .query(conn)
            .unwrap()
    };
    let before = tats(&mut conn);
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per day")
    );
    assert_eq!(tats(&mut conn), before, "a rejection charges no bucket");
    let ttl: i64 = redis::cmd("PTTL").arg(&day).query(&mut conn).unwrap();
    // All three daily tokens taken: full again in 3 x 8 h.
    let eight_hours = 8 * 3_600 * 1_000;
    assert!(
        (3 * eight_hours - 60_000..=3 * eight_hours).contains(&ttl),
        "PTTL {ttl}"
    );
}

/// With the minute and the daily bucket both empty, the 429 tells the daily bucket's wait (and
/// names the day): after the minute's second the client would be refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reports_the_longest_wait_of_the_empty_buckets() {
    let redis = RedisServer::start();
    let gw = daily_plan_gateway(
        &redis,
        "requests_per_minute = 60\nburst = 1\nrequests_per_day = 1",
    )
    .await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429, "{}", r.shown());
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (86_000..=86_400).contains(&retry_after),
        "Retry-After {retry_after}, not the minute bucket's 1 s"
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per day"),
        "{}",
        r.shown()
    );
}

#[test]
fn the_compose_config_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.compose.toml");
    let config = tollgate::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.redis.target,
        tollgate::config::RedisTarget::Single {
            url: "redis://redis:6379".into()
        }
    );
}
