//! An upstream's targets: one keep-alive pool per target, and the balancer that picks the
//! target of each request (smooth weighted round robin, as nginx's, or least in flight).
//!
//! Part of the proxy box: [`Upstream::forward`](super::Upstream::forward) asks the upstream's
//! current [`TargetSet`] for a target before it builds the request, and again for a different
//! one on a retry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::uri::Scheme;
use http::{HeaderValue, Uri};

use super::classify::Failure;
use super::health::{Ejection, Health, State};
use super::pool::Pool;
use super::resolve::Endpoint;
use super::tls::Connector;
use crate::body::RequestBody;
use crate::config::{Balance, UpstreamConfig};
use crate::error::{FailureKind, GatewayError};
use crate::observability::metrics::Metrics;
use hyper_util::client::legacy::Client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// One target of an upstream: a configured target, at one of its addresses.
#[derive(Debug)]
pub struct Target {
    /// The endpoint it was built for (a hostname target gives one per address).
    pub endpoint: Endpoint,
    /// The URL it is reached at: the upstream's scheme and base path, and the address (or
    /// the configured authority when it has none).
    pub url: Uri,
    /// `address:port` (or `host:port` when resolved at connect), for the access log and
    /// metric labels.
    pub label: Arc<str>,
    /// Its share of the requests, relative to the other targets'.
    pub weight: u32,
    /// Its keep-alive pool when the upstream is plain http; https ones use the upstream's
    /// hyper-util client, which pools by authority.
    pub pool: Option<Arc<Pool>>,
    /// An https target at a resolved address: its own clients (requests, upgrades) that
    /// dial the address and verify the name.
    pub clients: Option<Arc<Clients>>,
    /// `Host` for plain-http targets (always HTTP/1.1): the configured `host[:port]`, built
    /// once (see `Upstream`).
    pub host: Option<HeaderValue>,
    /// Requests to this target in flight (heads or bodies still streaming); counted only when
    /// the upstream has more than one target.
    pub load: Arc<AtomicUsize>,
    /// Its health, shared with the same target of the set it replaced.
    pub health: Arc<Health>,
    /// `tollgate_upstream_target_healthy{upstream, target}`.
    pub healthy: Gauge,
    /// `tollgate_upstream_ejections_total{upstream, target}`.
    pub ejections: Counter,
}

impl Target {
    /// A target of `upstream` for `endpoint`. `previous` is the same target in the set this
    /// one replaces (a reload, or a DNS change): its health and in-flight count carry over,
    /// and its pool too when `keep_pool` (the connection settings did not change).
    pub fn new(
        config: &UpstreamConfig,
        endpoint: &Endpoint,
        previous: Option<&Target>,
        keep_pool: bool,
        metrics: &Metrics,
    ) -> Self {
        let upstream = &config.name;
        let configured = &endpoint.url;
        let https = configured.scheme() == Some(&Scheme::HTTPS);
        let port = configured
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let host = configured.host().unwrap_or("");
        // An https target keeps its name in the URL: the TLS handshake verifies it.
        let (label, url) = match endpoint.addr {
            Some(addr) if !https => (addr.to_string(), with_authority(configured, addr)),
            Some(addr) => (addr.to_string(), configured.clone()),
            None => (format!("{host}:{port}"), configured.clone()),
        };
        let (healthy, ejections) = metrics.target_series(upstream, &label);
        let health = previous.map_or_else(Arc::default, |p| p.health.clone());
        if health.is_down() || health.is_out(Instant::now()) {
            healthy.set(0);
        }
        let kept = previous.filter(|_| keep_pool);
        let pool = match kept {
            Some(previous) => previous.pool.clone(),
            None => (!https).then(|| {
                Arc::new(Pool::new(
                    label.clone(),
                    config.connect_timeout,
                    super::POOL_IDLE_TIMEOUT,
                ))
            }),
        };
        let clients = match (kept, endpoint.addr) {
            (Some(previous), _) => previous.clients.clone(),
            (None, Some(addr)) if https => Some(Arc::new(Clients {
                request: super::build_client(super::tls::connector(config, true, Some(addr))),
                upgrade: super::build_client(super::tls::connector(config, false, Some(addr))),
            })),
            (None, _) => None,
        };
        Self {
            endpoint: endpoint.clone(),
            url,
            label: label.into(),
            weight: endpoint.weight.get(),
            pool,
            clients,
            host: (!https).then(|| host_header(host, port)).flatten(),
            load: previous.map_or_else(Arc::default, |p| p.load.clone()),
            health,
            healthy,
            ejections,
        }
    }
}

/// The hyper-util clients of an https target at a resolved address.
#[derive(Debug)]
pub struct Clients {
    /// h2 or HTTP/1.1 by ALPN.
    pub request: Client<Connector, RequestBody>,
    /// HTTP/1.1 only, for upgrades.
    pub upgrade: Client<Connector, RequestBody>,
}

/// `url` with `addr` as its authority.
fn with_authority(url: &Uri, addr: SocketAddr) -> Uri {
    let mut parts = url.clone().into_parts();
    parts.authority = addr.to_string().parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| url.clone())
}

/// The `Host` the pooled client would send to a plain-http target (`host[:port]`, the port
/// only when not 80).
fn host_header(host: &str, port: u16) -> Option<HeaderValue> {
    let text = match port {
        80 => host.to_owned(),
        port => format!("{host}:{port}"),
    };
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
}

/// The targets an upstream sends to now, and how it picks among them. Replaced whole when a
/// hostname target's addresses change.
#[derive(Debug)]
pub struct TargetSet {
    /// The targets, in config order (a hostname target's addresses in sorted order).
    pub targets: Vec<Target>,
    /// Picks the target of each request; `None` with one target.
    pub balancer: Option<Balancer>,
    /// When a failing target is taken out.
    pub ejection: Ejection,
    /// Whether health probes can take targets out.
    pub probed: bool,
}

impl TargetSet {
    /// The set of `endpoints`, each target carrying over the state of the same endpoint in
    /// `previous` (its pool only when `keep_pool`). The metric series of targets that are
    /// gone are dropped.
    pub fn new(
        config: &UpstreamConfig,
        endpoints: &[Endpoint],
        previous: Option<&TargetSet>,
        keep_pool: bool,
        metrics: &Metrics,
    ) -> Self {
        let targets: Vec<Target> = endpoints
            .iter()
            .map(|endpoint| {
                let same =
                    previous.and_then(|p| p.targets.iter().find(|o| &o.endpoint == endpoint));
                Target::new(config, endpoint, same, keep_pool, metrics)
            })
            .collect();
        for gone in previous
            .iter()
            .flat_map(|p| &p.targets)
            .filter(|o| !targets.iter().any(|t| t.label == o.label))
        {
            metrics.forget_target(&config.name, &gone.label);
        }
        Self {
            balancer: (targets.len() > 1).then(|| Balancer::new(config.balance, targets.len())),
            ejection: Ejection {
                after: config.eject_after,
                base: config.eject_for,
                max_ejected: targets.len() * config.max_ejected_percent as usize / 100,
            },
            probed: config.health_check.is_some(),
            targets,
        }
    }

    /// The endpoints the set was built from.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.targets.iter().map(|t| t.endpoint.clone()).collect()
    }

    /// The addresses the configured target `url` is at in this set.
    pub fn addresses_of(&self, url: &Uri) -> Vec<SocketAddr> {
        self.targets
            .iter()
            .filter(|t| &t.endpoint.url == url)
            .filter_map(|t| t.endpoint.addr)
            .collect()
    }

    /// The targets' labels, comma separated, for a log line.
    pub fn labels(&self) -> String {
        let labels: Vec<&str> = self.targets.iter().map(|t| &*t.label).collect();
        labels.join(",")
    }

    /// The target of the next request, not one already `tried`; `None` when every other
    /// target is out (ejected or failing its probes).
    pub(super) fn pick(&self, tried: &Tried, upstream: &str) -> Option<usize> {
        // A one-target upstream that can never be taken out (the default): no clock read.
        if self.balancer.is_none() && !self.ejection.enabled() && !self.probed {
            return (!tried.has(0)).then_some(0);
        }
        let now = Instant::now();
        let may_take = |i: usize| {
            !tried.has(i)
                && match self.targets[i].health.state(now) {
                    State::In => true,
                    State::Returned => {
                        self.targets[i].healthy.set(1);
                        tracing::warn!(
                            upstream,
                            upstream_target = %self.targets[i].label,
                            "upstream target back in rotation after its ejection"
                        );
                        true
                    }
                    State::Out(_) | State::Down => false,
                }
        };
        match &self.balancer {
            Some(balancer) => balancer.pick(&self.targets, may_take),
            None => may_take(0).then_some(0),
        }
    }

    /// The 503 when every target is out: back when the first ejection ends, or, when only
    /// probes hold them out, after the good probes that would put one back.
    pub(super) fn no_healthy_target(&self, config: &UpstreamConfig) -> GatewayError {
        let now = Instant::now();
        let first_back = self
            .targets
            .iter()
            .filter_map(|t| match t.health.state(now) {
                State::Out(until) => Some(until - now),
                _ => None,
            })
            .min();
        let probes = config
            .health_check
            .as_ref()
            .map(|h| h.interval * h.healthy_after);
        GatewayError::ServiceUnavailable {
            kind: FailureKind::NoHealthyTarget,
            retry_after: first_back.or(probes).unwrap_or(config.retry_after),
        }
    }

    /// Counts an attempt's outcome toward its target's passive health.
    pub(super) fn observe<T>(&self, index: usize, outcome: &Result<T, Failure>, upstream: &str) {
        if !self.ejection.enabled() {
            return;
        }
        let target = &self.targets[index];
        let failure = match outcome {
            Ok(_) => return target.health.success(),
            Err(Failure::Upstream(kind)) => *kind,
            Err(_) => return,
        };
        if !matches!(
            failure,
            FailureKind::ConnectRefused
                | FailureKind::ConnectTimeout
                | FailureKind::Reset
                | FailureKind::Timeout
        ) {
            return;
        }
        let now = Instant::now();
        let others_out = (self.targets.iter().enumerate())
            .filter(|(i, t)| *i != index && t.health.is_out(now))
            .count();
        if let Some(length) = target.health.failure(now, others_out, &self.ejection) {
            target.healthy.set(0);
            target.ejections.inc();
            tracing::warn!(
                upstream,
                upstream_target = %target.label,
                kind = failure.as_str(),
                ejected_for_s = length.as_secs(),
                "upstream target ejected after consecutive failures"
            );
        }
    }
}

/// Which target each request goes to.
#[derive(Debug)]
pub struct Balancer {
    balance: Balance,
    /// Smooth weighted round robin's current weight of each target.
    current: Mutex<Vec<i64>>,
    /// Where least_inflight starts looking: ties go round robin.
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer over `count` targets.
    pub fn new(balance: Balance, count: usize) -> Self {
        Self {
            balance,
            current: Mutex::new(vec![0; count]),
            next: AtomicUsize::new(0),
        }
    }

    /// The target for the next request among those `eligible` says may take it, or `None`
    /// when none may.
    pub fn pick(&self, targets: &[Target], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self.balance {
            Balance::RoundRobin => self.round_robin(targets, eligible),
            Balance::LeastInflight => self.least_inflight(targets, eligible),
        }
    }

    /// nginx's smooth weighted round robin: every eligible target gains its weight, the one
    /// with the most is picked and gives back the total. Over any run of sum-of-weights
    /// picks each target gets exactly its weight, interleaved rather than in bursts.
    fn round_robin(&self, targets: &[Target], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, target) in targets.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let weight = i64::from(target.weight);
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    /// The eligible target with the fewest requests in flight; ties go to the heavier one,
    /// then to the first from a start that moves on with every request.
    fn least_inflight(
        &self,
        targets: &[Target],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, usize, u32)> = None;
        for i in (start..n).chain(0..start) {
            if !eligible(i) {
                continue;
            }
            let load = targets[i].load.load(Ordering::Relaxed);
            let weight = targets[i].weight;
            let better = match best {
                None => true,
                Some((_, l, w)) => load < l || (load == l && weight > w),
            };
            if better {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// The targets a request has been sent to (at most `1 + retries`, so 4).
#[derive(Default)]
pub(super) struct Tried {
    indices: [usize; 4],
    len: usize,
}

impl Tried {
    pub(super) fn add(&mut self, index: usize) {
        if self.len < self.indices.len() {
            self.indices[self.len] = index;
            self.len += 1;
        }
    }

    pub(super) fn has(&self, index: usize) -> bool {
        self.indices[..self.len].contains(&index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn upstream() -> UpstreamConfig {
        let text = "[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:3000\"\n\
                    [[routes]]\nprefix = \"/\"\nupstream = \"u\"\n";
        let config = crate::Config::from_text(std::path::Path::new("t.toml"), text).unwrap();
        config.upstreams[0].clone()
    }

    fn targets(weights: &[u32]) -> Vec<Target> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let config = Endpoint {
                    url: format!("http://127.0.0.1:{}", 3000 + i).parse().unwrap(),
                    addr: None,
                    weight: NonZeroU32::new(*w).unwrap(),
                };
                Target::new(&upstream(), &config, None, false, &Metrics::new())
            })
            .collect()
    }

    #[test]
    fn round_robin_gives_each_target_its_weight_interleaved() {
        let targets = targets(&[5, 1, 1]);
        let balancer = Balancer::new(Balance::RoundRobin, 3);
        let picks: Vec<usize> = (0..7)
            .map(|_| balancer.pick(&targets, |_| true).unwrap())
            .collect();
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_skips_targets_that_may_not_take_requests() {
        let targets = targets(&[1, 1, 2]);
        let balancer = Balancer::new(Balance::RoundRobin, 3);
        for _ in 0..8 {
            assert_ne!(balancer.pick(&targets, |i| i != 2), Some(2));
        }
        assert_eq!(balancer.pick(&targets, |_| false), None);
    }

    #[test]
    fn least_inflight_prefers_the_idle_target_then_the_heavier_one() {
        let targets = targets(&[1, 1, 2]);
        let balancer = Balancer::new(Balance::LeastInflight, 3);
        targets[2].load.store(3, Ordering::Relaxed);
        targets[0].load.store(1, Ordering::Relaxed);
        for _ in 0..6 {
            assert_eq!(balancer.pick(&targets, |_| true), Some(1));
        }
        targets[1].load.store(1, Ordering::Relaxed);
        targets[2].load.store(1, Ordering::Relaxed);
        for _ in 0..6 {
            assert_eq!(
                balancer.pick(&targets, |_| true),
                Some(2),
                "ties: the heavier"
            );
        }
        targets[2].load.store(5, Ordering::Relaxed);
        let picks: Vec<_> = (0..4)
            .map(|_| balancer.pick(&targets, |_| true).unwrap())
            .collect();
        assert!(
            picks.contains(&0) && picks.contains(&1),
            "ties of equal weight rotate: {picks:?}"
        );
    }
}
