//! Upgrades (WebSocket): an HTTP/1.1 request with `Connection: upgrade` and `Upgrade: <proto>`
//! is forwarded with those two headers kept; when the upstream answers `101 Switching
//! Protocols`, both connections are taken over from hyper and bytes are copied both ways
//! until either side closes.

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
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
/// its own, holding the upstream's `max_inflight` slot while the tunnel is open.
pub fn tunnel(client: OnUpgrade, upstream: OnUpgrade, permit: Option<super::InflightSlot>) {
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
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => {
                tracing::debug!(bytes_up = up, bytes_down = down, "upgraded stream closed")
            }
            Err(error) => tracing::debug!(%error, "upgraded stream ended with an error"),
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
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
