//! Wire behaviour of SPEC.md, proven over loopback sockets against the real server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::body::ResponseBody;
use tollgate::observability::RequestId;
use tollgate::{Gateway, GatewayError, Handler, RequestContext};

const ROUTES: &str = r#"
[[routes]]
prefix = "/status"
auth = false
methods = ["GET"]
respond = { status = 200, body = "up", content_type = "text/plain" }

[[routes]]
prefix = "/fixed/"
auth = false
respond = { status = 201, body = "made" }
"#;

fn styled(style: &str, server_extra: &str) -> tollgate::Config {
    config(
        server_extra,
        &format!("[errors]\nstyle = \"{style}\"\nfields = {{ powered_by = \"Acme\" }}\n{ROUTES}"),
    )
}

/// Checks an error body in the given style and returns its request ID.
fn assert_error(reply: &Reply, style: &str, status: u16, code: &str) -> String {
    assert_eq!(reply.status, status, "{}", reply.shown());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let v = reply.json();
    let header_id = reply
        .header("x-request-id")
        .expect("X-Request-Id")
        .to_owned();
    let (body_code, message) = match style {
        "envelope" => {
            assert_eq!(v["success"], false);
            let ts = v["timestamp"].as_str().expect("timestamp");
            assert!(humantime::parse_rfc3339(ts).is_ok(), "timestamp {ts}");
            (&v["error"]["code"], &v["error"]["message"])
        }
        "detail" => (&v["code"], &v["detail"]),
        "simple" => {
            assert_eq!(v["success"], false);
            (&v["code"], &v["error"])
        }
        _ => unreachable!(),
    };
    assert_eq!(body_code, code, "{v}");
    assert!(
        message.as_str().is_some_and(|m| !m.is_empty()),
        "message in {v}"
    );
    assert_eq!(
        v["request_id"],
        header_id.as_str(),
        "same ID in header and body"
    );
    assert_eq!(v["powered_by"], "Acme", "errors.fields in {v}");
    header_id
}

#[tokio::test]
async fn client_errors_in_all_three_styles() {
    for style in ["envelope", "detail", "simple"] {
        let gw = TestGateway::start(styled(
            style,
            "max_header_bytes = \"1KiB\"\nmax_body_bytes = \"1KiB\"",
        ))
        .await;

        let r = get(gw.addr, "/nowhere", &[]).await;
        assert_error(&r, style, 404, "not_found");

        let r = request(gw.addr, "POST", "/status", &[], b"x").await;
        assert_error(&r, style, 405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));

        let big = vec![b'a'; 2048];
        let r = request(gw.addr, "POST", "/fixed/x", &[], &big).await;
        assert_error(&r, style, 413, "payload_too_large");

        let long_path = format!("/status/{}", "a".repeat(9000));
        let r = get(gw.addr, &long_path, &[]).await;
        assert_error(&r, style, 414, "uri_too_long");

        let big_header = "h".repeat(2000);
        let r = get(gw.addr, "/status", &[("X-Big", &big_header)]).await;
        assert_error(&r, style, 431, "headers_too_large");
        // The request line counts toward the head: 600 + 500 bytes is over 1 KiB.
        let long_target = format!("/status?{}", "q".repeat(600));
        let r = get(gw.addr, &long_target, &[("X-Half", &"h".repeat(500))]).await;
        assert_error(&r, style, 431, "headers_too_large");
        let r = get(gw.addr, &long_target, &[("X-Half", &"h".repeat(200))]).await;
        assert_eq!(r.status, 200, "{}", r.shown());

        // Just under the limits is fine.
        let r = request(gw.addr, "POST", "/fixed/x", &[], &vec![b'a'; 1024]).await;
        assert_eq!(r.status, 201);
        assert_eq!(r.text(), "made");
    }
}

#[tokio::test]
async fn body_over_limit_while_streaming_is_413() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(config(
        "max_body_bytes = \"1KiB\"",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    // Chunked: no Content-Length to check up front.
    let mut req = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'z'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = send_raw(gw.addr, &req).await;
    assert_error_plain(&r, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");

    // Under the limit, chunked passes through.
    let mut req = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(b"100\r\n");
    req.extend_from_slice(&[b'z'; 0x100]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = send_raw(gw.addr, &req).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["body_len"], 256);
}

#[tokio::test]
async fn request_ids_kept_replaced_generated() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!("{ROUTES}\n[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\nauth = false\n"),
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
    assert_eq!(assert_error_plain(&r, 404), good);
    let r = get(gw.addr, "/nope", &[("X-Request-Id", "bad id")]).await;
    assert_generated_id(&assert_error_plain(&r, 404));

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

fn assert_error_plain(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status, status);
    let v = reply.json();
    let id = reply.header("x-request-id").unwrap();
    assert_eq!(v["request_id"], id);
    id.to_owned()
}

/// The real pipeline, except `/panic` panics inside the handler.
struct PanicsOnPath(Arc<Gateway>);

impl Handler for PanicsOnPath {
    async fn handle(
        &self,
        request: Request<Incoming>,
        ctx: &RequestContext,
    ) -> Response<ResponseBody> {
        if request.uri().path() == "/panic" {
            panic!("deliberate test panic");
        }
        self.0.handle(request, ctx).await
    }

    fn render_error(&self, error: &GatewayError, request_id: &RequestId) -> Response<ResponseBody> {
        self.0.render_error(error, request_id)
    }
}

#[tokio::test]
async fn a_panic_becomes_a_500_envelope_and_the_connection_survives() {
    let cfg = styled("envelope", "");
    let gateway = Arc::new(Gateway::new(cfg.clone()));
    let gw = TestGateway::start_with(cfg, gateway.clone(), Arc::new(PanicsOnPath(gateway))).await;

    let r = get(gw.addr, "/panic", &[("X-Request-Id", "panic-1")]).await;
    let id = assert_error(&r, "envelope", 500, "internal_error");
    assert_eq!(id, "panic-1");
    assert!(
        !r.text().contains("deliberate"),
        "panic message leaked: {}",
        r.text()
    );

    // Keep-alive: a panic on one request does not take the connection down.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /panic HTTP/1.1\r\nHost: t\r\n\r\nGET /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 500"), "{text}");
    assert!(
        text.contains("HTTP/1.1 200"),
        "second response after the panic: {text}"
    );
    assert!(text.ends_with("up"), "{text}");
}

#[tokio::test]
async fn graceful_shutdown_drains_an_in_flight_request() {
    let (entered_tx, entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let up = upstream(move |_req: Request<Incoming>| {
        let entered = entered_tx.clone();
        async move {
            let _ = entered.send(());
            tokio::time::sleep(Duration::from_millis(600)).await;
            Response::new(Full::new(Bytes::from_static(b"slow but complete")))
        }
    })
    .await;
    let mut gw = TestGateway::start(config(
        "shutdown_grace = \"10s\"",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    let mut entered_rx = entered_rx;
    entered_rx.recv().await.expect("upstream got the request");

    let started = Instant::now();
    let serve = gw.begin_shutdown();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slow but complete");
    serve
        .await
        .unwrap()
        .expect("serve returns Ok after draining");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Listeners are closed: new clients are refused.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let up = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(Full::new(Bytes::new()))
    })
    .await;
    let mut gw = TestGateway::start(config(
        "shutdown_grace = \"300ms\"",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    let addr = gw.addr;
    let _stuck = tokio::spawn(async move { get(addr, "/stuck", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    gw.begin_shutdown().await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

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

#[tokio::test]
async fn upstream_refused_is_a_502_envelope() {
    // Bind and drop to get a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = TestGateway::start(config(
        "",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{dead}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    let r = get(gw.addr, "/x", &[]).await;
    assert_error_plain(&r, 502);
    assert_eq!(r.json()["error"]["code"], "bad_gateway");
    assert!(
        !r.text().contains(&dead.port().to_string()),
        "upstream address leaked"
    );
}

/// A gateway (with `server_extra` in `[server]`) whose one public route `/` goes to a new
/// [`echo_upstream`]; returns both.
async fn echo_gateway(server_extra: &str) -> (TestGateway, std::net::SocketAddr) {
    let up = echo_upstream().await;
    let gw = TestGateway::start(config(
        server_extra,
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    (gw, up)
}

/// An HTTP/2 connection to `addr` without TLS (prior knowledge), ready for requests.
async fn h2c(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

/// Sends `req` over an HTTP/2 connection to an [`echo_gateway`]; asserts 200 and returns the
/// upstream's JSON echo of what it received.
async fn h2_echo(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    req: Request<http_body_util::Empty<Bytes>>,
) -> serde_json::Value {
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let gw = TestGateway::start(styled("envelope", "")).await;
    let mut sender = h2c(gw.addr).await;
    let req = Request::get(format!("http://{}/status", gw.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_generated_id(resp.headers()["x-request-id"].to_str().unwrap());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"up");

    let req = Request::get(format!("http://{}/missing", gw.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 404);
}

/// HTTP/2 has no `Host` line; the request's `:authority` is the host the client asked for.
#[tokio::test]
async fn h2_requests_carry_x_forwarded_host_from_the_authority() {
    let (gw, up) = echo_gateway("").await;
    let mut sender = h2c(gw.addr).await;
    let req = Request::get("http://api.example.test:8443/v1/x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let echo = h2_echo(&mut sender, req).await;
    let h = &echo["headers"];
    assert_eq!(
        h["x-forwarded-host"],
        "api.example.test:8443",
        "{}",
        redact(&h.to_string())
    );
    assert_eq!(h["host"], up.to_string());
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
        ];
        let r = get(gw.addr, "/v1/x", &sent).await;
        assert_eq!(r.status, 200, "{}", r.shown());
        let h = &r.json()["headers"];
        assert_eq!(h["x-forwarded-proto"], proto, "{server:?}");
        assert_eq!(h["x-forwarded-host"], host, "{server:?}");
        // A value that is no scheme is not passed on, even from a trusted proxy.
        let r = get(gw.addr, "/v1/x", &[("X-Forwarded-Proto", "gopher")]).await;
        assert_eq!(
            r.json()["headers"]["x-forwarded-proto"],
            "http",
            "{server:?}"
        );
    }
}

/// An HTTP/2 client sends each cookie as a field of its own; the HTTP/1.1 upstream gets them
/// on one `Cookie` line, joined with "; " (RFC 9113 8.2.3).
#[tokio::test]
async fn h2_cookie_fields_reach_an_http11_upstream_as_one_line() {
    let (gw, _) = echo_gateway("").await;
    let mut sender = h2c(gw.addr).await;
    let req = Request::get(format!("http://{}/v1/x", gw.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let echo = h2_echo(&mut sender, req).await;
    assert_eq!(echo["headers"]["cookie"], "a=1; b=2; c=3");
}

#[tokio::test]
async fn a_slow_head_gets_a_408_envelope_and_the_connection_closes() {
    let gw = TestGateway::start(styled("envelope", "header_read_timeout = \"300ms\"")).await;
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
    let id = assert_error(&reply, "envelope", 408, "request_timeout");
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
async fn max_connections_holds_extra_clients_in_the_backlog() {
    let gw = TestGateway::start(styled("envelope", "max_connections = 1")).await;
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

#[tokio::test]
async fn admin_health_and_readiness() {
    let gw = TestGateway::start(styled("envelope", "")).await;
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

#[tokio::test]
async fn fixed_responses_and_head() {
    let gw = TestGateway::start(styled("envelope", "")).await;
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
    let gw = TestGateway::start(styled("envelope", "")).await;
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

/// An upstream that counts the requests it receives (any bytes at all count as one).
async fn counting_upstream() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    let addr = upstream(move |_req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_never_reaches_the_upstream() {
    let (up, seen) = counting_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    let cases: [(&str, &[u8]); 12] = [
        ("chunked, chunked", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("two TE headers", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("gzip coding", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ("duplicate differing CL", b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
        ("HTTP/1.0 + TE", b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n  b\r\n\r\n"),
        ("control byte in a header", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n"),
        ("Host disagrees with absolute-form target", b"GET http://other.example/ HTTP/1.1\r\nHost: t\r\n\r\n"),
        ("no Host", b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n"),
        ("no Host, absolute-form target", b"GET http://other.example/ HTTP/1.1\r\n\r\n"),
        ("two Host headers", b"GET / HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n"),
        ("an invalid Host", b"GET / HTTP/1.1\r\nHost: t u\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: connection not closed"))
            .unwrap();
        let reply = parse_reply(&buf).unwrap_or_else(|| {
            panic!("{name}: no response in {:?}", String::from_utf8_lossy(&buf))
        });
        assert_eq!(reply.status, 400, "{name}: {}", reply.shown());
        assert_eq!(reply.json()["error"]["code"], "bad_request", "{name}");
        assert_eq!(reply.header("connection"), Some("close"), "{name}");
        let id = reply.header("x-request-id").expect("X-Request-Id");
        assert_eq!(reply.json()["request_id"], id, "{name}");
    }
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );

    // A well-formed absolute-form request whose authority matches Host is fine, and so are
    // an HTTP/1.0 request without Host and a Host with a port or an IPv6 address.
    for raw in [
        &b"GET http://t/ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
        b"GET /ok HTTP/1.0\r\n\r\n",
        b"GET /ok HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    ] {
        let r = send_raw(gw.addr, raw).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(raw));
    }
}

#[tokio::test]
async fn te_plus_cl_is_framed_by_te_alone_and_the_connection_closes() {
    // hyper drops Content-Length when Transfer-Encoding is present and closes the connection
    // after answering (RFC 9112 6.1), so a request smuggled behind the body is never read.
    let (up, seen) = counting_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("connection closed")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {text}"
    );
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the smuggled request never arrived"
    );
}

#[tokio::test]
async fn a_shutdown_answers_requests_already_owed_and_closes_idle_keep_alive_connections() {
    let mut gw = TestGateway::start(styled("envelope", "")).await;
    // Idle keep-alive: served once, nothing since.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Accepted, nothing sent yet.
    let mut fresh = TcpStream::connect(gw.addr).await.unwrap();
    // Half a head sent.
    let mut half = TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(b"GET /status HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let serving = gw.begin_shutdown();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut out))
        .await
        .expect("the idle keep-alive connection is closed at once")
        .unwrap();
    assert!(out.is_empty());
    let started = Instant::now();
    while TcpStream::connect(gw.addr).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still accepting new connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The two connections that owe a head get it answered, then closed.
    fresh
        .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    half.write_all(b"Host: t\r\n\r\n").await.unwrap();
    for (name, stream) in [("fresh", &mut fresh), ("half", &mut half)] {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed after its answer"))
            .unwrap();
        let reply = parse_reply(&out).unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(reply.status, 200, "{name}");
        assert_eq!(reply.text(), "up", "{name}");
        assert_eq!(reply.header("connection"), Some("close"), "{name}");
    }
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
}

/// An upstream that counts only requests it received whole: head and complete body.
async fn whole_request_upstream() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let whole = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = whole.clone();
    let addr = upstream(move |req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            if req.into_body().collect().await.is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    (addr, whole)
}

/// Heads hyper refuses before tollgate sees a request (it answers them itself, empty) get
/// tollgate's error body in the configured style and a request ID, like every other error.
#[tokio::test]
async fn heads_the_parser_refuses_get_the_error_style_and_a_request_id() {
    let gw = TestGateway::start(styled("detail", "")).await;
    // Far beyond max_header_bytes (16 KiB): more than hyper's read buffer holds.
    let mut huge = b"GET /status HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    huge.resize(huge.len() + 300_000, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let reply = send_raw(gw.addr, &huge).await;
    let id = assert_error(&reply, "detail", 431, "headers_too_large");
    assert_generated_id(&id);

    // A good request, then a malformed one on the same connection: the first is answered as
    // usual, the second with an error body.
    let replies = exchange_raw(
        gw.addr,
        b"GET /status HTTP/1.1\r\nHost: t\r\n\r\nG@T /status HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    let second = replies
        .windows(9)
        .skip(1)
        .position(|w| w == b"HTTP/1.1 ")
        .map(|at| at + 1)
        .unwrap_or_else(|| panic!("one response in {:?}", String::from_utf8_lossy(&replies)));
    let first = parse_reply(&replies[..second]).unwrap();
    assert_eq!(first.status, 200, "{}", first.shown());
    assert_eq!(first.text(), "up");
    let refused = parse_reply(&replies[second..]).unwrap();
    let refused_id = assert_error(&refused, "detail", 400, "bad_request");
    assert_ne!(Some(refused_id.as_str()), first.header("x-request-id"));
    assert!(
        refused.json()["detail"]
            .as_str()
            .is_some_and(|m| m.contains("could not be parsed")),
        "{}",
        refused.shown()
    );
}

#[tokio::test]
async fn bad_chunks_invalid_methods_and_too_many_headers_are_refused() {
    let (up, whole) = whole_request_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n[[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"),
    ))
    .await;
    let many_headers: Vec<u8> = {
        let mut raw = b"GET / HTTP/1.1\r\nHost: t\r\n".to_vec();
        for i in 0..200 {
            raw.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw
    };
    // (name, request, status, code).
    let cases: [(&str, &[u8], u16, &str); 6] = [
        ("chunk size not hex", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
        ("chunk size overflows", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
        ("chunk shorter than its size", b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
        ("invalid method token", b"G@T / HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
        ("method with a space", b"GE T / HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
        ("200 headers", &many_headers, 431, "headers_too_large"),
    ];
    for (name, raw, status, code) in cases {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        // The gateway closes the connection (it may reset it after a refusal).
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: connection not closed"));
        let reply = parse_reply(&buf).unwrap_or_else(|| {
            panic!("{name}: no response in {:?}", String::from_utf8_lossy(&buf))
        });
        assert_eq!(reply.status, status, "{name}: {}", reply.shown());
        assert_eq!(reply.json()["error"]["code"], code, "{name}");
        let id = reply.header("x-request-id").expect("X-Request-Id");
        assert_eq!(reply.json()["request_id"], id, "{name}");
        assert!(
            !String::from_utf8_lossy(&buf).contains(" 200 "),
            "{name}: never answered as a success"
        );
    }
    // The upstream received nothing whole; the gateway is still serving.
    let r = send_raw(
        gw.addr,
        b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        whole.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the well-formed request reached the upstream whole"
    );
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

/// Sends `fields` extra header fields (`x-fNNNN: v`) and `extra` on an HTTP/2 connection;
/// returns the status and body.
async fn h2_with_fields(
    addr: std::net::SocketAddr,
    path: &str,
    fields: usize,
    extra: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut sender = h2c(addr).await;
    let mut req = Request::get(format!("http://{addr}{path}"));
    for i in 0..fields {
        req = req.header(format!("x-f{i:04}"), "v");
    }
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .expect("an answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// HTTP/2 requests get the HTTP/1.1 field limit at the head, before routing (431 envelope):
/// a fixed-response route answers nothing else, and an upstream never sees them. Cookie
/// crumbs count as the one line they are joined into.
#[tokio::test]
async fn h2_field_limit_is_applied_at_the_head_like_http11() {
    let (up, seen) = counting_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            "{ROUTES}[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/public/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    for (path, fields) in [
        ("/status", 150),
        ("/status", 1200),
        ("/public/x", 150),
        ("/public/x", 1200),
    ] {
        let (status, body) = h2_with_fields(gw.addr, path, fields, &[]).await;
        assert_eq!(status, 431, "{path} with {fields} fields: {body}");
        assert_eq!(body["error"]["code"], "headers_too_large", "{body}");
    }
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "forwarded"
    );
    // HTTP/1.1, the same count: 431 too.
    let mut head = String::from("GET /status HTTP/1.1\r\nHost: t\r\n");
    for i in 0..150 {
        head.push_str(&format!("x-f{i:04}: v\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let reply = send_raw(gw.addr, head.as_bytes()).await;
    assert_envelope(&reply, 431, "headers_too_large");
    // At the limit, and 150 cookie crumbs (one line once joined): answered.
    let (status, _) = h2_with_fields(gw.addr, "/public/x", 95, &[]).await;
    assert_eq!(status, 200);
    let crumbs: Vec<(String, String)> = (0..150)
        .map(|i| ("cookie".into(), format!("c{i}=1")))
        .collect();
    let crumbs: Vec<(&str, &str)> = crumbs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let (status, body) = h2_with_fields(gw.addr, "/public/x", 0, &crumbs).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// HTTP/2: a `Host` that names another entity than `:authority` makes the request malformed
/// (RFC 9113 8.3.1): 400, never forwarded. The same host, in any case, is fine.
#[tokio::test]
async fn h2_host_disagreeing_with_the_authority_is_a_400() {
    let (up, seen) = counting_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    let (status, body) = h2_with_fields(gw.addr, "/x", 0, &[("host", "evil.test")]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "forwarded"
    );
    let authority = gw.addr.to_string().to_uppercase();
    let (status, body) = h2_with_fields(gw.addr, "/x", 0, &[("host", &authority)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
}
