//! Upgrades (WebSocket): an HTTP/1.1 request with `Connection: upgrade` and `Upgrade: <proto>`
//! is forwarded with those two headers kept; when the upstream answers `101 Switching
//! Protocols`, both connections are taken over from hyper and bytes are copied both ways
//! until either side closes.

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::Instrument;

static CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// The protocol a request asks to upgrade to, if it is an upgrade tollgate passes through.
///
/// `h2c` is not passed on: it is a hop-by-hop negotiation between the client and tollgate.
pub fn requested<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let headers = request.headers();
    let protocol = headers.get(UPGRADE)?;
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    (asks && !protocol.as_bytes().eq_ignore_ascii_case(b"h2c")).then(|| protocol.clone())
}

/// Puts the upgrade headers back after hop-by-hop removal.
pub fn restore_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, CONNECTION_UPGRADE.clone());
    headers.insert(UPGRADE, protocol);
}

/// Whether the upstream accepted the upgrade.
pub fn accepted<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::SWITCHING_PROTOCOLS
}

/// Copies bytes between the client's and the upstream's upgraded connections, in a task of
/// its own, holding the upstream's `max_inflight` slot while the tunnel is open. A tunnel
/// that carries no byte either way for `idle` is closed (as `idle_timeout` closes an idle
/// connection): a peer that vanished without a FIN cannot hold the slot forever.
pub fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    permit: Option<super::InflightSlot>,
    idle: Duration,
) {
    let task = async move {
        let _permit = permit;
        // The client side completes once hyper has written our 101 to it.
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "upgrade did not complete");
                return;
            }
        };
        let activity = Arc::new(Activity::new());
        let mut client = Watched::new(TokioIo::new(client), activity.clone());
        let mut upstream = Watched::new(TokioIo::new(upstream), activity.clone());
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::select! {
            copied = copy => match copied {
                Ok((up, down)) => {
                    tracing::debug!(bytes_up = up, bytes_down = down, "upgraded stream closed")
                }
                Err(error) => tracing::debug!(%error, "upgraded stream ended with an error"),
            },
            () = activity.idle_for(idle) => {
                tracing::debug!(?idle, "upgraded stream idle: closed");
            }
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
}

/// When a tunnel last carried a byte.
struct Activity {
    base: Instant,
    /// Nanoseconds from `base`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let since = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// An upgraded connection that records each byte moved in its tunnel's [`Activity`].
    struct Watched<T> {
        #[pin]
        io: T,
        activity: Arc<Activity>,
    }
}

impl<T> Watched<T> {
    fn new(io: T, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.moved();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.moved();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().version(version);
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn websocket_upgrades_are_recognised() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert_eq!(requested(&req(Version::HTTP_11, &ws)).unwrap(), "websocket");
        assert!(requested(&req(Version::HTTP_2, &ws)).is_none());
        assert!(requested(&req(Version::HTTP_11, &[("upgrade", "websocket")])).is_none());
        assert!(
            requested(&req(
                Version::HTTP_11,
                &[("connection", "upgrade"), ("upgrade", "h2c")]
            ))
            .is_none()
        );
    }
}
