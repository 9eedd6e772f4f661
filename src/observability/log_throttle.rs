//! Rate-limited warnings, for failures that repeat once per request: an overloaded or dead
//! upstream would otherwise write a WARN line for every request it fails (tens of thousands a
//! second), and the Redis limiter backend one per outage however fast it flaps. A
//! [`LogThrottle`] lets one line through per [`LOG_PERIOD`] and counts the others, which the
//! next line reports as `suppressed`; the metrics still count every failure.
//!
//! The request path's failures share [`upstream_failures`], keyed by failure kind and
//! upstream name; the Redis backend holds its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// How often one [`LogThrottle`] lets a line through.
pub const LOG_PERIOD: Duration = Duration::from_secs(1);

/// One line of log per [`LOG_PERIOD`]; the others are counted. Two atomics and no lock, as
/// it is called on every failed request.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// When the next line may be written, in milliseconds since [`ORIGIN`] (0: at once).
    next_ms: AtomicU64,
    /// Lines left out since the last one written.
    suppressed: AtomicU64,
}

/// The time [`LogThrottle`]s count from.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

impl LogThrottle {
    /// A throttle that lets its first line through.
    pub const fn new() -> Self {
        Self {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: write the line now, with `n`, the number of lines left out since the last
    /// one; `None`: leave it out (it is counted for the next).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(ORIGIN.elapsed(), true)
    }

    /// [`admit`](Self::admit) for a line already counted as left out, tried again later (the
    /// Redis outage warning, until it is written): a refusal is not counted a second time.
    pub fn readmit(&self) -> Option<u64> {
        self.admit_at(ORIGIN.elapsed(), false)
    }

    /// [`admit`](Self::admit) at `now`, a time since [`ORIGIN`]; a refusal is counted if
    /// `count`.
    fn admit_at(&self, now: Duration, count: bool) -> Option<u64> {
        let now = now.as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        // Of callers racing at the end of a period, the one whose swap lands writes the line.
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + LOG_PERIOD.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        if count {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        None
    }
}

/// [`LogThrottle`]s by kind (a `&'static` label) and subject (such as an upstream's name),
/// each made at its first line and kept for the process's life: subjects come from config,
/// so there are few. A lookup is lock-free (an [`ArcSwap`] load and two hash lookups); the
/// map is copied only to add a throttle.
#[derive(Debug, Default)]
pub struct LogThrottles {
    by_kind: ArcSwap<HashMap<&'static str, BySubject>>,
}

/// One kind's throttles, by subject.
type BySubject = HashMap<Box<str>, Arc<LogThrottle>>;

impl LogThrottles {
    /// [`LogThrottle::admit`] on the throttle of `kind` and `subject`.
    pub fn admit(&self, kind: &'static str, subject: &str) -> Option<u64> {
        if let Some(throttle) = self.by_kind.load().get(kind).and_then(|s| s.get(subject)) {
            return throttle.admit();
        }
        self.by_kind.rcu(|by_kind| {
            let mut by_kind = HashMap::clone(by_kind);
            by_kind
                .entry(kind)
                .or_default()
                .entry(subject.into())
                .or_default();
            by_kind
        });
        self.by_kind.load()[kind][subject].admit()
    }
}

/// The throttles of the warnings that repeat per request or connection (upstream failures,
/// failed accepts), by kind and subject (such as an upstream's name). Process-wide, so a
/// reload (which builds new upstreams) keeps them.
pub fn upstream_failures() -> &'static LogThrottles {
    static THROTTLES: LazyLock<LogThrottles> = LazyLock::new(LogThrottles::default);
    &THROTTLES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn one_line_a_period_carrying_the_count_left_out() {
        let throttle = LogThrottle::new();
        assert_eq!(
            throttle.admit_at(ms(5_000), true),
            Some(0),
            "the first line"
        );
        for at in [5_000, 5_001, 5_500, 5_999] {
            assert_eq!(throttle.admit_at(ms(at), true), None, "{at} ms");
        }
        assert_eq!(
            throttle.admit_at(ms(6_000), true),
            Some(4),
            "a period on, with the 4 left out"
        );
        assert_eq!(throttle.admit_at(ms(6_999), true), None);
        assert_eq!(
            throttle.admit_at(ms(60_000), true),
            Some(1),
            "after a quiet spell at once"
        );
        assert_eq!(throttle.admit_at(ms(60_001), true), None);
    }

    #[test]
    fn a_line_tried_again_is_not_counted_again() {
        let throttle = LogThrottle::new();
        assert_eq!(throttle.admit_at(ms(0), true), Some(0));
        assert_eq!(throttle.admit_at(ms(10), true), None, "left out, counted");
        assert_eq!(throttle.admit_at(ms(20), false), None, "tried again");
        assert_eq!(throttle.admit_at(ms(30), false), None, "and again");
        assert_eq!(throttle.admit_at(ms(1_000), false), Some(1), "counted once");
    }

    #[test]
    fn a_line_at_the_start_of_the_clock() {
        assert_eq!(LogThrottle::new().admit_at(ms(0), true), Some(0));
    }

    #[test]
    fn each_kind_and_subject_has_its_own_throttle() {
        let throttles = LogThrottles::default();
        assert_eq!(throttles.admit("overloaded", "core"), Some(0));
        assert_eq!(throttles.admit("overloaded", "core"), None);
        assert_eq!(
            throttles.admit("overloaded", "billing"),
            Some(0),
            "another upstream"
        );
        assert_eq!(
            throttles.admit("maintenance", "core"),
            Some(0),
            "another kind"
        );
        assert_eq!(
            throttles.admit("overloaded", "core"),
            None,
            "kept across additions"
        );
        assert_eq!(throttles.admit("maintenance", "core"), None);
    }

    #[test]
    fn concurrent_callers_write_one_line_and_count_the_rest() {
        let throttle = LogThrottle::new();
        let written = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..1_000)
                            .filter(|_| throttle.admit_at(ms(10), true).is_some())
                            .count()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum::<usize>()
        });
        assert_eq!(written, 1);
        assert_eq!(throttle.admit_at(ms(1_010), true), Some(3_999));
    }
}
