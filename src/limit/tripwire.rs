//! A per-client-IP tripwire: `count` events (401s, or 429s) within `window` block the IP for
//! `block_for`. Backs `limits.failed_auth` and `limits.ip_throttle`. An IPv6 client counts as
//! its /64 ([`limit_key`]).
//!
//! Memory is bounded: at most [`MAX_TRACKED_IPS`] entries. Expired entries are swept at most
//! once a second when the table is full; if it is still full, a new IP takes the place of one
//! that is only being counted (IPs already blocked stay blocked), so a flood from many
//! addresses cannot stop the counting of the others. Time is passed in, so tests use synthetic
//! instants and never sleep.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::Tripwire;

/// The client a per-IP limit counts `ip` as: an IPv4 address itself, an IPv6 address its
/// /64 network. One IPv6 subscriber (a home, a VM) is routed a whole /64, so keying on the
/// full address would hand each of its 2^64 addresses a fresh failed-auth allowance, throttle
/// count and anonymous bucket.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
    }
}

/// Most client IPs one tripwire tracks at once (about 100 bytes each).
pub const MAX_TRACKED_IPS: usize = 100_000;

/// [`IpTripwire`]'s `last_block_end` before any block.
const NO_BLOCK: u64 = 0;
/// `last_block_end` of a block whose end lies before the tripwire was made, or too far
/// ahead: every request is looked up.
const UNKNOWN_END: u64 = u64::MAX;

/// Shortest gap between two sweeps of a full table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

impl Entry {
    fn fresh(now: Instant) -> Self {
        Self {
            window_start: now,
            count: 0,
            blocked_until: None,
        }
    }

    /// Counts one event at `now`: the end of the block it trips, if it does. An IP already
    /// blocked is not counted; a window that has passed, or a block that has ended, starts
    /// the count again.
    fn count(&mut self, now: Instant, rule: &Tripwire) -> Option<Instant> {
        if self.blocked_until.is_some_and(|until| until > now) {
            return None;
        }
        if now.saturating_duration_since(self.window_start) >= rule.window
            || self.blocked_until.is_some()
        {
            *self = Self::fresh(now);
        }
        self.count += 1;
        if self.count < rule.count.get() {
            return None;
        }
        let until = now + rule.block_for;
        self.blocked_until = Some(until);
        Some(until)
    }
}

/// Counts events per IP and blocks IPs that trip.
#[derive(Debug)]
pub struct IpTripwire {
    entries: DashMap<IpAddr, Entry>,
    capacity: usize,
    /// When the last block set so far ends, in nanoseconds after `base` ([`NO_BLOCK`]: none
    /// was ever set, [`UNKNOWN_END`]: one ends at an instant it cannot express). Until some IP
    /// is blocked, and once every block has ended, a request is let through without a lookup.
    last_block_end: AtomicU64,
    base: Instant,
    last_sweep: Mutex<Option<Instant>>,
    /// Set when a full table held only blocks: until this next sweep, no new IP can get in,
    /// so a flood of new IPs does not scan the whole table for each of them.
    no_room_until: Mutex<Option<Instant>>,
    /// Scans for an entry to evict (tests count them).
    #[cfg(test)]
    scans: std::sync::atomic::AtomicUsize,
}

impl Default for IpTripwire {
    fn default() -> Self {
        Self::with_capacity(MAX_TRACKED_IPS)
    }
}

impl IpTripwire {
    /// A tripwire tracking at most `capacity` IPs.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: DashMap::new(),
            capacity,
            last_block_end: AtomicU64::new(NO_BLOCK),
            base: Instant::now(),
            last_sweep: Mutex::new(None),
            no_room_until: Mutex::new(None),
            #[cfg(test)]
            scans: Default::default(),
        }
    }

    /// How much longer `ip` is blocked, if it is (an IPv6 address counts as its /64).
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let last_end = self.last_block_end.load(Ordering::Acquire);
        if last_end == NO_BLOCK || self.nanos(now).is_some_and(|now| now >= last_end) {
            return None;
        }
        let entry = self.entries.get(&limit_key(ip))?;
        let until = entry.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records one event from `ip` (an IPv6 address counts as its /64); returns true if this
    /// event tripped the block.
    pub fn record(&self, ip: IpAddr, now: Instant, rule: &Tripwire) -> bool {
        let ip = limit_key(ip);
        // An IP already counted (a client's 429s come in runs) is found with one lookup.
        let counted = self
            .entries
            .get_mut(&ip)
            .map(|mut entry| entry.count(now, rule));
        let tripped = match counted {
            Some(tripped) => tripped,
            None => {
                if self.entries.len() >= self.capacity {
                    self.sweep_if_due(now, rule);
                    // Still full (a flood from more addresses than the table holds): an IP
                    // that is only being counted makes room, so the flood cannot blind the
                    // guard to everyone else. Blocked IPs stay; if every entry is a block,
                    // this one is not tracked.
                    if self.entries.len() >= self.capacity && !self.evict_one_counting(now) {
                        *self.no_room_until.lock().expect("not poisoned") =
                            Some(now + SWEEP_INTERVAL);
                        return false;
                    }
                }
                self.entries
                    .entry(ip)
                    .or_insert(Entry::fresh(now))
                    .count(now, rule)
            }
        };
        let Some(until) = tripped else {
            return false;
        };
        let end = self.nanos(until).unwrap_or(UNKNOWN_END);
        self.last_block_end.fetch_max(end, Ordering::AcqRel);
        true
    }

    /// `at` in nanoseconds after `base`; `None` before it.
    fn nanos(&self, at: Instant) -> Option<u64> {
        at.checked_duration_since(self.base)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(UNKNOWN_END))
    }

    /// Drops entries whose window and block have both passed.
    pub fn sweep(&self, now: Instant, rule: &Tripwire) {
        self.entries.retain(|_, e| {
            e.blocked_until.is_some_and(|until| until > now)
                || now.saturating_duration_since(e.window_start) < rule.window
        });
        *self.last_sweep.lock().expect("not poisoned") = Some(now);
        *self.no_room_until.lock().expect("not poisoned") = None;
    }

    fn sweep_if_due(&self, now: Instant, rule: &Tripwire) {
        let due = self
            .last_sweep
            .lock()
            .expect("not poisoned")
            .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_INTERVAL);
        if due {
            self.sweep(now, rule);
        }
    }

    /// Removes one entry that is counting, not blocking; false when every entry is a block.
    fn evict_one_counting(&self, now: Instant) -> bool {
        let no_room = self.no_room_until.lock().expect("not poisoned");
        if no_room.is_some_and(|until| now < until) {
            return false;
        }
        drop(no_room);
        #[cfg(test)]
        self.scans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let victim = self
            .entries
            .iter()
            .find(|e| e.blocked_until.is_none_or(|until| until <= now))
            .map(|e| *e.key());
        victim.is_some_and(|ip| self.entries.remove(&ip).is_some())
    }

    /// IPs tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no IP is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn rule(count: u32) -> Tripwire {
        Tripwire {
            count: NonZeroU32::new(count).unwrap(),
            window: Duration::from_secs(60),
            block_for: Duration::from_secs(300),
        }
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn trips_after_count_within_window_and_expires() {
        let t = IpTripwire::default();
        let r = rule(3);
        let t0 = Instant::now();
        assert!(!t.record(ip(1), t0, &r));
        assert!(!t.record(ip(1), t0 + Duration::from_secs(1), &r));
        assert_eq!(t.blocked(ip(1), t0 + Duration::from_secs(1)), None);
        assert!(t.record(ip(1), t0 + Duration::from_secs(2), &r));
        assert_eq!(
            t.blocked(ip(1), t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(300))
        );
        assert_eq!(t.blocked(ip(2), t0), None, "other IPs are unaffected");
        assert_eq!(
            t.blocked(ip(1), t0 + Duration::from_secs(302)),
            None,
            "block expires"
        );
        // After the block, counting starts over.
        assert!(!t.record(ip(1), t0 + Duration::from_secs(303), &r));
    }

    #[test]
    fn a_shorter_later_block_does_not_end_an_earlier_longer_one() {
        let t = IpTripwire::default();
        let t0 = Instant::now();
        assert_eq!(t.blocked(ip(1), t0), None, "nothing blocked yet");
        assert!(t.record(ip(1), t0, &rule(1)));
        let short = Tripwire {
            block_for: Duration::from_secs(10),
            ..rule(1)
        };
        assert!(t.record(ip(2), t0 + Duration::from_secs(5), &short));
        let later = t0 + Duration::from_secs(100);
        assert_eq!(t.blocked(ip(2), later), None);
        assert_eq!(t.blocked(ip(1), later), Some(Duration::from_secs(200)));
        assert_eq!(t.blocked(ip(1), t0 + Duration::from_secs(300)), None);
    }

    #[test]
    fn a_block_from_before_the_tripwire_was_made_still_counts() {
        let t0 = Instant::now();
        let t = IpTripwire::default();
        // A one-second block that ended before the tripwire was made: its end is not
        // expressible after `base`, and `blocked` must still look it up.
        let before = t0
            .checked_sub(Duration::from_secs(2))
            .expect("the monotonic clock has run two seconds");
        let short = Tripwire {
            block_for: Duration::from_secs(1),
            ..rule(1)
        };
        assert!(t.record(ip(1), before, &short));
        assert_eq!(
            t.blocked(ip(1), before + Duration::from_millis(500)),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn events_outside_the_window_do_not_add_up() {
        let t = IpTripwire::default();
        let r = rule(2);
        let t0 = Instant::now();
        assert!(!t.record(ip(1), t0, &r));
        assert!(!t.record(ip(1), t0 + Duration::from_secs(61), &r));
        assert!(t.record(ip(1), t0 + Duration::from_secs(62), &r));
    }

    #[test]
    fn an_ipv6_client_counts_as_its_64() {
        let t = IpTripwire::default();
        let r = rule(3);
        let t0 = Instant::now();
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        // Three addresses of one /64 (one subscriber rotating its interface ids) trip it...
        assert!(!t.record(v6("2001:db8:1:2::1"), t0, &r));
        assert!(!t.record(v6("2001:db8:1:2:aaaa::9"), t0, &r));
        assert!(t.record(v6("2001:db8:1:2:ffff:ffff:ffff:ffff"), t0, &r));
        // ...for the whole /64, and only that one.
        assert!(t.blocked(v6("2001:db8:1:2:1234::1"), t0).is_some());
        assert_eq!(t.blocked(v6("2001:db8:1:3::1"), t0), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_swept() {
        let t = IpTripwire::with_capacity(100);
        let r = rule(5);
        let t0 = Instant::now();
        for n in 0..1000 {
            t.record(ip(n), t0, &r);
        }
        assert_eq!(t.len(), 100);
        // Once their window passed, old entries make room.
        let later = t0 + Duration::from_secs(61);
        t.record(ip(5000), later, &r);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_still_counts_new_ips_and_keeps_its_blocks() {
        let t = IpTripwire::with_capacity(10);
        let r = rule(2);
        let t0 = Instant::now();
        // Two blocked IPs, then a flood of one-off addresses filling the table.
        for blocked in [ip(1), ip(2)] {
            t.record(blocked, t0, &r);
            assert!(t.record(blocked, t0, &r));
        }
        for n in 100..1000 {
            t.record(ip(n), t0, &r);
        }
        assert_eq!(t.len(), 10);
        // A key guesser arriving now is still counted, and blocked at its second 401...
        assert!(!t.record(ip(7), t0, &r));
        assert!(t.record(ip(7), t0, &r));
        // ...and the flood evicted no block.
        for blocked in [ip(1), ip(2), ip(7)] {
            assert!(t.blocked(blocked, t0).is_some(), "{blocked}");
        }
        assert_eq!(t.len(), 10);
    }

    #[test]
    fn a_table_full_of_blocks_is_not_scanned_again_for_every_new_ip() {
        let t = IpTripwire::with_capacity(3);
        let r = rule(1);
        let t0 = Instant::now();
        for n in 1..=3 {
            assert!(t.record(ip(n), t0, &r), "blocked at once");
        }
        let scans = || t.scans.load(std::sync::atomic::Ordering::Relaxed);
        // The first new IP finds no room (the sweep due now frees nothing: blocks last).
        assert!(!t.record(ip(100), t0, &r));
        assert_eq!(scans(), 1);
        // The rest of the flood within the sweep interval costs no scan.
        for n in 101..1_000 {
            assert!(!t.record(ip(n), t0 + Duration::from_millis(500), &r));
        }
        assert_eq!(scans(), 1);
        assert_eq!(t.len(), 3);
        // After the next sweep the table is looked at again; the blocks still hold.
        let later = t0 + SWEEP_INTERVAL;
        assert!(!t.record(ip(2_000), later, &r));
        assert_eq!(scans(), 2);
        for n in 1..=3 {
            assert!(t.blocked(ip(n), later).is_some());
        }
        // Once the blocks expire, the sweep makes room and new IPs are counted again.
        let expired = t0 + Duration::from_secs(301);
        assert!(t.record(ip(3_000), expired, &r), "counted and blocked");
    }
}
