//! HTTP/2 without TLS (prior knowledge): requests served like HTTP/1.1 ones, `:authority` as
//! the forwarded host, cookie crumbs joined for an HTTP/1.1 upstream, the field limit at the
//! head, and a `Host` that disagrees with the authority refused.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use tokio::net::TcpStream;

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

#[tokio::test]
async fn h2c_prior_knowledge() {
    let gw = TestGateway::start(styled_config("envelope", "")).await;
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

/// HTTP/2 requests get the HTTP/1.1 field limit at the head, before routing (431 envelope):
/// a fixed-response route answers nothing else, and an upstream never sees them. Cookie
/// crumbs count as the one line they are joined into.
#[tokio::test]
async fn h2_field_limit_is_applied_at_the_head_like_http11() {
    let (up, seen) = counting_upstream().await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            "{FIXED_ROUTES}[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
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
