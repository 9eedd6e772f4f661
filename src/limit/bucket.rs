//! Token buckets (GCRA) through `governor`, behind our own [`Limiter`] (one key's buckets) and
//! [`KeyedLimiter`] (per client IP, governor over dashmap). Both are generic over the clock, so
//! tests use governor's `FakeRelativeClock` and never sleep.
//!
//! A bucket has capacity `burst` and refills one token every `window / limit`. A plan may have a
//! minute bucket plus optional hourly and daily ones; a request is charged to all of them or to
//! none, and the decision reports the bucket closest to empty (or the one that rejected). The
//! hourly and daily buckets are looked at first without charging, so a request they refuse
//! does not take a minute token (as the Redis script does); the common rejection (per minute)
//! then charges nothing else.

use std::cell::Cell;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use http::HeaderValue;

use super::headers::limit_value;
use super::ip_table::{Access, Accessed, BoundedStore, MAX_TRACKED_CLIENTS, Shared, look, measure};
pub use super::reason::Reason;
use crate::config::Plan;

/// The clock of every limiter: the TSC, read through one process-wide quanta clock that was
/// calibrated once. governor's own `QuantaClock` carries a 40-byte copy of the calibration in
/// each limiter; this one is zero-sized, so a key's whole bucket fits one cache line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tsc;

/// The process's TSC clock, also read by `headers::unix_time`.
pub(crate) static TSC: LazyLock<quanta::Clock> = LazyLock::new(quanta::Clock::new);

thread_local! {
    /// The raw TSC reading of this thread's last [`Tsc`] read: a decision keeps the reading
    /// its charge was made at, so its headers need no clock read of their own.
    static LAST_READING: Cell<u64> = const { Cell::new(0) };
}

impl Clock for Tsc {
    type Instant = Nanos;

    #[inline]
    fn now(&self) -> Nanos {
        let clock = &*TSC;
        let raw = clock.raw();
        LAST_READING.set(raw);
        Nanos::new(clock.delta_as_nanos(0, raw))
    }
}

/// A raw reading of the process's TSC clock, as [`Decision::at`] holds one.
pub fn tsc_now() -> u64 {
    TSC.raw()
}

/// Time since a raw TSC reading.
pub fn since(at: u64) -> Duration {
    Duration::from_nanos(TSC.delta_as_nanos(at, tsc_now()))
}

// The window lives with the config types, where `error.rs` names it too.
pub use crate::config::Window;

/// One bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// The window the limit is stated in.
    pub window: Window,
    /// Requests per window (the refill rate).
    pub limit: NonZeroU32,
    /// Capacity.
    pub burst: NonZeroU32,
}

impl BucketSpec {
    /// Time to earn one token back.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(
            (Duration::from_secs(self.window.seconds()).as_nanos() / u128::from(self.limit.get()))
                as u64,
        )
    }

    fn quota(&self) -> Quota {
        Quota::with_period(self.interval().max(Duration::from_nanos(1)))
            .expect("interval is non-zero")
            .allow_burst(self.burst)
    }
}

/// A bucket's parameters with what a decision needs worked out once: the refill interval (it
/// takes a 128-bit division) and the `X-RateLimit-Limit` value. 32 bytes, so that with
/// governor's 32-byte state the minute bucket is one cache line.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    spec: BucketSpec,
    /// Whether the limiter keeps its buckets in shared state that can be looked at without
    /// charging: it has hourly or daily buckets after this one, or it was made
    /// [`Limiter::peekable`] (in the padding after `spec`; read so that a one-bucket plan
    /// touches nothing outside this line).
    more: bool,
    /// The refill interval in nanoseconds.
    interval: u64,
    limit_value: &'static HeaderValue,
}

impl Bucket {
    fn new(spec: &BucketSpec, more: bool) -> Self {
        Self {
            spec: *spec,
            more,
            interval: u64::try_from(spec.interval().as_nanos()).unwrap_or(u64::MAX),
            limit_value: limit_value(spec.limit.get()),
        }
    }

    /// `n` refill intervals.
    fn intervals(&self, n: u32) -> Duration {
        match self.interval.checked_mul(u64::from(n)) {
            Some(nanos) => Duration::from_nanos(nanos),
            None => Duration::from_nanos(self.interval) * n,
        }
    }

    /// An admitted request, from governor's view of the bucket after charging it.
    fn admitted(&self, bucket: usize, state: &StateSnapshot) -> Decision {
        let burst = self.spec.burst.get();
        let remaining = state.remaining_burst_capacity().min(burst);
        Decision {
            allowed: true,
            spec: self.spec,
            bucket,
            remaining,
            // governor exposes whole tokens only, so this rounds the refill of the partial
            // token up: the reported time is never early, and at most one interval late.
            reset_after: self.intervals(burst - remaining),
            retry_after: Duration::ZERO,
            limit_value: self.limit_value,
            at: LAST_READING.get(),
            reason: Reason::Bucket,
        }
    }

    /// A rejected request of `cost` tokens: `wait` until there are that many; the bucket is
    /// full `burst - cost` intervals later.
    fn rejected(&self, bucket: usize, wait: Duration, cost: u32) -> Decision {
        Decision {
            allowed: false,
            spec: self.spec,
            bucket,
            remaining: 0,
            reset_after: wait + self.intervals(self.spec.burst.get().saturating_sub(cost)),
            retry_after: wait,
            limit_value: self.limit_value,
            at: LAST_READING.get(),
            reason: Reason::Bucket,
        }
    }

    /// A request costing more than the bucket holds: refused however long it waits. (`check`
    /// refuses such a cost for plan buckets; a key's custom rate may still be smaller.) Told
    /// to wait for a full bucket, the client at least does not hammer.
    fn never(&self, bucket: usize) -> Decision {
        let full = self.intervals(self.spec.burst.get());
        Decision {
            reset_after: full,
            ..self.rejected(bucket, full, self.spec.burst.get())
        }
    }

    /// What a look (a charge of one that was not made) says of the bucket before it.
    fn looked(&self, bucket: usize, look: Result<StateSnapshot, Duration>) -> Decision {
        match look {
            Ok(state) => {
                let burst = self.spec.burst.get();
                let remaining = (state.remaining_burst_capacity() + 1).min(burst);
                Decision {
                    allowed: true,
                    remaining,
                    reset_after: self.intervals(burst - remaining),
                    ..self.admitted(bucket, &state)
                }
            }
            Err(wait) => Decision {
                allowed: true,
                retry_after: Duration::ZERO,
                ..self.rejected(bucket, wait, 1)
            },
        }
    }
}

/// The buckets of a plan (or of a key with a custom rate).
pub fn buckets_for(plan: &Plan, custom_per_minute: Option<NonZeroU32>) -> Vec<BucketSpec> {
    let minute = match custom_per_minute {
        // A custom rate gets a bucket as deep as one minute of it.
        Some(rate) => BucketSpec {
            window: Window::Minute,
            limit: rate,
            burst: rate,
        },
        None => BucketSpec {
            window: Window::Minute,
            limit: plan.requests_per_minute,
            burst: plan.burst,
        },
    };
    let mut specs = vec![minute];
    for (window, limit) in [
        (Window::Hour, plan.requests_per_hour),
        (Window::Day, plan.requests_per_day),
    ] {
        if let Some(limit) = limit {
            specs.push(BucketSpec {
                window,
                limit,
                burst: limit,
            });
        }
    }
    specs
}

/// The outcome of charging a request, with what the rate-limit headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether every bucket had a token.
    pub allowed: bool,
    /// The bucket reported: the one that rejected, or the one closest to empty.
    pub spec: BucketSpec,
    /// Its index in the limiter's buckets.
    pub bucket: usize,
    /// Whole tokens left in that bucket after this request.
    pub remaining: u32,
    /// Time until that bucket is full again.
    pub reset_after: Duration,
    /// Time until one request will be admitted (zero when allowed).
    pub retry_after: Duration,
    /// `X-RateLimit-Limit`: that bucket's limit, as a header value built once.
    pub limit_value: &'static HeaderValue,
    /// When the decision was made, as a raw reading of the process's TSC clock
    /// ([`tsc_now`]): `reset_after` counts from here, so `X-RateLimit-Reset` is this plus
    /// `reset_after` however long the upstream then takes. (Limiters on other clocks, in
    /// tests, leave the thread's last TSC reading here.)
    pub at: u64,
    /// What the reported bucket is: the plan's, a route's, or the monthly quota.
    pub reason: Reason,
}

/// Folds per-bucket outcomes (smallest window first) into one decision. `now` is read only
/// when a bucket rejects: an admitted request needs no clock of its own.
fn combine<C: Clock>(
    buckets: &[Bucket],
    clock: &C,
    mut check: impl FnMut(usize) -> Result<StateSnapshot, NotUntil<C::Instant>>,
) -> Decision {
    let mut report: Option<Decision> = None;
    for (i, bucket) in buckets.iter().enumerate() {
        match check(i) {
            Ok(state) => {
                let decision = bucket.admitted(i, &state);
                if report.is_none_or(|r| decision.remaining < r.remaining) {
                    report = Some(decision);
                }
            }
            Err(not_until) => {
                return bucket.rejected(i, not_until.wait_time_from(clock.now()), 1);
            }
        }
    }
    report.expect("a limiter has at least one bucket")
}

type DirectGcra<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;
type SharedGcra<C> = RateLimiter<Access, SharedState, C, StateInformationMiddleware>;

/// A bucket's GCRA state. One limiter both charges it and looks at it ([`Access`]), so both
/// measure time from the limiter's one reference instant: a look sees exactly what a charge
/// at the same moment would. (Two limiters over one state would each have their own, and a
/// look would be off by the time between their making.)
#[derive(Debug, Default)]
struct SharedState(AtomicU64);

impl StateStore for SharedState {
    type Key = Access;

    fn measure_and_replace<T, F, E>(&self, access: &Access, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        match access {
            Access::Charge => measure(&self.0, f),
            Access::Look => look(self.0.load(Ordering::Acquire), f),
        }
    }
}

/// Of looks at several buckets, the one that refuses with the longest wait (its index among
/// them, and the wait): a client told to wait less would be refused again.
fn longest_wait<C: Clock, S>(
    looks: impl Iterator<Item = Result<S, NotUntil<C::Instant>>>,
    clock: &C,
) -> Option<(usize, Duration)> {
    let mut longest: Option<(usize, Duration)> = None;
    for (i, look) in looks.enumerate() {
        if let Err(not_until) = look {
            let wait = not_until.wait_time_from(clock.now());
            if longest.is_none_or(|(_, w)| wait > w) {
                longest = Some((i, wait));
            }
        }
    }
    longest
}

/// A bucket's limiter, full.
fn shared_gcra<C: Clock + Clone>(spec: &BucketSpec, clock: &C) -> SharedGcra<C> {
    RateLimiter::<Access, _, C, NoOpMiddleware<C::Instant>>::new(
        spec.quota(),
        SharedState::default(),
        clock.clone(),
    )
    .with_middleware()
}

type KeyedGcra<K, C> = RateLimiter<Accessed<K>, Shared<K>, C, StateInformationMiddleware>;

/// One key's buckets. A plan with only a minute bucket (most plans) has it inline, in the
/// first cache line: charging it reads that line and nothing else, and builds the
/// `X-RateLimit-*` values from it (with the `Tsc` clock; another clock may be larger). A plan
/// with hourly or daily buckets too keeps every bucket, the minute one included, in shared
/// state that can be looked at without charging, so all are looked at before any is charged.
#[repr(C, align(64))]
pub struct Limiter<C: Clock = Tsc> {
    /// One-bucket plans only.
    minute_gcra: DirectGcra<C>,
    /// The first bucket; its `more` tells the two kinds of plan apart.
    minute: Bucket,
    /// Plans with more than one bucket: each bucket (minute first), its charging limiter and
    /// its look.
    buckets: Box<[Bucket]>,
    gcras: Box<[SharedGcra<C>]>,
    specs: Box<[BucketSpec]>,
    clock: C,
}

impl<C: Clock + Clone> Limiter<C> {
    /// Full buckets for `specs` (at least one, the first the smallest window) on `clock`.
    pub fn new(specs: &[BucketSpec], clock: C) -> Self {
        Self::build(specs, clock, specs.len() > 1)
    }

    /// [`Self::new`], with every bucket (a lone minute bucket too) in shared state, so that
    /// it can be looked at without charging: for requests of cost 0, which report the
    /// bucket and take nothing, and for route buckets, which are looked at before anything is
    /// charged.
    pub fn peekable(specs: &[BucketSpec], clock: C) -> Self {
        Self::build(specs, clock, true)
    }

    /// Whether the buckets can be looked at without charging ([`Self::look`]).
    #[inline]
    pub fn is_peekable(&self) -> bool {
        self.minute.more
    }

    fn build(specs: &[BucketSpec], clock: C, more: bool) -> Self {
        let first = specs.first().expect("a limiter needs a bucket");
        let shared = if more { specs } else { &[] };
        let gcras: Vec<_> = shared.iter().map(|s| shared_gcra(s, &clock)).collect();
        Self {
            minute: Bucket::new(first, more),
            minute_gcra: RateLimiter::direct_with_clock(first.quota(), clock.clone())
                .with_middleware(),
            buckets: shared.iter().map(|s| Bucket::new(s, false)).collect(),
            gcras: gcras.into(),
            specs: specs.into(),
            clock,
        }
    }

    /// Charges one request to every bucket, or to none. A refusal reports the refusing bucket
    /// with the longest wait: told a shorter one, the client would be refused again.
    #[inline]
    pub fn check(&self) -> Decision {
        if self.minute.more {
            return self.check_every_bucket();
        }
        match self.minute_gcra.check() {
            Ok(state) => self.minute.admitted(0, &state),
            Err(not_until) => {
                self.minute
                    .rejected(0, not_until.wait_time_from(self.clock.now()), 1)
            }
        }
    }

    /// Charges `cost` tokens to every bucket, or to none ([`Self::check`] for a cost of one).
    /// A cost of 0 charges nothing and reports the bucket closest to empty ([`Self::look`]).
    #[inline]
    pub fn check_n(&self, cost: u32) -> Decision {
        if cost == 1 {
            return self.check();
        }
        self.check_cost(cost)
    }

    /// [`Self::check_n`] for a cost other than one: out of line, so that the common cost
    /// stays small enough to inline.
    #[inline(never)]
    fn check_cost(&self, cost: u32) -> Decision {
        let Some(n) = NonZeroU32::new(cost) else {
            return self.look();
        };
        if !self.minute.more {
            return match self.minute_gcra.check_n(n) {
                Ok(Ok(state)) => self.minute.admitted(0, &state),
                Ok(Err(not_until)) => {
                    self.minute
                        .rejected(0, not_until.wait_time_from(self.clock.now()), cost)
                }
                Err(_) => self.minute.never(0),
            };
        }
        if let Some(refused) = self.peek_n(n) {
            return refused;
        }
        let mut report: Option<Decision> = None;
        for (i, bucket) in self.buckets.iter().enumerate() {
            let decision = match self.gcras[i].check_key_n(&Access::Charge, n) {
                Ok(Ok(state)) => bucket.admitted(i, &state),
                // Another request took the tokens since the look (see `check_every_bucket`).
                Ok(Err(not_until)) => {
                    return bucket.rejected(i, not_until.wait_time_from(self.clock.now()), cost);
                }
                Err(_) => return bucket.never(i),
            };
            if report.is_none_or(|r| decision.remaining < r.remaining) {
                report = Some(decision);
            }
        }
        report.expect("a limiter has at least one bucket")
    }

    /// The refusal charging `n` tokens would meet, without charging (peekable limiters; one
    /// that is not says nothing). Of several empty buckets, the longest wait.
    pub fn peek_n(&self, n: NonZeroU32) -> Option<Decision> {
        let mut longest: Option<Decision> = None;
        for (i, (bucket, gcra)) in self.buckets.iter().zip(self.gcras.iter()).enumerate() {
            let refused = match gcra.check_key_n(&Access::Look, n) {
                Ok(Ok(_)) => continue,
                Ok(Err(not_until)) => {
                    bucket.rejected(i, not_until.wait_time_from(self.clock.now()), n.get())
                }
                Err(_) => return Some(bucket.never(i)),
            };
            if longest.is_none_or(|l| refused.retry_after > l.retry_after) {
                longest = Some(refused);
            }
        }
        longest
    }

    /// The buckets as they are, charged nothing: the one closest to empty, reported as
    /// admitted. A limiter that is not [`Self::peekable`] cannot be looked at and reports its
    /// minute bucket full.
    pub fn look(&self) -> Decision {
        if !self.minute.more {
            let mut full = self.minute.looked(0, Err(Duration::ZERO));
            full.remaining = self.minute.spec.burst.get();
            full.reset_after = Duration::ZERO;
            return full;
        }
        let mut report: Option<Decision> = None;
        for (i, (bucket, gcra)) in self.buckets.iter().zip(self.gcras.iter()).enumerate() {
            let look = gcra
                .check_key(&Access::Look)
                .map_err(|not_until| not_until.wait_time_from(self.clock.now()));
            let decision = bucket.looked(i, look);
            if report.is_none_or(|r| decision.remaining < r.remaining) {
                report = Some(decision);
            }
        }
        report.expect("a limiter has at least one bucket")
    }

    /// [`Self::check`] for a plan with more than one bucket: kept out of line, so that the
    /// one-bucket path stays small enough to inline.
    #[inline(never)]
    fn check_every_bucket(&self) -> Decision {
        // (Two requests racing for a bucket's last token may both pass the look; the loser is
        // then refused by the charge, after the buckets before it were charged.)
        let looks = self.gcras.iter().map(|gcra| gcra.check_key(&Access::Look));
        if let Some((i, wait)) = longest_wait(looks, &self.clock) {
            return self.buckets[i].rejected(i, wait, 1);
        }
        combine(&self.buckets, &self.clock, |i| {
            self.gcras[i].check_key(&Access::Charge)
        })
    }

    /// The bucket parameters.
    pub fn specs(&self) -> &[BucketSpec] {
        &self.specs
    }

    /// The `X-RateLimit-Limit` value of bucket `bucket` (an index into `specs`).
    pub fn limit_value(&self, bucket: usize) -> &'static HeaderValue {
        match self.buckets.get(bucket) {
            Some(b) => b.limit_value,
            None => self.minute.limit_value,
        }
    }
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("specs", &self.specs)
            .finish()
    }
}

/// Buckets per key of type `K` (client IPs), created on first use and evicted once full again
/// (or, when a table is full, to make room for a new key).
pub struct KeyedLimiter<K: Hash + Eq + Clone, C: Clock = Tsc> {
    specs: Box<[BucketSpec]>,
    buckets: Box<[Bucket]>,
    /// Each bucket's limiter, which both charges and looks ([`Access`]).
    gcras: Box<[KeyedGcra<K, C>]>,
    /// More than one bucket: each is looked at before any is charged.
    looks_first: bool,
    clock: C,
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> KeyedLimiter<K, C> {
    /// Empty tables for `specs` (at least one) on `clock`, each holding at most
    /// [`MAX_TRACKED_CLIENTS`] keys.
    pub fn new(specs: &[BucketSpec], clock: C) -> Self {
        Self::with_capacity(specs, clock, MAX_TRACKED_CLIENTS)
    }

    /// Empty tables for `specs` (at least one) on `clock`, each holding at most `capacity`
    /// keys: when one is full, its least recently used key makes room
    /// ([`super::ip_table`]).
    pub fn with_capacity(specs: &[BucketSpec], clock: C, capacity: usize) -> Self {
        assert!(!specs.is_empty(), "a limiter needs a bucket");
        Self {
            specs: specs.into(),
            buckets: specs.iter().map(|s| Bucket::new(s, false)).collect(),
            gcras: specs
                .iter()
                .map(|s| {
                    RateLimiter::<Accessed<K>, _, C, NoOpMiddleware<C::Instant>>::new(
                        s.quota(),
                        Shared(BoundedStore::new(capacity)),
                        clock.clone(),
                    )
                    .with_middleware()
                })
                .collect(),
            looks_first: specs.len() > 1,
            clock,
        }
    }

    /// Charges one request from `key` to every bucket, or to none (see [`Limiter::check`]).
    pub fn check(&self, key: &K) -> Decision {
        if self.looks_first {
            let look = Self::accessed(key, Access::Look);
            let looks = self.gcras.iter().map(|gcra| gcra.check_key(&look));
            if let Some((i, wait)) = longest_wait(looks, &self.clock) {
                return self.buckets[i].rejected(i, wait, 1);
            }
        }
        let charge = Self::accessed(key, Access::Charge);
        combine(&self.buckets, &self.clock, |i| {
            self.gcras[i].check_key(&charge)
        })
    }

    /// Charges `cost` tokens from `key` to every bucket, or to none. A cost of 0 charges
    /// nothing and gives no decision (a public route that is free reports no bucket).
    pub fn check_n(&self, key: &K, cost: u32) -> Option<Decision> {
        let n = match NonZeroU32::new(cost) {
            None => return None,
            Some(n) if n.get() == 1 => return Some(self.check(key)),
            Some(n) => n,
        };
        if self.looks_first {
            let look = Self::accessed(key, Access::Look);
            let mut longest: Option<Decision> = None;
            for (i, gcra) in self.gcras.iter().enumerate() {
                let refused = match gcra.check_key_n(&look, n) {
                    Ok(Ok(_)) => continue,
                    Ok(Err(not_until)) => self.buckets[i].rejected(
                        i,
                        not_until.wait_time_from(self.clock.now()),
                        cost,
                    ),
                    Err(_) => return Some(self.buckets[i].never(i)),
                };
                if longest.is_none_or(|l| refused.retry_after > l.retry_after) {
                    longest = Some(refused);
                }
            }
            if longest.is_some() {
                return longest;
            }
        }
        let mut report: Option<Decision> = None;
        let charge = Self::accessed(key, Access::Charge);
        for (i, bucket) in self.buckets.iter().enumerate() {
            let decision = match self.gcras[i].check_key_n(&charge, n) {
                Ok(Ok(state)) => bucket.admitted(i, &state),
                Ok(Err(not_until)) => {
                    return Some(bucket.rejected(
                        i,
                        not_until.wait_time_from(self.clock.now()),
                        cost,
                    ));
                }
                Err(_) => return Some(bucket.never(i)),
            };
            if report.is_none_or(|r| decision.remaining < r.remaining) {
                report = Some(decision);
            }
        }
        report
    }

    fn accessed(key: &K, access: Access) -> Accessed<K> {
        Accessed {
            key: key.clone(),
            access,
        }
    }

    /// Drops keys whose buckets are full again (idle), and returns how many keys remain.
    pub fn evict_idle(&self) -> usize {
        for gcra in self.gcras.iter() {
            gcra.retain_recent();
            gcra.shrink_to_fit();
        }
        self.len()
    }

    /// Keys tracked (in the largest table).
    pub fn len(&self) -> usize {
        self.gcras.iter().map(|g| g.len()).max().unwrap_or(0)
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bucket parameters.
    pub fn specs(&self) -> &[BucketSpec] {
        &self.specs
    }
}

impl<K: Hash + Eq + Clone, C: Clock> std::fmt::Debug for KeyedLimiter<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("specs", &self.specs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use governor::clock::FakeRelativeClock;

    fn spec(limit: u32, burst: u32) -> BucketSpec {
        BucketSpec {
            window: Window::Minute,
            limit: NonZeroU32::new(limit).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn full_bucket_then_empty() {
        let clock = FakeRelativeClock::default();
        // 60/min: one token a second, 3 deep.
        let l = Limiter::new(&[spec(60, 3)], clock.clone());
        let d = l.check();
        assert!(d.allowed);
        assert_eq!(
            (d.remaining, d.reset_after),
            (2, SEC),
            "first of a full bucket"
        );
        let d = l.check();
        assert_eq!((d.remaining, d.reset_after), (1, 2 * SEC));
        let d = l.check();
        assert_eq!((d.remaining, d.reset_after), (0, 3 * SEC), "last token");
        let d = l.check();
        assert!(!d.allowed, "empty");
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_after, SEC, "one token after one interval");
        assert_eq!(d.reset_after, 3 * SEC, "full after burst intervals");
    }

    #[test]
    fn fractional_refill() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::new(&[spec(60, 2)], clock.clone());
        assert!(l.check().allowed);
        assert!(l.check().allowed);
        clock.advance(Duration::from_millis(400));
        let d = l.check();
        assert!(!d.allowed, "0.4 of a token is not a token");
        assert_eq!(d.retry_after, Duration::from_millis(600));
        assert_eq!(d.reset_after, Duration::from_millis(1600));
        clock.advance(Duration::from_millis(600));
        let d = l.check();
        assert!(d.allowed, "exactly at retry_after one request is admitted");
        assert_eq!(d.remaining, 0);
        // Rejections do not charge: after one more interval there is a token again.
        assert!(!l.check().allowed);
        clock.advance(SEC);
        assert!(l.check().allowed);
    }

    #[test]
    fn burst_larger_and_smaller_than_rate() {
        let clock = FakeRelativeClock::default();
        // 6/min (one per 10s) but 5 deep.
        let l = Limiter::new(&[spec(6, 5)], clock.clone());
        for left in (0..5).rev() {
            assert_eq!(l.check().remaining, left);
        }
        let d = l.check();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, 10 * SEC);
        assert_eq!(d.reset_after, 50 * SEC);
        // 600/min (one per 100ms) but only 1 deep.
        let l = Limiter::new(&[spec(600, 1)], clock.clone());
        let d = l.check();
        assert_eq!(
            (d.allowed, d.remaining, d.reset_after),
            (true, 0, Duration::from_millis(100))
        );
        let d = l.check();
        assert_eq!(
            (d.allowed, d.retry_after),
            (false, Duration::from_millis(100))
        );
        clock.advance(Duration::from_millis(100));
        assert!(l.check().allowed);
    }

    #[test]
    fn partly_refilled_reset_is_never_early() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::new(&[spec(60, 3)], clock.clone());
        for _ in 0..3 {
            l.check();
        }
        clock.advance(Duration::from_millis(2500));
        // 2.5 tokens back; this request takes one, leaving 1.5: whole tokens 1.
        let d = l.check();
        assert_eq!(d.remaining, 1);
        // Exactly full after 1.5 s; reported 2 s (rounded up to the whole token).
        assert_eq!(d.reset_after, 2 * SEC);
        clock.advance(Duration::from_millis(1500));
        for _ in 0..3 {
            assert!(
                l.check().allowed,
                "full at the true reset, so also at the reported one"
            );
        }
    }

    #[test]
    fn several_buckets_report_the_closest_to_empty() {
        let clock = FakeRelativeClock::default();
        let plan = Plan {
            requests_per_minute: NonZeroU32::new(10).unwrap(),
            burst: NonZeroU32::new(10).unwrap(),
            requests_per_hour: None,
            requests_per_day: Some(NonZeroU32::new(3).unwrap()),
            requests_per_month: None,
            routes: Default::default(),
        };
        let l = Limiter::new(&buckets_for(&plan, None), clock.clone());
        let d = l.check();
        assert_eq!((d.spec.window, d.remaining), (Window::Day, 2));
        l.check();
        l.check();
        let d = l.check();
        assert!(!d.allowed);
        assert_eq!(d.spec.window, Window::Day, "the daily bucket rejected");
        assert_eq!(d.retry_after, Duration::from_secs(86_400 / 3));
    }

    #[test]
    fn a_minute_bucket_is_one_cache_line() {
        // What `check` reads for a one-bucket plan: governor's state, the bucket, its flag.
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<Limiter>(), 64);
        assert_eq!(offset_of!(Limiter, minute_gcra), 0);
        assert!(
            offset_of!(Limiter, minute) + size_of::<Bucket>() <= 64,
            "state {} + bucket {}",
            size_of::<DirectGcra<Tsc>>(),
            size_of::<Bucket>()
        );
        assert_eq!(size_of::<Tsc>(), 0);
    }

    #[test]
    fn interval_sums_past_u64_nanoseconds_do_not_wrap() {
        // One a day, counted 2^32 - 1 times: about 1.2e13 s, past u64 nanoseconds.
        let day = BucketSpec {
            window: Window::Day,
            limit: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
        };
        let bucket = Bucket::new(&day, false);
        assert_eq!(bucket.intervals(3), Duration::from_secs(3 * 86_400));
        assert_eq!(
            bucket.intervals(u32::MAX),
            Duration::from_secs(86_400 * u64::from(u32::MAX))
        );
        assert_eq!(bucket.limit_value, "1");
    }

    #[test]
    fn custom_rate_overrides_the_plan() {
        let plan = Plan {
            requests_per_minute: NonZeroU32::new(300).unwrap(),
            burst: NonZeroU32::new(300).unwrap(),
            requests_per_hour: None,
            requests_per_day: None,
            requests_per_month: None,
            routes: Default::default(),
        };
        let specs = buckets_for(&plan, NonZeroU32::new(1200));
        assert_eq!(specs, vec![spec(1200, 1200)]);
    }

    #[test]
    fn keyed_buckets_are_per_key_and_evicted_when_full() {
        let clock = FakeRelativeClock::default();
        let l: KeyedLimiter<u32, _> = KeyedLimiter::new(&[spec(60, 2)], clock.clone());
        assert!(l.check(&1).allowed);
        assert!(l.check(&1).allowed);
        assert!(!l.check(&1).allowed);
        assert!(l.check(&2).allowed, "another key has its own bucket");
        assert_eq!(l.evict_idle(), 2);
        clock.advance(Duration::from_secs(3));
        assert_eq!(l.evict_idle(), 0, "full buckets are forgotten");
        assert!(l.check(&1).allowed);
    }

    #[test]
    fn a_request_the_hourly_bucket_refuses_takes_no_minute_token() {
        let clock = FakeRelativeClock::default();
        let hour = BucketSpec {
            window: Window::Hour,
            limit: NonZeroU32::new(3).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
        };
        let l = Limiter::new(&[spec(60, 10), hour], clock.clone());
        for _ in 0..3 {
            assert!(l.check().allowed);
        }
        for _ in 0..5 {
            let d = l.check();
            assert!(!d.allowed);
            assert_eq!(d.bucket, 1, "the hourly bucket refuses");
            assert_eq!(d.retry_after, Duration::from_secs(20 * 60));
        }
        // The minute bucket gave 3 tokens, not 8: charging it once more leaves 10 - 3 - 1.
        let minute = l.gcras[0].check_key(&Access::Charge).expect("tokens left");
        assert_eq!(minute.remaining_burst_capacity(), 6);
        // The hour's next token comes after 20 minutes, and is charged once.
        clock.advance(Duration::from_secs(20 * 60));
        assert!(l.check().allowed);
        assert!(!l.check().allowed);
    }

    /// With the hourly and the daily bucket both empty, a 429 tells the daily bucket's wait:
    /// after the hourly one the daily bucket would still refuse.
    #[test]
    fn a_refusal_reports_the_longest_wait_of_the_empty_buckets() {
        let clock = FakeRelativeClock::default();
        let one = |window| BucketSpec {
            window,
            limit: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
        };
        let specs = [spec(60, 10), one(Window::Hour), one(Window::Day)];
        let l = Limiter::new(&specs, clock.clone());
        let ips: KeyedLimiter<u32, _> = KeyedLimiter::new(&specs, clock.clone());
        assert!(l.check().allowed);
        assert!(ips.check(&1).allowed);
        for d in [l.check(), ips.check(&1)] {
            assert!(!d.allowed);
            assert_eq!(d.bucket, 2, "the daily bucket");
            assert_eq!(d.spec.window, Window::Day);
            assert_eq!(d.retry_after, Duration::from_secs(86_400));
        }
        // An hour later the hourly bucket has a token again; the daily one still refuses.
        clock.advance(Duration::from_secs(3_600));
        for d in [l.check(), ips.check(&1)] {
            assert!(!d.allowed);
            assert_eq!(d.bucket, 2);
            assert_eq!(d.retry_after, Duration::from_secs(82_800));
        }
        clock.advance(Duration::from_secs(82_800));
        assert!(l.check().allowed);
        assert!(ips.check(&1).allowed);
    }

    /// The minute bucket is looked at with the others: when its wait is the longest of the
    /// empty buckets, it is the one reported.
    #[test]
    fn an_empty_minute_bucket_with_the_longest_wait_is_reported() {
        let clock = FakeRelativeClock::default();
        // One every 6 s, and one a second over the hour; each one deep.
        let hour = BucketSpec {
            window: Window::Hour,
            limit: NonZeroU32::new(3_600).unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
        };
        let specs = [spec(10, 1), hour];
        let l = Limiter::new(&specs, clock.clone());
        let ips: KeyedLimiter<u32, _> = KeyedLimiter::new(&specs, clock.clone());
        assert!(l.check().allowed);
        assert!(ips.check(&1).allowed);
        clock.advance(Duration::from_millis(500));
        // The hour's bucket has a token in 0.5 s, the minute's in 5.5 s.
        for d in [l.check(), ips.check(&1)] {
            assert!(!d.allowed);
            assert_eq!(d.bucket, 0, "the minute bucket");
            assert_eq!(d.retry_after, Duration::from_millis(5_500));
        }
        clock.advance(Duration::from_millis(5_500));
        assert!(l.check().allowed);
        assert!(ips.check(&1).allowed);
    }

    #[test]
    fn a_cost_takes_that_many_tokens_from_every_bucket_or_none() {
        let clock = FakeRelativeClock::default();
        let hour = BucketSpec {
            window: Window::Hour,
            limit: NonZeroU32::new(12).unwrap(),
            burst: NonZeroU32::new(12).unwrap(),
        };
        for l in [
            Limiter::new(&[spec(60, 10)], clock.clone()),
            Limiter::peekable(&[spec(60, 10)], clock.clone()),
            Limiter::new(&[spec(60, 10), hour], clock.clone()),
        ] {
            let d = l.check_n(4);
            assert_eq!((d.allowed, d.remaining), (true, 6));
            assert_eq!(d.reset_after, 4 * SEC, "four tokens to earn back");
            assert_eq!(l.check_n(4).remaining, 2);
            let d = l.check_n(4);
            assert!(!d.allowed, "2 tokens left, 4 asked");
            assert_eq!(d.retry_after, 2 * SEC, "until there are four");
            assert_eq!(d.reset_after, 8 * SEC);
            assert_eq!(l.check_n(2).remaining, 0, "the refusal took nothing");
            assert!(!l.check_n(11).allowed, "more than the bucket holds");
            clock.advance(10 * SEC);
        }
    }

    #[test]
    fn a_cost_of_zero_looks_and_charges_nothing() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::peekable(&[spec(60, 3)], clock.clone());
        let d = l.check_n(0);
        assert_eq!(
            (d.allowed, d.remaining, d.reset_after),
            (true, 3, Duration::ZERO)
        );
        l.check();
        l.check();
        let d = l.check_n(0);
        assert_eq!((d.allowed, d.remaining, d.reset_after), (true, 1, 2 * SEC));
        l.check();
        let d = l.check_n(0);
        assert!(d.allowed, "a look is never refused");
        assert_eq!((d.remaining, d.reset_after), (0, 3 * SEC));
        assert!(
            !l.check().allowed,
            "the looks took nothing, the charges all three"
        );
        assert!(l.peek_n(NonZeroU32::new(1).unwrap()).is_some());
        clock.advance(SEC);
        assert!(l.peek_n(NonZeroU32::new(1).unwrap()).is_none());
        assert!(l.peek_n(NonZeroU32::new(2).unwrap()).is_some());
        assert!(l.check().allowed, "peeking charged nothing");
    }

    /// A clock that moves on by `step` at every read, so that time passes while a limiter is
    /// being made, as it does when the thread making it is preempted.
    #[derive(Debug, Clone, Default)]
    struct Ticking {
        now: Arc<AtomicU64>,
        step: Arc<AtomicU64>,
    }

    impl Clock for Ticking {
        type Instant = Nanos;

        fn now(&self) -> Nanos {
            let step = self.step.load(Ordering::Relaxed);
            Nanos::new(self.now.fetch_add(step, Ordering::Relaxed))
        }
    }

    /// A clock moving half a second at each read (until its `step` is set to 0), and an
    /// hourly bucket deep enough never to be the one that refuses.
    fn ticking_while_made() -> (Ticking, BucketSpec) {
        let clock = Ticking::default();
        clock.step.store(500_000_000, Ordering::Relaxed);
        let hour = BucketSpec {
            window: Window::Hour,
            limit: NonZeroU32::new(600).unwrap(),
            burst: NonZeroU32::new(600).unwrap(),
        };
        (clock, hour)
    }

    #[test]
    fn a_look_sees_what_a_charge_left_however_long_the_limiter_took_to_make() {
        // 60/min: one token a second, 10 deep. Half a second passes at each read of the clock
        // while the limiter is made, none after.
        let (clock, hour) = ticking_while_made();
        let limiters = [
            Limiter::peekable(&[spec(60, 10)], clock.clone()),
            Limiter::new(&[spec(60, 10), hour], clock.clone()),
        ];
        clock.step.store(0, Ordering::Relaxed);
        for l in limiters {
            assert_eq!(l.check().remaining, 9);
            assert_eq!(l.look().remaining, 9, "the look sees the 9 the charge left");
            assert_eq!(l.check_n(9).remaining, 0);
            assert!(l.peek_n(NonZeroU32::new(1).unwrap()).is_some(), "empty");
            assert!(!l.check().allowed);
        }
    }

    #[test]
    fn a_client_ip_gets_the_token_its_bucket_has_however_long_the_limiter_took_to_make() {
        // 60/min, 10 deep, and an hourly bucket: the minute bucket is looked at before it is
        // charged. Half a second passes at each read of the clock while the limiter is made.
        let (clock, hour) = ticking_while_made();
        let l: KeyedLimiter<u32, _> = KeyedLimiter::new(&[spec(60, 10), hour], clock.clone());
        clock.step.store(0, Ordering::Relaxed);
        assert_eq!(l.check_n(&1, 10).unwrap().remaining, 0);
        assert!(!l.check(&1).allowed, "empty");
        // One second later the minute bucket has one token: the look sees it as the charge does.
        clock.now.fetch_add(1_000_000_000, Ordering::Relaxed);
        let d = l.check(&1);
        assert!(d.allowed, "refused for {:?}", d.retry_after);
        assert!(!l.check(&1).allowed);
        clock.now.fetch_add(2_000_000_000, Ordering::Relaxed);
        assert!(
            l.check_n(&1, 2).unwrap().allowed,
            "two tokens, two seconds later"
        );
    }

    #[test]
    fn a_client_ip_is_charged_the_cost() {
        let clock = FakeRelativeClock::default();
        let l: KeyedLimiter<u32, _> = KeyedLimiter::new(&[spec(60, 10)], clock.clone());
        assert_eq!(l.check_n(&1, 6).unwrap().remaining, 4);
        assert!(!l.check_n(&1, 6).unwrap().allowed);
        assert_eq!(l.check_n(&1, 4).unwrap().remaining, 0);
        assert!(l.check_n(&1, 0).is_none(), "free: no decision");
        assert_eq!(l.check_n(&2, 10).unwrap().remaining, 0, "another client");
    }

    #[test]
    fn a_client_ip_the_hourly_bucket_refuses_takes_no_minute_token() {
        let clock = FakeRelativeClock::default();
        let hour = BucketSpec {
            window: Window::Hour,
            limit: NonZeroU32::new(3).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
        };
        let l: KeyedLimiter<u32, _> = KeyedLimiter::new(&[spec(60, 10), hour], clock.clone());
        for _ in 0..3 {
            assert!(l.check(&1).allowed);
        }
        for _ in 0..5 {
            let d = l.check(&1);
            assert!(!d.allowed);
            assert_eq!(d.bucket, 1, "the hourly bucket refuses");
        }
        let minute = l.gcras[0]
            .check_key(&KeyedLimiter::<u32, FakeRelativeClock>::accessed(
                &1,
                Access::Charge,
            ))
            .expect("tokens left");
        assert_eq!(minute.remaining_burst_capacity(), 6);
        // Looking does not add a client to a table.
        assert!(l.check(&2).allowed);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn a_full_keyed_table_makes_room_and_keeps_busy_keys_limited() {
        let clock = FakeRelativeClock::default();
        // Two keys at most; 60/min, 2 deep.
        let l: KeyedLimiter<u32, _> = KeyedLimiter::with_capacity(&[spec(60, 2)], clock.clone(), 2);
        assert!(l.check(&1).allowed);
        assert!(l.check(&1).allowed);
        assert!(!l.check(&1).allowed, "key 1 is empty");
        // A flood of new keys, with key 1 still knocking between them.
        for key in 100..200 {
            clock.advance(Duration::from_millis(1));
            assert!(
                !l.check(&1).allowed,
                "key 1 was evicted and got a fresh bucket"
            );
            assert!(l.check(&key).allowed, "a new key is admitted");
            assert!(l.len() <= 2);
        }
        // Key 1 refills at its own pace (one token a second from when it was emptied).
        clock.advance(Duration::from_millis(900));
        assert!(l.check(&1).allowed);
        assert!(!l.check(&1).allowed);
    }
}
