//! The listeners: a slow head or a stalled body gets a 408, `max_connections` holds extra
//! clients in the backlog, an IPv6 wildcard binds beside IPv4 on one port, and the admin
//! listener answers health and readiness.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_slow_head_gets_a_408_envelope_and_the_connection_closes() {
    let gw = TestGateway::start(styled_config("envelope", "header_read_timeout = \"300ms\"")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection not closed within 5s");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    let reply = parse_reply(&buf)
        .unwrap_or_else(|| panic!("no response in {:?}", String::from_utf8_lossy(&buf)));
    let id = assert_styled_error(&reply, "envelope", 408, "request_timeout");
    assert_generated_id(&id);
    assert_eq!(
        reply.json()["error"]["message"],
        "The request headers were not received in time."
    );
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(reply.header("date").is_some(), "{}", reply.shown());
    assert!(buf.ends_with(&reply.body), "nothing after the response");
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    // The client's stall is the client's: 408 whichever of the upstream's `timeout` and
    // `body_read_timeout` is shorter (the upstream, reading the body, is not at fault).
    for (body_read_timeout, upstream_timeout) in [("300ms", "30s"), ("600ms", "200ms")] {
        let up = echo_upstream().await;
        let gw = TestGateway::start(config(
            &format!("body_read_timeout = \"{body_read_timeout}\""),
            &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\ntimeout = \"{upstream_timeout}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
        ))
        .await;
        let buf = exchange_raw(
            gw.addr,
            b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly-part",
        )
        .await;
        let reply = parse_reply(&buf).expect("a response");
        assert_eq!(reply.status, 408, "{upstream_timeout}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "request_timeout");
    }
}

#[tokio::test]
async fn max_connections_holds_extra_clients_in_the_backlog() {
    let gw = TestGateway::start(styled_config("envelope", "max_connections = 1")).await;
    // First connection: a keep-alive request, then it stays open.
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    first
        .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // Second connection: connected by the kernel, but not served while the first is open.
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    second
        .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(400), second.read_to_end(&mut out)).await;
    assert!(
        waited.is_err(),
        "second connection served while at max_connections"
    );

    drop(first);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut out))
        .await
        .expect("served once the first connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
}

/// `listen = ["127.0.0.1:P", "[::]:P"]`: the IPv6 wildcard is bound IPv6-only (as nginx binds
/// it), so it does not also claim the IPv4 port, and both listeners answer. Without
/// `IPV6_V6ONLY` the second bind fails with "Address already in use" on Linux's default.
#[tokio::test]
async fn an_ipv6_wildcard_listens_beside_an_ipv4_address_on_the_same_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\", \"[::]:{port}\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nprefix = \"/\"\nauth = false\n\
         respond = {{ status = 200, body = \"ok\" }}\n"
    );
    let config = tollgate::Config::from_text(std::path::Path::new("t.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway::start(config).await;
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let reply = get(addr.parse().unwrap(), "/", &[]).await;
        assert_eq!((reply.status, reply.text().as_str()), (200, "ok"), "{addr}");
    }
    drop(gw);
}

#[tokio::test]
async fn admin_health_and_readiness() {
    let gw = TestGateway::start(styled_config("envelope", "")).await;
    assert_eq!(get(gw.admin, "/healthz", &[]).await.status, 200);
    assert_eq!(get(gw.admin, "/readyz", &[]).await.status, 200);
    assert_eq!(get(gw.admin, "/other", &[]).await.status, 404);
    // Read-only endpoints: another method is a 405 naming the allowed ones.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = request(gw.admin, "POST", path, &[], b"").await;
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{path}");
    }
    let head = b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let buf = exchange_raw(gw.admin, head).await;
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");
}
