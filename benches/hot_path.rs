//! One admission decision, the per-request work before proxying: extract the key from the
//! request's headers, look it up (10k keys), charge its bucket, build the X-RateLimit headers.
//! It calls the same functions the pipeline calls (`auth::authenticate`, `Limiter::check`,
//! `PolicyHeaders::apply`).
//!
//! Beside it, a naive baseline for scale: plaintext keys in a `Mutex<HashMap<String, _>>`, a
//! float token bucket, and headers built with `format!`.
//!
//! Run: `cargo bench --bench hot_path -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use tollgate::auth::{ApiKey, KeyStore, authenticate};
use tollgate::config::{AuthConfig, KeyConfig, KeyId, Plan, PlanName, RateLimitHeaders};

const KEYS: usize = 10_000;
/// Refill fast enough that the bench measures the admit path, not 429s...
const RATE: u32 = 1_000_000_000;
/// ...with a bucket as deep as a real plan's, so header values have realistic sizes.
const BURST: u32 = 1_000;

fn key_text(n: usize) -> String {
    format!("tg_live_{n:043}")
}

fn auth_config() -> AuthConfig {
    AuthConfig {
        header: HeaderName::from_static("x-api-key"),
        bearer: true,
        query_param: None,
        forward_key: false,
        keys_file: None,
    }
}

fn requests() -> Vec<HeaderMap> {
    (0..1024)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("api.example.com"));
            h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
            h.insert("accept", HeaderValue::from_static("application/json"));
            h.insert(
                "x-api-key",
                HeaderValue::from_str(&key_text((i * 7919) % KEYS)).unwrap(),
            );
            h
        })
        .collect()
}

fn tollgate_decision(c: &mut Criterion) {
    let plan = PlanName(Arc::from("pro"));
    let rate = NonZeroU32::new(RATE).unwrap();
    let plans = [(
        plan.clone(),
        Plan {
            requests_per_minute: rate,
            burst: NonZeroU32::new(BURST).unwrap(),
            requests_per_hour: None,
            requests_per_day: None,
        },
    )]
    .into_iter()
    .collect();
    let keys: Vec<KeyConfig> = (0..KEYS)
        .map(|n| KeyConfig {
            id: KeyId(Arc::from(format!("key-{n}").as_str())),
            digest: ApiKey::new(key_text(n)).digest(),
            plan: plan.clone(),
            scopes: vec![],
            requests_per_minute: None,
            disabled: false,
        })
        .collect();
    let store = KeyStore::new(&keys, &plans, None);
    let auth = auth_config();
    let uri = Uri::from_static("/v1/campaigns");
    let requests = requests();
    let mut i = 0;
    // The response's header map exists anyway; the decision only adds to it.
    let mut out = HeaderMap::with_capacity(8);

    let mut group = c.benchmark_group("hot_path");
    group.bench_function("tollgate_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let identity = authenticate(&requests[i], &uri, &auth, &store, true, &[])
                .expect("valid key")
                .expect("a key");
            let decision = identity.record.limiter.check();
            out.clear();
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            identity
                .record
                .policy
                .apply(&mut out, RateLimitHeaders::XRateLimit, &decision, now);
            black_box(&out);
        })
    });

    // The same decision in parts, to show where the time goes.
    group.bench_function("part_authenticate", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(authenticate(&requests[i], &uri, &auth, &store, true, &[]).is_ok())
        })
    });
    let record = authenticate(&requests[0], &uri, &auth, &store, true, &[])
        .unwrap()
        .unwrap()
        .record;
    group.bench_function("part_charge_bucket", |b| {
        b.iter(|| black_box(record.limiter.check()))
    });
    let decision = record.limiter.check();
    group.bench_function("part_build_headers", |b| {
        b.iter(|| {
            out.clear();
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            record
                .policy
                .apply(&mut out, RateLimitHeaders::XRateLimit, &decision, now);
            black_box(&out);
        })
    });

    // Naive: plaintext keys, one global lock, float bucket, format! headers.
    struct NaiveBucket {
        tokens: f64,
        last: Instant,
    }
    let naive: Mutex<HashMap<String, NaiveBucket>> = Mutex::new(
        (0..KEYS)
            .map(|n| {
                (
                    key_text(n),
                    NaiveBucket {
                        tokens: f64::from(BURST),
                        last: Instant::now(),
                    },
                )
            })
            .collect(),
    );
    group.bench_function("naive_mutex_hashmap_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let key = requests[i].get("x-api-key").unwrap().to_str().unwrap();
            let mut map = naive.lock().unwrap();
            let bucket = map.get_mut(key).expect("known key");
            let now = Instant::now();
            let per_sec = f64::from(RATE) / 60.0;
            bucket.tokens = (bucket.tokens
                + now.duration_since(bucket.last).as_secs_f64() * per_sec)
                .min(f64::from(BURST));
            bucket.last = now;
            let allowed = bucket.tokens >= 1.0;
            if allowed {
                bucket.tokens -= 1.0;
            }
            let remaining = bucket.tokens.floor() as u64;
            let reset_secs = ((f64::from(BURST) - bucket.tokens) / per_sec).ceil() as u64;
            drop(map);
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            out.clear();
            out.insert(
                "x-ratelimit-limit",
                HeaderValue::from_str(&format!("{RATE}")).unwrap(),
            );
            out.insert(
                "x-ratelimit-remaining",
                HeaderValue::from_str(&format!("{remaining}")).unwrap(),
            );
            out.insert(
                "x-ratelimit-reset",
                HeaderValue::from_str(&format!("{}", unix + reset_secs)).unwrap(),
            );
            black_box((allowed, &out));
        })
    });
    group.finish();
}

criterion_group!(benches, tollgate_decision);
criterion_main!(benches);
