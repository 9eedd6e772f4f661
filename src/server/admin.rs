//! The admin listener: `/healthz` (the process is up), `/readyz` (listeners bound and config
//! loaded, and not draining), for load balancers and orchestrators, `/metrics`
//! (Prometheus text format), and the key API under `/keys` ([`keys`]).
//!
//! The listener shares the process's file descriptors with the main one, so it is bounded too:
//! at most [`MAX_CONNECTIONS`] connections at once (more are closed as they come), a request
//! head must arrive within `server.header_read_timeout` (which also closes a kept-alive
//! connection idle that long), and a connection is closed after `server.idle_timeout` whatever
//! it is doing (once its response is written; scrapers and probes reconnect).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::observability::metrics;

pub mod keys;

/// Most admin connections open at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long an admin connection may take to send a request head, and how long it lives.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `server.header_read_timeout`.
    pub head: Duration,
    /// `server.idle_timeout`: the connection's whole life.
    pub lifetime: Duration,
}

/// The `/metrics` text, if the served handler keeps metrics.
pub type MetricsText = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    metrics_text: MetricsText,
    usage: super::usage::UsageJson,
    timeouts: Timeouts,
    key_admin: Option<Arc<dyn keys::KeyAdmin>>,
) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!("admin connection refused: {MAX_CONNECTIONS} already open");
            drop(stream);
            continue;
        };
        let ready = ready.clone();
        let metrics_text = metrics_text.clone();
        let usage = usage.clone();
        let key_admin = key_admin.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                if keys::is_key_path(request.uri().path()) {
                    let key_admin = key_admin.clone();
                    return futures_util::future::Either::Left(async move {
                        Ok::<_, Infallible>(keys::respond(request, key_admin, peer.ip()).await)
                    });
                }
                let mut content_type = "text/plain; charset=utf-8";
                let path = request.uri().path();
                // The endpoints are read-only: another method is a 405 with `Allow`, as on
                // any server, not an answer that a POST could be mistaken to have acted on.
                let readable = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
                let known = matches!(path, "/healthz" | "/readyz" | "/metrics")
                    || path.starts_with(super::usage::PREFIX);
                let (status, body) = match path {
                    _ if known && !readable => (
                        StatusCode::METHOD_NOT_ALLOWED,
                        Bytes::from_static(b"method not allowed: use GET\n"),
                    ),
                    "/healthz" => (StatusCode::OK, Bytes::from_static(b"ok\n")),
                    "/readyz" if ready.load(Ordering::SeqCst) => {
                        (StatusCode::OK, Bytes::from_static(b"ready\n"))
                    }
                    "/readyz" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Bytes::from_static(b"not ready\n"),
                    ),
                    "/metrics" => match metrics_text() {
                        Some(text) => {
                            content_type = metrics::CONTENT_TYPE;
                            (StatusCode::OK, Bytes::from(text))
                        }
                        None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
                    },
                    _ if path.starts_with(super::usage::PREFIX) => {
                        content_type = "application/json";
                        super::usage::answer(path, &usage)
                    }
                    _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
                };
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    response.headers_mut().insert(
                        http::header::ALLOW,
                        http::HeaderValue::from_static("GET, HEAD"),
                    );
                }
                futures_util::future::Either::Right(std::future::ready(Ok::<_, Infallible>(
                    response,
                )))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.head)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = tokio::time::sleep(timeouts.lifetime) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(timeouts.head, conn).await;
                }
            }
        });
    }
}
