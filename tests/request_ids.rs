//! Request IDs (SPEC.md, "Request IDs"): a client's well-formed ID is kept, a malformed or
//! doubled one replaced, a missing one generated; the same ID in the header, the error body
//! and the upstream's request.

mod common;

use common::*;

#[tokio::test]
async fn request_ids_kept_replaced_generated() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!("{FIXED_ROUTES}\n[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;

    // Generated when absent.
    let r = get(gw.addr, "/status", &[]).await;
    assert_eq!(r.status, 200);
    assert_generated_id(r.header("x-request-id").unwrap());

    // Kept when well-formed, up to 128 characters.
    let good = "client-abc.1:2_3";
    let r = get(gw.addr, "/status", &[("X-Request-Id", good)]).await;
    assert_eq!(r.header("x-request-id"), Some(good));
    let max = "a".repeat(128);
    let r = get(gw.addr, "/status", &[("X-Request-Id", &max)]).await;
    assert_eq!(r.header("x-request-id"), Some(max.as_str()));

    // Replaced when malformed or too long.
    for bad in ["has space", "semi;colon", "quote\"", &"b".repeat(129)] {
        let r = get(gw.addr, "/status", &[("X-Request-Id", bad)]).await;
        let id = r.header("x-request-id").unwrap();
        assert_generated_id(id);
    }

    // The same ID in header and error body, kept or generated.
    let r = get(gw.addr, "/nope", &[("X-Request-Id", good)]).await;
    assert_eq!(assert_status_and_request_id(&r, 404), good);
    let r = get(gw.addr, "/nope", &[("X-Request-Id", "bad id")]).await;
    assert_generated_id(&assert_status_and_request_id(&r, 404));

    // The same ID reaches the upstream, and a client's copy cannot replace it when invalid.
    let r = get(gw.addr, "/v1/echo", &[("X-Request-Id", good)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-request-id"], good);
    let r = get(gw.addr, "/v1/echo", &[("X-Request-Id", "bad id")]).await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_generated_id(&id);
    assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());

    // Two IDs, even valid ones: neither is kept (which did the client mean?), and the
    // upstream gets the new one alone.
    let two = [("X-Request-Id", "one"), ("X-Request-Id", "two")];
    let r = get(gw.addr, "/v1/echo", &two).await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_generated_id(&id);
    assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());
}
