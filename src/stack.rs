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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;

use crate::auth::extract::{bearer_token, query_without};
use crate::auth::{Identity, KeyRecord, KeyStore};
use crate::body::ResponseBody;
use crate::config::{Config, MAX_HEADER_FIELDS, MAX_URI_BYTES, RouteTarget};
use crate::config::{LimitMode, PlanName};
use crate::error::{ErrorRenderer, GatewayError};
use crate::limit::bucket::buckets_for;
use crate::limit::headers::PolicyHeaders;
use crate::limit::{Decision, IpTripwire, KeyedLimiter, LimiterBackend};
use crate::observability::RequestId;
use crate::observability::access::AccessInfo;
use crate::observability::metrics::{Labels, LimitOutcome, Metrics, SnapshotMetrics};
use crate::proxy::headers::{X_TOLLGATE_KEY_ID, X_TOLLGATE_PLAN};
use crate::proxy::{ClientInfo, Forward, Upstream};
use crate::route::{PathError, Router};
use crate::server::client_ip::{client_ip, is_trusted_peer};
use crate::server::{Handler, RequestContext};

/// Everything derived from one loaded config. Swapped whole on reload; a request keeps the
/// snapshot it started with.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config. Its `keys` are empty: they live on in `keys`, built from them
    /// (a million keys' config records are a few hundred MB not to keep twice).
    pub config: Config,
    /// Compiled routes.
    pub router: Router,
    /// Error body writer for `[errors]`.
    pub renderer: ErrorRenderer,
    /// API keys by digest.
    pub keys: KeyStore,
    /// One pooled client per upstream, by index in `config.upstreams`.
    pub upstreams: Vec<Upstream>,
    /// Per-client-IP buckets for public routes (`plans.anonymous`), when that plan exists.
    pub anonymous: Option<Arc<Anonymous>>,
    /// Where API keys' buckets live (`limits.backend`); the Redis connection survives reloads.
    pub backend: LimiterBackend,
    /// Metric series pre-resolved for this config's routes, plans and upstreams.
    pub metrics: SnapshotMetrics,
    /// The anonymous plan's index in `metrics`, when that plan exists.
    anonymous_plan: Option<usize>,
}

/// The `plans.anonymous` limiter: governor over dashmap, keyed by client IP.
#[derive(Debug)]
pub struct Anonymous {
    /// Buckets per client IP.
    pub limiter: KeyedLimiter<IpAddr>,
    /// Header parts.
    pub policy: Arc<PolicyHeaders>,
}

/// The plan public routes are limited by, per client IP.
pub const ANONYMOUS_PLAN: &str = "anonymous";

impl Snapshot {
    /// Builds the runtime state for `config`, carrying bucket state over from `previous`
    /// (keys that still exist with the same limits; the anonymous table if its plan is unchanged).
    pub fn new(mut config: Config, previous: Option<&Snapshot>, metrics: &Arc<Metrics>) -> Self {
        let key_list = std::mem::take(&mut config.keys);
        let anonymous = config
            .plans
            .get(&PlanName(Arc::from(ANONYMOUS_PLAN)))
            .map(|plan| buckets_for(plan, None))
            .map(|specs| match previous.and_then(|p| p.anonymous.as_ref()) {
                Some(prev) if prev.limiter.specs() == specs.as_slice() => prev.clone(),
                _ => Arc::new(Anonymous {
                    limiter: KeyedLimiter::new(&specs, Default::default()),
                    policy: Arc::new(PolicyHeaders::new(ANONYMOUS_PLAN, &specs)),
                }),
            });
        Self {
            router: Router::new(&config.routes),
            renderer: ErrorRenderer::new(&config.errors),
            keys: KeyStore::from_keys(key_list, &config.plans, previous.map(|p| &p.keys)),
            upstreams: config
                .upstreams
                .iter()
                .map(|u| {
                    let old =
                        previous.and_then(|p| p.upstreams.iter().find(|o| o.config.name == u.name));
                    Upstream::new(u, old, metrics)
                })
                .collect(),
            anonymous,
            backend: LimiterBackend::new(&config.limits, previous.map(|p| &p.backend)),
            metrics: SnapshotMetrics::new(metrics.clone(), &config),
            anonymous_plan: config.plans.keys().position(|p| &*p.0 == ANONYMOUS_PLAN),
            config,
        }
    }
}

/// The rate-limit decision of a request and the header parts to report it with, borrowed
/// from the request's snapshot (no reference counting per request).
struct RateInfo<'s> {
    decision: Decision,
    policy: &'s PolicyHeaders,
}

/// What the pipeline learned about a request on the way, for metrics and the access log.
#[derive(Default)]
struct Trace<'s> {
    labels: Labels,
    client: Option<IpAddr>,
    key: Option<&'s KeyRecord>,
    upstream_status: Option<http::StatusCode>,
    upstream_latency: Option<Duration>,
    failure_kind: Option<&'static str>,
}

/// The gateway: the current snapshot, and the pipeline that runs every request against it.
#[derive(Debug)]
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// `limits.failed_auth`: per client IP, survives reloads.
    failed_auth: IpTripwire,
    /// `limits.ip_throttle`: per client IP, survives reloads.
    ip_throttle: IpTripwire,
    /// Requests that shadow mode would have rejected.
    would_limit: AtomicU64,
    /// Prometheus metrics, served on the admin listener.
    metrics: Arc<Metrics>,
}

impl Gateway {
    /// A gateway running `config`.
    pub fn new(config: Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.config_loaded(&config);
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config, None, &metrics)),
            failed_auth: IpTripwire::default(),
            ip_throttle: IpTripwire::default(),
            would_limit: AtomicU64::new(0),
            metrics,
        }
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The snapshot new requests use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the config for new requests; in-flight requests finish on the old one.
    pub fn reload(&self, config: Config) {
        let previous = self.snapshot.load_full();
        self.metrics.config_loaded(&config);
        self.snapshot.store(Arc::new(Snapshot::new(
            config,
            Some(&previous),
            &self.metrics,
        )));
        self.metrics.reload(true);
    }

    /// Requests shadow mode let through that enforce mode would have rejected.
    pub fn would_limit_count(&self) -> u64 {
        self.would_limit.load(Ordering::Relaxed)
    }

    async fn pipeline<'s>(
        &self,
        snapshot: &'s Snapshot,
        mut request: Request<()>,
        body: &mut Option<Incoming>,
        ctx: &RequestContext,
        rate: &mut Option<RateInfo<'s>>,
        trace: &mut Trace<'s>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let server = &snapshot.config.server;

        // Head limits first: nothing about an oversized request is worth routing.
        let target = request
            .uri()
            .path_and_query()
            .map_or(1, |pq| pq.as_str().len());
        if target > MAX_URI_BYTES {
            return Err(GatewayError::UriTooLong {
                limit: MAX_URI_BYTES,
            });
        }
        // The whole head: the request line (`GET /path HTTP/1.1`, CRLF), then each field.
        let request_line = request.method().as_str().len() + target + 12;
        let head_bytes: usize = request_line
            + request
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        // One rule for both protocols: HTTP/1.1's parser counts fields, HTTP/2 has no count.
        if head_bytes as u64 > server.max_header_bytes || too_many_fields(request.headers()) {
            return Err(GatewayError::HeadersTooLarge {
                limit: server.max_header_bytes,
            });
        }
        // Framing that two parsers could read differently is refused, never forwarded.
        reject_ambiguous_framing(&request)?;
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
        trace.client = Some(client);
        // Blocked by both: the later end, or the retry would be refused again.
        let blocks = [
            self.failed_auth.blocked(client, now),
            self.ip_throttle.blocked(client, now),
        ];
        if let Some(wait) = blocks.into_iter().flatten().max() {
            // Shadow mode rejects nothing for rate limits, IP blocks included.
            if snapshot.config.limits.mode == LimitMode::Shadow {
                self.would_limit.fetch_add(1, Ordering::Relaxed);
                snapshot.metrics.decision(LimitOutcome::WouldLimit, None);
                tracing::info!(
                    decision = "would_limit",
                    client_ip = %client,
                    "shadow mode: client IP blocked, let through"
                );
            } else {
                snapshot.metrics.decision(LimitOutcome::IpThrottled, None);
                return Err(GatewayError::IpThrottled { retry_after: wait });
            }
        }

        // Routed, and forwarded, in normal form: an encoded, doubled or dotted path must not
        // reach a route other than the one the upstream will serve.
        match crate::route::normalize_path(request.uri().path()) {
            Ok(None) => {}
            Ok(Some(normal)) => set_path(&mut request, &normal)?,
            Err(PathError::EncodedSlash) => {
                return Err(GatewayError::BadRequest("encoded slash in the path"));
            }
        }
        let params_dropped = crate::route::without_params(request.uri().path());
        let route = snapshot
            .router
            .find(params_dropped.as_deref().unwrap_or(request.uri().path()))
            .ok_or(GatewayError::NoRoute)?;
        trace.labels.route = Some(route.index);
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
        .inspect_err(|error| self.count_failed_auth(error, client, now, snapshot))?;
        if let Some(identity) = &identity {
            tracing::Span::current().record("key_id", &*identity.record.id.0);
            trace.key = Some(identity.record);
            trace.labels.plan = Some(identity.record.plan_index);
        } else if snapshot.anonymous.is_some() {
            trace.labels.plan = snapshot.anonymous_plan;
        }

        // Only now is a bucket charged: 401/403 never cost a token. Keys go to the configured
        // backend (Redis may be down: `on_backend_error` then admits without a decision or
        // answers 503); client IPs always stay in process.
        *rate = match (&identity, &snapshot.anonymous) {
            (Some(identity), _) => snapshot
                .backend
                .check(
                    &identity.record.id.0,
                    &identity.record.limits.limiter,
                    &snapshot.config.limits,
                    &self.metrics,
                )
                .await?
                .map(|decision| RateInfo {
                    decision,
                    policy: &identity.record.limits.policy,
                }),
            (None, Some(anonymous)) => Some(RateInfo {
                decision: anonymous
                    .limiter
                    .check(&crate::limit::limit_key(client)),
                policy: &anonymous.policy,
            }),
            (None, None) => None,
        };
        if let Some(info) = rate.as_ref() {
            if info.decision.allowed {
                snapshot
                    .metrics
                    .decision(LimitOutcome::Allowed, trace.labels.plan);
            } else {
                self.over_limit(&info.decision, client, now, snapshot, trace.labels.plan)?;
            }
        }

        strip_credentials(&mut request, auth);
        crate::proxy::headers::drop_underscored(
            request.headers_mut(),
            server.underscores_in_headers,
            &auth.header,
        );
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
                let stripped = route.config.strip_prefix.then(|| {
                    // The route may have matched only once segment parameters were dropped.
                    let path = request.uri().path();
                    let rest = match path.strip_prefix(route.config.prefix.as_str()) {
                        Some(rest) => rest,
                        None => params_dropped
                            .as_deref()
                            .and_then(|p| p.strip_prefix(route.config.prefix.as_str()))
                            .unwrap_or(""),
                    };
                    if rest.starts_with('/') {
                        rest.to_owned()
                    } else {
                        format!("/{rest}")
                    }
                });
                let forward = Forward {
                    path: stripped.as_deref(),
                    client: ClientInfo {
                        peer: ctx.peer.ip(),
                        peer_header: &ctx.peer_header,
                        ip: client,
                        tls: ctx.tls,
                        trusted_peer: is_trusted_peer(ctx.peer, &server.trusted_proxies),
                    },
                    request_id: &ctx.request_id,
                    max_body_bytes: server.max_body_bytes,
                    body_read_timeout: server.body_read_timeout,
                    idle_timeout: server.idle_timeout,
                    normalize_5xx: snapshot.config.errors.normalize_upstream_5xx,
                };
                // Logged here, where the upstream is known; inside the request's span, so the
                // line carries the request ID.
                let sent = Instant::now();
                // Boxed: forwarding's state is kilobytes, and inline it would be copied with
                // every move of the request's future (into hyper, through the panic and span
                // wrappers), on every path, rejections included.
                let outcome = Box::pin(upstream.forward(request, body, forward)).await;
                let latency = sent.elapsed();
                snapshot.metrics.upstream_duration(*index, latency);
                trace.upstream_latency = Some(latency);
                trace.upstream_status = match &outcome {
                    Ok(response) => Some(response.status()),
                    Err(GatewayError::UpstreamStatus { status, .. }) => Some(*status),
                    Err(_) => None,
                };
                outcome.inspect_err(|error| {
                    log_upstream_failure(error, upstream);
                    if let Some(kind) = upstream_failure_kind(error) {
                        self.metrics.upstream_failure(&upstream.config.name, kind);
                    }
                })
            }
        }
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

impl Gateway {
    /// A request over its limit: rejected (and counted towards `ip_throttle`), or in shadow
    /// mode let through, logged and counted.
    fn over_limit(
        &self,
        decision: &Decision,
        client: IpAddr,
        now: Instant,
        snapshot: &Snapshot,
        plan: Option<usize>,
    ) -> Result<(), GatewayError> {
        let limits = &snapshot.config.limits;
        if limits.mode == LimitMode::Shadow {
            self.would_limit.fetch_add(1, Ordering::Relaxed);
            snapshot.metrics.decision(LimitOutcome::WouldLimit, plan);
            tracing::info!(
                decision = "would_limit",
                window = decision.spec.window.name(),
                "shadow mode: over the limit, let through"
            );
            return Ok(());
        }
        snapshot.metrics.decision(LimitOutcome::Limited, plan);
        if self.ip_throttle.record(client, now, &limits.ip_throttle) {
            tracing::warn!(client_ip = %client, block_for = ?limits.ip_throttle.block_for, "ip throttle tripped: client IP blocked after repeated 429s");
            // The 429 that trips the block says so: told the key's wait, the client would be
            // refused again when it retries.
            return Err(GatewayError::IpThrottled {
                retry_after: limits.ip_throttle.block_for.max(decision.retry_after),
            });
        }
        Err(GatewayError::RateLimited {
            limit: decision.spec.limit.get(),
            window: decision.spec.window,
            retry_after: decision.retry_after,
        })
    }

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

/// Refuses requests whose framing or target a proxy and an upstream could disagree on
/// (request smuggling): `Transfer-Encoding` together with `Content-Length`, any transfer
/// coding but a single `chunked`, an HTTP/1.1 request without exactly one valid `Host` (RFC
/// 9112 3.2: the upstream, and `X-Forwarded-Host`, would get the attacker's pick), and an
/// absolute-form target or HTTP/2 `:authority` that disagrees with `Host`. hyper already refuses
/// duplicate differing `Content-Length`, HTTP/1.0 with `Transfer-Encoding`, obs-fold, bad
/// chunk sizes and control bytes in headers.
fn reject_ambiguous_framing<B>(request: &Request<B>) -> Result<(), GatewayError> {
    let headers = request.headers();
    if let Some(why) = crate::proxy::headers::ambiguous_framing(headers) {
        return Err(GatewayError::BadRequest(why));
    }
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if request.version() == http::Version::HTTP_11 => {
            return Err(GatewayError::BadRequest("the Host header is missing"));
        }
        (Some(_), Some(_)) => {
            return Err(GatewayError::BadRequest("more than one Host header"));
        }
        (Some(host), None) if !valid_host(host.as_bytes()) => {
            return Err(GatewayError::BadRequest(
                "the Host header is not a valid host",
            ));
        }
        _ => {}
    }
    // HTTP/1.1's absolute-form target, or HTTP/2's `:authority` (RFC 9113 8.3.1: a `Host`
    // that names another entity makes the request malformed).
    if let (Some(authority), Some(host)) = (request.uri().authority(), headers.get(HOST))
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Err(GatewayError::BadRequest(
            "the Host header disagrees with the request target",
        ));
    }
    Ok(())
}

/// `host[:port]` as RFC 9110 7.2 allows it in `Host` (empty too, for a target without an
/// authority): a URI authority without user info. Checked in place: `http`'s `Authority`
/// parser would copy the value into an allocation on every request.
fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value {
        [b'[', ..] => match value.iter().position(|&b| b == b']') {
            Some(end) => (&value[..=end], &value[end + 1..]),
            None => return false,
        },
        _ => match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        },
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    // RFC 3986: an IP-literal in brackets, or a reg-name / IPv4 address (unreserved,
    // pct-encoded and sub-delims characters).
    let host_ok = match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b":.-_~%!$&'()*+,;=".contains(&b))
        }
        _ => host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b".-_~%!$&'()*+,;=".contains(&b)),
    };
    port_ok && host_ok
}

/// More than [`MAX_HEADER_FIELDS`] fields, counting an HTTP/2 client's `Cookie` crumbs (RFC
/// 9113 8.2.3) as the one line they are joined into.
fn too_many_fields(headers: &HeaderMap) -> bool {
    let fields = headers.len();
    if fields <= MAX_HEADER_FIELDS {
        return false;
    }
    let cookies = headers.get_all(http::header::COOKIE).iter().count();
    fields - cookies.saturating_sub(1) > MAX_HEADER_FIELDS
}

/// Replaces the request's path, keeping its query.
fn set_path<B>(request: &mut Request<B>, path: &str) -> Result<(), GatewayError> {
    let invalid = || GatewayError::BadRequest("invalid path");
    let target = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| invalid())?);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| invalid())?;
    Ok(())
}

/// Removes the credential before forwarding, unless `auth.forward_key`: the key header, a
/// Bearer `Authorization`, and the query parameter.
fn strip_credentials<B>(request: &mut Request<B>, auth: &crate::config::AuthConfig) {
    if auth.forward_key {
        return;
    }
    let headers = request.headers_mut();
    headers.remove(&auth.header);
    // Every Bearer line goes, wherever it is among the `Authorization` lines (the key may
    // have come from any of them); other schemes are the upstream's business and stay.
    if auth.bearer
        && headers
            .get_all(AUTHORIZATION)
            .iter()
            .any(|v| bearer_token(v.as_bytes()).is_some())
    {
        let kept: Vec<HeaderValue> = headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter(|v| bearer_token(v.as_bytes()).is_none())
            .cloned()
            .collect();
        headers.remove(AUTHORIZATION);
        for value in kept {
            headers.append(AUTHORIZATION, value);
        }
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

/// An HTTP/1.x request body left unread this long or this large after an early answer is
/// not waited for: the answer says `Connection: close` instead. Like nginx, which discards
/// the body of a request it answered early, so the connection can carry the next request.
pub const DISCARD_BODY_BYTES: u64 = 64 * 1024;

/// See [`DISCARD_BODY_BYTES`].
pub const DISCARD_BODY_TIME: Duration = Duration::from_secs(1);

/// An HTTP/1.x request that came with a body. Answered without reading it all, the client's
/// next request on the connection would be read from the middle of this body, so hyper
/// closes the connection; unsaid, that close reaches a keep-alive client as a reset.
struct UnreadBody {
    /// `Expect: 100-continue`: the client waits for a go-ahead before it sends the body.
    expects_continue: bool,
}

impl UnreadBody {
    /// `Some` for an HTTP/1.x request with a body still to come.
    fn of(head: &http::request::Parts, body: &Incoming) -> Option<Self> {
        if head.version >= http::Version::HTTP_2 || http_body::Body::is_end_stream(body) {
            // HTTP/2: an unread body ends its own stream (RST_STREAM), never the connection.
            return None;
        }
        let expects_continue = head
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        Some(Self { expects_continue })
    }

    /// After the answer is made: a body that was never forwarded (`body` still here) is read
    /// and discarded, within [`DISCARD_BODY_BYTES`] and [`DISCARD_BODY_TIME`], so the
    /// connection stays open; otherwise, or when forwarding failed (the body may be half
    /// sent), the answer says `Connection: close` so the client knows before it sends again.
    async fn settle(
        self,
        body: Option<Incoming>,
        forwarded_ok: bool,
        response: &mut Response<ResponseBody>,
    ) {
        let kept = match body {
            // A client waiting for `100 Continue` has sent nothing: asking for the body now
            // would tell it to upload something that is refused already.
            Some(body) => !self.expects_continue && discard(body).await,
            // The upstream answered: its connection read what it wanted of the body.
            None => forwarded_ok,
        };
        if !kept {
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Reads `body` to its end and drops the bytes; `false` if it is larger than
/// [`DISCARD_BODY_BYTES`] (declared or seen), fails, or takes longer than
/// [`DISCARD_BODY_TIME`].
async fn discard(mut body: Incoming) -> bool {
    use http_body_util::BodyExt;
    if http_body::Body::size_hint(&body).lower() > DISCARD_BODY_BYTES {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > DISCARD_BODY_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DISCARD_BODY_TIME, read)
        .await
        .unwrap_or(false)
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
        // One snapshot for the whole request, however long it takes: a reload mid-request does
        // not change its config, and everything per-request borrows from it.
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let snapshot = self.snapshot.load_full();
        let mut rate = None;
        let mut trace = Trace::default();
        // The body stays here until the request is forwarded: a request answered before
        // that still has it, to discard (see `settle_unread_body`).
        let (head, incoming) = request.into_parts();
        let unread = UnreadBody::of(&head, &incoming);
        let mut body = Some(incoming);
        let outcome = self
            .pipeline(
                &snapshot,
                Request::from_parts(head, ()),
                &mut body,
                ctx,
                &mut rate,
                &mut trace,
            )
            .await;
        let forwarded_ok = outcome.is_ok() && body.is_none();
        let mut response = match outcome {
            Ok(response) => response,
            Err(error) => {
                trace.failure_kind = error.failure_kind().map(|kind| kind.as_str());
                // Upstream failures were logged by the pipeline, with the upstream's name. A
                // limiter outage is logged once by the backend when it starts and ends; one
                // line per denied request would flood the log, so those are debug only.
                if let Some(kind) = error.failure_kind().filter(|kind| !kind.is_upstream()) {
                    tracing::debug!(
                        kind = kind.as_str(),
                        status = error.status().as_u16(),
                        "denied: rate-limit backend down"
                    );
                }
                // In the request's own snapshot's style, like everything else about it.
                snapshot.renderer.render(&error, &ctx.request_id).map(ResponseBody::full)
            }
        };
        // Every response to a charged request reports the bucket, errors included.
        if let Some(info) = rate {
            // `Reset` counts from the decision, not from now: the upstream's time since then
            // has refilled the bucket already.
            let decided = crate::limit::headers::unix_time(info.decision.at);
            let style = snapshot.config.limits.headers;
            info.policy.apply(
                response.headers_mut(),
                style,
                &info.decision,
                decided,
                || crate::limit::bucket::since(info.decision.at),
            );
        }
        if let Some(unread) = unread {
            unread.settle(body, forwarded_ok, &mut response).await;
        }
        snapshot.metrics.request(trace.labels, response.status());
        self.metrics.request_duration(started.elapsed());
        if AccessInfo::wanted() {
            response.extensions_mut().insert(AccessInfo {
                client_ip: trace.client.unwrap_or(ctx.peer.ip()),
                key_id: trace.key.map(|k| k.id.clone()),
                plan: trace
                    .labels
                    .plan
                    .and_then(|plan| snapshot.metrics.plan(plan))
                    .cloned(),
                upstream_status: trace.upstream_status,
                upstream_latency: trace.upstream_latency,
                failure_kind: trace.failure_kind,
            });
        }
        response
    }

    fn render_error(&self, error: &GatewayError, request_id: &RequestId) -> Response<ResponseBody> {
        let snapshot = self.snapshot.load();
        let response = snapshot
            .renderer
            .render(error, request_id)
            .map(ResponseBody::full);
        // Counted like any answer, under no route and no plan (nothing of the request was
        // read, or its handler panicked before counting it).
        snapshot
            .metrics
            .request(Labels::default(), response.status());
        response
    }

    fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let snapshot = self.snapshot.load();
        snapshot
            .config
            .server
            .tls
            .as_ref()
            .map(|t| t.server_config.clone())
    }

    fn metrics(&self) -> Option<String> {
        Some(self.metrics.encode())
    }

    fn tick(&self) {
        let snapshot = self.snapshot.load();
        let now = Instant::now();
        if let Some(anonymous) = &snapshot.anonymous {
            anonymous.limiter.evict_idle();
        }
        self.failed_auth
            .sweep(now, &snapshot.config.limits.failed_auth);
        self.ip_throttle
            .sweep(now, &snapshot.config.limits.ip_throttle);
        for upstream in snapshot.upstreams.iter() {
            upstream.close_idle_connections();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn host_values() {
        for good in [
            "",
            "t",
            "api.example.com:8080",
            "127.0.0.1",
            "[::1]:8080",
            "[fe80::1%25eth0]",
            "host:",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "x y",
            "user@host",
            "[::1",
            "[::1]x",
            "[]",
            "host:80a",
            "a/b",
            "a:1:2",
            "h\"",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }
}
