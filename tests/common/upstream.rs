//! Upstreams for the gateway to proxy to, on 127.0.0.1:0: a hyper server with a handler,
//! an echo, a counter, raw sockets that misbehave on purpose, and an address that refuses.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

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
        // `headers` keeps one value per name: the names sent more than once are listed too.
        let mut repeated: Vec<&str> = parts
            .headers
            .keys()
            .filter(|name| parts.headers.get_all(*name).iter().count() > 1)
            .map(|name| name.as_str())
            .collect();
        repeated.sort_unstable();
        let echo = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "repeated": repeated,
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

/// An upstream that counts the requests it receives (any bytes at all count as one).
pub async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let addr = upstream(move |_req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    (addr, seen)
}

/// A raw upstream: every accepted connection is handed to `behave`; returns its address and
/// the number of connections accepted so far.
pub async fn fault_upstream<F, Fut>(behave: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(behave(stream));
        }
    });
    (addr, accepted)
}

/// Answers `ok` to every request on one keep-alive upstream connection.
pub async fn serve_ok(stream: TcpStream) {
    let service = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Reads one request head (up to the blank line).
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
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

/// An upstream that never answers: it reads each request head and reports it, then reports
/// when the gateway closes the connection.
pub async fn silent_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let mut reported = false;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if !reported && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        reported = true;
                        let _ = events.send("request");
                    }
                }
                let _ = events.send("closed");
            });
        }
    });
    (addr, received)
}

/// `N` distinct loopback addresses free now, for a child process to bind a moment later. The
/// listeners are held until all are picked: successive binds to port 0 can hand out the port
/// just freed, and a child given one port twice cannot start.
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr"))
}
