//! `https://` upstreams: the CA file, h2 by ALPN, a CA file rewritten in place and reloaded,
//! and idempotent requests retried once after a failed connect.

mod common;

use std::sync::atomic::Ordering;

use common::tls_upstream::*;
use common::*;

#[tokio::test]
async fn https_upstream_with_ca_file_negotiates_h2() {
    let cert = test_cert();
    let (up, _) = tls_upstream(&cert, 0).await;
    let ca = cert.pem_path.display().to_string();
    let gw = proxy_gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    for _ in 0..3 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.shown());
        assert_eq!(reply.text(), "HTTP/2.0", "h2 negotiated by ALPN");
    }
    // An upgrade needs HTTP/1.1: it goes over a connection that offered only that.
    let reply = get(
        gw.addr,
        "/",
        &[("Connection", "upgrade"), ("Upgrade", "websocket")],
    )
    .await;
    assert_eq!(reply.text(), "HTTP/1.1");

    // Without the CA the certificate is not trusted: 502, nothing leaked.
    let gw = proxy_gateway(&format!("https://127.0.0.1:{}", up.port()), "", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
}

/// A `ca_file` rewritten in place is read again on reload: the upstream's clients are rebuilt
/// when the file's bytes changed, though its path did not.
#[tokio::test]
async fn a_reload_reads_a_ca_file_rewritten_in_place() {
    let cert = test_cert();
    let other = test_cert();
    let (up, _) = tls_upstream(&cert, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // First the wrong CA: the upstream's certificate is not trusted.
    std::fs::copy(&other.pem_path, &ca).unwrap();
    let text = format!(
        "[[upstreams]]\nname = \"up\"\nurl = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n",
        up.port(),
        ca.display()
    );
    let gw = TestGateway::start(config("", &text)).await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
    // The right CA, same path, then a reload of the same config text.
    std::fs::copy(&cert.pem_path, &ca).unwrap();
    gw.gateway.reload(config("", &text));
    let reply = get(gw.addr, "/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.shown());
    assert_eq!(reply.text(), "HTTP/2.0");
}

#[tokio::test]
async fn idempotent_requests_are_retried_once_after_a_connect_failure() {
    // The upstream's first connection fails during the TLS handshake: no request byte was
    // sent, so the GET is replayed on a fresh connection.
    let cert = test_cert();
    let ca = cert.pem_path.display().to_string();
    for (method, status, connections) in [
        ("GET", 200, 2),
        ("DELETE", 200, 2),
        ("POST", 502, 1),
        ("PATCH", 502, 1),
    ] {
        let (up, seen) = tls_upstream(&cert, 1).await;
        let gw = proxy_gateway(
            &format!("https://127.0.0.1:{}", up.port()),
            &format!("ca_file = \"{ca}\""),
            "",
        )
        .await;
        let reply = request(gw.addr, method, "/", &[], b"").await;
        assert_eq!(reply.status, status, "{method}: {}", reply.text());
        if status != 200 {
            assert_failure(&reply, status, "bad_gateway", up);
        }
        assert_eq!(seen.load(Ordering::SeqCst), connections, "{method}");
    }
    // Twice refused: one retry only, then 502.
    let (up, seen) = tls_upstream(&cert, 5).await;
    let gw = proxy_gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    // A PUT with a body cannot be replayed.
    let (up, seen) = tls_upstream(&cert, 1).await;
    let gw = proxy_gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    let reply = request(gw.addr, "PUT", "/", &[], b"body").await;
    assert_eq!(reply.status, 502);
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}
