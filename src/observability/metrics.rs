//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! One [`Metrics`] per gateway (no global registry, so tests in one process do not share
//! counters). The hot path never formats a label: every config snapshot gets a
//! [`SnapshotMetrics`] table of counters indexed by route, plan and status class, each
//! resolved from its [`Family`] on first use and then a plain atomic increment.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `tollgate_requests_total` | counter | `route` (prefix or `none`), `status` (`2xx`...), `plan` (or `none`); heads refused by the parser or timed out count under `none`, `none` |
//! | `tollgate_rate_limit_decisions_total` | counter | `decision` (`allowed`, `limited`, `would_limit`, `ip_throttled`), `plan`, `route` (prefix, or `none` before routing) |
//! | `tollgate_quota_exhausted_total` | counter | `plan`: requests refused (or, in shadow mode, let through) by a used-up monthly quota |
//! | `tollgate_upstream_failures_total` | counter | `upstream`, `kind` |
//! | `tollgate_request_duration_seconds` | histogram | (none): until the response head |
//! | `tollgate_upstream_target_healthy` | gauge | `upstream`, `target` (`address:port`): 1 in rotation, 0 ejected or failing its probes (a return from ejection is seen by the next request) |
//! | `tollgate_upstream_ejections_total` | counter | `upstream`, `target` |
//! | `tollgate_upstream_retries_total` | counter | `upstream`, `outcome` (`ok`: the retry got a response head, `failed`) |
//! | `tollgate_upstream_duration_seconds` | histogram | `upstream`: until the upstream's head |
//! | `tollgate_requests_in_flight` | gauge | (none) |
//! | `tollgate_config_reloads_total` | counter | `result` (`ok`, `failed`) |
//! | `tollgate_config_info` | gauge, always 1 | `hash` (SHA-256 of the config and keys file text) |
//! | `tollgate_limiter_backend_errors_total` | counter | `kind` (`timeout`, `io`, `readonly`, `moved`, `tls`, `auth`, `other`) |
//! | `tollgate_redis_info` | gauge, always 1 | `mode` (`single`, `sentinel`, `cluster`), `tls` (`true`, `false`); only with `limits.backend = "redis"` |
//! | `tollgate_limiter_fallbacks_total` | counter | `on_backend_error` (`local`, `allow`, `deny`): requests decided without the Redis backend (error, timeout, or breaker open) |

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::histogram::AtomicHistogram;
use crate::config::{Config, PlanName};

/// `Content-Type` of the `/metrics` answer (Prometheus text format 0.0.4 is a subset of what
/// the OpenMetrics text encoder writes; Prometheus accepts both).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label value for a request that matched no route, or had no plan.
pub const NONE: &str = "none";

/// Latency histogram buckets, in seconds: 1 ms to 30 s.
static LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Status classes counted: 1xx to 5xx (anything else is counted as 5xx).
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A rate-limit outcome, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOutcome {
    /// A token was taken.
    Allowed,
    /// Rejected with 429.
    Limited,
    /// Over the limit, let through by shadow mode.
    WouldLimit,
    /// Rejected because the client IP is blocked (failed auth or repeated 429s).
    IpThrottled,
}

impl LimitOutcome {
    const ALL: [LimitOutcome; 4] = [
        LimitOutcome::Allowed,
        LimitOutcome::Limited,
        LimitOutcome::WouldLimit,
        LimitOutcome::IpThrottled,
    ];

    /// The `decision` label.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitOutcome::Allowed => "allowed",
            LimitOutcome::Limited => "limited",
            LimitOutcome::WouldLimit => "would_limit",
            LimitOutcome::IpThrottled => "ip_throttled",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: &'static str,
    plan: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    plan: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlanLabels {
    plan: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    upstream: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    upstream: String,
    target: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    upstream: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    on_backend_error: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendErrorLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedisInfoLabels {
    mode: &'static str,
    tls: &'static str,
}

/// The `kind`s of `tollgate_limiter_backend_errors_total`, exported from the start.
pub const BACKEND_ERROR_KINDS: [&str; 7] =
    ["timeout", "io", "readonly", "moved", "tls", "auth", "other"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabels {
    hash: String,
}

#[derive(Debug, Clone, Copy)]
struct LatencyHistogram;

impl MetricConstructor<AtomicHistogram> for LatencyHistogram {
    fn new_metric(&self) -> AtomicHistogram {
        AtomicHistogram::new(&LATENCY_BUCKETS)
    }
}

/// Every metric of one gateway, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    quota_exhausted: Family<PlanLabels, Counter>,
    upstream_failures: Family<FailureLabels, Counter>,
    request_duration: AtomicHistogram,
    upstream_duration: Family<UpstreamLabels, AtomicHistogram, LatencyHistogram>,
    target_healthy: Family<TargetLabels, Gauge>,
    ejections: Family<TargetLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    in_flight: Gauge,
    reloads: Family<ResultLabels, Counter>,
    config_info: Family<HashLabels, Gauge>,
    /// The `hash` label currently exported, so a reload can remove it.
    config_hash: Mutex<String>,
    backend_errors: Family<BackendErrorLabels, Counter>,
    backend_fallbacks: Family<FallbackLabels, Counter>,
    redis_info: Family<RedisInfoLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `tollgate_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route prefix, status class and plan",
            requests.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "rate_limit_decisions",
            "Rate-limit decisions, by decision, plan and route",
            decisions.clone(),
        );
        let quota_exhausted = Family::<PlanLabels, Counter>::default();
        registry.register(
            "quota_exhausted",
            "Requests that found their key's monthly quota used up, by plan",
            quota_exhausted.clone(),
        );
        let upstream_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Upstream failures, by upstream and kind",
            upstream_failures.clone(),
        );
        let request_duration = AtomicHistogram::new(&LATENCY_BUCKETS);
        registry.register(
            "request_duration_seconds",
            "Time from the request head to the response head",
            request_duration.clone(),
        );
        let upstream_duration = Family::new_with_constructor(LatencyHistogram);
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding to the upstream's response head (or failure), by upstream",
            upstream_duration.clone(),
        );
        let target_healthy = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "upstream_target_healthy",
            "Whether an upstream target takes requests (1) or is ejected (0)",
            target_healthy.clone(),
        );
        let ejections = Family::<TargetLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Passive ejections of upstream targets, by upstream and target",
            ejections.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent again to another target, by upstream and outcome",
            retries.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests being handled (until their response head)",
            in_flight.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        let config_info = Family::<HashLabels, Gauge>::default();
        registry.register(
            "config_info",
            "The loaded config: SHA-256 of the config and keys file text (always 1)",
            config_info.clone(),
        );
        let backend_errors = Family::<BackendErrorLabels, Counter>::default();
        registry.register(
            "limiter_backend_errors",
            "Rate-limit backend errors and timeouts, by kind",
            backend_errors.clone(),
        );
        let redis_info = Family::<RedisInfoLabels, Gauge>::default();
        registry.register(
            "redis_info",
            "The Redis deployment the limiter uses: mode and TLS (always 1)",
            redis_info.clone(),
        );
        let backend_fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "limiter_fallbacks",
            "Requests decided without the rate-limit backend, by on_backend_error",
            backend_fallbacks.clone(),
        );
        // Series that exist from the start, so dashboards and alerts see zeros, not gaps.
        for result in ["ok", "failed"] {
            reloads.get_or_create_owned(&ResultLabels { result });
        }
        for on_backend_error in ["local", "allow", "deny"] {
            backend_fallbacks.get_or_create_owned(&FallbackLabels { on_backend_error });
        }
        for kind in BACKEND_ERROR_KINDS {
            backend_errors.get_or_create_owned(&BackendErrorLabels { kind });
        }
        Self {
            registry,
            requests,
            decisions,
            quota_exhausted,
            upstream_failures,
            request_duration,
            upstream_duration,
            target_healthy,
            ejections,
            retries,
            in_flight,
            reloads,
            config_info,
            config_hash: Mutex::new(String::new()),
            backend_errors,
            backend_fallbacks,
            redis_info,
        }
    }

    /// The metrics in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records a config as loaded: its hash becomes the `tollgate_config_info` series.
    pub fn config_loaded(&self, config: &Config) {
        let mut current = self.config_hash.lock().unwrap_or_else(|e| e.into_inner());
        if *current != config.source_hash {
            self.config_info.remove(&HashLabels {
                hash: current.clone(),
            });
            *current = config.source_hash.clone();
        }
        self.config_info
            .get_or_create(&HashLabels {
                hash: current.clone(),
            })
            .set(1);
        // One series, the deployment in use; none while the limiter is in process.
        self.redis_info.clear();
        if config.limits.backend == crate::config::LimitBackend::Redis {
            self.redis_info
                .get_or_create(&RedisInfoLabels {
                    mode: config.redis.target.mode_name(),
                    tls: if config.redis.tls { "true" } else { "false" },
                })
                .set(1);
        }
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts an upstream failure (a failure path: the label lookup is fine here).
    pub fn upstream_failure(&self, upstream: &str, kind: &'static str) {
        self.upstream_failures
            .get_or_create(&FailureLabels {
                upstream: upstream.to_owned(),
                kind,
            })
            .inc();
    }

    /// The `tollgate_upstream_failures_total` series of `upstream` and `kind`, to count
    /// without a label lookup (an upstream keeps the one for resets after the head).
    pub fn upstream_failure_counter(&self, upstream: &str, kind: &'static str) -> Counter {
        self.upstream_failures
            .get_or_create(&FailureLabels {
                upstream: upstream.to_owned(),
                kind,
            })
            .clone()
    }

    /// The series of one upstream target, to update without a label lookup: its
    /// `tollgate_upstream_target_healthy` gauge (set to 1 here) and its
    /// `tollgate_upstream_ejections_total` counter.
    pub fn target_series(&self, upstream: &str, target: &str) -> (Gauge, Counter) {
        let labels = TargetLabels {
            upstream: upstream.to_owned(),
            target: target.to_owned(),
        };
        let healthy = self.target_healthy.get_or_create(&labels).clone();
        healthy.set(1);
        (healthy, self.ejections.get_or_create(&labels).clone())
    }

    /// Drops the series of a target a reload removed.
    pub fn forget_target(&self, upstream: &str, target: &str) {
        let labels = TargetLabels {
            upstream: upstream.to_owned(),
            target: target.to_owned(),
        };
        self.target_healthy.remove(&labels);
        self.ejections.remove(&labels);
    }

    /// The `tollgate_upstream_retries_total` series of `upstream`: (`ok`, `failed`).
    pub fn retry_counters(&self, upstream: &str) -> (Counter, Counter) {
        let series = |outcome| {
            self.retries
                .get_or_create(&RetryLabels {
                    upstream: upstream.to_owned(),
                    outcome,
                })
                .clone()
        };
        (series("ok"), series("failed"))
    }

    /// Counts a rate-limit backend error of `kind` (one of [`BACKEND_ERROR_KINDS`]).
    pub fn backend_error(&self, kind: &'static str) {
        self.backend_errors
            .get_or_create(&BackendErrorLabels { kind })
            .inc();
    }

    /// Counts a request decided by `on_backend_error` (`local`, `allow`, `deny`) because the
    /// backend failed or its circuit breaker is open.
    pub fn backend_fallback(&self, on_backend_error: &'static str) {
        self.backend_fallbacks
            .get_or_create(&FallbackLabels { on_backend_error })
            .inc();
    }

    /// Observes one request's time to its response head.
    pub fn request_duration(&self, elapsed: Duration) {
        self.request_duration.observe(elapsed);
    }

    /// Marks a request in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }
}

/// Decrements `tollgate_requests_in_flight` on drop (panics and cancellations included).
#[derive(Debug)]
pub struct InFlight<'m>(&'m Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The per-snapshot table of pre-resolved series: one slot per (route, plan, status class)
/// and (plan, decision), resolved on first use, and one latency histogram per upstream.
#[derive(Debug)]
pub struct SnapshotMetrics {
    metrics: Arc<Metrics>,
    /// Route prefixes in `config.routes` order; index `routes.len()` is "none".
    routes: Vec<String>,
    /// Plan names in `config.plans` order; index `plans.len()` is "none".
    plans: Vec<PlanName>,
    requests: Box<[OnceLock<Counter>]>,
    decisions: Box<[OnceLock<Counter>]>,
    upstream_duration: Vec<AtomicHistogram>,
}

/// Which route and plan a request was counted under (indexes into its snapshot's table).
#[derive(Debug, Clone, Copy, Default)]
pub struct Labels {
    /// Index in `config.routes`, when a route matched.
    pub route: Option<usize>,
    /// Index in `config.plans`, when the request was charged to a plan.
    pub plan: Option<usize>,
}

impl SnapshotMetrics {
    /// The table for `config`.
    pub fn new(metrics: Arc<Metrics>, config: &Config) -> Self {
        let routes: Vec<String> = config.routes.iter().map(|r| r.prefix.clone()).collect();
        // In `config.plans` order: key records carry their plan's index in it
        // (`KeyRecord::plan_index`).
        let plans: Vec<PlanName> = config.plans.keys().cloned().collect();
        let slots = |n: usize| (0..n).map(|_| OnceLock::new()).collect();
        let upstream_duration = config
            .upstreams
            .iter()
            .map(|u| {
                metrics
                    .upstream_duration
                    .get_or_create_owned(&UpstreamLabels {
                        upstream: u.name.clone(),
                    })
            })
            .collect();
        Self {
            requests: slots((routes.len() + 1) * (plans.len() + 1) * STATUS_CLASSES.len()),
            decisions: slots((routes.len() + 1) * (plans.len() + 1) * LimitOutcome::ALL.len()),
            routes,
            plans,
            upstream_duration,
            metrics,
        }
    }

    /// The gateway-wide metrics.
    pub fn global(&self) -> &Metrics {
        &self.metrics
    }

    /// The index of the plan named `plan` in the table (a handful of short string compares).
    pub fn plan_index(&self, plan: &str) -> Option<usize> {
        self.plans.iter().position(|p| &*p.0 == plan)
    }

    /// The plan at `index`.
    pub fn plan(&self, index: usize) -> Option<&PlanName> {
        self.plans.get(index)
    }

    /// Counts an answered request.
    pub fn request(&self, labels: Labels, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        let route = labels.route.unwrap_or(self.routes.len());
        let plan = labels.plan.unwrap_or(self.plans.len());
        let slot = (route * (self.plans.len() + 1) + plan) * STATUS_CLASSES.len() + class;
        self.requests[slot]
            .get_or_init(|| {
                self.metrics.requests.get_or_create_owned(&RequestLabels {
                    route: self.routes.get(route).cloned().unwrap_or(NONE.into()),
                    status: STATUS_CLASSES[class],
                    plan: self.plan_label(plan),
                })
            })
            .inc();
    }

    /// Counts a rate-limit decision, under the request's route and plan (as far as known).
    pub fn decision(&self, outcome: LimitOutcome, labels: Labels) {
        let plan = labels.plan.unwrap_or(self.plans.len());
        let route = labels.route.unwrap_or(self.routes.len());
        let index = outcome as usize;
        let slot = (route * (self.plans.len() + 1) + plan) * LimitOutcome::ALL.len() + index;
        self.decisions[slot]
            .get_or_init(|| {
                self.metrics.decisions.get_or_create_owned(&DecisionLabels {
                    decision: outcome.as_str(),
                    plan: self.plan_label(plan),
                    route: self.routes.get(route).cloned().unwrap_or(NONE.into()),
                })
            })
            .inc();
    }

    /// Counts a request that found its key's monthly quota used up.
    pub fn quota_exhausted(&self, plan: Option<usize>) {
        let plan = self.plan_label(plan.unwrap_or(self.plans.len()));
        self.metrics
            .quota_exhausted
            .get_or_create_owned(&PlanLabels { plan })
            .inc();
    }

    /// Observes the time an upstream (by index in `config.upstreams`) took to answer.
    pub fn upstream_duration(&self, upstream: usize, elapsed: Duration) {
        if let Some(histogram) = self.upstream_duration.get(upstream) {
            histogram.observe(elapsed);
        }
    }

    fn plan_label(&self, plan: usize) -> String {
        self.plans
            .get(plan)
            .map(|p| p.0.to_string())
            .unwrap_or(NONE.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_text(
            std::path::Path::new("t.toml"),
            "[[upstreams]]\nname = \"core\"\nurl = \"http://127.0.0.1:1\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"core\"\n",
        )
        .unwrap()
    }

    #[test]
    fn table_slots_encode_with_their_labels() {
        let metrics = Arc::new(Metrics::new());
        let config = config();
        metrics.config_loaded(&config);
        let table = SnapshotMetrics::new(metrics.clone(), &config);
        let pro = table.plan_index("pro");
        let labels = Labels {
            route: Some(0),
            plan: pro,
        };
        table.request(labels, http::StatusCode::OK);
        table.request(labels, http::StatusCode::OK);
        table.request(Labels::default(), http::StatusCode::NOT_FOUND);
        table.decision(LimitOutcome::Limited, labels);
        table.decision(LimitOutcome::IpThrottled, Labels::default());
        table.quota_exhausted(pro);
        table.upstream_duration(0, Duration::from_millis(3));
        let text = metrics.encode();
        for line in [
            "tollgate_requests_total{route=\"/v1/\",status=\"2xx\",plan=\"pro\"} 2",
            "tollgate_requests_total{route=\"none\",status=\"4xx\",plan=\"none\"} 1",
            "tollgate_rate_limit_decisions_total{decision=\"limited\",plan=\"pro\",route=\"/v1/\"} 1",
            "tollgate_rate_limit_decisions_total{decision=\"ip_throttled\",plan=\"none\",route=\"none\"} 1",
            "tollgate_quota_exhausted_total{plan=\"pro\"} 1",
            "tollgate_upstream_duration_seconds_count{upstream=\"core\"} 1",
            "tollgate_config_reloads_total{result=\"ok\"} 0",
            "tollgate_limiter_backend_errors_total{kind=\"tls\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains(&format!(
            "tollgate_config_info{{hash=\"{}\"}} 1",
            config.source_hash
        )));
    }

    #[test]
    fn a_new_config_hash_replaces_the_old_series() {
        let metrics = Metrics::new();
        let mut config = config();
        metrics.config_loaded(&config);
        config.source_hash = "other".into();
        metrics.config_loaded(&config);
        let text = metrics.encode();
        assert_eq!(text.matches("tollgate_config_info{").count(), 1, "{text}");
        assert!(text.contains("tollgate_config_info{hash=\"other\"} 1"));
    }
}
