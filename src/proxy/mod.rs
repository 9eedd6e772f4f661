//! Forwarding to upstreams: their targets and keep-alive connection pools, the
//! `max_inflight` and `maintenance` gates, header rewriting, upgrades, retries (on another
//! target, when safe), and the classification of upstream failures into [`GatewayError`]s.
//!
//! The last box of the flow. Bodies stream both ways; nothing is buffered whole. Module map:
//! [`targets`] picks each request's target (weighted round robin or least in flight),
//! [`health`] takes out targets that keep failing (`probe` probes them), [`resolve`] turns
//! hostname targets into one target per address, [`pool`] keeps the HTTP/1.1 connections of
//! each plain-http target, [`tls`] builds the connector of hyper-util's client (https
//! upstreams, upgrades; TCP + rustls), [`headers`] rewrites heads, [`classify`] turns client
//! errors into failure kinds and decides retries, [`upgrade`] tunnels WebSockets.

pub mod classify;
mod deadline;
mod field_names;
pub mod framing;
pub mod headers;
pub mod health;
pub mod inflight;
pub mod pool;
mod probe;
pub mod quickack;
pub mod resolve;
pub mod targets;
pub mod tls;
pub mod upgrade;
pub mod wire;

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, RETRY_AFTER};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::body::{RequestBody, ResponseBody, UpstreamBody};
use crate::config::UpstreamConfig;
use crate::error::{FailureKind, GatewayError};
use crate::observability::RequestId;
use crate::observability::log_throttle::upstream_failures;
use crate::observability::metrics::Metrics;
use arc_swap::ArcSwap;
use classify::{Failure, classify, classify_pool, error_chain, needs_detail};
use deadline::Deadline;
use pool::{Outgoing, Pool, Retire};
use probe::Background;
pub use resolve::Resolver;
use targets::{Target, TargetSet, Tried};
use tls::Connector;

pub use inflight::InflightSlot;
use inflight::Slots;

pub use classify::may_retry;

/// How long an idle pooled upstream connection is kept.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream: its connection pool and its in-flight gate.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its validated config.
    pub config: UpstreamConfig,
    /// Pooled keep-alive client; h2 when an https upstream negotiates it by ALPN.
    client: Client<Connector, RequestBody>,
    /// The `ca_file`'s bytes when the clients were built (`None` without one, or unreadable):
    /// a reload that finds them changed builds new clients, so a CA rotated in place (or a
    /// broken file fixed) takes effect without a restart.
    ca_pem: Option<Vec<u8>>,
    /// HTTP/1.1-only client for upgrade requests: an h2 connection cannot carry an
    /// `Upgrade`. The same client as `client` for plain-http upstreams.
    upgrade_client: Client<Connector, RequestBody>,
    /// Its targets now, each with its own keep-alive pool when plain http (https ones use
    /// `client`); replaced whole when a hostname target's addresses change.
    set: Arc<ArcSwap<TargetSet>>,
    /// Its health prober and resolver.
    background: Arc<Background>,
    /// `tollgate_upstream_retries_total{upstream, outcome="ok"}`.
    retries_ok: Counter,
    /// `tollgate_upstream_retries_total{upstream, outcome="failed"}`.
    retries_failed: Counter,
    /// `max_inflight` slots; a slot is held until the response body ends or is dropped.
    slots: Arc<Slots>,
    /// Path prefix of the upstream URL without a trailing `/` (often empty).
    base_path: String,
}

/// What the proxy needs to know about the client side of a request.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    /// The TCP peer (appended to `X-Forwarded-For`).
    pub peer: std::net::IpAddr,
    /// `peer` as a header value.
    pub peer_header: &'a http::HeaderValue,
    /// The client's address (resolved through trusted proxies).
    pub ip: std::net::IpAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// Whether the peer is in `server.trusted_proxies`: its `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` (the scheme and host the client used before it) are kept.
    pub trusted_peer: bool,
}

/// Everything about one request that [`Upstream::forward`] needs besides the request itself.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// The path to request upstream, when the route stripped its prefix; `None` keeps the
    /// request's own.
    pub path: Option<&'a str>,
    /// The client side.
    pub client: ClientInfo<'a>,
    /// Sent upstream as `X-Request-Id`.
    pub request_id: &'a RequestId,
    /// The key the request authenticated with, for the upstream.
    pub identity: Option<headers::IdentityHeaders<'a>>,
    /// `[auth]`, whose credential fields the upstream does not see; `None` with
    /// `auth.forward_key`.
    pub credential: Option<&'a crate::config::AuthConfig>,
    /// `server.max_body_bytes`, enforced while the body streams.
    pub max_body_bytes: u64,
    /// `server.body_read_timeout`: a body that stalls this long fails.
    pub body_read_timeout: Duration,
    /// `server.idle_timeout`: an upgraded tunnel idle this long is closed.
    pub idle_timeout: Duration,
    /// `errors.normalize_upstream_5xx`.
    pub normalize_5xx: bool,
}

impl Upstream {
    /// Builds the client for one upstream. The connection pool and the in-flight count of
    /// `previous` (the same upstream in the config being replaced) are kept when the settings
    /// they depend on did not change, so a reload neither drops warm connections nor resets
    /// `max_inflight` accounting.
    pub fn new(
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
        metrics: &Arc<Metrics>,
        resolver: &Resolver,
    ) -> Self {
        let ca_pem = config
            .ca_file
            .as_deref()
            .and_then(|path| std::fs::read(path).ok());
        let same_connection = |p: &&Upstream| {
            p.config.url.scheme() == config.url.scheme()
                && p.config.connect_timeout == config.connect_timeout
                && p.config.ca_file == config.ca_file
                && p.ca_pem == ca_pem
        };
        let kept = previous.filter(same_connection);
        let (client, upgrade_client) = match kept.filter(|p| p.config.targets == config.targets) {
            Some(p) => (p.client.clone(), p.upgrade_client.clone()),
            None => {
                let client = build_client(tls::connector(config, true, None));
                let upgrade_client = if config.url.scheme() == Some(&Scheme::HTTPS) {
                    build_client(tls::connector(config, false, None))
                } else {
                    client.clone()
                };
                (client, upgrade_client)
            }
        };
        // A target that stays keeps its health and its pool: a reload neither puts an ejected
        // target back nor drops warm connections. A hostname target keeps its addresses
        // until the resolver's next answer.
        let previous_set = previous.map(|p| p.set.load_full());
        let endpoints = resolve::endpoints(config, previous_set.as_deref());
        let set = Arc::new(ArcSwap::from_pointee(TargetSet::new(
            config,
            &endpoints,
            previous_set.as_deref(),
            kept.is_some(),
            metrics,
        )));
        if let Some(p) = previous {
            p.background.stop();
        }
        let background = Arc::new(Background::default());
        if let Some(check) = &config.health_check {
            background.spawn(probe::run(
                Arc::downgrade(&set),
                check.clone(),
                config.name.clone(),
                client.clone(),
            ));
        }
        if resolve::has_hostnames(config) {
            background.spawn(resolve::refresh(
                Arc::downgrade(&set),
                config.clone(),
                resolver.clone(),
                metrics.clone(),
            ));
        }
        let (retries_ok, retries_failed) = metrics.retry_counters(&config.name);
        // The same upstream keeps its gate across reloads, resized in place when
        // `max_inflight` changed: a new gate would let in a full new allowance on top of the
        // requests still in flight.
        let max = config.max_inflight.get() as usize;
        let slots = match previous {
            Some(p) => {
                p.slots.resize(max);
                p.slots.clone()
            }
            None => Arc::new(Slots::new(
                max,
                metrics.upstream_failure_counter(&config.name, FailureKind::Reset.as_str()),
                metrics.upstream_failure_counter(&config.name, FailureKind::Timeout.as_str()),
            )),
        };
        Self {
            config: config.clone(),
            client,
            ca_pem,
            upgrade_client,
            set,
            background,
            retries_ok,
            retries_failed,
            slots,
            base_path: config.url.path().trim_end_matches('/').to_owned(),
        }
    }

    /// Closes pooled connections idle past the pool's idle timeout (called on the server's
    /// housekeeping tick, so they go even when no request comes to pass them).
    pub fn close_idle_connections(&self) {
        let set = self.set.load();
        for pool in set.targets.iter().filter_map(|t| t.pool.as_deref()) {
            pool.close_idle();
        }
    }

    /// Requests to this upstream in flight right now (heads or bodies still streaming).
    pub fn in_flight(&self) -> usize {
        self.slots.in_use()
    }

    /// Forwards `request` (taken from the caller's place once it passes this upstream's gates)
    /// and returns the upstream's response with its body streaming, or the failure the client
    /// gets instead.
    ///
    /// `client_body` is taken once the request passes this upstream's gates; a request that
    /// never left tollgate (refused at a gate, or its connect failed) gives it back unread.
    /// `sent_to` is set to the label (`address:port`) of the last target the request was
    /// sent to, for the access log.
    pub async fn forward(
        &self,
        request: &mut Request<()>,
        client_body: &mut Option<Incoming>,
        how: Forward<'_>,
        sent_to: &mut Option<Arc<str>>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        // Neither gate may touch the upstream.
        if self.config.maintenance {
            return Err(GatewayError::ServiceUnavailable {
                kind: FailureKind::Maintenance,
                retry_after: self.config.retry_after,
            });
        }
        let mut permit = self
            .slots
            .try_take()
            .ok_or(GatewayError::ServiceUnavailable {
                kind: FailureKind::Overloaded,
                retry_after: self.config.retry_after,
            })?;

        // The client's upgrade handle lives in the request's extensions: take it before the
        // request is taken apart.
        let upgrade = upgrade::requested(request)
            .map(|protocol| (protocol, hyper::upgrade::on(&mut *request)));
        // Taken from the caller's place only here: the head is copied with each move.
        let (mut parts, ()) = std::mem::take(request).into_parts();
        let mut tried = Tried::default();
        let set = self.set.load_full();
        let index = (set.pick(&tried, &self.config.name))
            .ok_or_else(|| set.no_healthy_target(&self.config))?;
        tried.add(index);
        let to = &set.targets[index];
        *sent_to = Some(to.label.clone());
        if set.balancer.is_some() {
            permit.count_on(&to.load);
        }
        let target = self.upstream_target(how.path, &parts.uri)?;
        // HTTP/1.0 and h2 clients alike: HTTP/1.1 to the upstream unless ALPN picks h2.
        let from_h2 = parts.version == Version::HTTP_2;
        parts.version = Version::HTTP_11;
        let added = headers::prepare_request(
            &mut parts.headers,
            how.client,
            how.request_id,
            parts.uri.authority(),
            from_h2,
        )
        .with_identity(how.identity)
        .with_credential(how.credential);
        if let Some((protocol, _)) = &upgrade {
            upgrade::restore_headers(&mut parts.headers, protocol.clone());
        }
        let upgrading = upgrade.is_some();
        let transport = self.aim(to, upgrading, &mut parts.uri, &mut parts.headers, target)?;

        let incoming = client_body.take().ok_or(GatewayError::Internal)?;
        let body_empty = incoming.is_end_stream();
        let body = if body_empty {
            RequestBody::empty()
        } else {
            RequestBody::new(incoming, how.max_body_bytes, how.body_read_timeout)
        };
        // A replay is allowed only for these (see `may_retry`). The pool gives back a request
        // it could not connect for; hyper-util's client does not, so for it a copy of the
        // head is kept.
        let replayable = classify::replayable(&parts.method, body_empty);
        let method = parts.method.clone();
        // With several targets a reset of a replayable request is retried on another one
        // too, and the pool gives back only what it could not connect for; hyper-util's
        // client gives back nothing, so any bodiless request may need the copy there.
        let several = set.targets.len() > 1;
        let gives_back = matches!(transport, Transport::Pool(_));
        let keep_copy = if several {
            replayable || (body_empty && !gives_back)
        } else {
            replayable && !gives_back
        };
        let mut replay =
            keep_copy.then(|| head_copy(&parts.method, &parts.uri, parts.version, &parts.headers));
        // One deadline for both attempts: a retry never stretches `timeout`. A streamed body
        // moves it: the response head is due `timeout` after the request's last bytes.
        let deadline = Deadline {
            at: Instant::now() + self.config.timeout,
            timeout: self.config.timeout,
            body: body.progress(),
        };
        // The request stays in this slot: each attempt borrows it, and one that never left
        // tollgate is back in it afterwards.
        let mut request = Some(Request::from_parts(parts, body));
        let mut outcome = attempt(
            transport,
            &mut request,
            &added,
            &deadline,
            &self.config.name,
        )
        .await;
        set.observe(index, &outcome, &self.config.name);
        if !several {
            if let Err(failure) = &outcome
                && self.config.retries > 0
                && replayable
                && may_retry(&method, true, *failure)
                && {
                    if request.is_none() {
                        request = replay.take();
                    }
                    request.is_some()
                }
            {
                tracing::debug!(
                    failed = ?failure,
                    "could not connect to the upstream; retrying once on a fresh connection"
                );
                let name = &self.config.name;
                outcome = attempt(transport, &mut request, &added, &deadline, name).await;
                set.observe(index, &outcome, name);
            }
        } else {
            for _ in 0..self.config.retries {
                let Err(failure) = &outcome else {
                    break;
                };
                if !classify::may_retry_elsewhere(&method, body_empty, *failure) {
                    break;
                }
                let Some(next) = set.pick(&tried, &self.config.name) else {
                    break;
                };
                // What the failed attempt gave back (its body unread), else the copy.
                let Some(next_request) = request.take().or_else(|| {
                    replay
                        .as_ref()
                        .map(|r| head_copy(r.method(), r.uri(), r.version(), r.headers()))
                }) else {
                    break;
                };
                tried.add(next);
                let to = &set.targets[next];
                *sent_to = Some(to.label.clone());
                permit.count_on(&to.load);
                let target = next_request
                    .uri()
                    .path_and_query()
                    .cloned()
                    .ok_or(GatewayError::Internal)?;
                let (mut head, body) = next_request.into_parts();
                let transport =
                    self.aim(to, upgrading, &mut head.uri, &mut head.headers, target)?;
                request = Some(Request::from_parts(head, body));
                tracing::debug!(
                    failed = ?failure,
                    upstream_target = %to.label,
                    "upstream target failed before its response head; retrying on another"
                );
                let name = &self.config.name;
                outcome = attempt(transport, &mut request, &added, &deadline, name).await;
                set.observe(next, &outcome, name);
                match &outcome {
                    Ok(_) => self.retries_ok.inc(),
                    Err(_) => self.retries_failed.inc(),
                };
            }
        }
        let (mut response, retire) = outcome.map_err(|failure| {
            *client_body = request
                .take()
                .and_then(|request| request.into_body().into_unread());
            failure.into_error()
        })?;
        // A response that is refused below ends its connection's use (see `Retire`).
        let retired = |error: GatewayError| {
            if let Some(retire) = &retire {
                retire.retire();
            }
            error
        };

        if let Some((_, client_upgrade)) = upgrade
            && upgrade::accepted(&response)
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let (mut head, _) = response.into_parts();
            let protocol = head.headers.get(http::header::UPGRADE).cloned();
            headers::prepare_response(&mut head.headers)
                .map_err(|why| retired(invalid_response(why)))?;
            if let Some(protocol) = protocol {
                upgrade::restore_headers(&mut head.headers, protocol);
            }
            upgrade::tunnel(
                client_upgrade,
                upstream_upgrade,
                Some(permit),
                how.idle_timeout,
            );
            return Ok(Response::from_parts(head, ResponseBody::empty()));
        }
        // A 101 to a request that asked for no upgrade tollgate passes on: the upstream
        // connection has switched to a protocol nobody asked for, and relayed, the 101 would
        // switch the client's connection to nothing.
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(retired(invalid_response(
                "switched protocols on a request that asked for no upgrade",
            )));
        }

        let status = response.status();
        if how.normalize_5xx
            && matches!(
                status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            )
        {
            // The upstream's page is not relayed: it may name internal hosts, versions or
            // stack traces. (Its framing was sound, so what of it has arrived is read, and a
            // connection that has it whole stays in use: an overloaded upstream is not sent
            // new connects for its 503s.) Every 503 tells the client when to come back: the
            // upstream's own Retry-After, else this upstream's `retry_after`.
            response.body_mut().read_arrived();
            let retry_after = response.headers().get(RETRY_AFTER).cloned().or_else(|| {
                (status == StatusCode::SERVICE_UNAVAILABLE).then(|| {
                    HeaderValue::from(crate::error::retry_after_secs(self.config.retry_after))
                })
            });
            return Err(GatewayError::UpstreamStatus {
                status,
                retry_after,
            });
        }
        let (mut head, body) = response.into_parts();
        headers::prepare_response(&mut head.headers)
            .map_err(|why| retired(invalid_response(why)))?;
        // The upstream answered before it took the whole body: what the client still sends
        // is read by nobody, and the connection cannot carry another request after it. Said
        // now, the client knows before it sends one (HTTP/2 streams end on their own).
        if !from_h2 && deadline.body.as_ref().is_some_and(|body| !body.finished()) {
            head.headers
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        // A body that arrived whole with the head is sent as it is: the upstream is done with
        // the request, so its `max_inflight` slot is free now, and there is no stall to time.
        let body = match body.into_arrived() {
            Ok(whole) => ResponseBody::full(whole),
            Err(body) => ResponseBody::upstream(body, Some(permit), self.config.timeout),
        };
        Ok(Response::from_parts(head, body))
    }

    /// The path and query to request upstream: the upstream URL's base path, then the
    /// route's rewritten path or the request's own, then the request's query.
    fn upstream_target(
        &self,
        path: Option<&str>,
        original: &Uri,
    ) -> Result<PathAndQuery, GatewayError> {
        let invalid = || GatewayError::BadRequest("invalid path");
        // The common case: the request's own path and query, as they are. Sharing its bytes
        // costs no allocation.
        if let (None, "") = (path, self.base_path.as_str()) {
            return original.path_and_query().cloned().ok_or_else(invalid);
        }
        let path = path.unwrap_or(original.path());
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
        PathAndQuery::try_from(pq).map_err(|_| invalid())
    }

    /// Points a request at `to`: its `Host`, and the URI its transport wants (origin form for
    /// the pool, absolute for hyper-util's client).
    fn aim<'a>(
        &'a self,
        to: &'a Target,
        upgrading: bool,
        uri: &mut Uri,
        headers: &mut http::HeaderMap,
        target: PathAndQuery,
    ) -> Result<Transport<'a>, GatewayError> {
        match &to.host {
            Some(host) => headers.insert(HOST, host.clone()),
            None => headers.remove(HOST),
        };
        let clients = to.clients.as_deref();
        Ok(match (upgrading, &to.pool) {
            (true, _) => {
                *uri = absolute_uri(&to.url, target)?;
                Transport::Client(clients.map_or(&self.upgrade_client, |c| &c.upgrade))
            }
            (false, Some(pool)) => {
                // Origin form: the pool writes the target as it is.
                *uri = Uri::from(target);
                Transport::Pool(pool)
            }
            (false, None) => {
                *uri = absolute_uri(&to.url, target)?;
                Transport::Client(clients.map_or(&self.client, |c| &c.request))
            }
        })
    }
}

/// `target` on `url`'s scheme and authority, for hyper-util's client.
fn absolute_uri(url: &Uri, target: PathAndQuery) -> Result<Uri, GatewayError> {
    let mut parts = url.clone().into_parts();
    parts.scheme.get_or_insert(Scheme::HTTP);
    parts.path_and_query = Some(target);
    Uri::from_parts(parts).map_err(|_| GatewayError::BadRequest("invalid path"))
}

/// An upstream response tollgate will not relay (502 `invalid_response`); `why` goes to the
/// debug log (the failure itself is logged and counted by the caller, with the upstream).
fn invalid_response(why: &'static str) -> GatewayError {
    tracing::debug!(why, "upstream response refused");
    Failure::Upstream(FailureKind::InvalidResponse).into_error()
}

fn build_client(connector: Connector) -> Client<Connector, RequestBody> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // A pooled connection the upstream closed before reading our request: hyper-util
        // resends on another connection (nothing was sent, any method is safe).
        .retry_canceled_requests(true)
        .build(connector)
}

/// A bodiless copy of a request head, to replay after a connect failure.
fn head_copy(
    method: &http::Method,
    uri: &Uri,
    version: Version,
    headers: &http::HeaderMap,
) -> Request<RequestBody> {
    let mut replay = Request::new(RequestBody::empty());
    *replay.method_mut() = method.clone();
    *replay.uri_mut() = uri.clone();
    *replay.version_mut() = version;
    *replay.headers_mut() = headers.clone();
    replay
}

/// How a request reaches its upstream.
#[derive(Clone, Copy)]
enum Transport<'a> {
    /// The plain-http pool.
    Pool(&'a Arc<Pool>),
    /// hyper-util's pooled client (https, upgrades).
    Client(&'a Client<Connector, RequestBody>),
}

/// One try of the request in `request`: the response head by `deadline` (with, from the
/// pool, a handle to retire its connection), or the classified failure. A request that never
/// left tollgate (the pool could not connect, or a pooled connection was dead before it took
/// a byte) is left in `request`, to be tried again; otherwise the slot is empty afterwards.
async fn attempt(
    transport: Transport<'_>,
    request: &mut Option<Outgoing>,
    added: &headers::Added<'_>,
    deadline: &Deadline,
    upstream: &str,
) -> Result<(Response<UpstreamBody>, Option<Retire>), Failure> {
    let log = |failure: Failure, error: &(dyn std::error::Error + 'static)| {
        if needs_detail(failure, error) {
            // A bad certificate fails every request: one line a second, with the count.
            if let Some(suppressed) = upstream_failures().admit("connect_detail", upstream) {
                tracing::warn!(
                    error = %error_chain(error),
                    upstream,
                    suppressed,
                    "could not connect to the upstream"
                );
            }
        } else {
            tracing::debug!(error = %error_chain(error), ?failure, "upstream request failed");
        }
        failure
    };
    let timed_out = Failure::Upstream(FailureKind::Timeout);
    match transport {
        Transport::Pool(pool) => {
            match deadline.run(pin!(pool.send(request, added))).await {
                Some(Ok((response, retire))) => return Ok((response, Some(retire))),
                Some(Err(error)) => return Err(log(classify_pool(&error), &error)),
                None => {}
            }
            // Timed out (the send, and its borrow of the slot, ended with the match): a
            // request still connecting when the deadline passed is not tried again.
            *request = None;
            Err(timed_out)
        }
        // hyper-util's client writes the map alone, and gives nothing back.
        Transport::Client(client) => {
            // Callers fill the slot; an empty one is answered as the pool answers it (a
            // connection that closed before it took anything).
            let Some(mut request) = request.take() else {
                return Err(Failure::Upstream(FailureKind::Reset));
            };
            added.insert_into(request.headers_mut());
            match deadline.run(pin!(client.request(request))).await {
                Some(Ok(response)) => Ok((response.map(UpstreamBody::from), None)),
                Some(Err(error)) => Err(log(classify(&error), &error)),
                None => Err(timed_out),
            }
        }
    }
}
