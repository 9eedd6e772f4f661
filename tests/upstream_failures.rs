//! Upstream failures (SPEC.md, "Proxying", "Error envelopes"), over real sockets against fault
//! upstreams written with raw tokio sockets: each failure's status, code, request ID, and that
//! nothing of the upstream leaks; how the upstream's `timeout` bounds an exchange.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn refused_upstream_is_502_bad_gateway() {
    let dead = refusing_addr();
    let gw = proxy_gateway(&format!("http://{dead}"), "", "").await;
    let reply = get(gw.addr, "/v1/x", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", dead);
}

#[tokio::test]
async fn upstream_refused_is_a_502_envelope() {
    let dead = refusing_addr();
    let gw = proxy_gateway(&format!("http://{dead}"), "", "").await;
    let r = get(gw.addr, "/x", &[]).await;
    assert_status_and_request_id(&r, 502);
    assert_eq!(r.json()["error"]["code"], "bad_gateway");
    assert!(
        !r.text().contains(&dead.port().to_string()),
        "upstream address leaked"
    );
}

#[tokio::test]
async fn accept_and_hang_is_504_after_timeout() {
    let (up, accepted) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "timeout = \"300ms\"", "").await;
    let started = Instant::now();
    let reply = get(gw.addr, "/v1/x", &[]).await;
    let took = started.elapsed();
    assert_failure(&reply, 504, "gateway_timeout", up);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a timeout is not retried"
    );
}

/// Sends a chunked POST whose body arrives in `chunks` five-byte pieces `gap` apart, and
/// returns the reply (the gateway closes after it).
async fn slow_upload(gw: SocketAddr, chunks: usize, gap: Duration) -> Reply {
    let mut stream = TcpStream::connect(gw).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n",
        )
        .await
        .unwrap();
    for _ in 0..chunks {
        tokio::time::sleep(gap).await;
        stream.write_all(b"5\r\nhello\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    parse_reply(&seen).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&seen)))
}

#[tokio::test]
async fn an_upload_longer_than_timeout_that_keeps_moving_is_not_cut_off() {
    let up = echo_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "timeout = \"1s\"", "").await;
    // Six chunks 300 ms apart: the body takes 1.8 s, nearly twice the upstream's `timeout`,
    // and the upstream reads each chunk as it comes. (Gaps well under `timeout`, so a busy
    // machine's scheduling delays do not make one look like a stall.)
    let started = Instant::now();
    let reply = slow_upload(gw.addr, 6, Duration::from_millis(300)).await;
    assert!(started.elapsed() >= Duration::from_millis(1800));
    assert_eq!(reply.status, 200, "{}", reply.shown());
    assert_eq!(reply.json()["body_len"], 30);
}

#[tokio::test]
async fn the_head_is_due_within_timeout_of_the_last_body_bytes() {
    // Reads the whole body, then never answers.
    let (up, _) = fault_upstream(|mut stream| async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"0\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "timeout = \"1s\"", "").await;
    let started = Instant::now();
    let reply = slow_upload(gw.addr, 6, Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert_failure(&reply, 504, "gateway_timeout", up);
    assert!(
        took >= Duration::from_millis(1800 + 1000) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

#[tokio::test]
async fn slow_head_past_timeout_is_504() {
    let (up, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Ty").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = stream
            .write_all(b"pe: text/plain\r\nContent-Length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "timeout = \"300ms\"", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 504, "gateway_timeout", up);
}

#[tokio::test]
async fn reset_or_close_before_the_head_is_502() {
    // Reset: a zero SO_LINGER makes the close send RST.
    let (reset, reset_count) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    // Plain close (FIN) after reading the request.
    let (closed, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        drop(stream);
    })
    .await;
    for (up, method) in [(reset, "GET"), (closed, "GET"), (reset, "POST")] {
        let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
        let reply = request(gw.addr, method, "/", &[], b"").await;
        assert_failure(&reply, 502, "bad_gateway", up);
    }
    // The request bytes reached the upstream: never replayed, whatever the method.
    assert_eq!(reset_count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn garbage_instead_of_http_is_502() {
    let (up, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"SSH-2.0-OpenSSH_9.6 db-primary.internal stack trace\r\n\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
}

/// An upstream that sends the head, some of the body, then nothing (its connection open): the
/// upstream's `timeout` also bounds the wait for its next body bytes, as nginx's
/// `proxy_read_timeout` does; the client's stream is cut, never ended cleanly.
#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_after_timeout() {
    let (up, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "timeout = \"400ms\"", "").await;
    let started = std::time::Instant::now();
    let raw = get_until_closed(gw.addr, "/").await;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "{text}");
    assert!(
        parse_reply(&raw).is_none(),
        "a short body, not a complete one"
    );
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_failures_counted(&gw, "timeout", 1).await;
}

#[tokio::test]
async fn reset_mid_body_aborts_the_client_stream() {
    // Content-Length 1000, then 10 bytes, then the upstream goes away.
    let (sized, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
    })
    .await;
    let gw = proxy_gateway(&format!("http://{sized}"), "", "").await;
    let raw = get_until_closed(gw.addr, "/").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 1000"),
        "{text}"
    );
    assert!(
        parse_reply(&raw).is_none(),
        "the client must see a short body, not a complete one: {text}"
    );
    let body = &raw[raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    assert!(body.len() < 1000, "{} body bytes", body.len());
    // Counted as an upstream failure like a reset before the head.
    assert_failures_counted(&gw, "reset", 1).await;

    // Chunked: one chunk, then the upstream goes away. The client's stream must end without
    // the terminating zero-length chunk.
    let (chunked, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
    })
    .await;
    let gw = proxy_gateway(&format!("http://{chunked}"), "", "").await;
    let raw = get_until_closed(gw.addr, "/").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("first"),
        "the first chunk was forwarded: {text}"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a clean end was faked: {text:?}"
    );
    assert!(parse_reply(&raw).is_none(), "{text:?}");
}

#[tokio::test]
async fn upstream_gateway_errors_get_the_envelope_others_pass_through() {
    let page = |status: &str, extra: &str| {
        let body = format!("<html><body><h1>{status}</h1>{UPSTREAM_SECRET}</body></html>");
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nServer: nginx/1.2.3 ({UPSTREAM_SECRET})\r\n\
             {extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (up, _) = fault_upstream(move |mut stream| async move {
        loop {
            let head = read_head(&mut stream).await;
            if head.is_empty() {
                return;
            }
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let response = match path.as_str() {
                "/502" => page("502 Bad Gateway", ""),
                "/503" => page("503 Service Unavailable", "Retry-After: 120\r\n"),
                "/503-bare" => page("503 Service Unavailable", ""),
                "/504" => page("504 Gateway Timeout", ""),
                "/500" => page("500 Internal Server Error", ""),
                _ => page("404 Not Found", ""),
            };
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let gw = proxy_gateway(&format!("http://{up}"), "retry_after = \"45s\"", "").await;
    for (path, status, code, retry) in [
        ("/502", 502, "bad_gateway", None),
        // The upstream's own Retry-After is kept...
        ("/503", 503, "service_unavailable", Some("120")),
        // ...and a 503 without one gets the upstream's `retry_after`, as every 503 does.
        ("/503-bare", 503, "service_unavailable", Some("45")),
        ("/504", 504, "gateway_timeout", None),
    ] {
        let reply = get(gw.addr, path, &[]).await;
        assert_failure(&reply, status, code, up);
        assert!(
            reply.header("server").is_none(),
            "upstream Server header kept"
        );
        assert_eq!(reply.header("retry-after"), retry, "{path}");
    }
    for (path, status) in [("/500", 500), ("/404", 404)] {
        let reply = get(gw.addr, path, &[]).await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.header("content-type"), Some("text/html"));
        assert!(
            reply.text().contains(UPSTREAM_SECRET),
            "{path} passed through"
        );
    }

    // Turned off, the upstream's own pages pass through too.
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[errors]\nnormalize_upstream_5xx = false\n[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    let reply = get(gw.addr, "/503", &[]).await;
    assert_eq!(reply.status, 503);
    assert!(reply.text().contains("<html>"));
}

/// A response whose framing two parsers could read differently (RFC 9112 6.3) is not relayed
/// as hyper happened to read it: 502, as nginx refuses "Content-Length and Transfer-Encoding
/// at the same time" and unknown transfer codings. A plain chunked response still passes.
#[tokio::test]
async fn an_upstream_response_with_ambiguous_framing_is_a_502() {
    for (framing, ok) in [
        ("Content-Length: 1\r\nTransfer-Encoding: chunked", false),
        ("Transfer-Encoding: gzip, chunked", false),
        ("Transfer-Encoding: chunked", true),
    ] {
        let response = format!("HTTP/1.1 200 OK\r\n{framing}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        // The same answer to every request on a kept-alive connection.
        let (up, accepted) = fault_upstream(move |mut stream| {
            let response = response.clone();
            async move {
                while !read_head(&mut stream).await.is_empty() {
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.flush().await;
                }
            }
        })
        .await;
        let gw = proxy_gateway(&format!("http://{up}"), "", "").await;
        for _ in 0..2 {
            let reply = get(gw.addr, "/x", &[]).await;
            if ok {
                assert_eq!((reply.status, reply.text().as_str()), (200, "hello"));
            } else {
                assert_failure(&reply, 502, "bad_gateway", up);
            }
        }
        if !ok {
            assert_failures_counted(&gw, "invalid_response", 2).await;
        }
        // A connection whose response was refused takes no further request (as nginx closes
        // it): nothing more is read from a socket two parsers could frame differently.
        let connections = if ok { 1 } else { 2 };
        assert_eq!(accepted.load(Ordering::SeqCst), connections, "{framing}");
    }
}

#[tokio::test]
async fn rate_limit_headers_stay_on_upstream_failures() {
    let dead = refusing_addr();
    let digest = {
        use sha2::Digest;
        use std::fmt::Write;
        let sum = sha2::Sha256::digest(b"tg_test_key_upstream_failures");
        sum.iter().fold(String::from("sha256:"), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[plans.pro]\nrequests_per_minute = 300\n\
             [[keys]]\nid = \"k\"\nkey = \"{digest}\"\nplan = \"pro\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{dead}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\n"
        ),
    ))
    .await;
    let reply = get(
        gw.addr,
        "/",
        &[("X-API-Key", "tg_test_key_upstream_failures")],
    )
    .await;
    assert_failure(&reply, 502, "bad_gateway", dead);
    assert_eq!(reply.header("x-ratelimit-limit"), Some("300"));
    assert!(reply.header("x-ratelimit-remaining").is_some());
}

/// Response-head timers are reused from one attempt to the next on a thread: a short timeout
/// right after requests with a long one (their timers registered 30 s ahead) still fires on
/// time, and so does the next one after it fired.
#[tokio::test]
async fn a_short_timeout_after_long_ones_fires_on_time() {
    let echo = echo_upstream().await;
    let (hang, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"echo\"\nurl = \"http://{echo}\"\ntimeout = \"30s\"\n\
             [[upstreams]]\nname = \"hang\"\nurl = \"http://{hang}\"\ntimeout = \"300ms\"\n\
             [[routes]]\nprefix = \"/echo/\"\nupstream = \"echo\"\nauth = false\n\
             [[routes]]\nprefix = \"/hang/\"\nupstream = \"hang\"\nauth = false\n"
        ),
    ))
    .await;
    for round in 0..2 {
        for _ in 0..20 {
            assert_eq!(get(gw.addr, "/echo/x", &[]).await.status, 200);
        }
        let started = Instant::now();
        let reply = get(gw.addr, "/hang/x", &[]).await;
        let took = started.elapsed();
        assert_failure(&reply, 504, "gateway_timeout", hang);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "round {round}: {took:?}"
        );
    }
}
