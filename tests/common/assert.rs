//! Assertions on what a client received: tollgate's error bodies and request IDs, upstream
//! failures that leak nothing, and waiting for a condition.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::client::{Reply, get};
use super::gateway::TestGateway;

/// Asserts a `req_` + 24 base62 request ID.
pub fn assert_generated_id(id: &str) {
    assert!(id.starts_with("req_"), "{id}");
    assert_eq!(id.len(), 28, "{id}");
    assert!(id[4..].bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
}

/// Asserts an error tollgate itself produced in the default `envelope` style: `status`, the
/// envelope's `error.code`, and an `X-Request-Id` header equal to the body's `request_id`.
/// Returns that request ID. (Failure messages show the reply with test keys masked.)
pub fn assert_envelope(reply: &Reply, status: u16, code: &str) -> String {
    assert_eq!(reply.status, status, "{reply:?}");
    let v = reply.json();
    assert_eq!(v["error"]["code"], code, "{reply:?}");
    let id = reply
        .header("x-request-id")
        .unwrap_or_else(|| panic!("no X-Request-Id: {reply:?}"));
    assert_eq!(
        v["request_id"], id,
        "X-Request-Id and the body's request_id differ: {reply:?}"
    );
    id.to_owned()
}

/// Asserts a `Retry-After` header of whole seconds, at least 1, and returns it.
pub fn assert_retry_after(reply: &Reply) -> u64 {
    let value = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {reply:?}"));
    let secs: u64 = value
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {value:?} is not whole seconds: {reply:?}"));
    assert!(secs >= 1, "Retry-After {secs}: {reply:?}");
    secs
}

/// Checks an error body in `style` from a [`styled_config`](super::gateway::styled_config)
/// gateway (its `powered_by` field included) and returns its request ID.
pub fn assert_styled_error(reply: &Reply, style: &str, status: u16, code: &str) -> String {
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

/// Asserts a JSON `Content-Type` (`application/json`, parameters allowed).
pub fn assert_json_content_type(r: &Reply) {
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "Content-Type {ct:?}: {}",
        r.shown()
    );
}

/// Asserts `status` and the same request ID in the `X-Request-Id` header and the body;
/// returns it.
pub fn assert_status_and_request_id(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status, status);
    let v = reply.json();
    let id = reply.header("x-request-id").unwrap();
    assert_eq!(v["request_id"], id);
    id.to_owned()
}

/// Text only the upstream knows; it must never reach the client in an error.
pub const UPSTREAM_SECRET: &str = "db-primary.internal stack trace";

/// Checks an upstream-failure envelope and returns its request ID: status, code, JSON, the
/// same ID in header and body, and nothing of the upstream (its body, its address).
pub fn assert_failure(reply: &Reply, status: u16, code: &str, upstream: SocketAddr) -> String {
    assert_eq!(reply.status, status, "{}", reply.shown());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let v = reply.json();
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let id = reply
        .header("x-request-id")
        .expect("X-Request-Id")
        .to_owned();
    assert_eq!(v["request_id"], id.as_str(), "same ID in header and body");
    let text = reply.text();
    for leak in [
        UPSTREAM_SECRET,
        "<html",
        &upstream.ip().to_string(),
        &format!(":{}", upstream.port()),
    ] {
        assert!(!text.contains(leak), "{leak:?} leaked in {text}");
        for (name, value) in &reply.headers {
            assert!(!value.contains(leak), "{leak:?} leaked in header {name}");
        }
    }
    id
}

/// Asserts that `/metrics` counts `n` failures of `kind` for upstream `up`.
pub async fn assert_failures_counted(gw: &TestGateway, kind: &str, n: u64) {
    let metrics = get(gw.admin, "/metrics", &[]).await.text();
    let series =
        format!("tollgate_upstream_failures_total{{upstream=\"up\",kind=\"{kind}\"}} {n}\n");
    assert!(metrics.contains(&series), "no {series:?} in\n{metrics}");
}

/// After a response that said `Connection: close`: the server's close arrives as a clean end
/// of stream (not a reset) within 10 s, and nothing comes before it.
pub async fn assert_clean_close(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes within 10s");
    match read {
        Ok(_) => assert!(rest.is_empty(), "bytes after the response: {rest:?}"),
        Err(e) => panic!("the connection was not closed cleanly: {e}"),
    }
}

/// Polls `check` every 50 ms until it holds; fails the test naming `what` after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
