//! The request pipeline: the one place that shows, in order, what happens to a request.
//!
//! ```text
//! request id + span (server/) -> head limits -> route -> method -> [auth] -> [limit] -> target
//! ```
//! Each step either passes the request on or answers with a [`GatewayError`]; nothing here
//! returns `Err` to hyper. Auth and rate limiting slot in where marked.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::{RequestBody, ResponseBody};
use crate::config::{Config, MAX_URI_BYTES, RouteTarget};
use crate::error::{ErrorRenderer, GatewayError};
use crate::observability::RequestId;
use crate::proxy::{ClientInfo, Upstream};
use crate::route::Router;
use crate::server::{Handler, RequestContext};

/// Everything derived from one loaded config. Swapped whole on reload; a request keeps the
/// snapshot it started with.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config.
    pub config: Config,
    /// Compiled routes.
    pub router: Router,
    /// Error body writer for `[errors]`.
    pub renderer: ErrorRenderer,
    /// One pooled client per upstream, by index in `config.upstreams`.
    pub upstreams: Vec<Upstream>,
}

impl Snapshot {
    /// Builds the runtime state for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            router: Router::new(&config.routes),
            renderer: ErrorRenderer::new(&config.errors),
            upstreams: config.upstreams.iter().map(Upstream::new).collect(),
            config,
        }
    }
}

/// The gateway: the current snapshot, and the pipeline that runs every request against it.
#[derive(Debug)]
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
}

impl Gateway {
    /// A gateway running `config`.
    pub fn new(config: Config) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
        }
    }

    /// The snapshot new requests use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the config for new requests; in-flight requests finish on the old one.
    pub fn reload(&self, config: Config) {
        self.snapshot.store(Arc::new(Snapshot::new(config)));
    }

    async fn pipeline(
        &self,
        request: Request<Incoming>,
        ctx: &RequestContext,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let snapshot = self.snapshot.load_full();
        let server = &snapshot.config.server;

        // Head limits first: nothing about an oversized request is worth routing.
        if request
            .uri()
            .path_and_query()
            .map_or(0, |pq| pq.as_str().len())
            > MAX_URI_BYTES
        {
            return Err(GatewayError::UriTooLong {
                limit: MAX_URI_BYTES,
            });
        }
        let head_bytes: usize = request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if head_bytes as u64 > server.max_header_bytes {
            return Err(GatewayError::HeadersTooLarge {
                limit: server.max_header_bytes,
            });
        }
        let declared_length = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|len| len > server.max_body_bytes) {
            return Err(GatewayError::PayloadTooLarge {
                limit: server.max_body_bytes,
            });
        }

        let route = snapshot
            .router
            .find(request.uri().path())
            .ok_or(GatewayError::NoRoute)?;
        if !route.allows(request.method()) {
            return Err(GatewayError::MethodNotAllowed {
                method: request.method().clone(),
                allow: route
                    .allow
                    .clone()
                    .unwrap_or_else(|| http::HeaderValue::from_static("")),
            });
        }

        // [auth]: authentication and scopes land here (issue 3).
        // [limit]: the key's token bucket is charged here (issue 4).

        match &route.config.target {
            RouteTarget::Respond(fixed) => {
                let mut response = Response::new(ResponseBody::full(fixed.body.clone()));
                *response.status_mut() = fixed.status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, fixed.content_type.clone());
                Ok(response)
            }
            RouteTarget::Upstream(index) => {
                let upstream = &snapshot.upstreams[*index];
                let path = if route.config.strip_prefix {
                    let rest = &request.uri().path()[route.config.prefix.len()..];
                    if rest.starts_with('/') {
                        rest.to_owned()
                    } else {
                        format!("/{rest}")
                    }
                } else {
                    request.uri().path().to_owned()
                };
                let request = request.map(|body| {
                    RequestBody::new(body, server.max_body_bytes, server.body_read_timeout)
                });
                let client = ClientInfo {
                    ip: ctx.peer.ip(),
                    tls: ctx.tls,
                };
                upstream
                    .forward(request, &path, client, &ctx.request_id)
                    .await
            }
        }
    }
}

impl Handler for Gateway {
    async fn handle(
        &self,
        request: Request<Incoming>,
        ctx: &RequestContext,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = request.method().clone();
        match self.pipeline(request, ctx).await {
            Ok(response) => {
                tracing::debug!(%method, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "proxied");
                response
            }
            Err(error) => {
                if let Some(kind) = error.failure_kind() {
                    tracing::warn!(
                        kind = kind.as_str(),
                        status = error.status().as_u16(),
                        "upstream failure"
                    );
                }
                self.render_error(&error, &ctx.request_id)
            }
        }
    }

    fn render_error(&self, error: &GatewayError, request_id: &RequestId) -> Response<ResponseBody> {
        self.snapshot.load().renderer.render(error, request_id)
    }
}
