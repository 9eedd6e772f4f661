//! What the upstream receives (SPEC.md, "Proxying"): the path and query, the forwarding
//! headers (`X-Forwarded-For`, `-Proto`, `-Host`) and who may set them, and no hop-by-hop
//! headers either way.

mod common;

use common::*;

#[tokio::test]
async fn proxies_to_the_upstream_with_forwarding_headers() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\nauth = false\n\
             [[routes]]\nprefix = \"/strip/\"\nupstream = \"up\"\nstrip_prefix = true\nauth = false\n"
        ),
    ))
    .await;
    let r = get(
        gw.addr,
        "/v1/users?limit=5",
        &[
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-For", "198.51.100.7, 192.0.2.1"),
            // Host and the address chain are the gateway's to forward: naming them here
            // removes neither.
            ("Connection", "close, x-client-hop, host, x-forwarded-for"),
            ("X-Client-Hop", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let echo = r.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/v1/users");
    assert_eq!(echo["query"], "limit=5");
    let h = &echo["headers"];
    // Every X-Forwarded-For line counts, in order, then the peer.
    assert_eq!(
        h["x-forwarded-for"],
        "203.0.113.9, 198.51.100.7, 192.0.2.1, 127.0.0.1"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "gateway.test");
    assert_eq!(h["host"], up.to_string());
    assert_eq!(echo["repeated"], serde_json::json!([]));
    assert!(
        h.get("x-client-hop").is_none(),
        "hop-by-hop header forwarded: {}",
        redact(&h.to_string())
    );
    assert!(
        r.header("x-upstream-hop").is_none(),
        "upstream hop-by-hop header returned"
    );

    let r = get(gw.addr, "/strip/a/b", &[]).await;
    assert_eq!(r.json()["path"], "/a/b");
}

/// From a trusted proxy (a TLS-terminating load balancer), the scheme and host the client
/// used are kept for the upstream; from any other peer they are this connection's.
#[tokio::test]
async fn x_forwarded_proto_and_host_are_kept_only_from_a_trusted_proxy() {
    for (server, proto, host) in [
        (
            "trusted_proxies = [\"127.0.0.1/32\"]",
            "https",
            "api.example.com",
        ),
        ("trusted_proxies = [\"10.0.0.0/8\"]", "http", "gateway.test"),
        ("", "http", "gateway.test"),
    ] {
        let (gw, _) = echo_gateway(server).await;
        let sent = [
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "api.example.com"),
            ("X-Request-Id", "client-id-1"),
        ];
        let r = get(gw.addr, "/v1/x", &sent).await;
        assert_eq!(r.status, 200, "{}", r.shown());
        let h = &r.json()["headers"];
        assert_eq!(h["x-forwarded-proto"], proto, "{server:?}");
        assert_eq!(h["x-forwarded-host"], host, "{server:?}");
        assert_eq!(h["x-request-id"], "client-id-1", "{server:?}");
        // One line each: the client's copies are replaced, not added to.
        assert_eq!(r.json()["repeated"], serde_json::json!([]), "{server:?}");
        // A value that is no scheme is not passed on, even from a trusted proxy.
        let r = get(gw.addr, "/v1/x", &[("X-Forwarded-Proto", "gopher")]).await;
        assert_eq!(
            r.json()["headers"]["x-forwarded-proto"],
            "http",
            "{server:?}"
        );
    }
}
