//! The one-plan key store of the unit-level tests and the key lookup bench: every key on plan
//! `pro` (300 requests a minute, 300 deep), no earlier store to carry buckets from.
//! `benches/key_lookup.rs` includes this file by path.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use tollgate::auth::{ApiKey, KeyStore};
use tollgate::config::{KeyConfig, KeyId, Plan, PlanName};

/// The plan every key of a one-plan store is on.
pub fn pro() -> PlanName {
    PlanName(Arc::from("pro"))
}

/// The plans of a one-plan store: `pro`, 300 requests a minute, 300 deep, no hourly or daily
/// bucket.
pub fn one_plan() -> BTreeMap<PlanName, Plan> {
    let rpm = NonZeroU32::new(300).unwrap();
    [(
        pro(),
        Plan {
            requests_per_minute: rpm,
            burst: rpm,
            requests_per_hour: None,
            requests_per_day: None,
            requests_per_month: None,
            routes: Default::default(),
        },
    )]
    .into_iter()
    .collect()
}

/// Key `id` (the digest of `secret`) on `pro`, with `scopes`, no override, enabled.
pub fn pro_key(id: &str, secret: &str, scopes: &[&str]) -> KeyConfig {
    KeyConfig {
        id: KeyId(Arc::from(id)),
        digests: vec![tollgate::config::DigestConfig::new(
            ApiKey::new(secret).digest(),
        )],
        plan: pro(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        requests_per_minute: None,
        disabled: false,
        requests_per_month: None,
        routes: Default::default(),
        expires_at: None,
        metadata: Vec::new(),
        created_at: None,
    }
}

/// A store of `keys` over [`one_plan`].
pub fn one_plan_store(keys: &[KeyConfig]) -> KeyStore {
    KeyStore::new(keys, &one_plan(), None)
}
