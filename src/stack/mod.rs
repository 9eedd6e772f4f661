//! The request pipeline: the one place that shows, in order, what happens to a request.
//!
//! ```text
//! request id + span (server/) -> head limits -> framing -> client IP guard -> route
//!   -> method -> authenticate + scopes -> charge -> credentials out, identity in
//!   -> dispatch (fixed response or upstream)
//! ```
//! Each step is a call into the box that owns its logic, and either passes the request on
//! or answers with a [`GatewayError`]; nothing here returns `Err` to hyper. What a request
//! learns on the way (its client, key, bucket decision, upstream answer) is kept in one
//! [`Exchange`], read at the end for headers, metrics and the access log.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::auth::{Identity, KeyRecord, KeySources, KeyStore, WallClock, expiry};
use crate::body::{ResponseBody, UnreadBody};
use crate::config::{Config, KeyConfig, RouteTarget};
use crate::error::GatewayError;
use crate::limit::headers::PolicyHeaders;
use crate::limit::{Decision, Guard};
use crate::observability::RequestId;
use crate::observability::access::AccessInfo;
use crate::observability::metrics::{Labels, LimitOutcome, Metrics};
use crate::proxy::{ClientInfo, Forward, Resolver, classify, framing, headers};
use crate::route::{Resolved, Route};
use crate::server::admin::keys::KeyAdmin;
use crate::server::client_ip::{client_ip, is_trusted_peer};
use crate::server::{Handler, RequestContext, head_limits};

mod snapshot;
pub use snapshot::{ANONYMOUS_PLAN, Anonymous, Snapshot};

/// The rate-limit decision of a request and the header parts to report it with, borrowed
/// from the request's snapshot (no reference counting per request).
struct RateInfo<'s> {
    decision: Decision,
    policy: &'s PolicyHeaders,
}

/// What the pipeline learned about one request on the way, for the rate-limit headers, the
/// metrics and the access log.
#[derive(Default)]
struct Exchange<'s> {
    labels: Labels,
    client: Option<IpAddr>,
    key: Option<&'s KeyRecord>,
    rate: Option<RateInfo<'s>>,
    upstream_status: Option<http::StatusCode>,
    upstream_latency: Option<Duration>,
    failure_kind: Option<&'static str>,
    upstream_target: Option<Arc<str>>,
    /// The key's expiry, when it is near enough to announce (`X-API-Key-Expires`).
    key_expires_soon: Option<u32>,
    /// The keys shared through Redis, as loaded when the request started.
    shared_keys: Option<&'s KeyStore>,
}

/// What admitting a request found out, for its way to the route's target.
struct Admitted<'s> {
    resolved: Resolved<'s>,
    client: IpAddr,
}

/// The gateway: the current snapshot, and the pipeline that runs every request against it.
#[derive(Debug)]
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// The per-client-IP guards and shadow accounting; they survive reloads.
    guard: Guard,
    /// Prometheus metrics, served on the admin listener.
    metrics: Arc<Metrics>,
    /// Resolves hostname targets.
    resolver: Resolver,
    /// The wall clock key expiries are checked against.
    clock: WallClock,
    /// What serves the admin key API, once installed (`reload::key_api`).
    key_admin: std::sync::OnceLock<Arc<dyn KeyAdmin>>,
    /// The keys last loaded from Redis (`auth.store = "redis"`); the lock also orders their
    /// swaps against reloads, so a reload never builds on a list older than the store's.
    shared_keys: Mutex<Arc<Vec<KeyConfig>>>,
}

impl Gateway {
    /// A gateway running `config`.
    pub fn new(config: Config) -> Self {
        Self::build(config, Resolver::system(), WallClock::system())
    }

    /// A gateway running `config` that resolves hostname targets with `resolver`.
    pub fn with_resolver(config: Config, resolver: Resolver) -> Self {
        Self::build(config, resolver, WallClock::system())
    }

    /// A gateway whose key expiries are checked against `clock` (a fake one in tests).
    pub fn with_wall_clock(config: Config, clock: WallClock) -> Self {
        Self::build(config, Resolver::system(), clock)
    }

    fn build(config: Config, resolver: Resolver, clock: WallClock) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.config_loaded(&config);
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config, None, &metrics, &resolver)),
            guard: Guard::default(),
            metrics,
            resolver,
            clock,
            key_admin: std::sync::OnceLock::new(),
            shared_keys: Mutex::new(Arc::new(Vec::new())),
        }
    }

    /// Replaces the keys loaded from Redis: the current snapshot serves them from the next
    /// request (a reload keeps them). No-op unless `auth.store = "redis"`.
    pub fn set_shared_keys(&self, keys: Vec<KeyConfig>) {
        let mut shared = self.shared_keys.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = self.snapshot.load();
        if let Some(current) = &snapshot.shared_keys {
            let store = snapshot.shared_store(&keys, Some(&current.load()));
            current.store(Arc::new(store));
        }
        *shared = Arc::new(keys);
    }

    /// The keys last loaded from Redis.
    pub fn shared_keys(&self) -> Arc<Vec<KeyConfig>> {
        self.shared_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs what serves the admin key API; the first one installed stays.
    pub fn set_key_admin(&self, admin: Arc<dyn KeyAdmin>) {
        let _ = self.key_admin.set(admin);
    }

    /// The per-client-IP guards (`failed_auth`, `ip_throttle`), which the admin key API's
    /// token check answers to as well.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// The wall clock key expiries are checked against.
    pub fn wall_clock(&self) -> &WallClock {
        &self.clock
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
        let shared = self.shared_keys.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.snapshot.load_full();
        self.metrics.config_loaded(&config);
        let snapshot = Snapshot::new(config, Some(&previous), &self.metrics, &self.resolver);
        if let Some(store) = &snapshot.shared_keys {
            let old = previous.shared_keys.as_ref().map(|s| s.load_full());
            store.store(Arc::new(snapshot.shared_store(&shared, old.as_deref())));
        }
        self.snapshot.store(Arc::new(snapshot));
        drop(shared);
        self.metrics.reload(true);
    }

    /// Sets monthly quota counts read from `limits.state_file` (at start, before requests).
    pub fn restore_quotas(&self, counts: &[(String, crate::limit::quota::MonthIndex, u64)]) {
        let quotas = &self.snapshot.load().quotas;
        for (id, month, used) in counts {
            quotas.seed(id, *month, *used);
        }
    }

    /// Writes the monthly quota counts to `limits.state_file`, when the local backend keeps
    /// them (with Redis they live in Redis). Called every housekeeping tick and at shutdown.
    pub fn save_quotas(&self) {
        let snapshot = self.snapshot.load();
        let limits = &snapshot.config.limits;
        let Some(path) = &limits.state_file else {
            return;
        };
        if limits.backend != crate::config::LimitBackend::Local {
            return;
        }
        if let Err(error) = crate::limit::state_file::write(path, &snapshot.quotas.entries()) {
            tracing::warn!(%error, path = %path.display(), "cannot write limits.state_file; quota counts since the last write would be lost at a restart");
        }
    }

    /// Requests shadow mode let through that enforce mode would have rejected.
    pub fn would_limit_count(&self) -> u64 {
        self.guard.would_limit_count()
    }

    /// The steps of a request up to its target, in order: everything that may refuse it.
    /// What is left in `request` is the request as the target gets it ([`Self::dispatch`]):
    /// without the credential, and with only the identity headers tollgate sets. Borrowed,
    /// not moved in and out: the head is copied with each move.
    async fn admit<'s>(
        &self,
        snapshot: &'s Snapshot,
        request: &mut Request<()>,
        ctx: &RequestContext,
        exchange: &mut Exchange<'s>,
    ) -> Result<Admitted<'s>, GatewayError> {
        let server = &snapshot.config.server;
        // Nothing about an oversized request is worth routing.
        head_limits::check(request, server)?;
        // Framing two parsers could read differently is refused, never forwarded.
        framing::check(request)?;
        // A blocked client IP is answered before any key is looked at (key guessing).
        let now = Instant::now();
        let client = client_ip(ctx.peer, request.headers(), &server.trusted_proxies);
        exchange.client = Some(client);
        let limits = &snapshot.config.limits;
        self.guard.admit(client, now, limits, &snapshot.metrics)?;
        // Routed in normal form, so a path cannot reach a route the upstream would not serve.
        let resolved = snapshot.router.resolve(request)?;
        exchange.labels.route = Some(resolved.route.index);
        resolved.route.check_method(request.method())?;
        // Who is asking, and may it use this route (401/403); a 401 counts against the IP.
        let identity =
            self.authenticate(request, resolved.route, client, now, snapshot, exchange)?;
        // Only now is a bucket charged: 401/403 never cost a token.
        self.charge(
            identity.as_ref(),
            resolved.route,
            client,
            now,
            snapshot,
            exchange,
        )
        .await?;
        // What the upstream may see: no credential (the header fields are left out as the
        // request is written, see `headers::Added`), and only the identity tollgate vouches for.
        crate::auth::strip_query_credential(request, &snapshot.config.auth);
        headers::drop_underscored(
            request.headers_mut(),
            server.underscores_in_headers,
            &snapshot.config.auth.header,
        );
        // The identity itself goes with the request to the upstream (see `headers::Added`).
        headers::strip_identity(request.headers_mut());
        Ok(Admitted { resolved, client })
    }

    /// The key of the request, checked against the route's `auth` and scopes; a 401 is
    /// counted towards the client IP's `failed_auth` block.
    fn authenticate<'s>(
        &self,
        request: &Request<()>,
        route: &Route,
        client: IpAddr,
        now: Instant,
        snapshot: &'s Snapshot,
        exchange: &mut Exchange<'s>,
    ) -> Result<Option<Identity<'s>>, GatewayError> {
        let identity = crate::auth::authenticate(
            request.headers(),
            request.uri(),
            &snapshot.config.auth,
            KeySources {
                config: &snapshot.keys,
                shared: exchange.shared_keys,
            },
            &self.clock,
            route.config.auth,
            &route.config.scopes,
        )
        .inspect_err(|error| {
            self.guard
                .failed_auth(error, client, now, &snapshot.config.limits)
        })?;
        if let Some(identity) = &identity {
            tracing::Span::current().record("key_id", &*identity.record.id.0);
            exchange.key = Some(identity.record);
            exchange.key_expires_soon = identity.expires_soon;
            exchange.labels.plan = Some(identity.record.plan_index);
        } else if snapshot.anonymous.is_some() {
            exchange.labels.plan = snapshot.anonymous_plan;
        }
        Ok(identity)
    }

    /// Charges the key's buckets on the configured backend (Redis may be down:
    /// `on_backend_error` then admits without a decision or answers 503), or, on a public
    /// route without a key, the client IP's `plans.anonymous` bucket, always in process.
    async fn charge<'s>(
        &self,
        identity: Option<&Identity<'s>>,
        route: &Route,
        client: IpAddr,
        now: Instant,
        snapshot: &'s Snapshot,
        exchange: &mut Exchange<'s>,
    ) -> Result<(), GatewayError> {
        let limits = &snapshot.config.limits;
        let cost = route.config.cost;
        let rate = match (identity, &snapshot.anonymous) {
            (Some(identity), _) => snapshot
                .backend
                .check(
                    &identity.record.id.0,
                    &identity.record.limits,
                    (route.index, cost),
                    limits,
                    &self.metrics,
                )
                .await?
                .map(|(decision, policy)| RateInfo { decision, policy }),
            (None, Some(anonymous)) => anonymous
                .limiter
                .check_n(&crate::limit::limit_key(client), cost)
                .map(|decision| RateInfo {
                    decision,
                    policy: &anonymous.policy,
                }),
            (None, None) => None,
        };
        let labels = exchange.labels;
        let outcome = match &rate {
            Some(info) if info.decision.allowed => {
                snapshot.metrics.decision(LimitOutcome::Allowed, labels);
                Ok(())
            }
            Some(info) => self.guard.over_limit(
                &info.decision,
                client,
                now,
                limits,
                &snapshot.metrics,
                labels,
                &route.config.prefix,
            ),
            None => Ok(()),
        };
        // Kept even for a 429: every answer to a charged request reports the bucket.
        exchange.rate = rate;
        outcome
    }

    /// The route's target: its fixed response, or the upstream's answer. `body` stays with
    /// the caller until the request is forwarded, so a request answered before that can have
    /// it discarded.
    async fn dispatch<'s>(
        &self,
        admitted: Admitted<'s>,
        request: &mut Request<()>,
        body: &mut Option<Incoming>,
        ctx: &RequestContext,
        snapshot: &'s Snapshot,
        exchange: &mut Exchange<'s>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let Admitted { resolved, client } = admitted;
        let route = resolved.route;
        let index = match &route.config.target {
            RouteTarget::Respond(fixed) => {
                let mut response = Response::new(ResponseBody::full(fixed.body.clone()));
                *response.status_mut() = fixed.status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, fixed.content_type.clone());
                return Ok(response);
            }
            RouteTarget::Upstream(index) => *index,
        };
        let upstream = &snapshot.upstreams[index];
        let server = &snapshot.config.server;
        let stripped =
            route.stripped_path(request.uri().path(), resolved.params_dropped.as_deref());
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
            identity: exchange.key.map(|record| {
                (
                    &record.id_header,
                    &record.plan_header,
                    record.metadata_headers(),
                )
            }),
            credential: Some(&snapshot.config.auth).filter(|auth| !auth.forward_key),
            max_body_bytes: server.max_body_bytes,
            body_read_timeout: server.body_read_timeout,
            idle_timeout: server.idle_timeout,
            normalize_5xx: snapshot.config.errors.normalize_upstream_5xx,
        };
        // Durations for the metrics are read off the TSC (quanta), not the system clock.
        let sent = quanta::Instant::now();
        let mut sent_to = None;
        let outcome = upstream.forward(request, body, forward, &mut sent_to).await;
        if AccessInfo::wanted() {
            exchange.upstream_target = sent_to;
        }
        let latency = sent.elapsed();
        snapshot.metrics.upstream_duration(index, latency);
        exchange.upstream_latency = Some(latency);
        exchange.upstream_status = match &outcome {
            Ok(response) => Some(response.status()),
            Err(GatewayError::UpstreamStatus { status, .. }) => Some(*status),
            Err(_) => None,
        };
        // Logged here, where the upstream is known; inside the request's span, so the line
        // carries the request ID.
        // Looked at in place: a combinator would take the result in and out (a copy more).
        if let Err(error) = &outcome {
            classify::report_failure(error, upstream, &self.metrics);
        }
        outcome
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
        let started = quanta::Instant::now();
        let _in_flight = self.metrics.in_flight();
        let snapshot = self.snapshot.load_full();
        // Only with `auth.store = "redis"`; one load for the whole request, like the snapshot.
        let shared_keys = snapshot.shared_keys.as_ref().map(|s| s.load_full());
        let mut exchange = Exchange {
            shared_keys: shared_keys.as_deref(),
            ..Exchange::default()
        };
        // The body stays here until the request is forwarded: a request answered before
        // that still has it, to discard (see `UnreadBody`).
        let (head, incoming) = request.into_parts();
        let unread = UnreadBody::of(&head, &incoming);
        let mut body = Some(incoming);
        let mut request = Request::from_parts(head, ());
        // Two awaits, not one inside the other: the forwarding state is made in place here,
        // where nesting it in the admission's would copy all of it (kilobytes) once made.
        let outcome = match self
            .admit(&snapshot, &mut request, ctx, &mut exchange)
            .await
        {
            Ok(admitted) => {
                self.dispatch(
                    admitted,
                    &mut request,
                    &mut body,
                    ctx,
                    &snapshot,
                    &mut exchange,
                )
                .await
            }
            Err(error) => Err(error),
        };
        let forwarded_ok = outcome.is_ok() && body.is_none();
        let mut response = match outcome {
            Ok(response) => response,
            Err(error) => {
                exchange.failure_kind = error.failure_kind().map(|kind| kind.as_str());
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
                snapshot
                    .renderer
                    .render(&error, &ctx.request_id)
                    .map(ResponseBody::full)
            }
        };
        // Every response to a charged request reports the bucket, errors included.
        if let Some(info) = &exchange.rate {
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
        // Also on errors: a client learns of the coming expiry from any answer.
        if let Some(expires) = exchange.key_expires_soon {
            response
                .headers_mut()
                .insert(&expiry::X_API_KEY_EXPIRES, expiry::header_value(expires));
        }
        if let Some(unread) = unread {
            unread.settle(body, forwarded_ok, &mut response).await;
        }
        snapshot.metrics.request(exchange.labels, response.status());
        self.metrics.request_duration(started.elapsed());
        if AccessInfo::wanted() {
            response.extensions_mut().insert(AccessInfo {
                client_ip: exchange.client.unwrap_or(ctx.peer.ip()),
                key_id: exchange.key.map(|k| k.id.clone()),
                plan: exchange
                    .labels
                    .plan
                    .and_then(|plan| snapshot.metrics.plan(plan))
                    .cloned(),
                upstream_status: exchange.upstream_status,
                upstream_latency: exchange.upstream_latency,
                failure_kind: exchange.failure_kind,
                upstream_target: exchange.upstream_target.take(),
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

    fn usage(&self, key_id: &str) -> Option<serde_json::Value> {
        let (snapshot, now) = (self.snapshot.load(), crate::limit::quota::unix_now());
        (snapshot.keys.usage(key_id, now))
            .or_else(|| snapshot.shared_keys.as_ref()?.load().usage(key_id, now))
    }

    fn key_admin(&self) -> Option<Arc<dyn KeyAdmin>> {
        self.key_admin.get().cloned()
    }

    fn tick(&self) {
        let snapshot = self.snapshot.load();
        let now = Instant::now();
        if let Some(anonymous) = &snapshot.anonymous {
            anonymous.limiter.evict_idle();
        }
        self.guard.sweep(now, &snapshot.config.limits);
        self.save_quotas();
        for upstream in snapshot.upstreams.iter() {
            upstream.close_idle_connections();
        }
    }
}
