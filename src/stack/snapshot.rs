//! A config as the pipeline runs it: the snapshot of everything built from one load,
//! swapped whole on reload.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::KeyStore;
use crate::config::{Config, KeyConfig, KeyId, KeyStoreKind, PlanName};
use crate::error::ErrorRenderer;
use crate::limit::bucket::buckets_for;
use crate::limit::charge::{Layout, QuotaTable};
use crate::limit::headers::PolicyHeaders;
use crate::limit::{KeyedLimiter, LimiterBackend};
use crate::observability::metrics::{Metrics, SnapshotMetrics};
use crate::proxy::{Resolver, Upstream};
use crate::route::Router;

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
    pub(super) anonymous_plan: Option<usize>,
    /// Every key's monthly quota count, handed from snapshot to snapshot.
    pub quotas: Arc<QuotaTable>,
    /// `auth.store = "redis"`: the keys loaded from Redis, built against this snapshot's
    /// plans and swapped as Redis changes (see [`Gateway::set_shared_keys`]).
    pub shared_keys: Option<ArcSwap<KeyStore>>,
    /// `auth.store = "redis"`: ids of the config's own keys, which a Redis key cannot take.
    config_key_ids: HashSet<KeyId>,
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
    pub fn new(
        mut config: Config,
        previous: Option<&Snapshot>,
        metrics: &Arc<Metrics>,
        resolver: &Resolver,
    ) -> Self {
        let key_list = std::mem::take(&mut config.keys);
        // Quota counts live for the process: a reload keeps every one.
        let quotas = previous.map_or_else(Default::default, |p| p.quotas.clone());
        let redis_store = config.auth.store == KeyStoreKind::Redis;
        let config_key_ids = if redis_store {
            key_list.iter().map(|k| k.id.clone()).collect()
        } else {
            HashSet::new()
        };
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
            keys: KeyStore::build(
                key_list,
                &config.plans,
                Layout {
                    routes: &config.routes,
                    quotas: &quotas,
                },
                previous.map(|p| &p.keys),
            ),
            quotas: quotas.clone(),
            upstreams: config
                .upstreams
                .iter()
                .map(|u| {
                    let old =
                        previous.and_then(|p| p.upstreams.iter().find(|o| o.config.name == u.name));
                    Upstream::new(u, old, metrics, resolver)
                })
                .collect(),
            anonymous,
            backend: LimiterBackend::new(
                &config.limits,
                &config.redis,
                previous.map(|p| &p.backend),
            ),
            metrics: SnapshotMetrics::new(metrics.clone(), &config),
            anonymous_plan: config.plans.keys().position(|p| &*p.0 == ANONYMOUS_PLAN),
            shared_keys: redis_store.then(|| ArcSwap::from_pointee(KeyStore::default())),
            config_key_ids,
            config,
        }
    }

    /// A store of `keys` (from Redis) for this snapshot: against its plans, keeping the
    /// buckets of `previous`, leaving out (and logging) keys whose plan is not defined here
    /// or whose id is one of the config's own.
    pub(super) fn shared_store(&self, keys: &[KeyConfig], previous: Option<&KeyStore>) -> KeyStore {
        let usable: Vec<KeyConfig> = keys
            .iter()
            .filter(|k| {
                let ok = self.config.plans.contains_key(&k.plan)
                    && !self.config_key_ids.contains(&k.id);
                if !ok {
                    tracing::warn!(key_id = &*k.id.0, plan = &*k.plan.0, "key store: a key in Redis is left out: its plan is not defined, or its id is one of the config's keys");
                }
                ok
            })
            .cloned()
            .collect();
        KeyStore::from_keys(usable, &self.config.plans, previous)
    }
}
