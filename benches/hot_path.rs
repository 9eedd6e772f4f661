//! One admission decision, the per-request work before proxying: extract the key from the
//! request's headers, look it up (10k keys), charge its bucket, build the X-RateLimit headers.
//! It calls the same functions the pipeline calls (`auth::authenticate`, `KeyLimits::charge`,
//! `PolicyHeaders::apply`). The `_before` variants charge as the pipeline did before route
//! costs, route buckets and quotas (`Limiter::check` and the key's policy headers), side by
//! side in the same binary: a plan with neither must cost no more than that.
//! `part_charge_route_bucket_and_quota` charges a key with one route bucket and a monthly
//! quota (the key's lock, the route bucket looked at and charged, the quota counted).
//!
//! Beside it, a naive baseline for scale: plaintext keys in a `Mutex<HashMap<String, _>>`, a
//! float token bucket, and headers built with `format!`.
//!
//! Memory as in the server: the request's headers were just parsed, so they are hot. Before
//! each batch of 16 decisions, the key of each request is written into one of 16 header maps
//! (about 13 KiB, so they stay in L1), its bytes copied fresh as a socket read leaves them;
//! that is the parser's work, done outside the timed loop (the timer, the TSC through quanta,
//! runs per batch, and its two reads are counted in the figure). The key store holds 10k
//! keys, built in a scattered order so that keys used one after another sit far apart in
//! memory. Which keys the requests carry:
//! - `tollgate_10k_keys`: API traffic as it is, skewed: key ranks drawn from a Zipf(1)
//!   distribution over all 10k keys (the busiest 100 keys send about half the requests, and
//!   every key is used);
//! - `tollgate_10k_keys_uniform`: the worst case, every request a different key, all 10k in
//!   turn, so nearly every record and bucket comes from L3 or memory.
//!
//! Run: `cargo bench --bench hot_path -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
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
        expiry_warning: tollgate::config::DEFAULT_EXPIRY_WARNING,
        store: tollgate::config::KeyStoreKind::File,
        keys_cache_file: None,
    }
}

/// A request's headers, before its key is written in.
fn request() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("api.example.com"));
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("application/json"));
    h
}

/// Requests parsed per batch; their header maps (about 13 KiB) stay in the L1 cache.
const RING: usize = 16;

/// A batch of parsed requests, each presenting the next key of the sequence.
struct Requests {
    ring: Vec<HeaderMap>,
    /// Every key's text.
    keys: Vec<String>,
    /// The keys of successive requests, as indices into `keys`.
    sequence: Vec<u16>,
    n: usize,
}

/// Which keys successive requests carry.
#[derive(Clone, Copy)]
enum Traffic {
    /// Zipf(1) over all keys.
    Skewed,
    /// Each key in turn.
    Uniform,
    /// 16 keys in turn, all in cache: the floor under the other two (`HOT_PATH_ITERS` only).
    Few,
}

/// Requests per pass of a sequence.
const SEQUENCE: usize = 1 << 16;

/// Key indices of `SEQUENCE` requests.
fn sequence(traffic: Traffic) -> Vec<u16> {
    match traffic {
        Traffic::Uniform => (0..SEQUENCE).map(|i| (i % KEYS) as u16).collect(),
        Traffic::Few => (0..SEQUENCE).map(|i| (i % 16) as u16).collect(),
        Traffic::Skewed => {
            // Inverse CDF of Zipf(1) over ranks 1..=KEYS, from a fixed-seed xorshift.
            let weights: Vec<f64> = (1..=KEYS).map(|rank| 1.0 / rank as f64).collect();
            let total: f64 = weights.iter().sum();
            let mut cdf = Vec::with_capacity(KEYS);
            let mut acc = 0.0;
            for w in weights {
                acc += w / total;
                cdf.push(acc);
            }
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            (0..SEQUENCE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                    cdf.partition_point(|&c| c < u).min(KEYS - 1) as u16
                })
                .collect()
        }
    }
}

impl Requests {
    fn new(traffic: Traffic) -> Self {
        Self {
            sequence: sequence(traffic),
            ring: (0..RING).map(|_| request()).collect(),
            keys: (0..KEYS).map(key_text).collect(),
            n: 0,
        }
    }

    /// Parses the next `RING` requests: each map gets the next key, in fresh bytes (hyper's
    /// header values are slices of the buffer the socket was just read into).
    fn parse_batch(&mut self) {
        for request in &mut self.ring {
            self.n += 1;
            let key = &self.keys[usize::from(self.sequence[self.n % SEQUENCE])];
            let value = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(key.as_bytes()))
                .expect("keys are header-safe");
            request.insert(&X_API_KEY, value);
        }
    }
}

/// Runs `decide` on `iters` parsed requests and returns the time the decisions took, without
/// the parsing.
fn timed(requests: &mut Requests, iters: u64, mut decide: impl FnMut(&HeaderMap)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        requests.parse_batch();
        let batch = left.min(RING as u64) as usize;
        let start = quanta::Instant::now();
        for request in &requests.ring[..batch] {
            decide(request);
        }
        total += start.elapsed();
        left -= batch as u64;
    }
    total
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// How much of a decision to make (`HOT_PATH_UPTO`, with `HOT_PATH_ITERS` only): running
/// each prefix under `perf stat` and subtracting gives each step's cost.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upto {
    /// Extract the key and look it up.
    Authenticate,
    /// ...and charge its bucket.
    Charge,
    /// ...and insert three ready-made values under the three X-RateLimit names: the response
    /// header map's own share of building the headers.
    Inserts,
    /// The whole decision.
    Decision,
}

static X_RATELIMIT: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-reset"),
];

/// How a decision charges the key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `KeyLimits::charge` (route 0, cost 1), as the pipeline does.
    Charge,
    /// `Limiter::check` and the key's own policy headers, as the pipeline did before route
    /// costs, route buckets and quotas.
    CheckBefore,
}

/// The key store and the response headers of one benchmark.
struct Decider {
    via: Via,
    store: KeyStore,
    auth: AuthConfig,
    clock: tollgate::auth::WallClock,
    uri: Uri,
    /// The response's header map exists anyway; the decision only adds to it.
    out: HeaderMap,
    upto: Upto,
}

impl Decider {
    fn new() -> Self {
        let plan = PlanName(Arc::from("pro"));
        let rate = NonZeroU32::new(RATE).unwrap();
        let plans = [(
            plan.clone(),
            Plan {
                requests_per_minute: rate,
                burst: NonZeroU32::new(BURST).unwrap(),
                requests_per_hour: None,
                requests_per_day: None,
                requests_per_month: None,
                routes: Default::default(),
            },
        )]
        .into_iter()
        .collect();
        // 7919 is prime to 10k: every key once, in an order unrelated to the requests' order.
        let keys: Vec<KeyConfig> = (0..KEYS)
            .map(|i| (i * 7919) % KEYS)
            .map(|n| KeyConfig {
                id: KeyId(Arc::from(format!("key-{n}").as_str())),
                digests: vec![tollgate::config::DigestConfig::new(
                    ApiKey::new(key_text(n)).digest(),
                )],
                plan: plan.clone(),
                scopes: vec![],
                requests_per_minute: None,
                disabled: false,
                requests_per_month: None,
                routes: Default::default(),
                expires_at: None,
                metadata: Vec::new(),
                created_at: None,
            })
            .collect();
        Self {
            via: Via::Charge,
            store: KeyStore::new(&keys, &plans, None),
            auth: auth_config(),
            clock: Default::default(),
            uri: Uri::from_static("/v1/campaigns"),
            out: HeaderMap::with_capacity(8),
            upto: Upto::Decision,
        }
    }

    /// One admission decision for `request`, as the pipeline makes it.
    fn decide(&mut self, request: &HeaderMap) {
        let identity = authenticate(
            request,
            &self.uri,
            &self.auth,
            &self.store,
            &self.clock,
            true,
            &[],
        )
        .expect("valid key")
        .expect("a key");
        if self.upto == Upto::Authenticate {
            black_box(identity.record);
            return;
        }
        let limits = &identity.record.limits;
        let (decision, policy) = match self.via {
            Via::Charge => limits.charge(0, 1),
            Via::CheckBefore => (limits.limiter.check(), &limits.policy),
        };
        match self.upto {
            Upto::Charge => {
                black_box(decision);
                return;
            }
            Upto::Inserts => {
                self.out.clear();
                for name in &X_RATELIMIT {
                    self.out.insert(name, decision.limit_value.clone());
                }
                black_box(&self.out);
                return;
            }
            Upto::Authenticate | Upto::Decision => {}
        }
        self.out.clear();
        let now = tollgate::limit::headers::unix_time(decision.at);
        policy.apply(
            &mut self.out,
            RateLimitHeaders::XRateLimit,
            &decision,
            now,
            || Duration::ZERO,
        );
        black_box(&self.out);
    }
}

fn tollgate_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_path");
    let mut decider = Decider::new();
    let mut uniform = Requests::new(Traffic::Uniform);
    for (name, via) in [
        ("tollgate_10k_keys_uniform_before", Via::CheckBefore),
        ("tollgate_10k_keys_uniform", Via::Charge),
    ] {
        decider.via = via;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| timed(&mut uniform, iters, |r| decider.decide(r)))
        });
    }
    drop(uniform);
    let mut requests = Requests::new(Traffic::Skewed);
    for (name, via) in [
        ("tollgate_10k_keys", Via::Charge),
        ("tollgate_10k_keys_before", Via::CheckBefore),
    ] {
        decider.via = via;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| timed(&mut requests, iters, |r| decider.decide(r)))
        });
    }
    let Decider {
        store,
        auth,
        clock,
        uri,
        mut out,
        ..
    } = decider;

    // The same decision in parts, to show where the time goes.
    group.bench_function("part_authenticate", |b| {
        b.iter_custom(|iters| {
            timed(&mut requests, iters, |r| {
                black_box(authenticate(r, &uri, &auth, &store, &clock, true, &[]).is_ok());
            })
        })
    });
    requests.parse_batch();
    let record = authenticate(&requests.ring[0], &uri, &auth, &store, &clock, true, &[])
        .unwrap()
        .unwrap()
        .record;
    group.bench_function("part_charge_bucket_before", |b| {
        b.iter(|| black_box(record.limits.limiter.check()))
    });
    group.bench_function("part_charge_bucket", |b| {
        b.iter(|| black_box(record.limits.charge(0, 1).0))
    });
    let extended = route_bucket_and_quota();
    group.bench_function("part_charge_route_bucket_and_quota", |b| {
        b.iter(|| black_box(extended.charge(1, 1).0))
    });
    let decision = record.limits.limiter.check();
    group.bench_function("part_build_headers", |b| {
        b.iter(|| {
            out.clear();
            let now = tollgate::limit::headers::unix_time(decision.at);
            record.limits.policy.apply(
                &mut out,
                RateLimitHeaders::XRateLimit,
                &decision,
                now,
                || Duration::ZERO,
            );
            black_box(&out);
        })
    });

    // The response header map's own share of that: three ready values under the three names.
    group.bench_function("part_headermap_inserts", |b| {
        b.iter(|| {
            out.clear();
            for name in &X_RATELIMIT {
                out.insert(name, decision.limit_value.clone());
            }
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
        b.iter_custom(|iters| {
            timed(&mut requests, iters, |request| {
                let key = request.get("x-api-key").unwrap().to_str().unwrap();
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
        })
    });
    group.finish();
}

/// One key's limits with the plan bucket of the bench, a route bucket as deep on route 1,
/// and a monthly quota too large to run out while measured.
fn route_bucket_and_quota() -> Arc<tollgate::limit::KeyLimits> {
    use tollgate::config::{RouteBucket, RouteConfig, RouteTarget};
    use tollgate::limit::charge::{KeySpec, Layout, QuotaTable};
    let rate = NonZeroU32::new(RATE).unwrap();
    let burst = NonZeroU32::new(BURST).unwrap();
    let plan = Plan {
        requests_per_minute: rate,
        burst,
        requests_per_hour: None,
        requests_per_day: None,
        requests_per_month: NonZeroU32::new(u32::MAX),
        routes: [(
            "/v1/reports/".to_owned(),
            RouteBucket {
                requests_per_minute: rate,
                burst,
                requests_per_hour: None,
                requests_per_day: None,
            },
        )]
        .into_iter()
        .collect(),
    };
    let routes: Vec<RouteConfig> = ["/v1/", "/v1/reports/"]
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
        .collect();
    let none = Default::default();
    let id = KeyId(Arc::from("extended"));
    let spec = KeySpec {
        plan_name: "pro",
        plan: &plan,
        custom_per_minute: None,
        requests_per_month: None,
        routes: &none,
        id: &id,
    };
    let quotas = QuotaTable::default();
    tollgate::limit::KeyLimits::build(
        &spec,
        Layout {
            routes: &routes,
            quotas: &quotas,
        },
        None,
    )
}

criterion_group!(benches, tollgate_decision);

fn main() {
    // `HOT_PATH_ITERS=N`: N decisions and their parsing, for `perf stat -e cycles:u` on a
    // machine too busy for wall-clock figures. `HOT_PATH_PARSE_ONLY=1`: the parsing alone;
    // subtract it (and a run with N=0, the setup) to get the decisions' share.
    // `HOT_PATH_UPTO=authenticate|charge|inserts`: only that much of each decision.
    if let Some(n) = std::env::var("HOT_PATH_ITERS")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        let traffic = match std::env::var("HOT_PATH_TRAFFIC").as_deref() {
            Ok("uniform") => Traffic::Uniform,
            Ok("few") => Traffic::Few,
            _ => Traffic::Skewed,
        };
        let parse_only = std::env::var_os("HOT_PATH_PARSE_ONLY").is_some();
        let mut decider = Decider::new();
        // `HOT_PATH_VIA=before`: charge as the pipeline did before costs and quotas.
        if std::env::var("HOT_PATH_VIA").as_deref() == Ok("before") {
            decider.via = Via::CheckBefore;
        }
        decider.upto = match std::env::var("HOT_PATH_UPTO").as_deref() {
            Ok("authenticate") => Upto::Authenticate,
            Ok("charge") => Upto::Charge,
            Ok("inserts") => Upto::Inserts,
            Ok(other) if !other.is_empty() => panic!("HOT_PATH_UPTO={other}: unknown step"),
            _ => Upto::Decision,
        };
        let mut requests = Requests::new(traffic);
        timed(&mut requests, n, |request| {
            if !parse_only {
                decider.decide(request);
            }
        });
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
