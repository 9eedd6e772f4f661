//! Property tests for route costs, route buckets and monthly quotas (proptest): for random
//! sequences of requests over routes with costs, one key's plan bucket, route buckets and
//! quota behave exactly as a model of whole tokens and counts, all or none; and under
//! concurrency no bucket or quota gives out more than it holds.
//!
//! Buckets refill one token a minute, so nothing refills while a case runs.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use proptest::prelude::*;
use tollgate::config::{KeyId, Plan, RouteBucket, RouteConfig, RouteTarget};
use tollgate::limit::charge::{KeySpec, Layout, QuotaTable};
use tollgate::limit::{KeyLimits, Reason};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// Three routes: 0 has no route bucket, 1 and 2 have one each (depths `routes`).
fn routes() -> Vec<RouteConfig> {
    ["/a/", "/b/", "/c/"]
        .iter()
        .map(|p| RouteConfig {
            prefix: (*p).to_owned(),
            target: RouteTarget::Upstream(0),
            scopes: vec![],
            methods: None,
            auth: true,
            strip_prefix: false,
            cost: 1,
        })
        .collect()
}

fn plan(burst: u32, quota: Option<u32>, route_depths: [u32; 2]) -> Plan {
    Plan {
        requests_per_minute: nz(1),
        burst: nz(burst),
        requests_per_hour: None,
        requests_per_day: None,
        requests_per_month: quota.map(nz),
        routes: ["/b/", "/c/"]
            .iter()
            .zip(route_depths)
            .map(|(p, depth)| {
                (
                    (*p).to_owned(),
                    RouteBucket {
                        requests_per_minute: nz(1),
                        burst: nz(depth),
                        requests_per_hour: None,
                        requests_per_day: None,
                    },
                )
            })
            .collect(),
    }
}

fn limits(plan: &Plan, routes: &[RouteConfig], quotas: &QuotaTable) -> Arc<KeyLimits> {
    let none = BTreeMap::new();
    let id = KeyId(Arc::from("k"));
    let spec = KeySpec {
        plan_name: "p",
        plan,
        custom_per_minute: None,
        requests_per_month: None,
        routes: &none,
        id: &id,
    };
    KeyLimits::build(&spec, Layout { routes, quotas }, None)
}

/// What the model expects of one request.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Admitted,
    Refused(Reason),
}

/// Whole tokens and counts: the plan bucket, the two route buckets, the quota left.
struct Model {
    plan: u32,
    routes: [u32; 2],
    quota: Option<u32>,
}

impl Model {
    fn request(&mut self, route: usize, cost: u32) -> Expected {
        if cost == 0 {
            return Expected::Admitted;
        }
        let route_left = route.checked_sub(1).map(|r| self.routes[r]);
        if route_left.is_some_and(|left| left < cost) {
            return Expected::Refused(Reason::Route);
        }
        if self.quota.is_some_and(|left| left < cost) {
            return Expected::Refused(Reason::Quota);
        }
        if self.plan < cost {
            return Expected::Refused(Reason::Bucket);
        }
        self.plan -= cost;
        if let Some(r) = route.checked_sub(1) {
            self.routes[r] -= cost;
        }
        if let Some(quota) = &mut self.quota {
            *quota -= cost;
        }
        Expected::Admitted
    }
}

/// Waits long enough for any core's clock to read past the last charge (seen here: a look
/// right after a charge, on another core, found one token fewer than the charge left).
fn let_the_clock_pass() {
    std::thread::sleep(std::time::Duration::from_micros(100));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn charges_match_the_model_all_or_none(
        burst in 1u32..40,
        quota in prop::option::of(1u32..40),
        depths in [1u32..20, 1u32..20],
        requests in prop::collection::vec((0usize..3, 0u32..6), 1..60),
    ) {
        let routes = routes();
        let quotas = QuotaTable::default();
        let l = limits(&plan(burst, quota, depths), &routes, &quotas);
        let mut model = Model { plan: burst, routes: depths, quota };
        for (i, (route, cost)) in requests.into_iter().enumerate() {
            let (decision, _) = l.charge(route, cost);
            let expected = model.request(route, cost);
            let got = if decision.allowed {
                Expected::Admitted
            } else {
                Expected::Refused(decision.reason)
            };
            prop_assert_eq!(got, expected, "request {} to route {} of cost {}", i, route, cost);
            // The plan bucket holds exactly what the model says (looked at, not charged). The
            // look reads the clock again, maybe on another core whose TSC reads a hair behind
            // the charge's: let the clock pass the charge first (a refill is a minute away).
            let_the_clock_pass();
            prop_assert_eq!(l.limiter.look().remaining, model.plan);
        }
        let extras = l.extras.as_deref().expect("route buckets make extras");
        let_the_clock_pass();
        for (r, left) in extras.routes.iter().zip(model.routes) {
            prop_assert_eq!(r.limiter.look().remaining, left, "route {}", &r.prefix);
        }
        if let (Some(quota), Some(left)) = (&extras.quota, model.quota) {
            let used = quota.counter.used(tollgate::limit::quota::unix_now());
            prop_assert_eq!(u64::from(quota.limit.get()) - used, u64::from(left));
        }
    }
}

/// Eight threads race random requests at one key: no bucket and no quota gives out more
/// than it holds, and what each gave out is exactly what the admitted requests cost it.
#[test]
fn under_concurrency_nothing_is_given_out_twice() {
    let routes = routes();
    for round in 0..20u32 {
        let quotas = QuotaTable::default();
        let (burst, quota, depths) = (50 + round, 45, [20, 30 - round / 2]);
        let l = limits(&plan(burst, Some(quota), depths), &routes, &quotas);
        let admitted: Vec<Vec<(usize, u32)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u32)
                .map(|t| {
                    let l = &l;
                    s.spawn(move || {
                        let mut admitted = Vec::new();
                        for i in 0..40u32 {
                            let route = ((t + i) % 3) as usize;
                            let cost = (t * 7 + i * 3 + round) % 5;
                            if l.charge(route, cost).0.allowed {
                                admitted.push((route, cost));
                            }
                        }
                        admitted
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<(usize, u32)> = admitted.into_iter().flatten().collect();
        let cost_of = |f: &dyn Fn(usize) -> bool| -> u32 {
            all.iter().filter(|(r, _)| f(*r)).map(|(_, c)| c).sum()
        };
        let plan_cost = cost_of(&|_| true);
        assert!(plan_cost <= burst.min(quota), "round {round}: {plan_cost}");
        assert_eq!(
            l.limiter.look().remaining,
            burst - plan_cost,
            "round {round}"
        );
        let extras = l.extras.as_deref().unwrap();
        for (i, r) in extras.routes.iter().enumerate() {
            let spent = cost_of(&|route| route == i + 1);
            assert!(spent <= depths[i], "round {round}: route {i} gave {spent}");
            assert_eq!(
                r.limiter.look().remaining,
                depths[i] - spent,
                "round {round}"
            );
        }
        let used = extras
            .quota
            .as_ref()
            .unwrap()
            .counter
            .used(tollgate::limit::quota::unix_now());
        assert_eq!(used, u64::from(plan_cost), "round {round}");
    }
}
