//! Forwarding to upstreams: a pooled keep-alive client per upstream, header rewriting, and the
//! classification of upstream failures into [`GatewayError`]s.
//!
//! The last box of the flow. Bodies stream both ways; nothing is buffered whole.

pub mod headers;

use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{RequestBody, RequestBodyError, ResponseBody};
use crate::config::UpstreamConfig;
use crate::error::{FailureKind, GatewayError};
use crate::observability::RequestId;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream with its connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its validated config.
    pub config: UpstreamConfig,
    client: Client<HttpConnector, RequestBody>,
    /// Path prefix of the upstream URL without a trailing `/` (often empty).
    base_path: String,
}

/// What the proxy needs to know about the client side of a request.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The TCP peer (appended to `X-Forwarded-For`).
    pub peer: std::net::IpAddr,
    /// The client's address (resolved through trusted proxies).
    pub ip: std::net::IpAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

impl Upstream {
    /// Builds the client for one upstream.
    pub fn new(config: &UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let base_path = config.url.path().trim_end_matches('/').to_owned();
        Self {
            config: config.clone(),
            client,
            base_path,
        }
    }

    /// Forwards `request` (its URI path already chosen by the route) and returns the upstream's
    /// response with its body streaming, or the classified failure.
    pub async fn forward(
        &self,
        mut request: Request<RequestBody>,
        path: &str,
        client: ClientInfo,
        request_id: &RequestId,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        *request.uri_mut() = self.upstream_uri(path, request.uri())?;
        headers::prepare_request(request.headers_mut(), client, request_id);
        if let Some(version) = upstream_version(&request) {
            *request.version_mut() = version;
        }
        let response = tokio::time::timeout(self.config.timeout, self.client.request(request))
            .await
            .map_err(|_| GatewayError::GatewayTimeout {
                kind: FailureKind::Timeout,
            })?
            .map_err(classify)?;
        let (mut parts, body) = response.into_parts();
        headers::prepare_response(&mut parts.headers);
        Ok(Response::from_parts(parts, ResponseBody::upstream(body)))
    }

    fn upstream_uri(&self, path: &str, original: &Uri) -> Result<Uri, GatewayError> {
        let query = original.query();
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let mut parts = self.config.url.clone().into_parts();
        parts.path_and_query =
            Some(PathAndQuery::try_from(pq).map_err(|_| GatewayError::BadRequest("invalid path"))?);
        if parts.scheme.is_none() {
            parts.scheme = Some(Scheme::HTTP);
        }
        Uri::from_parts(parts).map_err(|_| GatewayError::BadRequest("invalid path"))
    }
}

/// Upstream requests always go out as HTTP/1.1 unless the pool negotiates h2.
fn upstream_version<B>(request: &Request<B>) -> Option<http::Version> {
    (request.version() == http::Version::HTTP_2).then_some(http::Version::HTTP_11)
}

/// Maps a client error to the failure the client sees.
fn classify(error: hyper_util::client::legacy::Error) -> GatewayError {
    if let Some(body_error) = RequestBodyError::find(&error) {
        return match body_error {
            RequestBodyError::TooLarge { limit } => GatewayError::PayloadTooLarge { limit: *limit },
            RequestBodyError::Stalled => GatewayError::RequestTimeout,
            RequestBodyError::Client(_) => GatewayError::BadRequest("the request body was cut off"),
        };
    }
    let kind = if error.is_connect() {
        if source_io_kind(&error) == Some(std::io::ErrorKind::TimedOut)
            || error.to_string().contains("timed out")
            || format!("{error:?}").contains("ConnectTimeout")
        {
            FailureKind::ConnectTimeout
        } else {
            FailureKind::ConnectRefused
        }
    } else if find_hyper(&error).is_some_and(|h| h.is_parse() || h.is_parse_status()) {
        FailureKind::InvalidResponse
    } else {
        FailureKind::Reset
    };
    tracing::debug!(error = %error_chain(&error), kind = kind.as_str(), "upstream request failed");
    match kind {
        FailureKind::ConnectTimeout => GatewayError::GatewayTimeout { kind },
        _ => GatewayError::BadGateway { kind },
    }
}

fn source_io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        current = e.source();
    }
    None
}

fn find_hyper<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        current = e.source();
    }
    None
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
