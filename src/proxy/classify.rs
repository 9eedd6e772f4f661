//! Upstream failures: which [`FailureKind`] an error of the pooled client is, what the client
//! sees for it, and whether the request may be tried again.

use http::Method;
use hyper_util::client::legacy::Error as ClientError;

use super::Upstream;
use super::pool::PoolError;
use super::wire::WireError;
use crate::body::RequestBodyError;
use crate::error::{FailureKind, GatewayError};
use crate::observability::metrics::Metrics;

/// What went wrong with one attempt, before it is turned into a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client's own body failed (too large, stalled, cut off): a 4xx, never retried.
    ClientBody(ClientBodyFailure),
    /// The upstream failed.
    Upstream(FailureKind),
}

/// The ways a request body can fail on the way up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBodyFailure {
    /// Over `max_body_bytes`.
    TooLarge(u64),
    /// No data for `body_read_timeout`.
    Stalled,
    /// The client connection broke mid-body.
    CutOff,
}

/// Classifies an error of the pooled client.
pub fn classify(error: &ClientError) -> Failure {
    classify_error(error, error.is_connect())
}

/// Classifies an error of a plain-http upstream's pool.
pub fn classify_pool(error: &PoolError) -> Failure {
    classify_error(error, error.is_connect())
}

fn classify_error(error: &(dyn std::error::Error + 'static), connect: bool) -> Failure {
    // hyper wraps body errors: the client's body failing is found down the source chain.
    if let Some(body_error) = find::<RequestBodyError>(error) {
        return Failure::ClientBody(match body_error {
            RequestBodyError::TooLarge { limit } => ClientBodyFailure::TooLarge(*limit),
            RequestBodyError::Stalled => ClientBodyFailure::Stalled,
            RequestBodyError::Client(_) => ClientBodyFailure::CutOff,
        });
    }
    let kind = if connect {
        // Refused, unreachable, DNS and TLS handshake failures all mean "could not connect";
        // only the connector's own timer is a timeout.
        if source_io_kind(error) == Some(std::io::ErrorKind::TimedOut) {
            FailureKind::ConnectTimeout
        } else {
            FailureKind::ConnectRefused
        }
    } else if find::<hyper::Error>(error).is_some_and(|h| h.is_parse() || h.is_parse_status())
        || find::<WireError>(error).is_some_and(|w| matches!(w, WireError::Invalid(_)))
    {
        FailureKind::InvalidResponse
    } else {
        // Closed or reset after connecting, before a complete response head.
        FailureKind::Reset
    };
    Failure::Upstream(kind)
}

impl Failure {
    /// The response the client gets.
    pub fn into_error(self) -> GatewayError {
        match self {
            Failure::ClientBody(ClientBodyFailure::TooLarge(limit)) => {
                GatewayError::PayloadTooLarge { limit }
            }
            Failure::ClientBody(ClientBodyFailure::Stalled) => GatewayError::RequestTimeout,
            Failure::ClientBody(ClientBodyFailure::CutOff) => {
                GatewayError::BadRequest("the request body was cut off")
            }
            Failure::Upstream(kind @ (FailureKind::ConnectTimeout | FailureKind::Timeout)) => {
                GatewayError::GatewayTimeout { kind }
            }
            Failure::Upstream(kind) => GatewayError::BadGateway { kind },
        }
    }
}

/// Whether a request may be replayed once on a fresh connection (SPEC: "idempotent requests
/// that failed to connect may be retried once; nothing else is retried").
///
/// Only when all hold:
/// - the method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE);
/// - the request body is empty: a streamed client body cannot be read twice, so a PUT with a
///   body is never replayed;
/// - the attempt failed while connecting (refused, unreachable, DNS, TLS handshake, connect
///   timeout), so no byte of the request reached the upstream.
///
/// Failures on a reused pooled connection that the server closed before reading the request
/// are already retried by hyper-util (`retry_canceled_requests`).
pub fn may_retry(method: &Method, body_empty: bool, failure: Failure) -> bool {
    replayable(method, body_empty)
        && matches!(
            failure,
            Failure::Upstream(FailureKind::ConnectRefused | FailureKind::ConnectTimeout)
        )
}

/// Whether a request that failed on one target may be sent to another (SPEC "Upstream
/// targets"): no byte of the response head arrived, and either the connection was never
/// established (any method: the upstream saw nothing; the request must have come back with
/// its body unread, or have none) or the request is idempotent and bodiless and the
/// connection was reset or closed. A timeout after sending is never retried: the request
/// may be running.
pub fn may_retry_elsewhere(method: &Method, body_empty: bool, failure: Failure) -> bool {
    match failure {
        Failure::Upstream(FailureKind::ConnectRefused | FailureKind::ConnectTimeout) => true,
        Failure::Upstream(FailureKind::Reset) => replayable(method, body_empty),
        _ => false,
    }
}

/// The part of [`may_retry`] known before sending: worth keeping a copy of the head for.
pub fn replayable(method: &Method, body_empty: bool) -> bool {
    body_empty
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        )
}

/// The kind of the first io::Error in `error`'s source chain: the connector wraps its timer's
/// `Elapsed` in a TimedOut io::Error, and a refusal is ConnectionRefused.
fn source_io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    find::<std::io::Error>(error).map(std::io::Error::kind)
}

/// The first error of type `E` in `error`'s source chain.
fn find<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Whether a failure to connect was something other than a refused connection or the
/// connect timer (a TLS handshake or certificate, DNS, an unreachable network). Its kind,
/// `connect_refused`, does not tell ops which, so the error itself is worth a warning.
pub fn needs_detail(failure: Failure, error: &(dyn std::error::Error + 'static)) -> bool {
    failure == Failure::Upstream(FailureKind::ConnectRefused)
        && source_io_kind(error) != Some(std::io::ErrorKind::ConnectionRefused)
}

/// An error and its sources on one line, for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        out.push_str(": ");
        out.push_str(&e.to_string());
        current = e.source();
    }
    out
}

/// Logs an upstream failure (throttled, see [`log_upstream_failure`]) and counts it in
/// `tollgate_upstream_failures_total` by its kind.
pub fn report_failure(error: &GatewayError, upstream: &Upstream, metrics: &Metrics) {
    log_upstream_failure(error, upstream);
    if let Some(kind) = upstream_failure_kind(error) {
        metrics.upstream_failure(&upstream.config.name, kind);
    }
}

/// A line per upstream failure: kind (like Envoy's response flags), status, upstream; at most
/// one a second per kind and upstream, with the number left out since the last one
/// (`suppressed`): an overloaded or failing upstream fails every request, and a line for each
/// would flood the log. Metrics count every failure.
fn log_upstream_failure(error: &GatewayError, upstream: &Upstream) {
    let status = error.status().as_u16();
    let name = upstream.config.name.as_str();
    // Throttled by the metrics' kind label (`status_503` for the upstream's own 503).
    let Some(kind) =
        upstream_failure_kind(error).or_else(|| error.failure_kind().map(|kind| kind.as_str()))
    else {
        return;
    };
    let Some(suppressed) =
        crate::observability::log_throttle::upstream_failures().admit(kind, name)
    else {
        return;
    };
    match error {
        GatewayError::UpstreamStatus { .. } => {
            tracing::info!(
                status,
                upstream = name,
                suppressed,
                "upstream answered with a gateway error; body replaced by an envelope"
            )
        }
        _ => tracing::warn!(
            kind,
            status,
            upstream = name,
            suppressed,
            "upstream failure"
        ),
    }
}

/// The `kind` label of an upstream failure: the failure kind, or `status_50x` when the
/// upstream itself answered 502/503/504 (normalized into an envelope).
fn upstream_failure_kind(error: &GatewayError) -> Option<&'static str> {
    match error {
        GatewayError::UpstreamStatus { status, .. } => Some(match status.as_u16() {
            502 => "status_502",
            503 => "status_503",
            _ => "status_504",
        }),
        _ => error
            .failure_kind()
            .filter(|kind| kind.is_upstream())
            .map(|kind| kind.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: Failure = Failure::Upstream(FailureKind::ConnectRefused);

    #[test]
    fn only_idempotent_bodiless_connect_failures_are_retried() {
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(may_retry(&method, true, REFUSED), "{method}");
            assert!(
                may_retry(
                    &method,
                    true,
                    Failure::Upstream(FailureKind::ConnectTimeout)
                ),
                "{method}"
            );
            assert!(!may_retry(&method, false, REFUSED), "{method} with a body");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT, Method::TRACE] {
            assert!(!may_retry(&method, true, REFUSED), "{method}");
        }
        // Bytes may have reached the upstream: never again.
        for kind in [
            FailureKind::Reset,
            FailureKind::InvalidResponse,
            FailureKind::Timeout,
        ] {
            assert!(!may_retry(&Method::GET, true, Failure::Upstream(kind)));
        }
        assert!(!may_retry(
            &Method::GET,
            true,
            Failure::ClientBody(ClientBodyFailure::Stalled)
        ));
    }

    #[test]
    fn failures_map_to_the_spec_statuses() {
        use http::StatusCode;
        let status = |f: Failure| f.into_error().status();
        assert_eq!(status(REFUSED), StatusCode::BAD_GATEWAY);
        assert_eq!(
            status(Failure::Upstream(FailureKind::Reset)),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status(Failure::Upstream(FailureKind::InvalidResponse)),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status(Failure::Upstream(FailureKind::ConnectTimeout)),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status(Failure::Upstream(FailureKind::Timeout)),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status(Failure::ClientBody(ClientBodyFailure::TooLarge(5))),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
