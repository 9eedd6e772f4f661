//! Rate-limit response headers: `X-RateLimit-Limit/Remaining/Reset`, and with
//! `limits.headers = "ietf" | "both"` the `RateLimit-Policy` / `RateLimit` fields of
//! draft-ietf-httpapi-ratelimit-headers. Everything that does not change per request is built
//! once per key at config load; per request only the numbers are written.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::bucket::{BucketSpec, Decision, Window};
use crate::config::RateLimitHeaders;
use crate::header_bytes;

static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The per-key parts of the IETF headers, built once. (`X-RateLimit-Limit` comes with the
/// decision, from the bucket's own cache line.)
#[derive(Debug, Clone)]
pub struct PolicyHeaders {
    /// `"pro";r=` per bucket (the IETF `RateLimit` prefix).
    ietf_prefixes: Box<[Bytes]>,
    /// `RateLimit-Policy`, all buckets.
    ietf_policy: HeaderValue,
    /// A monthly quota's policy item (`"pro-month";q=100000;w=`), written per request: its
    /// window is the length of the current month.
    quota_item: Option<Box<str>>,
}

impl PolicyHeaders {
    /// Headers for a plan named `name` with these buckets. The minute bucket's policy is named
    /// after the plan; hourly and daily ones get `-hour` / `-day`.
    pub fn new(name: &str, specs: &[BucketSpec]) -> Self {
        Self::with_route(name, specs, None, None)
    }

    /// Headers for a plan's buckets, then a route's buckets (named `"<plan>:<prefix>"`, with
    /// `-hour` / `-day` for longer windows), then a monthly quota (`"<plan>-month"`), in the
    /// order of a decision's `bucket` index.
    pub fn with_route(
        name: &str,
        specs: &[BucketSpec],
        route: Option<(&str, &[BucketSpec])>,
        quota: Option<std::num::NonZeroU32>,
    ) -> Self {
        let policy_name = |base: &str, spec: &BucketSpec| match spec.window {
            Window::Minute => base.to_owned(),
            other => format!("{base}-{}", other.name()),
        };
        let route_name = route.map(|(prefix, _)| format!("{name}:{prefix}"));
        let items: Vec<(String, &BucketSpec)> = specs
            .iter()
            .map(|s| (policy_name(name, s), s))
            .chain(route.into_iter().flat_map(|(_, rspecs)| {
                let base = route_name.as_deref().unwrap_or(name);
                rspecs.iter().map(move |s| (policy_name(base, s), s))
            }))
            .collect();
        let quota_name = format!("{name}-month");
        let ietf_prefixes = items
            .iter()
            .map(|(item, _)| item.as_str())
            .chain(quota.map(|_| quota_name.as_str()))
            .map(|item| Bytes::from(format!("\"{item}\";r=")))
            .collect();
        let policy = items
            .iter()
            .map(|(item, s)| format!("\"{item}\";q={};w={}", s.limit, s.window.seconds()))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            ietf_prefixes,
            // Route prefixes are validated: no quote, no control character.
            ietf_policy: HeaderValue::from_str(&policy).expect("plan names are header-safe"),
            quota_item: quota.map(|q| format!("\"{quota_name}\";q={q};w=").into()),
        }
    }

    /// Writes the headers for `decision`, made at wall-clock time `decided` (since the epoch).
    /// `elapsed` gives the time since the decision (a slow upstream's); it is asked only for
    /// the IETF `t`, which counts from the response where `X-RateLimit-Reset` is a moment.
    pub fn apply(
        &self,
        headers: &mut HeaderMap,
        style: RateLimitHeaders,
        decision: &Decision,
        decided: Duration,
        elapsed: impl FnOnce() -> Duration,
    ) {
        if matches!(style, RateLimitHeaders::XRateLimit | RateLimitHeaders::Both) {
            headers.insert(&X_RATELIMIT_LIMIT, decision.limit_value.clone());
            headers.insert(&X_RATELIMIT_REMAINING, small_number(decision.remaining));
            headers.insert(
                &X_RATELIMIT_RESET,
                reset_value(ceil_secs(decided + decision.reset_after)),
            );
        }
        if matches!(style, RateLimitHeaders::Ietf | RateLimitHeaders::Both) {
            match &self.quota_item {
                None => headers.insert(&RATELIMIT_POLICY, self.ietf_policy.clone()),
                Some(item) => {
                    let (start, end) = super::quota::period(decided.as_secs());
                    let policy = format!(
                        "{}, {item}{}",
                        self.ietf_policy.to_str().unwrap_or_default(),
                        end - start
                    );
                    match HeaderValue::from_str(&policy) {
                        Ok(value) => headers.insert(&RATELIMIT_POLICY, value),
                        Err(_) => headers.insert(&RATELIMIT_POLICY, self.ietf_policy.clone()),
                    }
                }
            };
            let elapsed = elapsed();
            let t = if decision.allowed {
                ceil_secs(decision.reset_after.saturating_sub(elapsed))
            } else {
                ceil_secs(decision.retry_after.saturating_sub(elapsed)).max(1)
            };
            // `"pro";r=12;t=3` in a stack buffer: no String per request.
            let prefix = &self.ietf_prefixes[decision.bucket];
            let mut buf = [0u8; 160];
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let written = cursor
                .write_all(prefix)
                .and_then(|()| write!(cursor, "{};t={}", decision.remaining, t))
                .is_ok();
            let len = cursor.position() as usize;
            if written && let Some(value) = header_bytes::value(&buf[..len]) {
                headers.insert(&RATELIMIT, value);
            }
        }
    }
}

/// `Remaining` values below this come from a table built once, so the common case costs no
/// allocation (the values are static; cloning one is a copy).
const SMALL_NUMBERS: u32 = 4096;

static SMALL: LazyLock<Box<[HeaderValue]>> = LazyLock::new(|| {
    (0..SMALL_NUMBERS)
        .map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str())))
        .collect()
});

fn small_number(n: u32) -> HeaderValue {
    SMALL
        .get(n as usize)
        .cloned()
        .unwrap_or_else(|| header_bytes::number(u64::from(n)))
}

/// Limit values of every plan and key ever configured, beyond the small table. Bounded by the
/// distinct limits in configs, so interning them for the process's life costs nothing.
static INTERNED: LazyLock<Mutex<HashMap<u32, &'static HeaderValue>>> =
    LazyLock::new(Default::default);

/// `n` as an `X-RateLimit-Limit` value that lives for the process, on static bytes, so
/// per-request clones touch no reference count shared between threads. Called when limiters
/// are built (it may take a lock); requests get the value from their bucket, also with Redis.
pub fn limit_value(n: u32) -> &'static HeaderValue {
    if let Some(value) = SMALL.get(n as usize) {
        return value;
    }
    let mut interned = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
    interned.entry(n).or_insert_with(|| {
        Box::leak(Box::new(HeaderValue::from_static(Box::leak(
            n.to_string().into_boxed_str(),
        ))))
    })
}

/// Slots in the per-thread cache of recent `Reset` values (Unix seconds cluster around now).
const RESET_CACHE_SLOTS: usize = 256;

thread_local! {
    // Const-initialised and inline: reaching it is an offset from the thread pointer, with no
    // lazy-init check and no heap pointer to follow.
    static RESET_CACHE: RefCell<[(u64, HeaderValue); RESET_CACHE_SLOTS]> = const {
        RefCell::new([const { (u64::MAX, HeaderValue::from_static("")) }; RESET_CACHE_SLOTS])
    };
}

/// The `X-RateLimit-Reset` value for `unix_secs`, built at most once per second per slot.
fn reset_value(unix_secs: u64) -> HeaderValue {
    RESET_CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let slot = &mut cache[(unix_secs % RESET_CACHE_SLOTS as u64) as usize];
        if slot.0 != unix_secs {
            *slot = (unix_secs, HeaderValue::from(unix_secs));
        }
        slot.1.clone()
    })
}

/// How long a thread trusts its TSC anchor before reading the system clock again.
const ANCHOR_REFRESH: Duration = Duration::from_millis(100);

thread_local! {
    /// (raw TSC reading, wall-clock time since the epoch) at the last system clock read.
    static ANCHOR: Cell<Option<(u64, Duration)>> = const { Cell::new(None) };
}

/// Wall-clock time since the epoch at a raw TSC reading (a decision's [`Decision::at`]), for
/// `X-RateLimit-Reset`. The reading is placed against a per-thread anchor that follows the
/// system clock every 100 ms, so a request costs no `clock_gettime` (about 50 ns on this VM)
/// and no clock read at all beyond the one its charge made. Between refreshes the two clocks
/// drift apart by at most NTP's slew rate (0.5 ms/s), about 50 µs here; a step of the system
/// clock is picked up by the next refresh.
pub fn unix_time(at: u64) -> Duration {
    let tsc = &*super::bucket::TSC;
    ANCHOR.with(|anchor| {
        if let Some((anchor_at, unix)) = anchor.get() {
            // The reading may precede the anchor: a decision made on another thread before
            // this one last refreshed.
            let refresh = ANCHOR_REFRESH.as_nanos() as u64;
            if at >= anchor_at {
                let since = tsc.delta_as_nanos(anchor_at, at);
                if since < refresh {
                    return unix + Duration::from_nanos(since);
                }
            } else {
                let before = tsc.delta_as_nanos(at, anchor_at);
                if before < refresh {
                    return unix.saturating_sub(Duration::from_nanos(before));
                }
            }
        }
        let now = tsc.raw();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        anchor.set(Some((now, unix)));
        unix.saturating_sub(Duration::from_nanos(tsc.delta_as_nanos(at, now)))
    })
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn specs() -> Vec<BucketSpec> {
        vec![
            BucketSpec {
                window: Window::Minute,
                limit: NonZeroU32::new(300).unwrap(),
                burst: NonZeroU32::new(300).unwrap(),
            },
            BucketSpec {
                window: Window::Day,
                limit: NonZeroU32::new(1000).unwrap(),
                burst: NonZeroU32::new(1000).unwrap(),
            },
        ]
    }

    fn decision(
        allowed: bool,
        bucket: usize,
        remaining: u32,
        reset_ms: u64,
        retry_ms: u64,
    ) -> Decision {
        Decision {
            allowed,
            spec: specs()[bucket],
            bucket,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: Duration::from_millis(retry_ms),
            limit_value: limit_value(specs()[bucket].limit.get()),
            at: 0,
            reason: super::super::bucket::Reason::Bucket,
        }
    }

    /// The headers `p` writes for `decision`, made at `decided`, `elapsed` before the response.
    fn headers(
        p: &PolicyHeaders,
        style: RateLimitHeaders,
        decision: &Decision,
        decided: Duration,
        elapsed: Duration,
    ) -> HeaderMap {
        let mut h = HeaderMap::new();
        p.apply(&mut h, style, decision, decided, || elapsed);
        h
    }

    #[test]
    fn x_ratelimit_headers() {
        let p = PolicyHeaders::new("pro", &specs());
        let now = Duration::from_millis(1_706_140_799_500);
        let h = headers(
            &p,
            RateLimitHeaders::XRateLimit,
            &decision(true, 0, 299, 200, 0),
            now,
            Duration::ZERO,
        );
        assert_eq!(h["x-ratelimit-limit"], "300");
        assert_eq!(h["x-ratelimit-remaining"], "299");
        assert_eq!(
            h["x-ratelimit-reset"], "1706140800",
            "rounded up to the second"
        );
        assert!(h.get("ratelimit").is_none());
    }

    #[test]
    fn limit_values_beyond_the_small_table_are_interned() {
        let a = limit_value(1_000_000);
        assert_eq!(a, "1000000");
        assert!(std::ptr::eq(a, limit_value(1_000_000)), "built once");
        assert_eq!(limit_value(300), "300");
    }

    fn system_now() -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
    }

    /// `t` lies between `before` and `after`, give or take the TSC drift bound.
    fn between(before: Duration, t: Duration, after: Duration) {
        let slack = Duration::from_millis(1);
        assert!(
            t + slack >= before && t <= after + slack,
            "{before:?} {t:?} {after:?}"
        );
    }

    #[test]
    fn unix_time_follows_the_system_clock() {
        // A TSC reading taken between two system clock reads lies between them, whether the
        // anchor was fresh or is reused.
        for _ in 0..3 {
            let before = system_now();
            let at = super::super::bucket::tsc_now();
            let after = system_now();
            between(before, unix_time(at), after);
        }
    }

    #[test]
    fn a_reading_older_than_the_anchor_is_placed_before_it() {
        // A decision made on one thread may get its headers on another, whose anchor was set
        // after the decision. A new thread has no anchor: converting the later reading first
        // sets it, after both readings. The two readings are 20 ms apart, well beyond the
        // slack, so an early reading placed at the anchor instead would be caught.
        std::thread::spawn(|| {
            let tsc_now = super::super::bucket::tsc_now;
            let t0 = system_now();
            let early = tsc_now();
            let t1 = system_now();
            std::thread::sleep(Duration::from_millis(20));
            let late = tsc_now();
            let t2 = system_now();
            let late_unix = unix_time(late);
            let early_unix = unix_time(early);
            between(t0, early_unix, t1);
            between(t1, late_unix, t2);
            assert!(early_unix <= late_unix);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn ietf_headers() {
        let p = PolicyHeaders::new("pro", &specs());
        let h = headers(
            &p,
            RateLimitHeaders::Ietf,
            &decision(false, 0, 0, 60_000, 200),
            Duration::ZERO,
            Duration::ZERO,
        );
        assert_eq!(
            h["ratelimit-policy"],
            "\"pro\";q=300;w=60, \"pro-day\";q=1000;w=86400"
        );
        assert_eq!(h["ratelimit"], "\"pro\";r=0;t=1");
        assert!(h.get("x-ratelimit-limit").is_none());
        let h = headers(
            &p,
            RateLimitHeaders::Both,
            &decision(true, 1, 7, 2_500, 0),
            Duration::ZERO,
            Duration::ZERO,
        );
        assert_eq!(h["ratelimit"], "\"pro-day\";r=7;t=3");
        assert_eq!(h["x-ratelimit-limit"], "1000");
        // `t` counts from the response: 1.2 s after the decision, 1.3 s are left.
        let h = headers(
            &p,
            RateLimitHeaders::Ietf,
            &decision(true, 1, 7, 2_500, 0),
            Duration::ZERO,
            Duration::from_millis(1_200),
        );
        assert_eq!(h["ratelimit"], "\"pro-day\";r=7;t=2");
    }
}
