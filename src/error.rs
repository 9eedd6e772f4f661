//! Every rejection and failure on the way through the gateway, and the one place that turns
//! them into a response.
//!
//! [`GatewayError`] says what happened and whose fault it is (client: 4xx, upstream: 502/503/504,
//! tollgate itself: 500). [`ErrorRenderer`] writes it as JSON in the configured
//! [`ErrorStyle`], always with the request ID, plus the static `errors.fields`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Response, StatusCode};

use crate::config::{ErrorStyle, ErrorsConfig};
use crate::header_bytes;
use crate::observability::RequestId;

/// The finer kind of an upstream or backend failure, for logs and metrics (like Envoy's
/// response flags). Clients only ever see the status and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The upstream refused the connection or was unreachable (DNS included).
    ConnectRefused,
    /// No connection within `connect_timeout`.
    ConnectTimeout,
    /// The connection was reset or closed before a complete response head.
    Reset,
    /// The upstream sent something that is not HTTP.
    InvalidResponse,
    /// No response head within `timeout`.
    Timeout,
    /// `max_inflight` reached.
    Overloaded,
    /// The upstream is in maintenance.
    Maintenance,
    /// Every target of the upstream is ejected.
    NoHealthyTarget,
    /// The rate-limit backend is down and the policy is `deny`.
    BackendDown,
}

impl FailureKind {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ConnectRefused => "connect_refused",
            FailureKind::ConnectTimeout => "connect_timeout",
            FailureKind::Reset => "reset",
            FailureKind::InvalidResponse => "invalid_response",
            FailureKind::Timeout => "timeout",
            FailureKind::Overloaded => "overloaded",
            FailureKind::Maintenance => "maintenance",
            FailureKind::NoHealthyTarget => "no_healthy_target",
            FailureKind::BackendDown => "backend_down",
        }
    }

    /// Whether the failure is the upstream's (or its gates'), as opposed to the limiter
    /// backend's.
    pub fn is_upstream(self) -> bool {
        !matches!(self, FailureKind::BackendDown)
    }
}

/// Everything that can stop a request from getting its upstream's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed in a way tollgate will not forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// No API key was presented.
    #[error("missing API key")]
    MissingApiKey,
    /// The key is unknown, malformed, disabled, or two different keys were presented.
    #[error("invalid API key")]
    InvalidApiKey,
    /// The key (or the digest presented) is past its `expires_at`.
    #[error("expired API key")]
    ExpiredApiKey,
    /// The key lacks a scope the route requires.
    #[error("scope {scope} denied")]
    ScopeDenied {
        /// The first missing scope.
        scope: String,
    },
    /// The key's (or anonymous client's) token bucket is empty.
    #[error("rate limited")]
    RateLimited {
        /// The limit of the bucket that rejected.
        limit: u32,
        /// Its window.
        window: crate::config::Window,
        /// Wait until one request will be admitted; sent as `Retry-After`.
        retry_after: Duration,
        /// The route prefix, when the bucket was the route's (`[plans.<name>.routes]`).
        route: Option<std::sync::Arc<str>>,
    },
    /// The key's monthly quota is used up.
    #[error("quota exceeded")]
    QuotaExceeded {
        /// The quota (`requests_per_month`).
        limit: u32,
        /// When it resets, in Unix seconds (00:00 UTC on the 1st of next month).
        resets_at: u64,
        /// Until then; sent as `Retry-After`.
        retry_after: Duration,
    },
    /// The client IP is blocked (repeated failed auth or repeated 429s).
    #[error("client IP throttled")]
    IpThrottled {
        /// How much longer the block lasts; sent as `Retry-After`.
        retry_after: Duration,
    },
    /// No route matches the path.
    #[error("no route")]
    NoRoute,
    /// The route does not allow the method.
    #[error("method {method} not allowed")]
    MethodNotAllowed {
        /// The method used.
        method: Method,
        /// The `Allow` header value.
        allow: HeaderValue,
    },
    /// The body is larger than `server.max_body_bytes`.
    #[error("payload too large")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The request body stalled for `server.body_read_timeout`.
    #[error("request body timed out")]
    RequestTimeout,
    /// The request head did not arrive within `server.header_read_timeout`.
    #[error("request head timed out")]
    HeadTimeout,
    /// The request target is longer than 8 KiB.
    #[error("URI too long")]
    UriTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request head is larger than `server.max_header_bytes`.
    #[error("headers too large")]
    HeadersTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// A bug in tollgate (a panic caught at the connection).
    #[error("internal error")]
    Internal,
    /// The upstream refused, reset, was unreachable or answered garbage.
    #[error("bad gateway ({})", kind.as_str())]
    BadGateway {
        /// What exactly failed.
        kind: FailureKind,
    },
    /// The upstream is overloaded, in maintenance or has no healthy target, or the limiter
    /// backend is down.
    #[error("service unavailable ({})", kind.as_str())]
    ServiceUnavailable {
        /// What exactly failed.
        kind: FailureKind,
        /// Sent as `Retry-After`.
        retry_after: Duration,
    },
    /// The upstream did not answer in time.
    #[error("gateway timeout ({})", kind.as_str())]
    GatewayTimeout {
        /// What exactly failed.
        kind: FailureKind,
    },
    /// The upstream answered 502, 503 or 504 itself and `errors.normalize_upstream_5xx` is on:
    /// its body is replaced by an envelope so nothing of the upstream leaks.
    #[error("upstream answered {status}")]
    UpstreamStatus {
        /// The upstream's status, kept (502, 503 or 504).
        status: StatusCode,
        /// The upstream's `Retry-After`, kept as sent.
        retry_after: Option<HeaderValue>,
    },
}

impl GatewayError {
    /// The HTTP status the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::ScopeDenied { .. } => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. }
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::IpThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout | GatewayError::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::BadGateway { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::ServiceUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::UpstreamStatus { status, .. } => *status,
        }
    }

    /// The stable machine-readable code of SPEC.md's table.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey => "authentication_error",
            GatewayError::ScopeDenied { .. } => "permission_denied",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::QuotaExceeded { .. } => "quota_exceeded",
            GatewayError::IpThrottled { .. } => "ip_throttled",
            GatewayError::NoRoute => "not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::RequestTimeout | GatewayError::HeadTimeout => "request_timeout",
            GatewayError::UriTooLong { .. } => "uri_too_long",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::Internal => "internal_error",
            GatewayError::BadGateway { .. } => "bad_gateway",
            GatewayError::ServiceUnavailable { .. } => "service_unavailable",
            GatewayError::GatewayTimeout { .. } => "gateway_timeout",
            GatewayError::UpstreamStatus { status, .. } => match *status {
                StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
                StatusCode::GATEWAY_TIMEOUT => "gateway_timeout",
                _ => "bad_gateway",
            },
        }
    }

    /// The failure kind, for upstream and backend failures.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            GatewayError::BadGateway { kind }
            | GatewayError::ServiceUnavailable { kind, .. }
            | GatewayError::GatewayTimeout { kind } => Some(*kind),
            _ => None,
        }
    }

    /// A short, human, actionable message. Never the key, an internal address or an
    /// upstream body.
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            GatewayError::BadRequest(why) => Cow::Owned(format!("Malformed request: {why}.")),
            GatewayError::MissingApiKey => Cow::Borrowed("API key is required"),
            GatewayError::InvalidApiKey => Cow::Borrowed("Invalid or revoked API key"),
            GatewayError::ExpiredApiKey => Cow::Borrowed("API key has expired"),
            GatewayError::ScopeDenied { scope } => {
                Cow::Owned(format!("This API key lacks the required scope '{scope}'."))
            }
            GatewayError::RateLimited {
                limit,
                window,
                retry_after,
                route,
            } => {
                // Pieces pushed, not `format!`: this is every 429's message.
                let mut m = String::with_capacity(96);
                m.push_str("Rate limit of ");
                push_number(&mut m, u64::from(*limit));
                m.push_str(if *limit == 1 { " request" } else { " requests" });
                m.push_str(" per ");
                m.push_str(window.name());
                if let Some(route) = route {
                    m.push_str(" on ");
                    m.push_str(route);
                }
                m.push_str(" exceeded. Retry after ");
                push_number(&mut m, retry_after_secs(*retry_after));
                m.push_str("s.");
                Cow::Owned(m)
            }
            GatewayError::QuotaExceeded {
                limit, resets_at, ..
            } => Cow::Owned(format!(
                "Monthly quota of {limit} request{} used. It resets at {}.",
                if *limit == 1 { "" } else { "s" },
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(*resets_at)
                )
            )),
            GatewayError::IpThrottled { retry_after } => Cow::Owned(format!(
                "Too many failed or rejected requests from your IP address. Retry after {}s.",
                retry_after_secs(*retry_after)
            )),
            GatewayError::NoRoute => Cow::Borrowed("No route matches this path."),
            GatewayError::MethodNotAllowed { method, allow } => Cow::Owned(format!(
                "Method {method} is not allowed here. Allowed: {}.",
                allow.to_str().unwrap_or("")
            )),
            GatewayError::PayloadTooLarge { limit } => {
                Cow::Owned(format!("Request body exceeds the limit of {limit} bytes."))
            }
            GatewayError::RequestTimeout => {
                Cow::Borrowed("The request body was not received in time.")
            }
            GatewayError::HeadTimeout => {
                Cow::Borrowed("The request headers were not received in time.")
            }
            GatewayError::UriTooLong { limit } => {
                Cow::Owned(format!("Request URI exceeds the limit of {limit} bytes."))
            }
            GatewayError::HeadersTooLarge { limit } => Cow::Owned(format!(
                "Request headers too large: at most {limit} bytes (request line included) and 100 fields."
            )),
            GatewayError::Internal => {
                Cow::Borrowed("Internal error in the gateway. Please report the request_id.")
            }
            GatewayError::BadGateway { .. } => Cow::Borrowed(
                "The upstream service is momentarily unavailable. Retry with backoff.",
            ),
            GatewayError::ServiceUnavailable { retry_after, .. } => Cow::Owned(format!(
                "The service is temporarily unavailable. Retry after {}s.",
                retry_after_secs(*retry_after)
            )),
            GatewayError::GatewayTimeout { .. } => {
                Cow::Borrowed("The upstream service did not respond in time. Retry with backoff.")
            }
            GatewayError::UpstreamStatus { status, .. } => Cow::Borrowed(match *status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "The upstream service is temporarily unavailable. Retry with backoff."
                }
                StatusCode::GATEWAY_TIMEOUT => {
                    "The upstream service did not respond in time. Retry with backoff."
                }
                _ => "The upstream service is momentarily unavailable. Retry with backoff.",
            }),
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Writes error bodies in the configured style. Built once per config load.
#[derive(Debug, Clone)]
pub struct ErrorRenderer {
    style: ErrorStyle,
    /// `errors.fields` pre-rendered as `,"name":value...`, appended before the closing brace.
    fields: String,
}

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

impl ErrorRenderer {
    /// A renderer for `[errors]`.
    pub fn new(config: &ErrorsConfig) -> Self {
        let mut fields = String::new();
        for (name, value) in &config.fields {
            fields.push(',');
            fields.push_str(&serde_json::Value::String(name.clone()).to_string());
            fields.push(':');
            fields.push_str(&value.to_string());
        }
        Self {
            style: config.style,
            fields,
        }
    }

    /// The complete error response: status, JSON body, and the error's own headers
    /// (`Allow`, `Retry-After`). The server adds `X-Request-Id`. A plain `Bytes` body: the
    /// caller wraps it in whatever body type it sends (errors know nothing of bodies).
    pub fn render(&self, error: &GatewayError, request_id: &RequestId) -> Response<Bytes> {
        let body = BODY.with_borrow_mut(|body| {
            self.write_body(body, error.code(), &error.message(), request_id);
            header_bytes::bytes(body)
        });
        let mut response = Response::new(body);
        *response.status_mut() = error.status();
        let headers = response.headers_mut();
        // Room for every header an error response gets (its own, the rate-limit headers, the
        // request ID), so none of them grows the map.
        headers.reserve(12);
        headers.insert(CONTENT_TYPE, APPLICATION_JSON);
        headers.insert(CACHE_CONTROL, NO_STORE);
        match error {
            GatewayError::MethodNotAllowed { allow, .. } => {
                headers.insert(ALLOW, allow.clone());
            }
            // After a request tollgate could not frame, the rest of the connection cannot be
            // trusted either: answer, then close (hyper drops this header on HTTP/2).
            GatewayError::BadRequest(_) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            GatewayError::ServiceUnavailable { retry_after, .. }
            | GatewayError::IpThrottled { retry_after }
            | GatewayError::QuotaExceeded { retry_after, .. }
            | GatewayError::RateLimited { retry_after, .. } => {
                headers.insert(
                    RETRY_AFTER,
                    header_bytes::number(retry_after_secs(*retry_after)),
                );
            }
            GatewayError::UpstreamStatus {
                retry_after: Some(retry_after),
                ..
            } => {
                headers.insert(RETRY_AFTER, retry_after.clone());
            }
            _ => {}
        }
        response
    }

    /// The JSON body for `code` and `message` in this renderer's style.
    pub fn body(&self, code: &str, message: &str, request_id: &RequestId) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_body(&mut out, code, message, request_id);
        out
    }

    /// Writes the body into `out`, emptied first.
    fn write_body(&self, out: &mut Vec<u8>, code: &str, message: &str, request_id: &RequestId) {
        out.clear();
        out.reserve(160 + message.len() + self.fields.len());
        // Request IDs are made of `[A-Za-z0-9._:-]` only (`request_id::is_valid`): nothing in
        // one needs an escape.
        let id = request_id.as_str();
        match self.style {
            ErrorStyle::Envelope => {
                out.extend_from_slice(b"{\"success\":false,\"error\":{\"code\":");
                push_json_str(out, code);
                out.extend_from_slice(b",\"message\":");
                push_json_str(out, message);
                out.extend_from_slice(b"},\"request_id\":");
                push_quoted(out, id);
                out.extend_from_slice(b",\"timestamp\":\"");
                push_timestamp(out, SystemTime::now());
                out.push(b'"');
            }
            ErrorStyle::Detail => {
                out.extend_from_slice(b"{\"detail\":");
                push_json_str(out, message);
                out.extend_from_slice(b",\"code\":");
                push_json_str(out, code);
                out.extend_from_slice(b",\"request_id\":");
                push_quoted(out, id);
            }
            ErrorStyle::Simple => {
                out.extend_from_slice(b"{\"error\":");
                push_json_str(out, message);
                out.extend_from_slice(b",\"code\":");
                push_json_str(out, code);
                out.extend_from_slice(b",\"success\":false,\"request_id\":");
                push_quoted(out, id);
            }
        }
        out.extend_from_slice(self.fields.as_bytes());
        out.push(b'}');
    }
}

/// `s` in quotes, as it is: for strings that need no escape.
fn push_quoted(out: &mut Vec<u8>, s: &str) {
    debug_assert!(!s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\'));
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Codes and most messages need no escape: copied as they are. Checked without an early
    // exit, so the check runs on whole vectors of bytes.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\') & (b < 0x7f)
    });
    if plain {
        return push_quoted(out, s);
    }
    serde_json::to_writer(&mut *out, s).expect("writing a str to a Vec cannot fail");
}

/// `n` in decimal.
fn push_number(out: &mut String, n: u64) {
    let mut buf = [0; 20];
    let digits = header_bytes::decimal(n, &mut buf);
    out.push_str(std::str::from_utf8(digits).unwrap_or_default());
}

thread_local! {
    /// The buffer error bodies are written in, then copied out of (no allocation per body).
    static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The last second written as an RFC 3339 timestamp on this thread, and its text.
    static TIMESTAMP: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
}

/// `at` as `2026-12-07T04:30:00Z`, formatted once per second per thread.
fn push_timestamp(out: &mut Vec<u8>, at: SystemTime) {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (cached, mut text) = TIMESTAMP.get();
    if cached != secs {
        let formatted =
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .to_string();
        match formatted.as_bytes().try_into() {
            Ok(bytes) => {
                text = bytes;
                TIMESTAMP.set((secs, text));
            }
            // Past year 9999: not cached.
            Err(_) => return out.extend_from_slice(formatted.as_bytes()),
        }
    }
    out.extend_from_slice(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_numbers_and_timestamps_are_written_as_json_and_humantime_write_them() {
        for text in [
            "rate_limited",
            "req_ABC-1.2:3",
            "say \"hi\"",
            "back\\slash",
            "tab\there",
            "ünï ✓",
            "\u{7f}",
            "",
        ] {
            let mut out = Vec::new();
            push_json_str(&mut out, text);
            assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
        for n in [0, 7, 10, 59, 1_000_000, u64::MAX] {
            let mut out = String::new();
            push_number(&mut out, n);
            assert_eq!(out, n.to_string());
        }
        for secs in [
            0,
            1_765_080_000,
            1_765_080_000,
            1_765_080_001,
            253_402_300_799,
        ] {
            let at =
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(999);
            let mut out = Vec::new();
            push_timestamp(&mut out, at);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
                )
                .to_string()
            );
        }
    }

    #[test]
    fn a_rate_limit_message_reads_as_before() {
        let limited = |limit, route: Option<&str>| GatewayError::RateLimited {
            limit,
            window: crate::config::Window::Minute,
            retry_after: Duration::from_millis(2_100),
            route: route.map(Into::into),
        };
        assert_eq!(
            limited(60, None).message(),
            "Rate limit of 60 requests per minute exceeded. Retry after 3s."
        );
        assert_eq!(
            limited(1, Some("/v1/search")).message(),
            "Rate limit of 1 request per minute on /v1/search exceeded. Retry after 3s."
        );
    }

    fn renderer(style: ErrorStyle, fields: &[(&str, serde_json::Value)]) -> ErrorRenderer {
        ErrorRenderer::new(&ErrorsConfig {
            style,
            normalize_upstream_5xx: true,
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        })
    }

    fn parse(r: &ErrorRenderer, e: &GatewayError) -> serde_json::Value {
        let id = RequestId::parse("abc-123").unwrap();
        serde_json::from_slice(&r.body(e.code(), &e.message(), &id)).unwrap()
    }

    #[test]
    fn envelope_style() {
        let r = renderer(ErrorStyle::Envelope, &[("powered_by", "Acme".into())]);
        let v = parse(&r, &GatewayError::NoRoute);
        assert_eq!(v["success"], false);
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "No route matches this path.");
        assert_eq!(v["request_id"], "abc-123");
        assert_eq!(v["powered_by"], "Acme");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        assert!(ts.ends_with('Z') && ts.len() == 20, "{ts}");
    }

    #[test]
    fn detail_and_simple_styles() {
        let d = parse(
            &renderer(ErrorStyle::Detail, &[]),
            &GatewayError::MissingApiKey,
        );
        assert_eq!(d["detail"], "API key is required");
        assert_eq!(d["code"], "authentication_error");
        assert_eq!(d["request_id"], "abc-123");
        let s = parse(
            &renderer(ErrorStyle::Simple, &[("n", 1.into())]),
            &GatewayError::Internal,
        );
        assert_eq!(s["code"], "internal_error");
        assert_eq!(s["success"], false);
        assert_eq!(s["n"], 1);
        assert!(s["error"].as_str().unwrap().contains("request_id"));
    }

    #[test]
    fn messages_escape_json() {
        let e = GatewayError::ScopeDenied {
            scope: "a\"b".to_owned(),
        };
        let v = parse(&renderer(ErrorStyle::Envelope, &[]), &e);
        assert!(v["error"]["message"].as_str().unwrap().contains("a\"b"));
    }

    #[test]
    fn upstream_gateway_errors_keep_status_and_retry_after() {
        let r = renderer(ErrorStyle::Simple, &[]);
        let id = RequestId::parse("abc-123").unwrap();
        let e = GatewayError::UpstreamStatus {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: Some(HeaderValue::from_static("120")),
        };
        let response = r.render(&e, &id);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "120");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(parse(&r, &e)["code"], "service_unavailable");
        assert_eq!(
            e.failure_kind(),
            None,
            "the upstream's own answer, not a failure kind"
        );
        for (status, code) in [(502, "bad_gateway"), (504, "gateway_timeout")] {
            let e = GatewayError::UpstreamStatus {
                status: StatusCode::from_u16(status).unwrap(),
                retry_after: None,
            };
            assert_eq!(e.code(), code);
            assert!(r.render(&e, &id).headers().get(RETRY_AFTER).is_none());
        }
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }
}
