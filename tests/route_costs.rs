//! Route costs, route buckets and monthly quotas over the wire (SPEC.md, "Route costs, route
//! buckets and quotas"): what the client and the upstream see.
//!
//! Plans refill once a minute (`requests_per_minute = 1`) so that nothing refills between a
//! test's requests however slow the machine.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

const KEY_A: &str = "tg_test_costs_a_0123456789abcdefghij";
const KEY_B: &str = "tg_test_costs_b_0123456789abcdefghij";

/// Keys `a` and `b` on plan `tight` (`plan` lines added to it), `limits` lines in
/// `[limits]`, a counting upstream behind `/v1/` (cost 1), `/v1/reports/` (cost
/// `report_cost`), `/free/` (cost 0) and public `/public/` (cost `report_cost`); `extra`
/// appended. Returns the gateway and the upstream's request counter.
async fn setup(
    plan: &str,
    report_cost: u32,
    limits: &str,
    key_b: &str,
    extra: &str,
) -> (TestGateway, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (text, seen) = setup_text(plan, report_cost, limits, key_b, extra).await;
    (TestGateway::start(config("", &text)).await, seen)
}

/// The config text of [`setup`], with its upstream started.
async fn setup_text(
    plan: &str,
    report_cost: u32,
    limits: &str,
    key_b: &str,
    extra: &str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (up, seen) = counting_upstream().await;
    let text = format!(
        r#"
[limits]
{limits}
[plans.tight]
requests_per_minute = 1
{plan}
[plans.anonymous]
requests_per_minute = 1
burst = 10
[[keys]]
id = "a"
key = "{a}"
plan = "tight"
[[keys]]
id = "b"
key = "{b}"
plan = "tight"
{key_b}
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
[[routes]]
prefix = "/v1/reports/"
upstream = "up"
cost = {report_cost}
[[routes]]
prefix = "/free/"
upstream = "up"
cost = 0
[[routes]]
prefix = "/public/"
upstream = "up"
auth = false
cost = {report_cost}
{extra}
"#,
        a = digest(KEY_A),
        b = digest(KEY_B),
    );
    (text, seen)
}

fn remaining(r: &Reply) -> u32 {
    r.header("x-ratelimit-remaining")
        .unwrap_or_else(|| panic!("no X-RateLimit-Remaining: {r:?}"))
        .parse()
        .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Unix seconds at 00:00 UTC on the 1st of the month after the one `now` is in.
fn next_month_start(now: u64) -> u64 {
    // Walk forward a day at a time from the start of today until the day of month is 1,
    // by civil arithmetic done independently of the gateway's.
    let mut day = now / 86_400 + 1;
    loop {
        let (_, _, d) = civil(day as i64);
        if d == 1 {
            return day * 86_400;
        }
        day += 1;
    }
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

async fn concurrent(
    addr: SocketAddr,
    path: &'static str,
    key: &'static str,
    n: usize,
) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { with_key(addr, path, key).await }))
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_five_on_a_sixty_token_bucket_admits_exactly_twelve_of_twenty_concurrent() {
    let (gw, seen) = setup("burst = 60", 5, "", "", "").await;
    let replies = concurrent(gw.addr, "/v1/reports/x", KEY_A, 20).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 12, "60 tokens at 5 a request");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        12,
        "only the admitted reach the upstream"
    );
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_envelope(r, 429, "rate_limited");
        assert_eq!(remaining(r), 0);
        let retry = assert_retry_after(r);
        // Five tokens at one a minute.
        assert!((241..=300).contains(&retry), "Retry-After {retry}");
    }
    let mut left: Vec<u32> = replies
        .iter()
        .filter(|r| r.status == 200)
        .map(remaining)
        .collect();
    left.sort();
    assert_eq!(
        left,
        (0..12).map(|i| i * 5).collect::<Vec<_>>(),
        "tokens left after each"
    );
    // A cost-1 route of the same key finds the bucket empty too.
    assert_envelope(
        &with_key(gw.addr, "/v1/x", KEY_A).await,
        429,
        "rate_limited",
    );
}

#[tokio::test]
async fn cost_zero_is_authenticated_and_reported_but_never_charged() {
    let (gw, seen) = setup("burst = 3", 1, "", "", "").await;
    for _ in 0..5 {
        let r = with_key(gw.addr, "/free/x", KEY_A).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(remaining(&r), 3, "nothing taken: {r:?}");
        assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    }
    for left in (0..3).rev() {
        assert_eq!(remaining(&with_key(gw.addr, "/v1/x", KEY_A).await), left);
    }
    assert_envelope(
        &with_key(gw.addr, "/v1/x", KEY_A).await,
        429,
        "rate_limited",
    );
    let r = with_key(gw.addr, "/free/x", KEY_A).await;
    assert_eq!(
        r.status, 200,
        "a free route passes with the bucket empty: {r:?}"
    );
    assert_eq!(remaining(&r), 0, "and reports it empty");
    // Still authenticated: no key, a wrong key.
    assert_envelope(
        &get(gw.addr, "/free/x", &[]).await,
        401,
        "authentication_error",
    );
    assert_envelope(
        &with_key(gw.addr, "/free/x", "tg_wrong_key_0123456789abcdefgh").await,
        401,
        "authentication_error",
    );
    assert_eq!(seen.load(Ordering::SeqCst), 5 + 3 + 1);
}

#[tokio::test]
async fn a_public_route_charges_its_cost_to_the_client_ip_bucket() {
    let (gw, seen) = setup("burst = 10", 4, "", "", "").await;
    // 10 tokens at 4 a request: two requests.
    for left in [6, 2] {
        let r = get(gw.addr, "/public/x", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(remaining(&r), left);
    }
    let r = get(gw.addr, "/public/x", &[]).await;
    assert_envelope(&r, 429, "rate_limited");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

const REPORTS_BUCKET: &str =
    "[plans.tight.routes.\"/v1/reports/\"]\nrequests_per_minute = 1\nburst = 2\n";

#[tokio::test]
async fn a_route_bucket_refuses_while_other_routes_pass_and_its_429_takes_nothing() {
    let (gw, seen) = setup("burst = 20", 1, "headers = \"both\"", "", REPORTS_BUCKET).await;
    assert_eq!(remaining(&with_key(gw.addr, "/v1/x", KEY_A).await), 19);
    for left in [1, 0] {
        let r = with_key(gw.addr, "/v1/reports/r", KEY_A).await;
        assert_eq!(r.status, 200, "{r:?}");
        // The route bucket is the closest to empty: it is the one reported.
        assert_eq!(remaining(&r), left);
        assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
        let policy = r.header("ratelimit-policy").unwrap();
        assert!(
            policy.contains("\"tight:/v1/reports/\";q=1;w=60"),
            "policy {policy}"
        );
        assert!(
            r.header("ratelimit")
                .unwrap()
                .starts_with("\"tight:/v1/reports/\";r=")
        );
    }
    for _ in 0..3 {
        let r = with_key(gw.addr, "/v1/reports/r", KEY_A).await;
        assert_envelope(&r, 429, "rate_limited");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            message.starts_with(
                "Rate limit of 1 request per minute on /v1/reports/ exceeded. Retry after "
            ),
            "{message}"
        );
        assert_retry_after(&r);
    }
    // Other routes still pass, and the plan bucket lost only the two admitted reports:
    // 20 - 1 - 2 = 17 before this request.
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 200);
    assert_eq!(remaining(&r), 16, "the three 429s took no plan token");
    // The route bucket is per key: b has its own.
    assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_B).await.status, 200);
    assert_eq!(seen.load(Ordering::SeqCst), 1 + 2 + 1 + 1);
}

#[tokio::test]
async fn a_refusing_plan_bucket_takes_nothing_from_the_route_bucket() {
    let (gw, _) = setup("burst = 2", 1, "", "", REPORTS_BUCKET).await;
    // Plan 2, route 2: two plain requests empty the plan bucket.
    for _ in 0..2 {
        assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    }
    for _ in 0..3 {
        let r = with_key(gw.addr, "/v1/reports/r", KEY_A).await;
        assert_envelope(&r, 429, "rate_limited");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            !message.contains("/v1/reports/"),
            "the plan bucket refused: {message}"
        );
    }
    // Reload-free check of the route bucket: key a's route bucket still holds 2. Its plan
    // bucket is empty, so look without charging: through the usage endpoint.
    let usage = get(gw.admin, "/usage/a", &[]).await;
    assert_eq!(usage.status, 200, "{usage:?}");
    assert_eq!(
        usage.json()["routes"]["/v1/reports/"]["remaining"],
        2,
        "{}",
        usage.text()
    );
}

#[tokio::test]
async fn a_key_override_replaces_or_creates_a_route_bucket() {
    let key_b = "routes = { \"/v1/reports/\" = { requests_per_minute = 1, burst = 4 }, \"/free/\" = { requests_per_minute = 1, burst = 1 } }";
    let (gw, _) = setup("burst = 20", 1, "", key_b, REPORTS_BUCKET).await;
    for _ in 0..4 {
        assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_B).await.status, 200);
    }
    assert_envelope(
        &with_key(gw.addr, "/v1/reports/r", KEY_B).await,
        429,
        "rate_limited",
    );
    for _ in 0..2 {
        assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_A).await.status, 200);
    }
    assert_envelope(
        &with_key(gw.addr, "/v1/reports/r", KEY_A).await,
        429,
        "rate_limited",
    );
}

#[tokio::test]
async fn a_quota_of_five_refuses_the_sixth_until_the_next_month() {
    let limits = "[limits.ip_throttle]\nrejections = 2\nwindow = \"60s\"\nblock_for = \"5m\"";
    let (gw, seen) = setup("burst = 100\nrequests_per_month = 5", 1, limits, "", "").await;
    for left in (0..5).rev() {
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            remaining(&r),
            left,
            "the quota is the closest to empty: {r:?}"
        );
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    }
    // More than ip_throttle's two rejections: a client waiting out its month is not blocked.
    for _ in 0..4 {
        let before = unix_now();
        let r = with_key(gw.addr, "/v1/x", KEY_A).await;
        let after = unix_now();
        assert_envelope(&r, 429, "quota_exceeded");
        let reset = next_month_start(before);
        let retry = assert_retry_after(&r);
        assert!(
            (reset - after..=reset - before + 1).contains(&retry),
            "Retry-After {retry}, {} s to the month's end",
            reset - before
        );
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(remaining(&r), 0);
        assert_eq!(
            r.header("x-ratelimit-reset"),
            Some(reset.to_string().as_str())
        );
        let when =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(reset));
        assert_eq!(
            r.json()["error"]["message"],
            format!("Monthly quota of 5 requests used. It resets at {when}."),
        );
    }
    // Key b has its own quota; key a's cost-0 route still passes.
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_B).await.status, 200);
    assert_eq!(with_key(gw.addr, "/free/x", KEY_A).await.status, 200);
    assert_eq!(seen.load(Ordering::SeqCst), 5 + 1 + 1);
}

#[tokio::test]
async fn a_key_quota_overrides_the_plan_and_the_headers_name_the_month() {
    let (gw, _) = setup(
        "burst = 100\nrequests_per_month = 4",
        3,
        "headers = \"ietf\"",
        "requests_per_month = 6",
        "",
    )
    .await;
    for _ in 0..2 {
        let r = with_key(gw.addr, "/v1/reports/r", KEY_B).await;
        assert_eq!(r.status, 200, "{r:?}");
        let policy = r.header("ratelimit-policy").unwrap();
        let end = next_month_start(unix_now());
        assert!(policy.contains("\"tight-month\";q=6;w="), "{policy}");
        let w: u64 = policy.rsplit("w=").next().unwrap().parse().unwrap();
        assert!(
            (28 * 86_400..=31 * 86_400).contains(&w) && end > unix_now(),
            "{policy}"
        );
    }
    // 6 used at 3 a request.
    let r = with_key(gw.addr, "/v1/reports/r", KEY_B).await;
    assert_envelope(&r, 429, "quota_exceeded");
    assert!(
        r.header("ratelimit")
            .unwrap()
            .starts_with("\"tight-month\";r=0;t="),
        "{r:?}"
    );
    // Key a's plan quota of 4 holds one request of 3, then one of 1, and no more.
    assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_A).await.status, 200);
    assert_envelope(
        &with_key(gw.addr, "/v1/reports/r", KEY_A).await,
        429,
        "quota_exceeded",
    );
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    assert_envelope(
        &with_key(gw.addr, "/v1/x", KEY_A).await,
        429,
        "quota_exceeded",
    );
}

#[tokio::test]
async fn shadow_mode_lets_route_and_quota_refusals_through_and_counts_them() {
    let (gw, seen) = setup(
        "burst = 100\nrequests_per_month = 2",
        1,
        "mode = \"shadow\"",
        "",
        REPORTS_BUCKET,
    )
    .await;
    for _ in 0..4 {
        assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    }
    // Key b: the route bucket (2) refuses the third report, in shadow mode too.
    for _ in 0..3 {
        assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_B).await.status, 200);
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        7,
        "everything reached the upstream"
    );
    let decisions = |d: &str, route: &str| {
        format!(
            "tollgate_rate_limit_decisions_total{{decision=\"{d}\",plan=\"tight\",route=\"{route}\"}}"
        )
    };
    assert_eq!(metric(gw.admin, &decisions("allowed", "/v1/")).await, 2.0);
    assert_eq!(
        metric(gw.admin, &decisions("would_limit", "/v1/")).await,
        2.0
    );
    assert_eq!(
        metric(gw.admin, &decisions("allowed", "/v1/reports/")).await,
        2.0
    );
    // b's third report: its quota (2, used by the two reports) and route bucket are both
    // out; the route bucket is looked at first.
    assert_eq!(
        metric(gw.admin, &decisions("would_limit", "/v1/reports/")).await,
        1.0
    );
    assert_eq!(metric(gw.admin, &decisions("limited", "/v1/")).await, 0.0);
    assert_eq!(
        metric(gw.admin, "tollgate_quota_exhausted_total{plan=\"tight\"}").await,
        2.0,
        "a's two requests over its quota"
    );
}

#[tokio::test]
async fn a_reload_keeps_the_quota_count_and_unchanged_route_buckets() {
    let (text, _) = setup_text(
        "burst = 100\nrequests_per_month = 10",
        1,
        "",
        "",
        REPORTS_BUCKET,
    )
    .await;
    let gw = TestGateway::start(config("", &text)).await;
    for _ in 0..3 {
        assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    }
    assert_eq!(with_key(gw.addr, "/v1/reports/r", KEY_A).await.status, 200);
    // A smaller quota and a deeper plan bucket; the route bucket unchanged.
    let changed = text
        .replace("requests_per_month = 10", "requests_per_month = 5")
        .replace("burst = 100", "burst = 200");
    gw.gateway.reload(config("", &changed));
    let usage = get(gw.admin, "/usage/a", &[]).await.json();
    assert_eq!(
        (usage["used"].as_u64(), usage["limit"].as_u64()),
        (Some(4), Some(5)),
        "{usage}"
    );
    assert_eq!(
        usage["routes"]["/v1/reports/"]["remaining"], 1,
        "the route bucket kept: {usage}"
    );
    assert_eq!(usage["plan"], "tight");
    // One more fits the new quota of 5.
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    assert_eq!((r.status, remaining(&r)), (200, 0));
    assert_envelope(
        &with_key(gw.addr, "/v1/x", KEY_A).await,
        429,
        "quota_exceeded",
    );
    // Unknown ids: 404 envelope.
    let r = get(gw.admin, "/usage/nobody", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
}
