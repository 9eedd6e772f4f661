//! A circuit breaker for the limiter backend. After a failure requests skip the backend (and
//! `on_backend_error` decides them) until a probe finds it answering again. Probes run in the
//! background, off the request path: the first [`FIRST_PROBE_AFTER`] the outage began, each
//! later one after twice the previous wait, up to [`MAX_PROBE_INTERVAL`]. So a dead Redis
//! costs one `backend_timeout` per outage, not one per request; a restart (back within a
//! second or so) is found soon after; and an instance that is idle when Redis comes back is
//! using it again within a probe interval, not only after its next request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long after an outage began the backend is first probed.
pub const FIRST_PROBE_AFTER: Duration = Duration::from_millis(100);

/// The longest wait between two probes: the most an outage outlasts Redis' return.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether calls may go to the backend, and whether its background prober was started.
#[derive(Debug)]
pub struct Breaker {
    /// Whether the last call succeeded: while not, calls are skipped, and failures are
    /// logged on the healthy -> down edge only.
    healthy: AtomicBool,
    /// Whether the background prober has been started (once, at the first failure).
    prober: AtomicBool,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            prober: AtomicBool::new(false),
        }
    }
}

impl Breaker {
    /// Whether calls may go to the backend.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// A call succeeded: closes the breaker. True when this ends an outage.
    pub fn success(&self) -> bool {
        !self.healthy.swap(true, Ordering::AcqRel)
    }

    /// A call failed: opens the breaker. True when this starts an outage (the backend was
    /// healthy until now).
    pub fn failure(&self) -> bool {
        self.healthy.swap(false, Ordering::AcqRel)
    }

    /// True for the one caller that should start the background prober. It runs for the
    /// backend's life and probes only while the breaker is open, so there is never a moment
    /// when an open breaker has no prober (as there would be between a prober's exit and the
    /// next outage's start).
    pub fn start_prober(&self) -> bool {
        !self.prober.swap(true, Ordering::AcqRel)
    }
}

/// The waits before each probe of one outage: [`FIRST_PROBE_AFTER`], then doubling up to
/// [`MAX_PROBE_INTERVAL`].
pub fn probe_waits() -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(FIRST_PROBE_AFTER), |wait| {
        Some((*wait * 2).min(MAX_PROBE_INTERVAL))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_start_soon_and_back_off_to_the_interval() {
        let waits: Vec<u64> = probe_waits()
            .take(7)
            .map(|w| w.as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn outages_begin_and_end_once() {
        let breaker = Breaker::default();
        assert!(breaker.is_healthy(), "closed at first");
        assert!(breaker.failure(), "healthy -> down is reported");
        assert!(!breaker.failure(), "a second failure is not a new outage");
        assert!(!breaker.is_healthy());
        assert!(breaker.success(), "the probe's success ends the outage");
        assert!(!breaker.success());
        assert!(breaker.is_healthy(), "closed again");
    }

    #[test]
    fn one_prober_for_every_outage() {
        let breaker = Breaker::default();
        breaker.failure();
        assert!(breaker.start_prober());
        breaker.success();
        breaker.failure();
        assert!(!breaker.start_prober(), "the first one still runs");
    }
}
