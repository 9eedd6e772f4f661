//! SPEC.md behaviours seen over the wire that no other test file covers: the 400
//! `bad_request` envelope, per-key `requests_per_minute` overrides, hourly buckets, shadow mode
//! in `/metrics`, the `detail` and `simple` error styles, and the IETF policy of a daily bucket.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;

const KEY_A: &str = "tg_test_spec_a_0123456789abcdefghijk";
const KEY_B: &str = "tg_test_spec_b_0123456789abcdefghijk";

async fn with_key(addr: SocketAddr, path: &str, key: &str) -> Reply {
    get(addr, path, &[("X-API-Key", key)]).await
}

/// The sorted top-level field names of a JSON object.
fn fields(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn assert_json_content_type(r: &Reply) {
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "Content-Type {ct:?}: {}",
        r.shown()
    );
}

/// An address with nothing listening: the socket is bound but never listens, so connections to
/// it are refused for as long as the returned socket lives.
fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = s.local_addr().unwrap();
    (s, dead)
}

// ---------------------------------------------------------------------------------------------
// 1. 400 bad_request
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_encoded_slash_is_a_400_bad_request_envelope_carrying_the_request_id() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let up = upstream(move |_req| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Response::new(Full::new(Bytes::from_static(b"reached")))
        }
    })
    .await;
    let cfg = config(
        "",
        &format!(
            "[[keys]]\nid = \"a\"\nkey = \"{}\"\nplan = \"p\"\n\
             [plans.p]\nrequests_per_minute = 600\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
            digest(KEY_A)
        ),
    );
    let gw = TestGateway::start(cfg).await;

    // A generated request ID.
    let r = with_key(gw.addr, "/v1/a%2Fb", KEY_A).await;
    assert_eq!(r.status, 400, "{}", r.shown());
    assert_json_content_type(&r);
    let v = r.json();
    assert_eq!(v["success"], false, "{}", r.shown());
    assert_eq!(v["error"]["code"], "bad_request", "{}", r.shown());
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        r.shown()
    );
    let id = r.header("x-request-id").expect("X-Request-Id on a 400");
    assert_generated_id(id);
    assert_eq!(v["request_id"], id, "{}", r.shown());

    // A valid client ID is kept, and the envelope carries it too.
    let r = get(
        gw.addr,
        "/v1/x%2f..%2Fadmin",
        &[("X-API-Key", KEY_A), ("X-Request-Id", "client.id-42:a")],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.shown());
    assert_json_content_type(&r);
    assert_eq!(r.header("x-request-id"), Some("client.id-42:a"));
    assert_eq!(r.json()["request_id"], "client.id-42:a", "{}", r.shown());
    assert_eq!(r.json()["error"]["code"], "bad_request");

    // An encoded backslash is refused the same way (README, Routing).
    let r = with_key(gw.addr, "/v1/a%5Cb", KEY_A).await;
    assert_eq!(r.status, 400, "{}", r.shown());
    assert_eq!(r.json()["error"]["code"], "bad_request");
    assert_envelope(&r, 400, "bad_request");

    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a request tollgate cannot forward never reaches the upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Per-key requests_per_minute override
// ---------------------------------------------------------------------------------------------

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
    let retry = assert_rate_limited(&r, 2, "minute");
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

// ---------------------------------------------------------------------------------------------
// 3. Hourly bucket
// ---------------------------------------------------------------------------------------------

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
    let retry = assert_rate_limited(&r, 2, "hour");
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    // Two an hour: the next token comes 30 minutes after the first was taken.
    assert!((1700..=1800).contains(&retry), "Retry-After {retry}");
}

/// Asserts a 429 `rate_limited` (default error style) whose message names `limit` per
/// `window` and the wait `Retry-After` gives; returns that wait.
fn assert_rate_limited(r: &Reply, limit: u32, window: &str) -> u64 {
    assert_envelope(r, 429, "rate_limited");
    let retry = assert_retry_after(r);
    assert_eq!(
        r.json()["error"]["message"],
        format!("Rate limit of {limit} requests per {window} exceeded. Retry after {retry}s."),
        "{}",
        r.shown()
    );
    retry
}

// ---------------------------------------------------------------------------------------------
// 4. Shadow mode in /metrics
// ---------------------------------------------------------------------------------------------

/// The value of `series` (written exactly, labels included) in a Prometheus text scrape.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .map(|(_, value)| value.parse().expect("numeric value"))
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
    let would_limit = metric(
        &text,
        "tollgate_rate_limit_decisions_total{decision=\"would_limit\",plan=\"tight\"}",
    );
    assert_eq!(would_limit, Some(2.0), "{text}");
    let allowed = metric(
        &text,
        "tollgate_rate_limit_decisions_total{decision=\"allowed\",plan=\"tight\"}",
    );
    assert_eq!(allowed, Some(1.0), "{text}");
    let limited = metric(
        &text,
        "tollgate_rate_limit_decisions_total{decision=\"limited\",plan=\"tight\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(limited, 0.0, "nothing was rejected: {text}");
}

// ---------------------------------------------------------------------------------------------
// 5. Error styles on a 429 and on normalized 502s
// ---------------------------------------------------------------------------------------------

/// A gateway in `style` with: `/v1/` to a live upstream (one token a minute for KEY_A),
/// `/dead/` to an address that refuses, `/bad/` to an upstream that answers 502 with its own
/// page. The last two are public routes, so they take no token.
async fn styled_gateway(style: &str, dead: SocketAddr) -> TestGateway {
    let up = echo_upstream().await;
    let bad = upstream(|_req| async {
        Response::builder()
            .status(502)
            .header("content-type", "text/html")
            .body(Full::new(Bytes::from_static(
                b"<html>secret upstream page 10.1.2.3</html>",
            )))
            .unwrap()
    })
    .await;
    let cfg = config(
        "",
        &format!(
            "[errors]\nstyle = \"{style}\"\n\
             [plans.tight]\nrequests_per_minute = 1\nburst = 1\n\
             [[keys]]\nid = \"a\"\nkey = \"{}\"\nplan = \"tight\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[upstreams]]\nname = \"dead\"\nurl = \"http://{dead}\"\n\
             [[upstreams]]\nname = \"bad\"\nurl = \"http://{bad}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n\
             [[routes]]\nprefix = \"/dead/\"\nupstream = \"dead\"\nauth = false\n\
             [[routes]]\nprefix = \"/bad/\"\nupstream = \"bad\"\nauth = false\n",
            digest(KEY_A)
        ),
    );
    TestGateway::start(cfg).await
}

/// Checks `r` is an error body in `style` with `code`, and returns its message.
fn styled_error(r: &Reply, style: &str, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", r.shown());
    assert_json_content_type(r);
    let v = r.json();
    let id = r.header("x-request-id").expect("X-Request-Id");
    assert_eq!(v["code"], code, "{}", r.shown());
    assert_eq!(v["request_id"], id, "{}", r.shown());
    let message = match style {
        "detail" => {
            assert_eq!(
                fields(&v),
                set(&["detail", "code", "request_id"]),
                "{}",
                r.shown()
            );
            &v["detail"]
        }
        "simple" => {
            assert_eq!(
                fields(&v),
                set(&["error", "code", "success", "request_id"]),
                "{}",
                r.shown()
            );
            assert_eq!(v["success"], false, "{}", r.shown());
            &v["error"]
        }
        other => unreachable!("style {other}"),
    };
    let message = message
        .as_str()
        .unwrap_or_else(|| panic!("message is a string: {}", r.shown()))
        .to_owned();
    assert!(!message.is_empty(), "{}", r.shown());
    message
}

async fn check_style(style: &str) {
    let (_keep, dead) = refusing_addr();
    let gw = styled_gateway(style, dead).await;

    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    let message = styled_error(&r, style, 429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("integer Retry-After");
    assert!(retry >= 1, "Retry-After {retry}");
    assert_eq!(
        message,
        format!("Rate limit of 1 request per minute exceeded. Retry after {retry}s."),
        "{style}"
    );

    // Upstream refused: tollgate's own 502.
    let r = get(gw.addr, "/dead/x", &[]).await;
    let message = styled_error(&r, style, 502, "bad_gateway");
    assert!(
        !r.text().contains(&dead.port().to_string()),
        "{style}: the upstream address leaked: {message}"
    );

    // The upstream's own 502, normalized: its page is replaced.
    let r = get(gw.addr, "/bad/x", &[]).await;
    styled_error(&r, style, 502, "bad_gateway");
    assert!(
        !r.text().contains("secret") && !r.text().contains("10.1.2.3"),
        "{style}: the upstream body leaked: {}",
        r.shown()
    );
}

#[tokio::test]
async fn detail_style_is_used_for_429_and_normalized_502() {
    check_style("detail").await;
}

#[tokio::test]
async fn simple_style_is_used_for_429_and_normalized_502() {
    check_style("simple").await;
}

// ---------------------------------------------------------------------------------------------
// 6. IETF headers with a daily bucket
// ---------------------------------------------------------------------------------------------

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
