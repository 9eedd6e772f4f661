//! Key lifecycle over the wire (SPEC.md, Key lifecycle): several digests of one key id,
//! expiry against the gateway's wall clock (a fake one here, moved by the test), the
//! `X-API-Key-Expires` warning, and metadata sent upstream.

mod common;

use std::sync::Arc;

use common::*;
use tollgate::Gateway;
use tollgate::auth::WallClock;

const NEW: &str = "tg_test_new_0123456789abcdefghijkl";
const OLD: &str = "tg_test_old_0123456789abcdefghijkl";
const OTHER: &str = "tg_test_other_0123456789abcdefghij";

/// 2027-01-15T00:00:00Z, the old digest's expiry.
const OLD_EXPIRES: u64 = 1_799_971_200;
/// 2027-06-30T00:00:00Z, the whole key's.
const KEY_EXPIRES: u64 = 1_814_313_600;
const DAY: u64 = 86_400;

/// One key `acme` with a new digest and an old one that expires first, one plain key, an
/// echo upstream; the gateway's wall clock at `now`.
async fn setup(now: u64) -> (TestGateway, WallClock) {
    let up = echo_upstream().await;
    let text = format!(
        r#"
[plans.tiny]
requests_per_minute = 3

[[keys]]
id = "acme"
key = ["{new}", {{ digest = "{old}", expires_at = "2027-01-15T00:00:00Z" }}]
expires_at = "2027-06-30T00:00:00Z"
plan = "tiny"
metadata = {{ customer_id = "cus_123", tier = "gold" }}

[[keys]]
id = "other"
key = "{other}"
plan = "tiny"

[[upstreams]]
name = "up"
url = "http://{up}"

[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
        new = digest(NEW),
        old = digest(OLD),
        other = digest(OTHER),
    );
    let config = config("", &text);
    let clock = WallClock::fake(now);
    let gateway = Arc::new(Gateway::with_wall_clock(config.clone(), clock.clone()));
    let gw = TestGateway::start_with(config, gateway.clone(), gateway).await;
    (gw, clock)
}

fn assert_expired(reply: &Reply) {
    assert_eq!(reply.status, 401, "{}", reply.shown());
    let v = reply.json();
    assert_eq!(v["error"]["code"], "authentication_error");
    assert_eq!(v["error"]["message"], "API key has expired");
}

#[tokio::test]
async fn two_digests_of_one_id_both_work_and_share_one_bucket() {
    let (gw, _clock) = setup(OLD_EXPIRES - 100 * DAY).await;
    let a = with_key(gw.addr, "/v1/x", NEW).await;
    assert_eq!(a.status, 200, "{}", a.shown());
    assert_eq!(a.json()["headers"]["x-tollgate-key-id"], "acme");
    assert_eq!(a.header("x-ratelimit-remaining"), Some("2"));
    let b = with_key(gw.addr, "/v1/x", OLD).await;
    assert_eq!(b.status, 200, "{}", b.shown());
    assert_eq!(b.json()["headers"]["x-tollgate-key-id"], "acme");
    assert_eq!(b.header("x-ratelimit-remaining"), Some("1"), "one bucket");
    assert_eq!(with_key(gw.addr, "/v1/x", NEW).await.status, 200);
    let empty = with_key(gw.addr, "/v1/x", OLD).await;
    assert_eq!(empty.status, 429, "{}", empty.shown());
    // Another key has buckets of its own.
    assert_eq!(with_key(gw.addr, "/v1/x", OTHER).await.status, 200);
}

#[tokio::test]
async fn an_expired_digest_is_refused_while_its_sibling_works_then_the_whole_key_expires() {
    let (gw, clock) = setup(OLD_EXPIRES - 1).await;
    assert_eq!(with_key(gw.addr, "/v1/x", OLD).await.status, 200);
    // No reload: the next request is checked against the moved clock.
    clock.set(OLD_EXPIRES);
    assert_expired(&with_key(gw.addr, "/v1/x", OLD).await);
    let new = with_key(gw.addr, "/v1/x", NEW).await;
    assert_eq!(new.status, 200, "{}", new.shown());
    clock.set(KEY_EXPIRES);
    assert_expired(&with_key(gw.addr, "/v1/x", NEW).await);
    assert_eq!(with_key(gw.addr, "/v1/x", OTHER).await.status, 200);
    // An unknown key keeps its own message.
    let unknown = with_key(gw.addr, "/v1/x", "tg_test_unknown_0123456789abcdef").await;
    assert_eq!(
        unknown.json()["error"]["message"],
        "Invalid or revoked API key"
    );
}

#[tokio::test]
async fn x_api_key_expires_appears_inside_the_warning_window_only() {
    // 15 days before the old digest's expiry: outside the default 14 days.
    let (gw, clock) = setup(OLD_EXPIRES - 15 * DAY).await;
    let r = with_key(gw.addr, "/v1/x", OLD).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-api-key-expires"), None, "{}", r.shown());
    clock.set(OLD_EXPIRES - 14 * DAY);
    let r = with_key(gw.addr, "/v1/x", OLD).await;
    assert_eq!(
        r.header("x-api-key-expires"),
        Some("Fri, 15 Jan 2027 00:00:00 GMT")
    );
    // The new digest expires with the key, months later: no warning for it.
    let r = with_key(gw.addr, "/v1/x", NEW).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-api-key-expires"), None);
    // Also on an error answer (here a 429: the bucket of 3 is used up).
    let r = with_key(gw.addr, "/v1/x", OLD).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("x-api-key-expires"),
        Some("Fri, 15 Jan 2027 00:00:00 GMT")
    );
    // Never on a key without an expiry.
    assert_eq!(
        with_key(gw.addr, "/v1/x", OTHER)
            .await
            .header("x-api-key-expires"),
        None
    );
}

#[tokio::test]
async fn metadata_reaches_the_upstream_and_client_copies_do_not() {
    let (gw, _clock) = setup(OLD_EXPIRES - 100 * DAY).await;
    let r = get(
        gw.addr,
        "/v1/x",
        &[
            ("X-API-Key", NEW),
            ("X-Tollgate-Key-Meta-Customer-Id", "cus_forged"),
            ("x-tollgate-key-meta-admin", "true"),
            ("X-TOLLGATE-KEY-META-TIER", "platinum"),
            ("X_Tollgate_Key_Meta_Extra", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let headers = &r.json()["headers"];
    assert_eq!(headers["x-tollgate-key-meta-customer-id"], "cus_123");
    assert_eq!(headers["x-tollgate-key-meta-tier"], "gold");
    let meta: Vec<&String> = headers
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.replace('_', "-").starts_with("x-tollgate-key-meta-"))
        .collect();
    assert_eq!(meta.len(), 2, "only the key's own metadata: {meta:?}");
    // A key without metadata: every client copy is removed, none is added.
    let r = get(
        gw.addr,
        "/v1/x",
        &[
            ("X-API-Key", OTHER),
            ("X-Tollgate-Key-Meta-Customer-Id", "cus_forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("x-tollgate-key-meta"), "{}", r.shown());
}
