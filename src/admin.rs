//! The admin listener: `/healthz` (the process is up) and `/readyz` (listeners bound and config
//! loaded, and not draining), for load balancers and orchestrators.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (status, body) = match request.uri().path() {
                    "/healthz" => (StatusCode::OK, "ok\n"),
                    "/readyz" if ready.load(Ordering::SeqCst) => (StatusCode::OK, "ready\n"),
                    "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                    _ => (StatusCode::NOT_FOUND, "not found\n"),
                };
                let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                *response.status_mut() = status;
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
