//! Health of an upstream's targets. Passive: `eject_after` consecutive failures (connect
//! refused or timed out, reset before the response head, response-head timeout) take a target
//! out for `eject_for`, twice as long on each consecutive ejection up to ten times, until a
//! success resets it; `max_ejected_percent` bounds how many are out at once. Active (with
//! `[upstreams.health_check]`): `unhealthy_after` failed probes in a row take a target out
//! until `healthy_after` good ones in a row (see `probe.rs`).
//!
//! Part of the proxy box: the balancer asks [`Health::state`] which targets may take a
//! request, and `forward` reports each attempt's outcome. Times are passed in, so the logic
//! is tested with a fake clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// An ejection is never longer than this many `eject_for`s.
const MAX_EJECTION_FACTOR: u32 = 10;

/// An upstream's passive ejection settings.
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// Consecutive failures that eject a target (`eject_after`; 0 never ejects).
    pub after: u32,
    /// The first ejection's length (`eject_for`).
    pub base: Duration,
    /// How many of the upstream's targets may be out at once (`max_ejected_percent` of them,
    /// rounded down).
    pub max_ejected: usize,
}

impl Ejection {
    /// Whether ejection can ever take a target out.
    pub fn enabled(&self) -> bool {
        self.after > 0 && self.max_ejected > 0
    }
}

/// Whether a target may take requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// It may.
    In,
    /// Its ejection ended just now: it may again (said once, for the log).
    Returned,
    /// Ejected until then.
    Out(Instant),
    /// Failing its health probes: out until it passes `healthy_after` in a row.
    Down,
}

/// One target's passive health.
#[derive(Debug, Default)]
pub struct Health {
    /// Failures since the last success or ejection.
    failures: AtomicU32,
    /// Ejections since the last success.
    streak: AtomicU32,
    /// Set while ejected: the one check of a healthy target's hot path.
    out: AtomicBool,
    /// When the ejection ends.
    until: Mutex<Option<Instant>>,
    /// Set while failing its probes.
    down: AtomicBool,
    /// Probes in a row that disagree with `down` (failed while up, good while down).
    probe_streak: AtomicU32,
}

impl Health {
    fn until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the target may take a request at `now`.
    pub fn state(&self, now: Instant) -> State {
        if self.down.load(Ordering::Acquire) {
            return State::Down;
        }
        if !self.out.load(Ordering::Acquire) {
            return State::In;
        }
        let mut until = self.until();
        match *until {
            Some(end) if now < end => State::Out(end),
            Some(_) => {
                *until = None;
                self.out.store(false, Ordering::Release);
                State::Returned
            }
            // Another request saw it return.
            None => State::In,
        }
    }

    /// Whether the target is ejected at `now` (without noticing a return).
    pub fn is_out(&self, now: Instant) -> bool {
        self.out.load(Ordering::Acquire) && self.until().is_some_and(|end| now < end)
    }

    /// Whether the target is failing its probes.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// A probe's result. `Some(up)` when it changed the target's state: down after
    /// `unhealthy_after` failures in a row, up after `healthy_after` good probes in a row.
    /// (One prober per upstream calls this, so the streak needs no lock.)
    pub fn probed(&self, good: bool, healthy_after: u32, unhealthy_after: u32) -> Option<bool> {
        let down = self.down.load(Ordering::Acquire);
        if good != down {
            // Agrees with the state it is in.
            self.probe_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.probe_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if down { healthy_after } else { unhealthy_after };
        if streak < needed {
            return None;
        }
        self.probe_streak.store(0, Ordering::Relaxed);
        self.down.store(!down, Ordering::Release);
        Some(down)
    }

    /// A request got its response head: the failure and ejection counts start over.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    /// A failure that counts toward ejection, at `now`, with `others_out` of the upstream's
    /// other targets ejected. The ejection's length when it ejects the target.
    pub fn failure(&self, now: Instant, others_out: usize, rule: &Ejection) -> Option<Duration> {
        if !rule.enabled() {
            return None;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < rule.after {
            return None;
        }
        let mut until = self.until();
        // Requests that were in flight when it was ejected fail too: no second ejection.
        if self.out.load(Ordering::Acquire) || others_out >= rule.max_ejected {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let streak = self.streak.fetch_add(1, Ordering::AcqRel);
        let factor = 1u32
            .checked_shl(streak)
            .unwrap_or(u32::MAX)
            .min(MAX_EJECTION_FACTOR);
        let length = rule.base * factor;
        *until = Some(now + length);
        self.out.store(true, Ordering::Release);
        Some(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Ejection = Ejection {
        after: 3,
        base: Duration::from_secs(30),
        max_ejected: 1,
    };

    fn fail(health: &Health, now: Instant, times: u32) -> Option<Duration> {
        (0..times)
            .filter_map(|_| health.failure(now, 0, &RULE))
            .last()
    }

    #[test]
    fn consecutive_failures_eject_for_eject_for_then_the_target_returns() {
        let health = Health::default();
        let t0 = Instant::now();
        assert_eq!(fail(&health, t0, 2), None);
        health.success();
        assert_eq!(
            fail(&health, t0, 2),
            None,
            "a success starts the count over"
        );
        assert_eq!(health.state(t0), State::In);
        assert_eq!(fail(&health, t0, 1), Some(Duration::from_secs(30)));
        let end = t0 + Duration::from_secs(30);
        assert_eq!(health.state(t0 + Duration::from_secs(29)), State::Out(end));
        assert!(health.is_out(t0));
        assert_eq!(
            fail(&health, t0, 5),
            None,
            "failures in flight eject it once"
        );
        assert_eq!(health.state(end), State::Returned);
        assert_eq!(health.state(end), State::In);
        assert!(!health.is_out(end));
    }

    #[test]
    fn consecutive_ejections_double_up_to_ten_times_until_a_success() {
        let health = Health::default();
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..6 {
            let length = fail(&health, now, 3).expect("ejected");
            lengths.push(length.as_secs());
            now += length;
            assert_eq!(health.state(now), State::Returned);
        }
        assert_eq!(lengths, [30, 60, 120, 240, 300, 300]);
        health.success();
        assert_eq!(fail(&health, now, 3), Some(Duration::from_secs(30)));
    }

    #[test]
    fn probes_take_a_target_out_after_unhealthy_after_and_back_after_healthy_after() {
        let health = Health::default();
        let now = Instant::now();
        assert_eq!(health.probed(false, 2, 3), None);
        assert_eq!(health.probed(false, 2, 3), None);
        assert_eq!(health.probed(true, 2, 3), None, "a good probe starts over");
        assert_eq!(health.probed(false, 2, 3), None);
        assert_eq!(health.probed(false, 2, 3), None);
        assert_eq!(health.state(now), State::In);
        assert_eq!(health.probed(false, 2, 3), Some(false));
        assert_eq!(health.state(now), State::Down);
        assert!(health.is_down() && !health.is_out(now));
        assert_eq!(health.probed(true, 2, 3), None);
        assert_eq!(health.probed(false, 2, 3), None, "a failure starts over");
        assert_eq!(health.probed(true, 2, 3), None);
        assert_eq!(health.state(now), State::Down);
        assert_eq!(health.probed(true, 2, 3), Some(true));
        assert_eq!(health.state(now), State::In);
    }

    #[test]
    fn a_target_down_by_probes_stays_out_while_ejected_too() {
        let health = Health::default();
        let now = Instant::now();
        assert_eq!(fail(&health, now, 3), Some(Duration::from_secs(30)));
        for _ in 0..3 {
            health.probed(false, 1, 3);
        }
        assert_eq!(health.state(now), State::Down);
        health.probed(true, 1, 3);
        assert!(matches!(health.state(now), State::Out(_)), "still ejected");
    }

    #[test]
    fn never_more_ejected_than_max_ejected_and_zero_turns_it_off() {
        let health = Health::default();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                health.failure(now, 1, &RULE),
                None,
                "one other target is out"
            );
        }
        assert_eq!(health.failure(now, 0, &RULE), Some(Duration::from_secs(30)));
        let off = Ejection { after: 0, ..RULE };
        let health = Health::default();
        assert!((0..10).all(|_| health.failure(now, 0, &off).is_none()));
        let none = Ejection {
            max_ejected: 0,
            ..RULE
        };
        assert!((0..10).all(|_| health.failure(now, 0, &none).is_none()));
    }
}
