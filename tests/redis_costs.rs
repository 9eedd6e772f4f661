//! Route costs, route buckets and monthly quotas with the Redis backend: two gateway
//! instances against one real `redis-server` (started per test on a free loopback port,
//! without persistence) share every bucket and the quota, all or none, in one script.

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::redis_server::RedisProc;
use common::*;

const KEY_A: &str = "tg_test_redis_costs_a_0123456789abcd";

/// Key `a` on plan `tight` (1 a minute, `plan` lines added) limited in Redis; routes `/v1/`
/// (cost 1), `/v1/reports/` (cost `cost`) and `/free/` (cost 0); `extra` appended.
async fn gateway(redis: &RedisProc, plan: &str, cost: u32, extra: &str) -> TestGateway {
    let up = echo_upstream().await;
    let text = format!(
        r#"
[limits]
backend = "redis"
redis_url = "{url}"
backend_timeout = "2s"
on_backend_error = "deny"
[plans.tight]
requests_per_minute = 1
{plan}
[[keys]]
id = "a"
key = "{a}"
plan = "tight"
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
[[routes]]
prefix = "/v1/reports/"
upstream = "up"
cost = {cost}
[[routes]]
prefix = "/free/"
upstream = "up"
cost = 0
{extra}
"#,
        url = redis.url(),
        a = digest(KEY_A),
    );
    TestGateway::start(config("", &text)).await
}

async fn two_gateways(redis: &RedisProc, plan: &str, cost: u32, extra: &str) -> [TestGateway; 2] {
    [
        gateway(redis, plan, cost, extra).await,
        gateway(redis, plan, cost, extra).await,
    ]
}

fn remaining(r: &Reply) -> u32 {
    r.header("x-ratelimit-remaining")
        .unwrap_or_else(|| panic!("no X-RateLimit-Remaining: {r:?}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_five_on_sixty_tokens_admits_exactly_twelve_of_twenty_across_two_instances() {
    let redis = RedisProc::plain();
    let gws = two_gateways(&redis, "burst = 60", 5, "").await;
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let addr = addrs[i % 2];
            tokio::spawn(async move { with_key(addr, "/v1/reports/x", KEY_A).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(replies.iter().filter(|r| r.status == 200).count(), 12);
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_envelope(r, 429, "rate_limited");
    }
    // Cost 0 reports the bucket (empty) and passes.
    let r = with_key(addrs[1], "/free/x", KEY_A).await;
    assert_eq!((r.status, remaining(&r)), (200, 0));
}

#[tokio::test]
async fn a_route_bucket_in_redis_refuses_and_its_429_takes_nothing_from_the_plan() {
    let redis = RedisProc::plain();
    let bucket = "[plans.tight.routes.\"/v1/reports/\"]\nrequests_per_minute = 1\nburst = 2\n";
    let [g1, g2] = two_gateways(&redis, "burst = 20", 1, bucket).await;
    assert_eq!(remaining(&with_key(g1.addr, "/v1/x", KEY_A).await), 19);
    for (gw, left) in [(&g1, 1), (&g2, 0)] {
        let r = with_key(gw.addr, "/v1/reports/r", KEY_A).await;
        assert_eq!((r.status, remaining(&r)), (200, left), "{r:?}");
    }
    for gw in [&g1, &g2, &g1] {
        let r = with_key(gw.addr, "/v1/reports/r", KEY_A).await;
        assert_envelope(&r, 429, "rate_limited");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains("per minute on /v1/reports/ exceeded"),
            "{message}"
        );
    }
    // 20 - 1 - 2 before this request: the three 429s took nothing.
    assert_eq!(remaining(&with_key(g2.addr, "/v1/x", KEY_A).await), 16);
    // The route bucket's key carries the hash tag and its limits.
    let mut conn = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:{a}:route:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys, ["tollgate:{a}:route:/v1/reports/:minute:1:2"]);
}

#[tokio::test]
async fn a_quota_in_redis_is_shared_and_expires_a_day_after_the_month() {
    let redis = RedisProc::plain();
    let limits_bucket =
        "[plans.tight.routes.\"/v1/reports/\"]\nrequests_per_minute = 1\nburst = 100\n";
    let [g1, g2] = two_gateways(
        &redis,
        "burst = 100\nrequests_per_month = 7",
        2,
        limits_bucket,
    )
    .await;
    // 7 at 2 a request: three reports (6), then one plain request (7).
    for gw in [&g1, &g2, &g1] {
        assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_A).await.status, 200);
    }
    let r = with_key(g2.addr, "/v1/reports/r", KEY_A).await;
    assert_envelope(&r, 429, "quota_exceeded");
    let r = with_key(g2.addr, "/v1/x", KEY_A).await;
    assert_eq!(
        (r.status, remaining(&r)),
        (200, 0),
        "the quota is closest to empty"
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("7"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = with_key(g1.addr, "/v1/x", KEY_A).await;
    assert_envelope(&r, 429, "quota_exceeded");
    let retry = assert_retry_after(&r);
    let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        reset.abs_diff(now + retry) <= 2,
        "reset {reset}, retry {retry}, now {now}"
    );
    assert_eq!(reset % 86_400, 0, "midnight UTC");
    // With Redis, an instance's usage shows the count of its own last admitted request:
    // g2 admitted the 7th.
    let usage = get(g2.admin, "/usage/a", &[]).await.json();
    assert_eq!(usage["used"], 7, "{usage}");
    let mut conn = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:{a}:month:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let used: u64 = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    assert_eq!(used, 7);
    let ttl: u64 = redis::cmd("TTL").arg(&keys[0]).query(&mut conn).unwrap();
    let expected = reset + 86_400 - now;
    assert!(
        ttl.abs_diff(expected) <= 3,
        "ttl {ttl}, expected about {expected}"
    );
    let route: String = redis::cmd("GET")
        .arg("tollgate:{a}:route:/v1/reports/:minute:1:100")
        .query(&mut conn)
        .unwrap();
    let tat: u64 = route.parse().unwrap();
    // The refused report took nothing from the route bucket: six tokens of a one-a-minute bucket: its TAT is 6 minutes past the first charge.
    let full_in = tat / 1_000_000 - now;
    assert!(
        (290..=361).contains(&full_in),
        "route bucket full in {full_in}s"
    );
}
