//! Rate limits over the wire (SPEC.md, Rate limits): exactness under concurrency, headers,
//! 429s, retry loops, IP throttling, shadow mode, reloads.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const KEY_A: &str = "tg_test_limits_a_0123456789abcdefgh";
const KEY_B: &str = "tg_test_limits_b_0123456789abcdefgh";

/// Two keys on plan `tight` (given rpm and burst), an upstream route and a dead one.
///
/// Tests that count tokens use `rpm = 1`: the next token is a minute away, so however slow
/// the machine, nothing refills between their requests.
async fn setup(rpm: u32, burst: u32, limits: &str, extra: &str) -> (TestGateway, tollgate::Config) {
    let up = echo_upstream().await;
    let dead = refusing_addr();
    let text = format!(
        r#"
[limits]
{limits}
[plans.tight]
requests_per_minute = {rpm}
burst = {burst}
[[keys]]
id = "a"
key = "{a}"
plan = "tight"
scopes = ["read"]
[[keys]]
id = "b"
key = "{b}"
plan = "tight"
[[upstreams]]
name = "up"
url = "http://{up}"
[[upstreams]]
name = "dead"
url = "http://{dead}"
[[routes]]
prefix = "/v1/"
upstream = "up"
[[routes]]
prefix = "/scoped/"
upstream = "up"
scopes = ["write"]
[[routes]]
prefix = "/dead/"
upstream = "dead"
{extra}
"#,
        a = digest(KEY_A),
        b = digest(KEY_B),
    );
    let cfg = config("", &text);
    (TestGateway::start(cfg.clone()).await, cfg)
}

/// Asserts a 429 `rate_limited` envelope (request ID in header and body) with a `Retry-After`.
fn assert_rate_limited(r: &Reply) {
    assert_envelope(r, 429, "rate_limited");
    assert_retry_after(r);
}

/// Asserts a 429 `ip_throttled` envelope (request ID in header and body) with a `Retry-After`.
fn assert_ip_throttled(r: &Reply) {
    assert_envelope(r, 429, "ip_throttled");
    assert_retry_after(r);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Requests with key a until one is limited, and returns that 429. For tests that must wait
/// for a refill, and so use a fast rate: on a loaded machine one request can take longer than
/// a token interval, so "the next request is limited" may not hold, but one that follows
/// within an interval is. Fails if none of 50 is limited.
async fn until_limited(addr: SocketAddr) -> Reply {
    for _ in 0..50 {
        let r = with_key(addr, "/v1/x", KEY_A).await;
        if r.status != 200 {
            assert_eq!(r.status, 429, "{r:?}");
            assert_rate_limited(&r);
            return r;
        }
    }
    panic!("50 requests and never limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_n_concurrent_requests_exactly_capacity_pass() {
    // Capacity 25, refilled once a minute: nothing refills during the test.
    let (gw, _) = setup(1, 25, "", "").await;
    let addr = gw.addr;
    let mut tasks = Vec::new();
    for _ in 0..48 {
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                statuses.push(with_key(addr, "/v1/x", KEY_A).await);
            }
            statuses
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.extend(t.await.unwrap());
    }
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(replies.len(), 96);
    assert_eq!(ok, 25, "exactly the capacity is admitted");
    assert_eq!(limited.len(), 96 - 25, "every other request is a 429");
    for r in &limited {
        assert_rate_limited(r);
    }

    let r = limited[0];
    let v = r.json();
    assert_eq!(v["error"]["code"], "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        v["error"]["message"],
        format!("Rate limit of 1 request per minute exceeded. Retry after {retry}s.")
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(v["request_id"], r.header("x-request-id").unwrap());

    // The other key's bucket is untouched.
    assert_eq!(with_key(addr, "/v1/x", KEY_B).await.status, 200);
}

#[tokio::test]
async fn after_the_retry_after_wait_a_request_is_admitted_again() {
    // One token a second, one deep.
    let (gw, _) = setup(60, 1, "", "").await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    // A request slower than the refill interval may find the next token: ask until limited.
    let r = until_limited(gw.addr).await;
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, 1);
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
}

#[tokio::test]
async fn headers_on_every_response_to_an_authenticated_request() {
    let (gw, _) = setup(1, 5, "", "").await;
    let before = unix_now();
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("4"));
    // One token taken at one a minute: full again a minute after the request.
    let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        reset >= before + 60 && reset <= unix_now() + 61,
        "reset {reset}, before {before}"
    );
    assert!(r.header("retry-after").is_none());

    // Upstream failures were charged and say so.
    let r = with_key(gw.addr, "/dead/x", KEY_A).await;
    assert_eq!(r.status, 502);
    assert_envelope(&r, 502, "bad_gateway");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("3"));

    // A 404 on no route happens before auth: nothing to report.
    let r = with_key(gw.addr, "/nowhere", KEY_A).await;
    assert_eq!(r.status, 404);
    assert_envelope(&r, 404, "not_found");
    assert!(r.header("x-ratelimit-remaining").is_none());
}

#[tokio::test]
async fn reset_counts_from_the_decision_not_from_a_slow_upstreams_answer() {
    // The upstream answers 3 s after the request was charged. The bucket is full again one
    // token interval (1 s at 60/min) after the charge, so Reset is at most 2 s after the
    // request was sent, not 1 s after the answer; and the IETF `t`, which counts from the
    // response, is 0.
    let slow = upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
    })
    .await;
    let extra = format!(
        r#"
[[upstreams]]
name = "slow"
url = "http://{slow}"
[[routes]]
prefix = "/slow/"
upstream = "slow"
"#
    );
    let (gw, _) = setup(60, 60, r#"headers = "both""#, &extra).await;
    let sent = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let r = with_key(gw.addr, "/slow/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("59"));
    let reset: f64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        reset >= sent + 1.0 && reset < sent + 3.0,
        "reset {reset}, sent {sent:.3}"
    );
    assert_eq!(r.header("ratelimit"), Some("\"tight\";r=59;t=0"));
}

#[tokio::test]
async fn rejected_401_and_403_are_never_charged() {
    let (gw, _) = setup(1, 2, "", "").await;
    for _ in 0..5 {
        let r = with_key(gw.addr, "/scoped/x", KEY_A).await;
        assert_eq!(r.status, 403);
        assert_envelope(&r, 403, "permission_denied");
        let r = with_key(gw.addr, "/v1/x", "tg_wrong").await;
        assert_eq!(r.status, 401);
        assert_envelope(&r, 401, "authentication_error");
    }
    assert_eq!(
        with_key(gw.addr, "/v1/x", KEY_A)
            .await
            .header("x-ratelimit-remaining"),
        Some("1")
    );
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429);
    assert_rate_limited(&r);
}

#[tokio::test]
async fn a_client_that_sleeps_until_reset_succeeds_on_its_first_retry() {
    // 120/min: a token every 500 ms, 3 deep: full again 1.5 s after it is drained.
    let (gw, _) = setup(120, 3, "", "").await;
    // Drain the burst at once (sequential requests slower than a token interval would never
    // be limited), then ask until limited: that 429 is the latest decision, so its reset is
    // when the bucket is full.
    let drain: Vec<_> = (0..10)
        .map(|_| tokio::spawn(with_key(gw.addr, "/v1/x", KEY_A)))
        .collect();
    for task in drain {
        task.await.unwrap();
    }
    let reply = until_limited(gw.addr).await;
    let reset: u64 = reply.header("x-ratelimit-reset").unwrap().parse().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let wait = Duration::from_secs(reset).saturating_sub(now);
    // Under 1.5 s to the full bucket, plus the rounding up to whole seconds.
    assert!(wait <= Duration::from_secs(3), "reset {wait:?} away");
    tokio::time::sleep(wait).await;
    let retry = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(retry.status, 200, "first retry after X-RateLimit-Reset");
    assert_eq!(
        retry.header("x-ratelimit-remaining"),
        Some("2"),
        "the bucket is full again"
    );
}

#[tokio::test]
async fn ietf_headers() {
    let (gw, _) = setup(1, 2, "headers = \"both\"", "").await;
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.header("ratelimit-policy"), Some("\"tight\";q=1;w=60"));
    // One token taken at one a minute: full again in 60 s.
    assert_eq!(r.header("ratelimit"), Some("\"tight\";r=1;t=60"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
    with_key(gw.addr, "/v1/x", KEY_A).await;
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429);
    assert_rate_limited(&r);
    // On a 429, `t` is the wait for the next token: 60 s after the first request, less the
    // (whole) seconds these requests took; never the 120 s until the bucket is full.
    let value = r.header("ratelimit").unwrap();
    let t: u64 = value
        .strip_prefix("\"tight\";r=0;t=")
        .unwrap_or_else(|| panic!("RateLimit {value}"))
        .parse()
        .unwrap();
    assert!((50..=60).contains(&t), "RateLimit {value}");

    let (gw, _) = setup(1, 2, "headers = \"ietf\"", "").await;
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert!(r.header("ratelimit").is_some());
    assert!(r.header("x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn a_daily_bucket_is_reported_when_closest_to_empty_and_named_on_429() {
    let up = echo_upstream().await;
    let cfg = config(
        "",
        &format!(
            "[plans.daily]\nrequests_per_minute = 100\nrequests_per_day = 2\n\
             [[keys]]\nid = \"a\"\nkey = \"{}\"\nplan = \"daily\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\n",
            digest(KEY_A)
        ),
    );
    let gw = TestGateway::start(cfg).await;
    let r = with_key(gw.addr, "/x", KEY_A).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
    with_key(gw.addr, "/x", KEY_A).await;
    let r = with_key(gw.addr, "/x", KEY_A).await;
    assert_eq!(r.status, 429);
    assert_rate_limited(&r);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with("Rate limit of 2 requests per day exceeded."),
        "{message}"
    );
    // The next daily token, 12 h after the first request, less the (whole) seconds these
    // requests took.
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((43_140..=43_200).contains(&retry), "Retry-After {retry}");
}

#[tokio::test]
async fn repeated_429s_block_the_client_ip_whatever_key_it_uses() {
    let (gw, _) = setup(
        1,
        1,
        "[limits.ip_throttle]\nrejections = 3\nwindow = \"60s\"\nblock_for = \"5m\"",
        "",
    )
    .await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    for _ in 0..2 {
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        assert_eq!(r.json()["error"]["code"], "rate_limited");
        assert_rate_limited(&r);
    }
    // The third 429 trips the block, and says so: its Retry-After is the block's, not the
    // key's minute, which would have the client refused again.
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_ip_throttled(&r);
    assert_eq!(r.header("retry-after"), Some("300"));
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("0"),
        "the key's bucket"
    );
    let r = with_key(gw.addr, "/v1/x", KEY_B).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "ip_throttled");
    assert_eq!(r.header("retry-after"), Some("300"));
    assert_ip_throttled(&r);
}

/// The IP block is temporary: a client that waits its `Retry-After` is served again (with a
/// key that has tokens).
#[tokio::test]
async fn an_ip_block_ends_after_block_for() {
    let (gw, _) = setup(
        1,
        1,
        "[limits.ip_throttle]\nrejections = 2\nwindow = \"60s\"\nblock_for = \"1s\"",
        "",
    )
    .await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    assert_rate_limited(&with_key(gw.addr, "/v1/x", KEY_A).await);
    assert_ip_throttled(&with_key(gw.addr, "/v1/x", KEY_A).await);
    let blocked = with_key(gw.addr, "/v1/x", KEY_B).await;
    assert_ip_throttled(&blocked);
    let wait = assert_retry_after(&blocked);
    assert_eq!(wait, 1);
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
    let r = with_key(gw.addr, "/v1/x", KEY_B).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    // Key A's own bucket is still empty: a plain 429, not a block.
    assert_rate_limited(&with_key(gw.addr, "/v1/x", KEY_A).await);
}

#[tokio::test]
async fn shadow_mode_lets_everything_through_and_counts_would_limit() {
    let (gw, _) = setup(1, 2, "mode = \"shadow\"", "").await;
    for _ in 0..5 {
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        assert_eq!(r.status, 200);
    }
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some("0"),
        "the decision is still reported"
    );
    assert_eq!(gw.gateway.would_limit_count(), 4);
}

#[tokio::test]
async fn shadow_mode_lets_a_client_ip_blocked_for_failed_auth_through() {
    let (gw, _) = setup(
        60,
        60,
        "mode = \"shadow\"\n[limits.failed_auth]\nattempts = 2\nwindow = \"60s\"\nblock_for = \"15m\"",
        "",
    )
    .await;
    for _ in 0..2 {
        let r = with_key(gw.addr, "/v1/x", "tg_wrong").await;
        assert_envelope(&r, 401, "authentication_error");
    }
    // The IP would be blocked now: the request is let through, and counted.
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(gw.gateway.would_limit_count(), 1);
}

#[tokio::test]
async fn reload_keeps_drained_buckets_and_applies_new_keys_and_limits() {
    let (gw, cfg) = setup(1, 2, "", "").await;
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429);
    assert_rate_limited(&r);

    // Same config again: the drained key stays drained.
    gw.gateway.reload(cfg.clone());
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 429, "no fresh burst on reload");
    assert_rate_limited(&r);

    // A new plan limit applies at once.
    let up = gw.gateway.snapshot().config.upstreams[0].url.clone();
    let text = format!(
        "[plans.tight]\nrequests_per_minute = 120\nburst = 3\n\
         [[keys]]\nid = \"b\"\nkey = \"{}\"\nplan = \"tight\"\n\
         [[upstreams]]\nname = \"up\"\nurl = \"{up}\"\n[[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
        digest(KEY_B)
    );
    gw.gateway.reload(config("", &text));
    let r = with_key(gw.addr, "/v1/x", KEY_B).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("120"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    // The removed key is now unknown.
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 401);
    assert_envelope(&r, 401, "authentication_error");
}

#[tokio::test]
async fn public_routes_are_limited_per_client_ip_by_the_anonymous_plan() {
    let up = echo_upstream().await;
    let cfg = config(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &format!(
            "[plans.anonymous]\nrequests_per_minute = 1\nburst = 2\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/public/\"\nupstream = \"up\"\nauth = false\n"
        ),
    );
    let gw = TestGateway::start(cfg).await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    assert_eq!(
        get(gw.addr, "/public/x", &from("203.0.113.1")).await.status,
        200
    );
    let r = get(gw.addr, "/public/x", &from("203.0.113.1")).await;
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let r = get(gw.addr, "/public/x", &from("203.0.113.1")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_rate_limited(&r);
    assert_eq!(
        get(gw.addr, "/public/x", &from("203.0.113.2")).await.status,
        200,
        "per IP"
    );
    // An IPv6 client is its /64: new interface ids do not bring a fresh bucket.
    for ip in ["2001:db8:7:7::1", "2001:db8:7:7::2"] {
        assert_eq!(get(gw.addr, "/public/x", &from(ip)).await.status, 200);
    }
    let r = get(gw.addr, "/public/x", &from("2001:db8:7:7:ffff::3")).await;
    assert_eq!(r.status, 429, "same /64");
    assert_rate_limited(&r);
    assert_eq!(
        get(gw.addr, "/public/x", &from("2001:db8:7:8::1"))
            .await
            .status,
        200,
        "another /64"
    );
}

#[tokio::test]
async fn a_key_with_its_own_requests_per_minute_is_limited_and_reported_by_it() {
    let up = echo_upstream().await;
    let cfg = config(
        "",
        &format!(
            "[plans.pro]\nrequests_per_minute = 600\n\
             [[keys]]\nid = \"custom\"\nkey = \"{a}\"\nplan = \"pro\"\nrequests_per_minute = 2\n\
             [[keys]]\nid = \"plain\"\nkey = \"{b}\"\nplan = \"pro\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
            a = digest(KEY_A),
            b = digest(KEY_B),
        ),
    );
    let gw = TestGateway::start(cfg).await;

    // One token every 30 s, two deep: nothing refills during the test.
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"), "{r:?}");
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");

    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    let retry = assert_rate_limited_per(&r, 2, "minute");
    assert_json_content_type(&r);
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.json()["request_id"], r.header("x-request-id").unwrap());

    // The override is the key's own: another key on the same plan has the plan's limit.
    let r = with_key(gw.addr, "/v1/x", KEY_B).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-limit"), Some("600"), "{r:?}");
}

/// A gateway with `limits` (TOML lines of `[limits]`, or empty), plan `name` defined by
/// `plan` (its TOML lines), key `KEY_A` on it, and a route `prefix` to an echo upstream.
async fn one_key_gateway(limits: &str, name: &str, plan: &str, prefix: &str) -> TestGateway {
    let up = echo_upstream().await;
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!("[limits]\n{limits}\n")
    };
    let cfg = config(
        "",
        &format!(
            "{limits}[plans.{name}]\n{plan}\n\
             [[keys]]\nid = \"a\"\nkey = \"{}\"\nplan = \"{name}\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"{prefix}\"\nupstream = \"up\"\n",
            digest(KEY_A)
        ),
    );
    TestGateway::start(cfg).await
}

#[tokio::test]
async fn an_empty_hourly_bucket_is_a_429_naming_the_hour_and_reported_in_the_headers() {
    let gw = one_key_gateway(
        "",
        "hourly",
        "requests_per_minute = 600\nrequests_per_hour = 2",
        "/",
    )
    .await;

    // The hourly bucket (1 left) is closer to empty than the minute one (599 left).
    let r = with_key(gw.addr, "/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"), "{r:?}");
    let r = with_key(gw.addr, "/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");

    let r = with_key(gw.addr, "/x", KEY_A).await;
    let retry = assert_rate_limited_per(&r, 2, "hour");
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    // Two an hour: the next token comes 30 minutes after the first was taken.
    assert!((1700..=1800).contains(&retry), "Retry-After {retry}");
}

/// Asserts a 429 `rate_limited` (default error style) whose message names `limit` per
/// `window` and the wait `Retry-After` gives; returns that wait.
fn assert_rate_limited_per(r: &Reply, limit: u32, window: &str) -> u64 {
    assert_rate_limited(r);
    let retry = assert_retry_after(r);
    assert_eq!(
        r.json()["error"]["message"],
        format!("Rate limit of {limit} requests per {window} exceeded. Retry after {retry}s."),
        "{}",
        r.shown()
    );
    retry
}

#[tokio::test]
async fn shadow_mode_passes_over_limit_requests_and_counts_would_limit_in_metrics() {
    let gw = one_key_gateway(
        "mode = \"shadow\"",
        "tight",
        "requests_per_minute = 1\nburst = 1",
        "/v1/",
    )
    .await;

    // One token a minute: the second and third requests are over the limit.
    for n in 0..3 {
        let r = with_key(gw.addr, "/v1/shadow", KEY_A).await;
        assert_eq!(r.status, 200, "request {n}: {}", r.shown());
        assert_eq!(
            r.json()["path"],
            "/v1/shadow",
            "request {n} reached the upstream"
        );
    }

    let scrape = get(gw.admin, "/metrics", &[]).await;
    assert_eq!(scrape.status, 200);
    let text = scrape.text();
    let would_limit = metric_in(
        &text,
        "tollgate_rate_limit_decisions_total{decision=\"would_limit\",plan=\"tight\",route=\"/v1/\"}",
    );
    assert_eq!(would_limit, Some(2.0), "{text}");
    let allowed = metric_in(
        &text,
        "tollgate_rate_limit_decisions_total{decision=\"allowed\",plan=\"tight\",route=\"/v1/\"}",
    );
    assert_eq!(allowed, Some(1.0), "{text}");
    let limited = metric_in(
        &text,
        "tollgate_rate_limit_decisions_total{decision=\"limited\",plan=\"tight\",route=\"/v1/\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(limited, 0.0, "nothing was rejected: {text}");
}

#[tokio::test]
async fn ietf_headers_list_the_daily_policy_and_report_the_bucket_closest_to_empty() {
    let gw = one_key_gateway(
        "headers = \"ietf\"",
        "daily",
        "requests_per_minute = 100\nrequests_per_day = 3",
        "/",
    )
    .await;
    let policy = "\"daily\";q=100;w=60, \"daily-day\";q=3;w=86400";

    let r = with_key(gw.addr, "/x", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("ratelimit-policy"), Some(policy), "{r:?}");
    // The daily bucket (2 left) is closer to empty than the minute one (99 left).
    let ratelimit = r.header("ratelimit").expect("RateLimit header");
    assert!(
        ratelimit.starts_with("\"daily-day\";r=2;t="),
        "RateLimit {ratelimit}"
    );
    assert!(
        r.header("x-ratelimit-limit").is_none(),
        "ietf only: no X-RateLimit-*: {r:?}"
    );

    with_key(gw.addr, "/x", KEY_A).await;
    with_key(gw.addr, "/x", KEY_A).await;
    let r = with_key(gw.addr, "/x", KEY_A).await;
    assert_eq!(r.status, 429, "{}", r.shown());
    assert_envelope(&r, 429, "rate_limited");
    assert_retry_after(&r);
    assert_eq!(r.header("ratelimit-policy"), Some(policy), "{r:?}");
    let retry = r.header("retry-after").expect("Retry-After on a 429");
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"daily-day\";r=0;t={retry}").as_str()),
        "{r:?}"
    );
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("Rate limit of 3 requests per day exceeded."),
        "{message}"
    );
}
