//! The admin listener: `/healthz` (the process is up), `/readyz` (listeners bound and config
//! loaded, and not draining), for load balancers and orchestrators, and `/metrics`
//! (Prometheus text format).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::observability::metrics;
use crate::server::Handler;

/// Serves the admin endpoints until the task is aborted.
pub async fn serve<H: Handler>(listener: TcpListener, ready: Arc<AtomicBool>, handler: Arc<H>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let ready = ready.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let mut content_type = "text/plain; charset=utf-8";
                let (status, body) = match request.uri().path() {
                    "/healthz" => (StatusCode::OK, Bytes::from_static(b"ok\n")),
                    "/readyz" if ready.load(Ordering::SeqCst) => {
                        (StatusCode::OK, Bytes::from_static(b"ready\n"))
                    }
                    "/readyz" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Bytes::from_static(b"not ready\n"),
                    ),
                    "/metrics" => match handler.metrics() {
                        Some(text) => {
                            content_type = metrics::CONTENT_TYPE;
                            (StatusCode::OK, Bytes::from(text))
                        }
                        None => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
                    },
                    _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
                };
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
