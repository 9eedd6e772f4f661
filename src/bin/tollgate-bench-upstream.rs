//! The upstream of the benches: a tiny HTTP/1.1 keep-alive server on one thread.
//!
//! Usage:
//! - `tollgate-bench-upstream [ADDR]` (default `127.0.0.1:3000`): the load comparison's
//!   upstream (`benches/load/compare.sh`). Every request gets a fixed `200 ok`, so the figures
//!   measure the proxy in front of it, not the backend.
//! - `tollgate-bench-upstream --faults [ADDR]` (default `127.0.0.1:0`): the soak's upstream
//!   (`benches/soak.sh`), see [`faults`]. It prints one line, `main=ADDR reset=ADDR flap=ADDR`,
//!   once its three listeners are bound.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    let faults = first.as_deref() == Some("--faults");
    let addr = if faults { args.next() } else { first };
    // One thread: compare.sh pins this process to the load generator's CPU.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if faults {
        runtime.block_on(faults::serve(addr.as_deref().unwrap_or("127.0.0.1:0")))
    } else {
        runtime.block_on(serve(addr.as_deref().unwrap_or("127.0.0.1:3000")))
    }
}

async fn serve(addr: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        // Small responses on keep-alive: send them now, don't wait for Nagle.
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            // A client that goes away mid-request is normal under load: nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The soak's fault upstream: three listeners, each failing in its own way, and a record of
/// every request that reached any of them, so the soak can match what the upstream saw
/// against what its client was answered, request by request.
///
/// - `main` (keep-alive): `/__soak/seen` lists every request seen so far, one `LISTENER ID`
///   line each (`ID` is the `X-Request-Id`, `-` if none), in arrival order; `/__soak/close-idle`
///   closes every idle keep-alive connection (so the gateway's pool empties and its file
///   descriptors can be compared with a baseline). Those two are not recorded. Any other path
///   is recorded, then answered by its last segment: `delay?ms=N` sleeps N ms then `200 ok`;
///   `unavailable` is a `503` with an HTML page naming an internal host (which the gateway
///   must not pass on); `echo` reads the whole body and answers its length in bytes; anything
///   else is `200 ok`.
/// - `reset`: reads a request head, records it, and resets the connection (RST) without a
///   byte of response.
/// - `flap`: listens for [`FLAP_PERIOD`], then closes its listening socket for as long (new
///   connections are refused), and so on. It answers `200 ok` with `Connection: close`, so
///   every request needs a new connection and meets the listener in whichever state it is.
mod faults {
    use std::convert::Infallible;
    use std::io::Write;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Method, StatusCode, header};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// How long the flapping listener is up, then down.
    pub const FLAP_PERIOD: Duration = Duration::from_millis(1000);
    /// The largest request head the reset listener reads before giving up on it.
    const MAX_HEAD: usize = 64 * 1024;

    /// Every recorded request, `LISTENER ID` in arrival order.
    type Seen = Arc<Mutex<Vec<String>>>;

    pub async fn serve(addr: &str) -> std::io::Result<()> {
        let main = TcpListener::bind(addr).await?;
        let ip = main.local_addr()?.ip();
        let reset = TcpListener::bind((ip, 0)).await?;
        let flap = TcpListener::bind((ip, 0)).await?;
        let flap_addr = flap.local_addr()?;
        let mut out = std::io::stdout();
        writeln!(
            out,
            "main={} reset={} flap={flap_addr}",
            main.local_addr()?,
            reset.local_addr()?
        )?;
        out.flush()?;

        let seen = Seen::default();
        tokio::spawn(serve_reset(reset, seen.clone()));
        tokio::spawn(serve_flap(flap, flap_addr, seen.clone()));
        serve_main(main, seen).await
    }

    fn record(seen: &Seen, listener: &str, request_id: Option<&[u8]>) {
        let id = request_id
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("-");
        seen.lock()
            .expect("no panic while holding the lock")
            .push(format!("{listener} {id}"));
    }

    fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(body.into()));
        *response.status_mut() = status;
        response
    }

    async fn serve_main(listener: TcpListener, seen: Seen) -> std::io::Result<()> {
        // Bumped by `/__soak/close-idle`: every connection shuts down gracefully (at once
        // when idle, after the response in flight otherwise).
        let (close_idle, _) = watch::channel(0u64);
        let close_idle = Arc::new(close_idle);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let seen = seen.clone();
            let close_tx = close_idle.clone();
            let mut close_rx = close_idle.subscribe();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    main_response(request, seen.clone(), close_tx.clone())
                });
                let connection =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                loop {
                    tokio::select! {
                        // A client that goes away mid-request is part of the soak: nothing to report.
                        _ = connection.as_mut() => break,
                        changed = close_rx.changed() => match changed {
                            Ok(()) => connection.as_mut().graceful_shutdown(),
                            Err(_) => break,
                        },
                    }
                }
            });
        }
    }

    async fn main_response(
        request: Request<Incoming>,
        seen: Seen,
        close_idle: Arc<watch::Sender<u64>>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = request.uri().path().to_owned();
        match path.as_str() {
            "/__soak/seen" => {
                let lines = seen
                    .lock()
                    .expect("no panic while holding the lock")
                    .join("\n");
                return Ok(text(StatusCode::OK, lines));
            }
            "/__soak/close-idle" => {
                close_idle.send_modify(|n| *n += 1);
                return Ok(text(StatusCode::OK, "closing idle connections"));
            }
            _ => {}
        }
        record(
            &seen,
            "main",
            request.headers().get("x-request-id").map(|v| v.as_bytes()),
        );
        let response = match path.rsplit('/').next().unwrap_or_default() {
            "delay" => {
                let ms = request
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, "ok")
            }
            "unavailable" => {
                let mut response = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "<h1>backend-7.internal.example down</h1>",
                );
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/html"),
                );
                response
            }
            "echo" if request.method() == Method::POST => {
                match request.into_body().collect().await {
                    Ok(body) => text(StatusCode::OK, body.to_bytes().len().to_string()),
                    Err(_) => text(StatusCode::BAD_REQUEST, "body cut off"),
                }
            }
            _ => text(StatusCode::OK, "ok"),
        };
        Ok(response)
    }

    async fn serve_reset(listener: TcpListener, seen: Seen) -> std::io::Result<()> {
        loop {
            let (mut stream, _) = listener.accept().await?;
            let seen = seen.clone();
            tokio::spawn(async move {
                if let Ok(Ok(Some(id))) =
                    tokio::time::timeout(Duration::from_secs(10), read_head(&mut stream)).await
                {
                    record(&seen, "reset", id.as_deref());
                    // Zero linger: closing sends RST, not FIN.
                    let _ = stream.set_zero_linger();
                }
                drop(stream);
            });
        }
    }

    /// Reads one request head; `Some(request id)` once complete, `None` if the peer closed first.
    async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Option<Vec<u8>>>> {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() > MAX_HEAD {
                return Ok(None);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let id = head.split(|&b| b == b'\n').find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            line[..colon]
                .eq_ignore_ascii_case(b"x-request-id")
                .then(|| line[colon + 1..].trim_ascii().to_vec())
        });
        Ok(Some(id))
    }

    async fn serve_flap(first: TcpListener, addr: SocketAddr, seen: Seen) {
        let mut listener = Some(first);
        loop {
            if let Some(up) = listener.take() {
                let until = tokio::time::Instant::now() + FLAP_PERIOD;
                while let Ok(accepted) = tokio::time::timeout_at(until, up.accept()).await {
                    let Ok((stream, _)) = accepted else { continue };
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            record(
                                &seen,
                                "flap",
                                request.headers().get("x-request-id").map(|v| v.as_bytes()),
                            );
                            async { Ok::<_, Infallible>(text(StatusCode::OK, "ok")) }
                        });
                        let _ = http1::Builder::new()
                            .keep_alive(false)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Dropping the listener: new connections are refused until it is bound again.
            }
            tokio::time::sleep(FLAP_PERIOD).await;
            // The port may be briefly unavailable to bind; then it stays down one more period.
            listener = TcpListener::bind(addr).await.ok();
        }
    }
}
