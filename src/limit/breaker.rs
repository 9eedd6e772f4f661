//! A circuit breaker for the limiter backend: after a failure, the backend is skipped for a
//! cool-off period, then one request probes it. A dead Redis therefore costs one
//! `backend_timeout` per cool-off, not one per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the backend is skipped after a failure.
pub const DEFAULT_COOL_OFF: Duration = Duration::from_secs(2);

/// Closed (calls go through), or open until a deadline, after which one caller probes.
/// What the breaker allows a caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The backend is healthy: call it.
    Closed,
    /// The backend failed and its cool-off is over: this caller alone should test it.
    Probe,
    /// The backend failed recently: do not call it.
    Open,
}

#[derive(Debug)]
pub struct Breaker {
    epoch: Instant,
    cool_off: Duration,
    /// Milliseconds since `epoch` (plus one) until which calls are skipped; 0 = closed.
    open_until: AtomicU64,
    /// Whether the last call succeeded: failures are logged on the healthy -> down edge only.
    healthy: AtomicBool,
}

impl Breaker {
    /// A closed breaker that stays open `cool_off` after each failure.
    pub fn new(cool_off: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            cool_off,
            open_until: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Whether a call may go to the backend at `now`. Once the cool-off is over, exactly one
    /// caller gets [`Admission::Probe`]; the others keep skipping for another cool-off.
    pub fn admit(&self, now: Instant) -> Admission {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Closed;
        }
        let now_ms = self.millis(now);
        if now_ms < until {
            return Admission::Open;
        }
        let next = self.millis(now + self.cool_off);
        match self
            .open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Open,
        }
    }

    /// A call succeeded: closes the breaker. True when this ends an outage.
    pub fn success(&self) -> bool {
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
        }
        !self.healthy.swap(true, Ordering::AcqRel)
    }

    /// A call failed at `now`: opens the breaker for a cool-off. True when this starts an
    /// outage (the backend was healthy until now).
    pub fn failure(&self, now: Instant) -> bool {
        self.open_until
            .store(self.millis(now + self.cool_off), Ordering::Release);
        self.healthy.swap(false, Ordering::AcqRel)
    }

    /// Whether the last call succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_after_failure_then_one_probe() {
        let breaker = Breaker::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(breaker.admit(t0), Admission::Closed, "closed at first");
        assert!(breaker.failure(t0), "healthy -> down is reported");
        assert!(!breaker.failure(t0), "a second failure is not a new outage");
        assert_eq!(
            breaker.admit(t0 + Duration::from_millis(1999)),
            Admission::Open
        );
        let later = t0 + Duration::from_millis(2001);
        assert_eq!(
            breaker.admit(later),
            Admission::Probe,
            "one probe after the cool-off"
        );
        assert_eq!(breaker.admit(later), Admission::Open, "only one");
        assert!(breaker.success(), "the probe's success ends the outage");
        assert!(!breaker.success());
        assert_eq!(breaker.admit(later), Admission::Closed, "closed again");
    }

    #[test]
    fn failed_probe_waits_another_cool_off() {
        let breaker = Breaker::new(Duration::from_secs(2));
        let t0 = Instant::now();
        breaker.failure(t0);
        let probe = t0 + Duration::from_secs(3);
        assert_eq!(breaker.admit(probe), Admission::Probe);
        breaker.failure(probe);
        assert_eq!(
            breaker.admit(probe + Duration::from_secs(1)),
            Admission::Open
        );
        assert_eq!(
            breaker.admit(probe + Duration::from_millis(2001)),
            Admission::Probe
        );
        assert!(!breaker.is_healthy());
    }
}
