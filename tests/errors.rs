//! tollgate's own error bodies over the wire (SPEC.md, "Error envelopes"): the client errors
//! in all three styles, a panic as a 500, and a 429 and normalized 502s in the `detail` and
//! `simple` styles.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::body::ResponseBody;
use tollgate::observability::RequestId;
use tollgate::{Gateway, GatewayError, Handler, RequestContext};

const KEY_A: &str = "tg_test_spec_a_0123456789abcdefghijk";

#[tokio::test]
async fn client_errors_in_all_three_styles() {
    for style in ["envelope", "detail", "simple"] {
        let gw = TestGateway::start(styled_config(
            style,
            "max_header_bytes = \"1KiB\"\nmax_body_bytes = \"1KiB\"",
        ))
        .await;

        let r = get(gw.addr, "/nowhere", &[]).await;
        assert_styled_error(&r, style, 404, "not_found");

        let r = request(gw.addr, "POST", "/status", &[], b"x").await;
        assert_styled_error(&r, style, 405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));

        let big = vec![b'a'; 2048];
        let r = request(gw.addr, "POST", "/fixed/x", &[], &big).await;
        assert_styled_error(&r, style, 413, "payload_too_large");

        let long_path = format!("/status/{}", "a".repeat(9000));
        let r = get(gw.addr, &long_path, &[]).await;
        assert_styled_error(&r, style, 414, "uri_too_long");

        let big_header = "h".repeat(2000);
        let r = get(gw.addr, "/status", &[("X-Big", &big_header)]).await;
        assert_styled_error(&r, style, 431, "headers_too_large");
        // The request line counts toward the head: 600 + 500 bytes is over 1 KiB.
        let long_target = format!("/status?{}", "q".repeat(600));
        let r = get(gw.addr, &long_target, &[("X-Half", &"h".repeat(500))]).await;
        assert_styled_error(&r, style, 431, "headers_too_large");
        let r = get(gw.addr, &long_target, &[("X-Half", &"h".repeat(200))]).await;
        assert_eq!(r.status, 200, "{}", r.shown());

        // Just under the limits is fine.
        let r = request(gw.addr, "POST", "/fixed/x", &[], &vec![b'a'; 1024]).await;
        assert_eq!(r.status, 201);
        assert_eq!(r.text(), "made");
    }
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
    let cfg = styled_config("envelope", "");
    let gateway = Arc::new(Gateway::new(cfg.clone()));
    let gw = TestGateway::start_with(cfg, gateway.clone(), Arc::new(PanicsOnPath(gateway))).await;

    let r = get(gw.addr, "/panic", &[("X-Request-Id", "panic-1")]).await;
    let id = assert_styled_error(&r, "envelope", 500, "internal_error");
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

/// The sorted top-level field names of a JSON object.
fn fields(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// A gateway in `style` with: `/v1/` to a live upstream (one token a minute for KEY_A),
/// `/dead/` to an address that refuses, `/bad/` to an upstream that answers 502 with its own
/// page. The last two are public routes, so they take no token.
async fn styled_gateway(style: &str, dead: SocketAddr) -> TestGateway {
    let up = echo_upstream().await;
    let bad = upstream(|_req| async {
        Response::builder()
            .status(502)
            .header("content-type", "text/html")
            .body(Full::new(Bytes::from_static(
                b"<html>secret upstream page 10.1.2.3</html>",
            )))
            .unwrap()
    })
    .await;
    let cfg = config(
        "",
        &format!(
            "[errors]\nstyle = \"{style}\"\n\
             [plans.tight]\nrequests_per_minute = 1\nburst = 1\n\
             [[keys]]\nid = \"a\"\nkey = \"{}\"\nplan = \"tight\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[upstreams]]\nname = \"dead\"\nurl = \"http://{dead}\"\n\
             [[upstreams]]\nname = \"bad\"\nurl = \"http://{bad}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n\
             [[routes]]\nprefix = \"/dead/\"\nupstream = \"dead\"\nauth = false\n\
             [[routes]]\nprefix = \"/bad/\"\nupstream = \"bad\"\nauth = false\n",
            digest(KEY_A)
        ),
    );
    TestGateway::start(cfg).await
}

/// Checks `r` is an error body in `style` with `code`, and returns its message.
fn styled_error(r: &Reply, style: &str, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", r.shown());
    assert_json_content_type(r);
    let v = r.json();
    let id = r.header("x-request-id").expect("X-Request-Id");
    assert_eq!(v["code"], code, "{}", r.shown());
    assert_eq!(v["request_id"], id, "{}", r.shown());
    let message = match style {
        "detail" => {
            assert_eq!(
                fields(&v),
                set(&["detail", "code", "request_id"]),
                "{}",
                r.shown()
            );
            &v["detail"]
        }
        "simple" => {
            assert_eq!(
                fields(&v),
                set(&["error", "code", "success", "request_id"]),
                "{}",
                r.shown()
            );
            assert_eq!(v["success"], false, "{}", r.shown());
            &v["error"]
        }
        other => unreachable!("style {other}"),
    };
    let message = message
        .as_str()
        .unwrap_or_else(|| panic!("message is a string: {}", r.shown()))
        .to_owned();
    assert!(!message.is_empty(), "{}", r.shown());
    message
}

async fn check_style(style: &str) {
    let dead = refusing_addr();
    let gw = styled_gateway(style, dead).await;

    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    let r = with_key(gw.addr, "/v1/x", KEY_A).await;
    let message = styled_error(&r, style, 429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("integer Retry-After");
    assert!(retry >= 1, "Retry-After {retry}");
    assert_eq!(
        message,
        format!("Rate limit of 1 request per minute exceeded. Retry after {retry}s."),
        "{style}"
    );

    // Upstream refused: tollgate's own 502.
    let r = get(gw.addr, "/dead/x", &[]).await;
    let message = styled_error(&r, style, 502, "bad_gateway");
    assert!(
        !r.text().contains(&dead.port().to_string()),
        "{style}: the upstream address leaked: {message}"
    );

    // The upstream's own 502, normalized: its page is replaced.
    let r = get(gw.addr, "/bad/x", &[]).await;
    styled_error(&r, style, 502, "bad_gateway");
    assert!(
        !r.text().contains("secret") && !r.text().contains("10.1.2.3"),
        "{style}: the upstream body leaked: {}",
        r.shown()
    );
}

#[tokio::test]
async fn detail_style_is_used_for_429_and_normalized_502() {
    check_style("detail").await;
}

#[tokio::test]
async fn simple_style_is_used_for_429_and_normalized_502() {
    check_style("simple").await;
}
