//! An upstream's `max_inflight` gate: a resizable count of slots, each held by a request
//! until its response body ends (or its upgraded connection closes). A leaf: the response
//! body holds its slot, so `body` and `proxy` both use it and it imports neither.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;

/// An upstream's `max_inflight` slots, and the counter of the failures its response bodies
/// meet after the head was forwarded. A body holds a slot anyway, so it reaches the counter
/// through it, with no reference count of its own per request.
#[derive(Debug)]
pub struct Slots {
    gate: Semaphore,
    /// `max_inflight` now: a reload resizes the gate in place, so requests already in flight
    /// keep counting against the new limit.
    max: AtomicUsize,
    /// Slots to retire as they come back: a shrink below the slots in use takes the rest
    /// from the requests that finish.
    debt: AtomicUsize,
    /// `tollgate_upstream_failures_total{upstream, kind="reset"}`.
    resets_after_head: Counter,
    /// `tollgate_upstream_failures_total{upstream, kind="timeout"}`.
    timeouts_after_head: Counter,
}

/// One `max_inflight` slot of an upstream, held until the response body ends or is dropped
/// (or the upgraded connection closes).
#[derive(Debug)]
pub struct InflightSlot(Arc<Slots>, Option<Arc<AtomicUsize>>);

impl InflightSlot {
    /// Counts this request in `target`'s in-flight count too (the target's of a
    /// several-target upstream) until the slot is dropped, or moved to another target.
    pub fn count_on(&mut self, target: &Arc<AtomicUsize>) {
        target.fetch_add(1, Ordering::AcqRel);
        if let Some(previous) = self.1.replace(target.clone()) {
            previous.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Counts an upstream failure after the response head: the client's stream was cut.
    pub fn count_reset_after_head(&self) {
        self.0.resets_after_head.inc();
    }

    /// Counts an upstream body that stalled past `timeout` after the response head.
    pub fn count_timeout_after_head(&self) {
        self.0.timeouts_after_head.inc();
    }
}

impl Drop for InflightSlot {
    fn drop(&mut self) {
        if let Some(target) = &self.1 {
            target.fetch_sub(1, Ordering::AcqRel);
        }
        let retired = self
            .0
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if !retired {
            self.0.gate.add_permits(1);
        }
    }
}

impl Slots {
    pub fn new(max: usize, resets_after_head: Counter, timeouts_after_head: Counter) -> Self {
        Self {
            gate: Semaphore::new(max),
            max: AtomicUsize::new(max),
            debt: AtomicUsize::new(0),
            resets_after_head,
            timeouts_after_head,
        }
    }

    /// Changes the limit to `max`, counting the slots in use.
    pub fn resize(&self, max: usize) {
        let old = self.max.swap(max, Ordering::AcqRel);
        if max > old {
            // Growing first cancels slots still owed from an earlier shrink.
            let mut grow = max - old;
            while grow > 0
                && self
                    .debt
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
                    .is_ok()
            {
                grow -= 1;
            }
            self.gate.add_permits(grow);
        } else if max < old {
            let shrink = old - max;
            let retired = self.gate.forget_permits(shrink);
            self.debt.fetch_add(shrink - retired, Ordering::AcqRel);
        }
    }

    /// One slot, if one is free.
    pub fn try_take(self: &Arc<Self>) -> Option<InflightSlot> {
        let permit = self.gate.try_acquire().ok()?;
        permit.forget();
        Some(InflightSlot(self.clone(), None))
    }

    /// Slots held right now.
    pub fn in_use(&self) -> usize {
        (self.max.load(Ordering::Acquire) + self.debt.load(Ordering::Acquire))
            .saturating_sub(self.gate.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(max: usize) -> Arc<Slots> {
        Arc::new(Slots::new(max, Counter::default(), Counter::default()))
    }

    #[test]
    fn shrinking_max_inflight_counts_the_requests_in_flight() {
        let gate = slots(4);
        let mut held: Vec<InflightSlot> = (0..3).map(|_| gate.try_take().unwrap()).collect();
        assert_eq!(gate.in_use(), 3);
        // Down to 2 with 3 in flight: nothing new until two of them have finished.
        gate.resize(2);
        assert_eq!(gate.in_use(), 3);
        assert!(gate.try_take().is_none());
        held.pop();
        assert_eq!(gate.in_use(), 2);
        assert!(gate.try_take().is_none(), "2 in flight, the limit is 2");
        held.pop();
        assert_eq!(gate.in_use(), 1);
        held.push(gate.try_take().expect("one free"));
        assert!(gate.try_take().is_none());
        drop(held);
        assert_eq!(gate.in_use(), 0);
        assert_eq!(gate.gate.available_permits(), 2);
    }

    #[test]
    fn growing_max_inflight_first_cancels_what_a_shrink_still_owed() {
        let gate = slots(4);
        let held: Vec<InflightSlot> = (0..4).map(|_| gate.try_take().unwrap()).collect();
        gate.resize(1); // owes 3
        gate.resize(3); // owes 1
        assert!(gate.try_take().is_none(), "4 in flight, the limit is 3");
        drop(held);
        assert_eq!(gate.in_use(), 0);
        assert_eq!(gate.gate.available_permits(), 3);
        let again: Vec<InflightSlot> = (0..3).map(|_| gate.try_take().unwrap()).collect();
        assert!(gate.try_take().is_none());
        drop(again);
    }
}
