//! Route costs, route buckets and monthly quotas: `[[routes]] cost`,
//! `[plans.<name>.routes."<prefix>"]`, `requests_per_month`, and a key's overrides of them.
//!
//! Route buckets and quotas are read with their plan or key; what needs the whole config (a
//! route table key that names no route, a cost no bucket could ever hold) is checked once
//! everything else is read.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

impl Validator<'_, '_> {
    /// `requests_per_month`: a quota of 0 would refuse every request; say so instead.
    pub(super) fn quota(&mut self, value: &Option<Spanned<i64>>, name: &str) -> Option<NonZeroU32> {
        let value = value.as_ref()?;
        if *value.get_ref() == 0 {
            self.error(
                value.span(),
                format!("{name} = 0 would refuse every request; remove it for no quota"),
            );
            return None;
        }
        self.positive(value, name)
    }

    /// Route buckets by prefix (checked against the routes later, in [`Self::costs`]).
    pub(super) fn route_buckets(
        &mut self,
        tables: &BTreeMap<String, Spanned<RouteBucketFile>>,
        table: &str,
    ) -> BTreeMap<String, RouteBucket> {
        let mut out = BTreeMap::new();
        for (prefix, bucket) in tables {
            let b = bucket.get_ref();
            let field = |f: &str| format!("{table}.\"{prefix}\".{f}");
            let rates = self.bucket_rates(
                (&b.requests_per_minute, &b.burst),
                (&b.requests_per_hour, &b.requests_per_day),
                &field,
            );
            if let Some(rates) = rates {
                out.insert(prefix.clone(), rates);
            }
        }
        out
    }

    /// What needs every section read: route table keys must be route prefixes, and no route
    /// may cost more than a bucket it is charged to can ever hold (it could never pass).
    /// Plans checked are the ones the file defines or a key uses (a built-in plan nobody
    /// uses limits nothing).
    pub(super) fn costs(
        &mut self,
        plans: &BTreeMap<String, Spanned<PlanFile>>,
        keys: &[KeyFile],
        routes: &[RouteFile],
        config: &Config,
    ) {
        let prefixes: BTreeSet<&str> = config.routes.iter().map(|r| r.prefix.as_str()).collect();
        let unknown_prefix = |prefix: &str| {
            let known: Vec<&str> = prefixes.iter().copied().collect();
            format!(
                "\"{prefix}\" is not a route prefix; route buckets are named by a [[routes]] prefix: {}",
                known.join(", ")
            )
        };
        for (name, plan) in plans {
            for (prefix, bucket) in &plan.get_ref().routes {
                if !prefixes.contains(prefix.as_str()) {
                    self.error(
                        bucket.span(),
                        format!("plans.{name}.routes: {}", unknown_prefix(prefix)),
                    );
                }
            }
        }
        for key in keys {
            for (prefix, bucket) in &key.routes {
                if !prefixes.contains(prefix.as_str()) {
                    self.error(
                        bucket.span(),
                        format!(
                            "key \"{}\": routes: {}",
                            key.id.get_ref().trim(),
                            unknown_prefix(prefix)
                        ),
                    );
                }
            }
        }
        let used: BTreeSet<&str> = plans
            .keys()
            .map(String::as_str)
            .chain(config.keys.iter().map(|k| &*k.plan.0))
            .collect();
        for file in routes {
            let Some(spanned) = &file.cost else { continue };
            let Some(route) = config
                .routes
                .iter()
                .find(|r| r.prefix == *file.prefix.get_ref() && r.cost > 0)
            else {
                continue;
            };
            let charged = config.plans.iter().filter(|(name, _)| {
                used.contains(&*name.0) && ((&*name.0 == "anonymous") != route.auth)
            });
            for (name, plan) in charged {
                if let Some(why) = too_small(plan, &route.prefix, route.cost) {
                    self.error(
                        spanned.span(),
                        format!(
                            "a request to {} costs {} tokens but plan {name}'s {why}: it could never pass",
                            route.prefix, route.cost
                        ),
                    );
                }
            }
        }
    }
}

/// What `check` and the start warn about (the config is valid): a monthly quota that a
/// restart would reset, with the local backend and no `limits.state_file`.
pub(crate) fn warnings(config: &Config) -> Vec<String> {
    if config.limits.backend != LimitBackend::Local || config.limits.state_file.is_some() {
        return Vec::new();
    }
    config
        .plans
        .iter()
        .filter(|(_, plan)| plan.requests_per_month.is_some())
        .map(|(name, _)| format!("plan {name}"))
        .chain(
            config
                .keys
                .iter()
                .filter(|k| k.requests_per_month.is_some())
                .map(|k| format!("key \"{}\"", k.id))
                .take(1),
        )
        .map(|whose| {
            format!(
                "{whose} has requests_per_month, but limits.backend is \"local\" and no limits.state_file is set: quota counts start from zero at every restart"
            )
        })
        .collect()
}

/// The first bucket of `plan` (or its route bucket for `prefix`, or its quota) smaller than
/// `cost`, described.
fn too_small(plan: &Plan, prefix: &str, cost: u32) -> Option<String> {
    let mut buckets = vec![
        ("minute bucket", Some(plan.burst)),
        ("hourly bucket", plan.requests_per_hour),
        ("daily bucket", plan.requests_per_day),
        ("monthly quota", plan.requests_per_month),
    ];
    if let Some(route) = plan.routes.get(prefix) {
        buckets.extend([
            ("route bucket", Some(route.burst)),
            ("hourly route bucket", route.requests_per_hour),
            ("daily route bucket", route.requests_per_day),
        ]);
    }
    buckets.into_iter().find_map(|(what, size)| {
        size.filter(|s| s.get() < cost)
            .map(|s| format!("{what} holds {s}"))
    })
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn issues(text: &str) -> Vec<ConfigIssue> {
        match load(Path::new("t.toml"), text, |p| {
            Err(ConfigError::Read {
                path: p.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }) {
            Ok(_) => Vec::new(),
            Err(e) => e.issues().to_vec(),
        }
    }

    const ROUTES: &str = "[[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n[[routes]]\nprefix = \"/v1/reports/\"\nupstream = \"up\"\n";
    const KEY: &str = "[[keys]]\nid = \"k\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\n";

    /// (TOML after the routes, line of the issue, fragment of its message); the routes take
    /// lines 1-9.
    const MISTAKES: &[(&str, usize, &str)] = &[
        (
            "[plans.pro]\nrequests_per_minute = 10\n[plans.pro.routes.\"/v2/\"]\nrequests_per_minute = 1\n",
            12,
            "plans.pro.routes: \"/v2/\" is not a route prefix; route buckets are named by a [[routes]] prefix: /v1/, /v1/reports/",
        ),
        (
            "[plans.free]\nrequests_per_minute = 10\n[[routes]]\nprefix = \"/x/\"\nupstream = \"up\"\ncost = 20\n",
            15,
            "a request to /x/ costs 20 tokens but plan free's minute bucket holds 10: it could never pass",
        ),
        (
            "[plans.pro]\nrequests_per_minute = 100\nrequests_per_month = 0\n",
            12,
            "plans.pro.requests_per_month = 0 would refuse every request",
        ),
        (
            "[[routes]]\nprefix = \"/x/\"\nupstream = \"up\"\ncost = 1001\n",
            13,
            "route \"/x/\": cost must be a whole number from 0 to 1000, got 1001",
        ),
        (
            "[plans.pro]\nrequests_per_minute = 100\n[plans.pro.routes.\"/v1/reports/\"]\nrequests_per_minute = 5\n[[routes]]\nprefix = \"/x/\"\nupstream = \"up\"\n",
            12,
            "",
        ),
        (
            "[plans.pro]\nrequests_per_minute = 100\n[plans.pro.routes.\"/v1/reports/\"]\nrequests_per_minute = 5\nburst = 0\n",
            14,
            "plans.pro.routes.\"/v1/reports/\".burst must be a whole number from 1",
        ),
        (
            "[plans.pro]\nrequests_per_minute = 100\n[plans.pro.routes.\"/v1/reports/\"]\nrequests_per_minte = 5\n",
            13,
            "unknown key `requests_per_minte`",
        ),
        (
            "[plans.pro]\nrequests_per_minute = 100\nrequests_per_month = 4\n[[routes]]\nprefix = \"/x/\"\nupstream = \"up\"\ncost = 5\n",
            16,
            "a request to /x/ costs 5 tokens but plan pro's monthly quota holds 4",
        ),
        (
            "[plans.pro]\nrequests_per_minute = 100\n[plans.pro.routes.\"/x/\"]\nrequests_per_minute = 2\n[[routes]]\nprefix = \"/x/\"\nupstream = \"up\"\ncost = 3\n",
            17,
            "a request to /x/ costs 3 tokens but plan pro's route bucket holds 2",
        ),
    ];

    #[test]
    fn each_mistake_is_reported_at_its_line() {
        for (snippet, line, fragment) in MISTAKES {
            let text = format!("{ROUTES}{snippet}");
            let found = issues(&text);
            if fragment.is_empty() {
                assert!(found.is_empty(), "{text}\n{found:?}");
                continue;
            }
            assert!(
                found
                    .iter()
                    .any(|i| i.line == *line && i.message.contains(fragment)),
                "expected line {line}: {fragment}\n---\n{text}\n---\n{found:#?}"
            );
        }
    }

    #[test]
    fn key_overrides_may_create_route_buckets_and_are_checked() {
        let text = format!(
            "{ROUTES}{KEY}requests_per_month = 10\nroutes = {{ \"/v1/reports/\" = {{ requests_per_minute = 3 }} }}\n"
        );
        assert!(issues(&text).is_empty(), "{:?}", issues(&text));
        let text =
            format!("{ROUTES}{KEY}routes = {{ \"/nope/\" = {{ requests_per_minute = 3 }} }}\n");
        let found = issues(&text);
        assert!(
            found.iter().any(|i| i.line == 14
                && i.message
                    .contains("key \"k\": routes: \"/nope/\" is not a route prefix")),
            "{found:#?}"
        );
        let text = format!("{ROUTES}{KEY}requests_per_month = 0\n");
        assert!(issues(&text).iter().any(|i| {
            i.line == 14
                && i.message
                    .contains("key \"k\": requests_per_month = 0 would refuse")
        }));
    }

    #[test]
    fn an_unused_builtin_plan_does_not_limit_costs() {
        // `free` (60 a minute) exists but no key uses it: a cost of 100 is fine.
        let text = format!("{ROUTES}[[routes]]\nprefix = \"/x/\"\nupstream = \"up\"\ncost = 100\n");
        assert!(issues(&text).is_empty(), "{:?}", issues(&text));
    }
}
