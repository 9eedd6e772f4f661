//! Connections to the upstream: keep-alive reuse and stale pooled connections, connect
//! timeouts, a GET sent again after a failed connect, and the `max_inflight` and maintenance
//! 503s.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

#[tokio::test]
async fn keep_alive_connections_to_the_upstream_are_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_ok(stream));
        }
    });
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    for _ in 0..100 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "ok");
    }
    let n = accepted.load(Ordering::SeqCst);
    assert!(
        n <= 3,
        "100 sequential requests opened {n} upstream connections"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    // Each connection answers one request as keep-alive, then the upstream closes it (as an
    // upstream's own idle timeout does). The next request must get a fresh connection, not
    // a 502 from the dead one.
    let (up, accepted) = fault_upstream(|mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    for n in 1..=5 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "request {n}: {}", reply.text());
        assert_eq!(reply.text(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), n);
        // The close reaches the gateway's connection task (it has its own task); a request
        // racing the close itself is the keep-alive race every proxy has.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn max_inflight_answers_503_with_retry_after_until_the_body_is_done() {
    let (entered_tx, mut entered_rx) = mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    let (up, accepted) = fault_upstream(move |mut stream| {
        let entered = entered_tx.clone();
        let release = release_rx.clone();
        async move {
            let _ = read_head(&mut stream).await;
            // The head goes out at once; the body's end waits for the test.
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .await;
            let _ = entered.send(());
            let _ = release.lock().await.recv().await;
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    })
    .await;
    let gw = proxy_gateway(
        &format!("http://{up}"),
        "max_inflight = 1\nretry_after = \"7s\"",
        "",
    )
    .await;
    let addr = gw.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    entered_rx.recv().await.unwrap();
    // The first response's head has been sent, but its body is still streaming: the slot
    // is still taken.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = get(gw.addr, "/second", &[]).await;
    assert_failure(&reply, 503, "service_unavailable", up);
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "overload never reaches the upstream"
    );

    release_tx.send(()).unwrap();
    let first = slow.await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "first");
    // The slot is free again once the body has ended.
    let again = tokio::spawn(async move { get(addr, "/third", &[]).await });
    entered_rx.recv().await.unwrap();
    release_tx.send(()).unwrap();
    assert_eq!(again.await.unwrap().status, 200);
}

#[tokio::test]
async fn maintenance_answers_503_without_contacting_the_upstream() {
    let (up, accepted) = fault_upstream(|_stream| async {}).await;
    let gw = proxy_gateway(
        &format!("http://{up}"),
        "maintenance = true\nretry_after = \"90s\"",
        "",
    )
    .await;
    for method in ["GET", "POST"] {
        let reply = request(gw.addr, method, "/", &[], b"payload").await;
        assert_failure(&reply, 503, "service_unavailable", up);
        assert_eq!(reply.header("retry-after"), Some("90"));
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("90s")
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs
/// until the connector's `connect_timeout`.
async fn blackhole() -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // Fill the queue: connects that complete without an accept. Stop at the first that hangs.
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    (listener, fillers)
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let (listener, _fillers) = blackhole().await;
    let up = listener.local_addr().unwrap();
    let gw = proxy_gateway(
        &format!("http://{up}"),
        "connect_timeout = \"200ms\"\ntimeout = \"5s\"",
        "",
    )
    .await;
    let started = Instant::now();
    let reply = request(gw.addr, "POST", "/", &[], b"x").await;
    assert_failure(&reply, 504, "gateway_timeout", up);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{took:?}: connect_timeout, not timeout"
    );
}

/// An https upstream that accepts the connection and never answers the TLS handshake: the
/// handshake is part of connecting, so `connect_timeout` bounds it, not `timeout`.
#[tokio::test]
async fn a_stalled_tls_handshake_is_a_connect_timeout() {
    let (up, _) = fault_upstream(|stream| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    let gw = proxy_gateway(
        &format!("https://{up}"),
        "connect_timeout = \"200ms\"\ntimeout = \"10s\"",
        "",
    )
    .await;
    let started = Instant::now();
    let reply = request(gw.addr, "POST", "/", &[], b"x").await;
    assert_failure(&reply, 504, "gateway_timeout", up);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "{took:?}: connect_timeout, not timeout"
    );
    assert_failures_counted(&gw, "connect_timeout", 1).await;
}

#[tokio::test]
async fn a_get_that_could_not_connect_is_sent_again_on_a_new_connection() {
    // A plain-http upstream. The first connect hangs (accept queue full, SYN dropped) until
    // connect_timeout; meanwhile the queue is drained and the upstream starts serving, so
    // the one retry connects. A POST with a body is never replayed: 504.
    for (method, body, status) in [("GET", &b""[..], 200), ("POST", &b"x"[..], 504)] {
        let (listener, fillers) = blackhole().await;
        let up = listener.local_addr().unwrap();
        let gw = proxy_gateway(
            &format!("http://{up}"),
            "connect_timeout = \"400ms\"\ntimeout = \"5s\"",
            "",
        )
        .await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(fillers);
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_ok(stream));
            }
        });
        let started = Instant::now();
        let reply = request(gw.addr, method, "/", &[], body).await;
        assert_eq!(reply.status, status, "{method}: {}", reply.text());
        if status == 200 {
            assert_eq!(reply.text(), "ok");
        } else {
            assert_failure(&reply, status, "gateway_timeout", up);
        }
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{method}: the first connect ran into connect_timeout"
        );
    }
}

#[tokio::test]
async fn an_upstream_writing_head_and_body_apart_is_not_held_by_a_delayed_ack() {
    // Many simple backends (Python's http.server) write the head and the body in two writes
    // with Nagle on: the body waits for the ACK of the head, and a delayed ACK holds every
    // response on a reused connection ~40 ms.
    let (up, accepted) = fault_upstream(|mut stream: TcpStream| async move {
        stream.set_nodelay(false).unwrap();
        loop {
            if read_head(&mut stream).await.is_empty() {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
            if stream.write_all(head).await.is_err() || stream.write_all(b"hello").await.is_err() {
                return;
            }
        }
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut took = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        let reply = exchange_on(&mut client, request).await.unwrap();
        took.push(started.elapsed());
        assert_eq!((reply.status, reply.text().as_str()), (200, "hello"));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one reused upstream connection"
    );
    // The first request connected; the rest reused the connection.
    let mut reused = took[1..].to_vec();
    reused.sort();
    let median = reused[reused.len() / 2];
    assert!(
        median < Duration::from_millis(20),
        "median {median:?} per request on a reused connection (a delayed ACK is 40 ms): {took:?}"
    );
}

/// A client that goes away while its request waits on the upstream cancels it: the upstream's
/// connection is closed at once, long before `timeout`, as nginx does (`proxy_ignore_client_abort
/// off`). Whether the client closes the socket or only its sending side, and with a body.
#[tokio::test]
async fn a_client_that_goes_away_cancels_its_upstream_request() {
    let (up, mut events) = silent_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "timeout = \"30s\"", "").await;
    let get = "GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n".to_string();
    let post = "POST /slow HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello".to_string();
    for (request, how) in [(&get, "close"), (&get, "half-close"), (&post, "close")] {
        let mut client = TcpStream::connect(gw.addr).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(
            event.unwrap(),
            Some("request"),
            "{how}: the upstream got the request"
        );
        let left = Instant::now();
        if how == "close" {
            drop(client);
        } else {
            client.shutdown().await.unwrap();
            // Kept open: only the client's sending side is closed.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(client);
            });
        }
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(
            event.expect("the upstream connection was not closed within 5 s"),
            Some("closed"),
            "{how}"
        );
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "{how}: cancelled after {:?}",
            left.elapsed()
        );
    }
}
