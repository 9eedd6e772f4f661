//! Key lookup: a presented API key -> its record, with 10, 10k and 1M keys in the store.
//!
//! One lookup is one SHA-256 of the presented key (CPU SHA extensions where present) plus one
//! map probe keyed by the digest's first 8 bytes, then the expiry check the request path
//! makes. Every key has the lifecycle fields present: an `expires_at` and two metadata
//! entries; every tenth is being rotated (a second digest with its own expiry, one more
//! record in the table). `sha256_only` shows how much of it is the hash.
//!
//! Run: `cargo bench --bench key_lookup -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

#[path = "../tests/common/key_store.rs"]
mod key_store;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tollgate::auth::{ApiKey, KeyDigest, KeyStore, WallClock, expiry};
use tollgate::config::{DigestConfig, KeyConfig, KeyId};

fn key_text(n: usize) -> String {
    format!("tg_live_{n:043}")
}

/// 2100-01-01T00:00:00Z: an expiry the bench never reaches, so every probe is admitted.
const FAR: u64 = 4_102_444_800;

/// The same keys with none of the lifecycle fields (one digest, no expiry, no metadata), as
/// every key was before keys had them: the baseline measured in the same process.
fn plain_store(size: usize) -> KeyStore {
    let keys: Vec<KeyConfig> = (0..size)
        .map(|n| key_store::pro_key(&format!("key-{n}"), &key_text(n), &["campaigns:read"]))
        .collect();
    key_store::one_plan_store(&keys)
}

fn store(size: usize) -> KeyStore {
    let plan = key_store::pro();
    let keys: Vec<KeyConfig> = (0..size)
        .map(|n| KeyConfig {
            id: KeyId(Arc::from(format!("key-{n}").as_str())),
            digests: std::iter::once(DigestConfig::new(ApiKey::new(key_text(n)).digest()))
                .chain((n % 10 == 0).then(|| DigestConfig {
                    digest: ApiKey::new(format!("old_{n}")).digest(),
                    expires_at: Some(FAR - 1),
                }))
                .collect(),
            plan: plan.clone(),
            scopes: vec!["campaigns:read".to_owned()],
            requests_per_minute: None,
            disabled: false,
            requests_per_month: None,
            routes: Default::default(),
            expires_at: Some(FAR),
            metadata: vec![
                ("customer_id".to_owned(), format!("cus_{n}")),
                ("tier".to_owned(), "gold".to_owned()),
            ],
            created_at: None,
        })
        .collect();
    key_store::one_plan_store(&keys)
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_lookup");
    // `cargo test --benches` runs each bench once: skip building the 1M store there.
    let sizes: &[usize] = if std::env::args().any(|a| a == "--bench") {
        &[10, 10_000, 1_000_000]
    } else {
        &[10, 10_000]
    };
    let clock = WallClock::system();
    let warning = std::time::Duration::from_secs(14 * 86_400);
    for &size in sizes {
        let plain = plain_store(size);
        let probes: Vec<String> = (0..1024).map(|i| key_text((i * 7919) % size)).collect();
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("hit_plain", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let record = plain.lookup(black_box(probes[i].as_bytes()));
                black_box(record.map(|r| expiry::check(r, &clock, warning).is_ok()))
            })
        });
        drop(plain);
        let store = store(size);
        // Spread probes over the store so the 1M case is not one hot cache line.
        let probes: Vec<String> = (0..1024).map(|i| key_text((i * 7919) % size)).collect();
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("hit", size), &size, |b, _| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let record = store.lookup(black_box(probes[i].as_bytes()));
                black_box(record.map(|r| expiry::check(r, &clock, warning).is_ok()))
            })
        });
        group.bench_with_input(BenchmarkId::new("miss", size), &size, |b, _| {
            b.iter(|| {
                black_box(store.lookup(black_box(b"tg_live_not_a_key_0000000000000000000000000")))
            })
        });
    }
    group.bench_function("sha256_only", |b| {
        let key = key_text(1);
        b.iter(|| black_box(KeyDigest::of(black_box(key.as_bytes()))))
    });
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
