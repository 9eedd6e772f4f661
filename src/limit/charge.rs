//! One charge decision over everything a request touches: the key's plan buckets, the
//! route's bucket for this key (`[plans.<name>.routes."<prefix>"]`, or the key's own
//! `routes`) and the monthly quota, each taking the route's `cost` in tokens, all or none.
//!
//! A key whose plan has neither route buckets nor a quota charges its plan buckets alone,
//! as before ([`Limiter::check_n`]), with no lock. A key with either has [`Extras`]: its
//! decisions take the key's own lock, under which the route bucket and the quota are looked
//! at, then the plan buckets charged (one atomic step of their own), and only if those admit
//! is the route bucket charged and the quota counted. Every change to the route bucket and
//! the quota happens under the lock, so what was looked at is what is charged: a request the
//! route bucket or the quota refuses takes nothing from the plan buckets, and one the plan
//! buckets refuse takes nothing from the route bucket or the quota. Every request of such a
//! key goes through the lock, so no request of it charges the plan buckets in between.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderValue;

use super::bucket::{BucketSpec, Decision, Reason, buckets_for, tsc_now};
use super::headers::{PolicyHeaders, limit_value, unix_time};
use super::quota::{QuotaCounter, period};
use super::{KeyLimits, Limiter, Window};
use crate::config::{KeyId, Plan, RouteBucket, RouteConfig};

/// A key's bucket for one route.
#[derive(Debug)]
pub struct RouteLimiter {
    /// The route's index in the config's routes.
    pub route: usize,
    /// The route's prefix, as a 429 names it.
    pub prefix: Arc<str>,
    /// The buckets (peekable); shared across reloads while the limits are unchanged.
    pub limiter: Arc<Limiter>,
    /// Header parts for requests to this route: the plan's buckets, these, the quota.
    pub policy: PolicyHeaders,
}

/// A key's monthly quota.
#[derive(Debug)]
pub struct Quota {
    /// `requests_per_month`.
    pub limit: NonZeroU32,
    /// `X-RateLimit-Limit` for it, built once.
    limit_value: &'static HeaderValue,
    /// The count, shared across reloads (see [`QuotaTable`]).
    pub counter: Arc<QuotaCounter>,
}

/// What a key has besides its plan buckets.
#[derive(Debug)]
pub struct Extras {
    /// Route buckets, one per route that has one for this key.
    pub routes: Box<[RouteLimiter]>,
    /// The monthly quota, if any.
    pub quota: Option<Quota>,
    /// Header parts for requests to routes without a route bucket: the plan's buckets and
    /// the quota.
    pub policy: PolicyHeaders,
    /// Serializes this key's decisions (see the module doc).
    lock: Mutex<()>,
}

/// Every key's quota counter, by key id: one table for the process, handed from snapshot
/// to snapshot, so a reload keeps every count whatever happens to the key's limits.
#[derive(Debug, Default)]
pub struct QuotaTable(DashMap<Arc<str>, Arc<QuotaCounter>>);

impl QuotaTable {
    /// The counter of key `id` (a new, empty one the first time).
    pub fn counter(&self, id: &KeyId) -> Arc<QuotaCounter> {
        if let Some(counter) = self.0.get(&*id.0) {
            return counter.clone();
        }
        self.0.entry(id.0.clone()).or_default().clone()
    }

    /// Sets key `id`'s count (from the state file): the counter its records already share,
    /// if it has one.
    pub fn seed(&self, id: &str, month: super::quota::MonthIndex, used: u64) {
        self.counter(&KeyId(Arc::from(id))).restore(month, used);
    }

    /// Every (key id, month, used), sorted by id.
    pub fn entries(&self) -> Vec<(Arc<str>, super::quota::MonthIndex, u64)> {
        let mut out: Vec<_> = self
            .0
            .iter()
            .map(|e| {
                let (month, used) = e.value().stored();
                (e.key().clone(), month, used)
            })
            .filter(|(_, _, used)| *used > 0)
            .collect();
        out.sort();
        out
    }
}

/// What the builder of key records needs to know of the config beyond plans.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'c> {
    /// The routes, for route bucket prefixes and costs.
    pub routes: &'c [RouteConfig],
    /// The process's quota counters.
    pub quotas: &'c QuotaTable,
}

impl Layout<'_> {
    /// Whether some route costs 0: its requests report the plan buckets without charging
    /// them, so every key's buckets must be ones that can be looked at.
    fn any_free_route(&self) -> bool {
        self.routes.iter().any(|r| r.cost == 0)
    }
}

/// A key's limits: its plan (and custom rate), its route buckets and quota.
pub struct KeySpec<'k> {
    /// The plan's name, for header policy names.
    pub plan_name: &'k str,
    /// The plan.
    pub plan: &'k Plan,
    /// `[[keys]] requests_per_minute`.
    pub custom_per_minute: Option<NonZeroU32>,
    /// `[[keys]] requests_per_month`.
    pub requests_per_month: Option<NonZeroU32>,
    /// `[[keys]] routes`.
    pub routes: &'k BTreeMap<String, RouteBucket>,
    /// The key's id, for its quota counter.
    pub id: &'k KeyId,
}

impl KeySpec<'_> {
    fn quota(&self) -> Option<NonZeroU32> {
        self.requests_per_month.or(self.plan.requests_per_month)
    }

    /// (route index, prefix, bucket specs) of each route this key has a bucket for: the
    /// key's own override, else the plan's. Prefixes that name no route are left out.
    fn route_specs(&self, routes: &[RouteConfig]) -> Vec<(usize, Arc<str>, Vec<BucketSpec>)> {
        let mut out = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            let bucket = self
                .routes
                .get(&route.prefix)
                .or_else(|| self.plan.routes.get(&route.prefix));
            if let Some(bucket) = bucket {
                out.push((
                    index,
                    Arc::from(route.prefix.as_str()),
                    route_bucket_specs(bucket),
                ));
            }
        }
        out
    }
}

/// The buckets of a route bucket's limits.
pub fn route_bucket_specs(bucket: &RouteBucket) -> Vec<BucketSpec> {
    let as_plan = Plan {
        requests_per_minute: bucket.requests_per_minute,
        burst: bucket.burst,
        requests_per_hour: bucket.requests_per_hour,
        requests_per_day: bucket.requests_per_day,
        requests_per_month: None,
        routes: BTreeMap::new(),
    };
    buckets_for(&as_plan, None)
}

impl KeyLimits {
    /// The limits of `key`, reusing what `previous` (the key's record before a reload) has
    /// that is unchanged: the whole thing if nothing changed, else each route bucket whose
    /// limits are the same. The quota count is always the process's one.
    pub fn build(
        key: &KeySpec<'_>,
        layout: Layout<'_>,
        previous: Option<&Arc<KeyLimits>>,
    ) -> Arc<Self> {
        let specs = buckets_for(key.plan, key.custom_per_minute);
        let route_specs = key.route_specs(layout.routes);
        let quota = key.quota();
        let has_extras = quota.is_some() || !route_specs.is_empty();
        let peekable = has_extras || layout.any_free_route();
        if let Some(prev) = previous
            && prev.limiter.specs() == specs.as_slice()
            && prev.limiter.is_peekable() == peekable
            && *prev.plan_name == *key.plan_name
            && prev.same_extras(&route_specs, quota)
        {
            return prev.clone();
        }
        let limiter = if peekable {
            Limiter::peekable(&specs, Default::default())
        } else {
            Limiter::new(&specs, Default::default())
        };
        let extras = has_extras.then(|| {
            let routes = route_specs
                .into_iter()
                .map(|(route, prefix, rspecs)| {
                    let old = previous
                        .and_then(|p| p.extras.as_ref())
                        .and_then(|e| e.routes.iter().find(|r| r.prefix == prefix))
                        .filter(|r| r.limiter.specs() == rspecs.as_slice())
                        .map(|r| r.limiter.clone());
                    RouteLimiter {
                        route,
                        policy: PolicyHeaders::with_route(
                            key.plan_name,
                            &specs,
                            Some((&prefix, &rspecs)),
                            quota,
                        ),
                        limiter: old.unwrap_or_else(|| {
                            Arc::new(Limiter::peekable(&rspecs, Default::default()))
                        }),
                        prefix,
                    }
                })
                .collect();
            Box::new(Extras {
                routes,
                quota: quota.map(|limit| Quota {
                    limit,
                    limit_value: limit_value(limit.get()),
                    counter: layout.quotas.counter(key.id),
                }),
                policy: PolicyHeaders::with_route(key.plan_name, &specs, None, quota),
                lock: Mutex::new(()),
            })
        });
        Arc::new(KeyLimits {
            policy: PolicyHeaders::new(key.plan_name, &specs),
            limiter,
            plan_name: Arc::from(key.plan_name),
            extras,
        })
    }

    fn same_extras(
        &self,
        routes: &[(usize, Arc<str>, Vec<BucketSpec>)],
        quota: Option<NonZeroU32>,
    ) -> bool {
        match &self.extras {
            None => routes.is_empty() && quota.is_none(),
            Some(extras) => {
                extras.quota.as_ref().map(|q| q.limit) == quota
                    && extras.routes.len() == routes.len()
                    && extras
                        .routes
                        .iter()
                        .zip(routes)
                        .all(|(a, (index, prefix, specs))| {
                            a.route == *index
                                && a.prefix == *prefix
                                && a.limiter.specs() == specs.as_slice()
                        })
            }
        }
    }

    /// Charges a request of `cost` tokens to route `route` (its index): the plan buckets
    /// alone, or with the route bucket and the quota, all or none (see the module doc).
    /// Returns the decision and the header parts that describe it.
    #[inline]
    pub fn charge(&self, route: usize, cost: u32) -> (Decision, &PolicyHeaders) {
        // A key with extras always has a peekable limiter: a plain key's decision reads the
        // limiter's first cache line, as before, and not the `extras` field beyond it.
        if !self.limiter.is_peekable() {
            return (self.limiter.check_n(cost), &self.policy);
        }
        match &self.extras {
            None => (self.limiter.check_n(cost), &self.policy),
            Some(extras) => {
                // The quota's clock is the one the headers are written from, so that
                // `X-RateLimit-Reset` lands on the month's end.
                let at = tsc_now();
                extras.charge(&self.limiter, route, cost, (unix_time(at), at))
            }
        }
    }
}

impl Extras {
    /// The route bucket of route `route`, if this key has one.
    pub fn route(&self, route: usize) -> Option<&RouteLimiter> {
        self.routes.iter().find(|r| r.route == route)
    }

    /// [`KeyLimits::charge`] for a key with route buckets or a quota, at wall-clock `now`.
    pub fn charge<'a>(
        &'a self,
        plan: &Limiter,
        route: usize,
        cost: u32,
        (now, at): (Duration, u64),
    ) -> (Decision, &'a PolicyHeaders) {
        let route = self.route(route);
        let policy = route.map_or(&self.policy, |r| &r.policy);
        let route_offset = plan.specs().len();
        let quota_index = route_offset + route.map_or(0, |r| r.limiter.specs().len());
        let as_route = |mut d: Decision| {
            d.bucket += route_offset;
            d.reason = Reason::Route;
            d
        };
        let Some(n) = NonZeroU32::new(cost) else {
            return (plan.look(), policy);
        };
        let unix = now.as_secs();
        let _held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(refused) = route.and_then(|r| r.limiter.peek_n(n)) {
            return (as_route(refused), policy);
        }
        let quota_after = match &self.quota {
            Some(quota) => match quota.counter.check(quota.limit.get(), cost, unix) {
                Some(after) => Some(after),
                None => return (quota.decision(false, 0, (now, at), quota_index), policy),
            },
            None => None,
        };
        let mut report = plan.check_n(cost);
        if !report.allowed {
            return (report, policy);
        }
        if let Some(route) = route {
            let charged = as_route(route.limiter.check_n(cost));
            if charged.remaining < report.remaining || !charged.allowed {
                report = charged;
            }
        }
        if let (Some(quota), Some(after)) = (&self.quota, quota_after) {
            quota.counter.charge(after, unix);
            let left = u64::from(quota.limit.get()).saturating_sub(after);
            let counted = quota.decision(true, left, (now, at), quota_index);
            if counted.remaining < report.remaining {
                report = counted;
            }
        }
        (report, policy)
    }
}

impl KeyLimits {
    /// What `GET /usage/<key id>` reports of these limits at wall-clock `unix` seconds: the
    /// month, its quota use (`limit` and `remaining` null without a quota) and each route
    /// bucket's whole tokens left, looked at without charging.
    pub fn usage(&self, unix: u64) -> serde_json::Value {
        let (start, end) = period(unix);
        let rfc3339 = |secs: u64| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .to_string()
        };
        let extras = self.extras.as_deref();
        let quota = extras.and_then(|e| e.quota.as_ref());
        let used = quota.map_or(0, |q| q.counter.used(unix));
        let routes: serde_json::Map<String, serde_json::Value> = extras
            .map(|e| &e.routes[..])
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let look = r.limiter.look();
                (
                    r.prefix.to_string(),
                    serde_json::json!({
                        "limit": look.spec.limit.get(),
                        "window": look.spec.window.name(),
                        "remaining": look.remaining,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "period_start": rfc3339(start),
            "period_end": rfc3339(end),
            "used": used,
            "limit": quota.map(|q| q.limit.get()),
            "remaining": quota.map(|q| u64::from(q.limit.get()).saturating_sub(used)),
            "routes": routes,
        })
    }
}

impl Quota {
    /// The quota as a decision at wall-clock `now`: `remaining` left this month, full again
    /// at the next month's start.
    pub fn decision(
        &self,
        allowed: bool,
        remaining: u64,
        (now, at): (Duration, u64),
        bucket: usize,
    ) -> Decision {
        let (_, end) = period(now.as_secs());
        let until = Duration::from_secs(end).saturating_sub(now);
        // `X-RateLimit-Reset` rounds up, from a clock read that may be placed a few
        // microseconds later on the thread that writes the headers: a millisecond less keeps
        // it on the month's first second.
        let reset_after = until.saturating_sub(Duration::from_millis(1));
        Decision {
            allowed,
            spec: BucketSpec {
                window: Window::Month,
                limit: self.limit,
                burst: self.limit,
            },
            bucket,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            reset_after,
            retry_after: if allowed { Duration::ZERO } else { until },
            limit_value: self.limit_value,
            at,
            reason: Reason::Quota,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn plan(burst: u32, quota: Option<u32>, route: Option<(&str, u32)>) -> Plan {
        Plan {
            requests_per_minute: nz(1),
            burst: nz(burst),
            requests_per_hour: None,
            requests_per_day: None,
            requests_per_month: quota.map(nz),
            routes: route
                .into_iter()
                .map(|(prefix, burst)| {
                    (
                        prefix.to_owned(),
                        RouteBucket {
                            requests_per_minute: nz(1),
                            burst: nz(burst),
                            requests_per_hour: None,
                            requests_per_day: None,
                        },
                    )
                })
                .collect(),
        }
    }

    fn routes(prefixes: &[&str]) -> Vec<RouteConfig> {
        prefixes
            .iter()
            .map(|p| RouteConfig {
                prefix: (*p).to_owned(),
                target: crate::config::RouteTarget::Upstream(0),
                scopes: vec![],
                methods: None,
                auth: true,
                strip_prefix: false,
                cost: 1,
            })
            .collect()
    }

    fn limits(plan: &Plan, routes: &[RouteConfig], quotas: &QuotaTable) -> Arc<KeyLimits> {
        let no_routes = BTreeMap::new();
        let id = KeyId(Arc::from("k"));
        let spec = KeySpec {
            plan_name: "pro",
            plan,
            custom_per_minute: None,
            requests_per_month: None,
            routes: &no_routes,
            id: &id,
        };
        KeyLimits::build(&spec, Layout { routes, quotas }, None)
    }

    /// 2026-12-31T23:59:50Z: ten seconds before 2027.
    const NEW_YEARS_EVE: Duration = Duration::from_secs(1_798_761_590);

    #[test]
    fn a_quota_near_the_month_end_resets_at_midnight_and_admits_again() {
        let quotas = QuotaTable::default();
        let l = limits(&plan(100, Some(5), None), &routes(&["/"]), &quotas);
        let extras = l.extras.as_deref().expect("a quota makes extras");
        let at = (NEW_YEARS_EVE, 0);
        for left in (0..5).rev() {
            let (d, _) = extras.charge(&l.limiter, 0, 1, at);
            assert!(d.allowed);
            assert_eq!((d.reason, d.remaining), (Reason::Quota, left));
        }
        let (d, _) = extras.charge(&l.limiter, 0, 1, at);
        assert!(!d.allowed, "the 6th");
        assert_eq!(d.reason, Reason::Quota);
        assert_eq!(
            d.retry_after,
            Duration::from_secs(10),
            "ten seconds to January"
        );
        assert_eq!(d.limit_value, "5");
        // The refusal took no plan token: 100 - 5 left.
        assert_eq!(l.limiter.look().remaining, 95);
        // At midnight the new month admits again.
        let january = (NEW_YEARS_EVE + Duration::from_secs(10), 0);
        let (d, _) = extras.charge(&l.limiter, 0, 1, january);
        assert!(d.allowed);
        assert_eq!(
            quotas
                .counter(&KeyId(Arc::from("k")))
                .used(january.0.as_secs()),
            1
        );
    }

    #[test]
    fn all_or_none_over_plan_route_and_quota() {
        let quotas = QuotaTable::default();
        let r = routes(&["/", "/reports/"]);
        let l = limits(&plan(4, Some(100), Some(("/reports/", 2))), &r, &quotas);
        let extras = l.extras.as_deref().unwrap();
        let counter = quotas.counter(&KeyId(Arc::from("k")));
        let now = (NEW_YEARS_EVE, 0);
        // Route bucket 2 at cost 1: two pass, then the route refuses and takes nothing else.
        for _ in 0..2 {
            assert!(extras.charge(&l.limiter, 1, 1, now).0.allowed);
        }
        let (d, _) = extras.charge(&l.limiter, 1, 1, now);
        assert_eq!((d.allowed, d.reason), (false, Reason::Route));
        assert_eq!(d.bucket, 1, "after the plan's one bucket");
        assert_eq!(
            counter.used(now.0.as_secs()),
            2,
            "the refusal is not counted"
        );
        // The look reads the clock again: let it pass the charges' instant, so a clock read
        // on another core a hair behind (the TSC of a VM) cannot round a token away.
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(l.limiter.look().remaining, 2, "nor charged to the plan");
        // The plan bucket (2 left) refuses a cost of 3 on the other route; nothing counted.
        let (d, _) = extras.charge(&l.limiter, 0, 3, now);
        assert_eq!((d.allowed, d.reason), (false, Reason::Bucket));
        assert_eq!(counter.used(now.0.as_secs()), 2);
        // Cost 0 charges nothing and reports the plan.
        let (d, _) = extras.charge(&l.limiter, 1, 0, now);
        assert!(d.allowed);
        assert_eq!((d.reason, d.remaining), (Reason::Bucket, 2));
        assert_eq!(counter.used(now.0.as_secs()), 2);
    }

    #[test]
    fn a_reload_keeps_unchanged_route_buckets_and_every_quota_count() {
        let quotas = QuotaTable::default();
        let r = routes(&["/", "/reports/"]);
        let before = limits(&plan(10, Some(100), Some(("/reports/", 3))), &r, &quotas);
        let now = (NEW_YEARS_EVE, 0);
        let extras = before.extras.as_deref().unwrap();
        assert!(extras.charge(&before.limiter, 1, 2, now).0.allowed);
        // Same limits: the same record.
        let id = KeyId(Arc::from("k"));
        let no_routes = BTreeMap::new();
        let rebuild = |p: &Plan, prev| {
            let spec = KeySpec {
                plan_name: "pro",
                plan: p,
                custom_per_minute: None,
                requests_per_month: None,
                routes: &no_routes,
                id: &id,
            };
            KeyLimits::build(
                &spec,
                Layout {
                    routes: &r,
                    quotas: &quotas,
                },
                Some(prev),
            )
        };
        let same = rebuild(&plan(10, Some(100), Some(("/reports/", 3))), &before);
        assert!(Arc::ptr_eq(&same, &before));
        // A new quota and plan burst: the route bucket (1 left) and the count (2) are kept.
        let after = rebuild(&plan(20, Some(50), Some(("/reports/", 3))), &before);
        let extras = after.extras.as_deref().unwrap();
        assert_eq!(extras.routes[0].limiter.look().remaining, 1);
        assert_eq!(
            extras.quota.as_ref().unwrap().counter.used(now.0.as_secs()),
            2
        );
        assert_eq!(
            after.limiter.look().remaining,
            20,
            "the plan bucket changed: new"
        );
        // A route bucket whose limits changed starts full.
        let changed = rebuild(&plan(20, Some(50), Some(("/reports/", 4))), &after);
        assert_eq!(
            changed.extras.as_ref().unwrap().routes[0]
                .limiter
                .look()
                .remaining,
            4
        );
    }
}
