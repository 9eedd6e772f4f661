//! The request pipeline: the one place that shows, in order, what happens to a request.
//!
//! ```text
//! request id + span (server/) -> head limits -> client IP guard -> route -> method
//!   -> auth + scopes -> [limit] -> identity headers -> target (fixed response or upstream)
//! ```
//! Each step either passes the request on or answers with a [`GatewayError`]; nothing here
//! returns `Err` to hyper. Rate limiting slots in where marked.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, Request, Response, Uri};
use hyper::body::Incoming;

use crate::auth::extract::{bearer_token, query_without};
use crate::auth::{Identity, KeyStore};
use crate::body::{RequestBody, ResponseBody};
use crate::config::{Config, MAX_URI_BYTES, RouteTarget};
use crate::error::{ErrorRenderer, GatewayError};
use crate::limit::IpTripwire;
use crate::observability::RequestId;
use crate::proxy::{ClientInfo, Upstream};
use crate::route::Router;
use crate::server::client_ip::client_ip;
use crate::server::{Handler, RequestContext};

/// Identity headers tollgate sets for the upstream; client copies are always removed.
static X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
static X_TOLLGATE_PLAN: HeaderName = HeaderName::from_static("x-tollgate-plan");

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
    /// API keys by digest.
    pub keys: KeyStore,
    /// One pooled client per upstream, by index in `config.upstreams`.
    pub upstreams: Vec<Upstream>,
}

impl Snapshot {
    /// Builds the runtime state for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            router: Router::new(&config.routes),
            renderer: ErrorRenderer::new(&config.errors),
            keys: KeyStore::new(&config.keys),
            upstreams: config.upstreams.iter().map(Upstream::new).collect(),
            config,
        }
    }
}

/// The gateway: the current snapshot, and the pipeline that runs every request against it.
#[derive(Debug)]
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// `limits.failed_auth`: per client IP, survives reloads.
    failed_auth: IpTripwire,
}

impl Gateway {
    /// A gateway running `config`.
    pub fn new(config: Config) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            failed_auth: IpTripwire::default(),
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
        mut request: Request<Incoming>,
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

        // Key guessing: a blocked IP is answered before any key is looked at.
        let now = Instant::now();
        let client = client_ip(ctx.peer, request.headers(), &server.trusted_proxies);
        if let Some(wait) = self.failed_auth.blocked(client, now) {
            return Err(GatewayError::IpThrottled { retry_after: wait });
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

        let auth = &snapshot.config.auth;
        let identity = crate::auth::authenticate(
            request.headers(),
            request.uri(),
            auth,
            &snapshot.keys,
            route.config.auth,
            &route.config.scopes,
        )
        .inspect_err(|error| self.count_failed_auth(error, client, now, &snapshot))?;
        if let Some(identity) = &identity {
            tracing::Span::current().record("key_id", &*identity.record.id.0);
        }

        // [limit]: the key's token bucket is charged here (limits issue); 401/403 never are.

        strip_credentials(&mut request, auth);
        set_identity_headers(request.headers_mut(), identity.as_ref());

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
                    peer: ctx.peer.ip(),
                    ip: client,
                    tls: ctx.tls,
                };
                upstream
                    .forward(request, &path, client, &ctx.request_id)
                    .await
            }
        }
    }
}

impl Gateway {
    /// Counts a 401 against the client IP for `limits.failed_auth`.
    fn count_failed_auth(
        &self,
        error: &GatewayError,
        client: IpAddr,
        now: Instant,
        snapshot: &Snapshot,
    ) {
        if error.status() != http::StatusCode::UNAUTHORIZED {
            return;
        }
        let rule = &snapshot.config.limits.failed_auth;
        if self.failed_auth.record(client, now, rule) {
            tracing::warn!(client_ip = %client, block_for = ?rule.block_for, "failed-auth guard tripped: client IP blocked");
        }
    }
}

/// Removes the credential before forwarding, unless `auth.forward_key`: the key header, a
/// Bearer `Authorization`, and the query parameter.
fn strip_credentials<B>(request: &mut Request<B>, auth: &crate::config::AuthConfig) {
    if auth.forward_key {
        return;
    }
    let headers = request.headers_mut();
    headers.remove(&auth.header);
    if auth.bearer
        && headers
            .get(AUTHORIZATION)
            .is_some_and(|v| bearer_token(v.as_bytes()).is_some())
    {
        headers.remove(AUTHORIZATION);
    }
    if let (Some(param), Some(query)) = (&auth.query_param, request.uri().query()) {
        // Only rebuild the URI when the parameter is actually there.
        if crate::auth::extract::query_pairs(query).any(|(k, _)| k == param.as_bytes()) {
            let path = request.uri().path();
            let rebuilt = match query_without(query, param) {
                Some(rest) => format!("{path}?{rest}"),
                None => path.to_owned(),
            };
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = rebuilt.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
}

/// Sets `X-Tollgate-Key-Id` and `X-Tollgate-Plan` for an authenticated request, after removing
/// any copy the client sent (so they cannot be spoofed).
fn set_identity_headers(headers: &mut HeaderMap, identity: Option<&Identity>) {
    headers.remove(&X_TOLLGATE_KEY_ID);
    headers.remove(&X_TOLLGATE_PLAN);
    if let Some(identity) = identity {
        headers.insert(&X_TOLLGATE_KEY_ID, identity.record.id_header.clone());
        headers.insert(&X_TOLLGATE_PLAN, identity.record.plan_header.clone());
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
