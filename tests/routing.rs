//! Routing over the wire: fixed responses (and HEAD), routes swapped by a reload, and paths
//! tollgate refuses to route (an encoded slash or backslash is a 400).

mod common;

use std::sync::atomic::Ordering;

use common::*;

const KEY_A: &str = "tg_test_spec_a_0123456789abcdefghijk";

#[tokio::test]
async fn fixed_responses_and_head() {
    let gw = TestGateway::start(styled_config("envelope", "")).await;
    let r = get(gw.addr, "/fixed/anything", &[]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.text(), "made");
    let head = b"HEAD /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let buf = exchange_raw(gw.addr, head).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "HEAD response has no body: {text:?}"
    );
}

#[tokio::test]
async fn reload_swaps_routes_for_new_requests() {
    let gw = TestGateway::start(styled_config("envelope", "")).await;
    assert_eq!(get(gw.addr, "/later", &[]).await.status, 404);
    gw.gateway.reload(config(
        "",
        "[[routes]]\nprefix = \"/later\"\nauth = false\nrespond = { status = 200, body = \"new\" }\n",
    ));
    let r = get(gw.addr, "/later", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "new");
}

#[tokio::test]
async fn an_encoded_slash_is_a_400_bad_request_envelope_carrying_the_request_id() {
    let (up, hits) = counting_upstream().await;
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
