//! Upgrades: a WebSocket handshake passes through as a byte stream, idle tunnels are closed,
//! an unasked 101 is a 502, and open tunnels count against `max_connections` and are waited
//! for by a stopping server.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[tokio::test]
async fn websocket_upgrade_passes_through_as_a_byte_stream() {
    let (heads_tx, mut heads_rx) = mpsc::unbounded_channel::<String>();
    let (up, _) = fault_upstream(move |mut stream| {
        let heads = heads_tx.clone();
        async move {
            let head = read_head(&mut stream).await;
            let _ = heads.send(head);
            let _ = stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                )
                .await;
            // Echo until the client goes away.
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut client))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(lower.contains("sec-websocket-accept"), "{head}");
    let upstream_head = heads_rx.recv().await.unwrap().to_ascii_lowercase();
    assert!(
        upstream_head.contains("upgrade: websocket"),
        "{upstream_head}"
    );
    assert!(
        upstream_head.contains("connection: upgrade"),
        "{upstream_head}"
    );
    assert!(
        upstream_head.contains("sec-websocket-key"),
        "{upstream_head}"
    );

    for message in [&b"hello"[..], b"\x81\x05bytes", &[0u8; 3000]] {
        client.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
            .await
            .expect("echo within 5s")
            .unwrap();
        assert_eq!(back, message);
    }
}

/// A tunnel that carries nothing for `idle_timeout` is closed and gives its `max_inflight`
/// slot back: a peer that vanished without a FIN cannot hold it forever.
#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed_and_frees_its_slot() {
    let up = websocket_upstream(Switch::Always).await;
    let gw = proxy_gateway(
        &format!("http://{up}"),
        "max_inflight = 1",
        "idle_timeout = \"400ms\"",
    )
    .await;
    let mut client = open_tunnel(gw.addr).await;
    // Traffic keeps it open past the idle timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_echoes(&mut client).await;
    }
    // ...silence closes it.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("closed within 5s")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(350), "{took:?}");
    // The one slot is free again: a new tunnel opens instead of a 503.
    open_tunnel(gw.addr).await;
}

/// Which requests [`websocket_upstream`] answers with 101.
#[derive(Clone, Copy, PartialEq)]
enum Switch {
    /// Every request, asked or not.
    Always,
    /// Upgrade requests; others get 200.
    Asked,
}

/// An upstream that switches protocols (101) and then echoes the tunnel's bytes.
async fn websocket_upstream(switch: Switch) -> SocketAddr {
    let (up, _) = fault_upstream(move |mut stream| async move {
        let head = read_head(&mut stream).await;
        if switch == Switch::Asked && !head.to_ascii_lowercase().contains("upgrade: websocket") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await;
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    up
}

/// A client connection upgraded through `gw` to a tunnel, checked with one echo.
async fn open_tunnel(gw: SocketAddr) -> TcpStream {
    let mut client = TcpStream::connect(gw).await.unwrap();
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut client))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_echoes(&mut client).await;
    client
}

async fn assert_echoes(client: &mut TcpStream) {
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
        .await
        .expect("echo within 5s")
        .unwrap();
    assert_eq!(&back, b"ping");
}

/// A 101 to a request that asked for no upgrade is not relayed (it would switch the client's
/// connection to nothing): 502 `bad_gateway`, counted as an invalid response.
#[tokio::test]
async fn an_unasked_101_from_the_upstream_is_a_502() {
    let up = websocket_upstream(Switch::Always).await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let reply = get(gw.addr, "/plain", &[]).await;
    assert_eq!(reply.status, 502, "{}", reply.shown());
    assert_eq!(reply.json()["error"]["code"], "bad_gateway");
    assert!(reply.header("x-request-id").is_some());
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_failures_counted(&gw, "invalid_response", 1).await;
}

/// An upgraded connection is still a client connection: it holds its `max_connections` place
/// until the tunnel closes, as any other connection does.
#[tokio::test]
async fn an_open_tunnel_counts_against_max_connections() {
    let up = websocket_upstream(Switch::Asked).await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "max_connections = 1").await;
    let tunnel = open_tunnel(gw.addr).await;
    // A second client waits in the backlog while the tunnel is open...
    let waiting = tokio::spawn(get(gw.addr, "/plain", &[]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "served beside an open tunnel");
    // ...and is served once it closes.
    drop(tunnel);
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served after the tunnel closed")
        .unwrap();
    assert_eq!(reply.status, 200);
}

/// A stopping server lets open tunnels carry on within `shutdown_grace`, and stops as soon as
/// the last one closes.
#[tokio::test]
async fn a_stopping_server_waits_for_open_tunnels() {
    let up = websocket_upstream(Switch::Asked).await;
    let mut gw = proxy_gateway(&format!("http://{up}"), "", "shutdown_grace = \"20s\"").await;
    let mut tunnel = open_tunnel(gw.addr).await;
    let stopped = gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopped.is_finished(), "stopped with a tunnel open");
    assert_echoes(&mut tunnel).await;
    drop(tunnel);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("stopped once the tunnel closed")
        .unwrap()
        .unwrap();
}
