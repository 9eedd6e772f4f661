//! Test harness: the real server on 127.0.0.1:0, a small real upstream, and a raw HTTP/1.1
//! client that shows exactly what a client sees on the wire.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::{Config, Gateway, Handler, Server};

/// A config whose listeners are on loopback port 0, with `server_extra` lines added to
/// `[server]` and `rest` appended.
pub fn config(server_extra: &str, rest: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n{rest}"
    );
    Config::from_text(Path::new("test.toml"), &text)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"))
}

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl TestGateway {
    /// Starts the real gateway pipeline.
    pub async fn start(config: Config) -> Self {
        let gateway = Arc::new(Gateway::new(config.clone()));
        Self::start_with(config, gateway.clone(), gateway).await
    }

    /// Starts the server with a custom handler (`gateway` is kept for reloads).
    pub async fn start_with<H: Handler>(
        config: Config,
        gateway: Arc<Gateway>,
        handler: Arc<H>,
    ) -> Self {
        let server = Server::bind(&config, handler).await.expect("bind");
        let addr = server.local_addrs()[0];
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin,
            gateway,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Triggers a graceful shutdown and returns the serve task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shutdown once")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A parsed HTTP response as the client received it.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                redact(&String::from_utf8_lossy(&self.body))
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body for a failure message, with test keys masked ([`redact`]).
    pub fn shown(&self) -> String {
        redact(&self.text())
    }
}

/// Shows the status, headers and body with test keys masked.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), redact(v)))
            .collect();
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &headers)
            .field("body", &self.shown())
            .finish()
    }
}

/// `text` with every test key (`tg_test_...`, `tg_live_...`) masked: failure messages print
/// bodies and headers the echo upstream sent back, and a plaintext key must never reach test
/// output.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["tg_test_", "tg_live_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        out.push_str(&rest[..at]);
        out.push_str("tg_***");
        let tail = &rest[at + "tg_test_".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Writes `request` as is and returns every byte the server sends until it closes (also for
/// answers [`parse_reply`] cannot frame, such as a HEAD's).
pub async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before the whole request is written (413, 431).
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10s");
    buf
}

/// On a connection the client keeps open (keep-alive), writes `request` while reading one
/// whole response (framed by its Content-Length or chunks), as a client that uploads and
/// listens at once. Fails if the write fails (a reset, a broken pipe) or the connection ends
/// before the response does.
pub async fn exchange_on(stream: &mut TcpStream, request: &[u8]) -> io::Result<Reply> {
    let (mut read, mut write) = stream.split();
    let send = async { write.write_all(request).await };
    let receive = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if let Some(reply) = parse_reply(&buf).filter(framed) {
                return Ok(reply);
            }
            let n = read.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {} bytes of a response", buf.len()),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let exchanged = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(send, receive)
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response within 10s"))?;
    match exchanged {
        (Ok(()), Ok(reply)) => Ok(reply),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// A response whose length is known from its head (so [`parse_reply`] did not stop at what
/// has arrived so far).
fn framed(reply: &Reply) -> bool {
    reply.header("content-length").is_some()
        || reply
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
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

/// Writes `request` as is, reads to EOF, parses the (first) response.
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let buf = exchange_raw(addr, request).await;
    parse_reply(&buf).unwrap_or_else(|| {
        panic!(
            "no complete response in {:?}",
            redact(&String::from_utf8_lossy(&buf))
        )
    })
}

/// Parses one HTTP/1.1 response from `buf` (Content-Length, chunked, or to EOF).
pub fn parse_reply(buf: &[u8]) -> Option<Reply> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = response.code?;
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &buf[head_len..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = find("content-length") {
        let len: usize = len.trim().parse().ok()?;
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// `GET path` with extra headers and `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(addr, "GET", path, headers, b"").await
}

/// Any method, with a body (Content-Length set when the body is non-empty).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    send_raw(addr, &bytes).await
}

/// A small real upstream on 127.0.0.1:0 answering with `handler`.
pub async fn upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers 200 with a JSON echo of what it received (method, path, query,
/// headers, body length), after reading the whole body.
pub async fn echo_upstream() -> SocketAddr {
    upstream(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let headers: serde_json::Map<String, serde_json::Value> = parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        let echo = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body_len": body.len(),
        });
        Response::builder()
            .header("content-type", "application/json")
            .header("connection", "keep-alive, x-upstream-hop")
            .header("x-upstream-hop", "secret-hop")
            .body(Full::new(Bytes::from(echo.to_string())))
            .expect("response")
    })
    .await
}

/// Asserts a `req_` + 24 base62 request ID.
pub fn assert_generated_id(id: &str) {
    assert!(id.starts_with("req_"), "{id}");
    assert_eq!(id.len(), 28, "{id}");
    assert!(id[4..].bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
}

/// The `sha256:` digest of `key`, as it is written in config.
pub fn digest(key: &str) -> String {
    tollgate::auth::ApiKey::new(key).digest().to_string()
}

/// A loopback address that refuses connections (a "dead upstream") for the rest of the test
/// process: a socket bound to the port but never listening, held in a static. Unlike the port
/// of a dropped listener, no other test (nor an outgoing connection's ephemeral port) can take
/// it meanwhile and answer. (nextest runs each test in its own process.)
pub fn refusing_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a refusing port");
    let addr = socket.local_addr().expect("addr");
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(socket);
    addr
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

/// The value of one series on `admin`'s `/metrics`, written as exposed (`name{label="v"}`),
/// or 0 when it is not there.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = get(admin, "/metrics", &[]).await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
