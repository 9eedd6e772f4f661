//! The state store behind the per-client-IP buckets (`plans.anonymous`): governor's GCRA
//! state per key in a dashmap, as governor's own `DashMapStateStore`, with a cap on keys.
//!
//! Without a cap, a client that rotates source addresses (one IPv6 /48 holds 65,536 /64s; a
//! botnet holds more) adds an entry per address, and with an hourly or daily bucket an entry
//! lives that long: memory grows until the process dies. Like nginx's `limit_req_zone`, a
//! full table drops its least recently used state to make room: keys wait in a queue in the
//! order they were added, and a key at the head that was checked since it was queued (admitted
//! or refused: a client hammering an empty bucket is in use too) goes to the back once instead
//! (a second chance: the CLOCK approximation of LRU). An evicted client starts again with a
//! full bucket; nothing else is lost, and a client already in the table is never turned away
//! because it is full.
//!
//! Only adding a key takes the queue's lock; charging a known key is a dashmap read and a
//! compare-and-swap, as with governor's store.

use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;

/// Most client IPs one bucket table tracks (about 100 bytes each with the queue).
pub const MAX_TRACKED_CLIENTS: usize = 1_000_000;

/// How many keys at the head of the queue get a second chance before one is evicted anyway.
const SECOND_CHANCES: usize = 8;

/// One key's GCRA state.
#[derive(Debug)]
struct Slot {
    /// governor's theoretical arrival time, in nanoseconds since the limiter started; 0 for a
    /// key never charged.
    tat: AtomicU64,
    /// When the key was added (a count of additions, wrapping), to tell its queue entry from
    /// stale ones left by an earlier life of the same key.
    added: u32,
    /// Checked since it was last queued.
    used: AtomicBool,
}

impl Slot {
    fn touch(&self) {
        // Read first: a key checked again and again dirties its cache line only once.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Queue<K> {
    /// Keys with their slot's `added`.
    order: VecDeque<(K, u32)>,
    /// Additions so far.
    added: u32,
}

/// GCRA state per key, at most `capacity` keys.
#[derive(Debug)]
pub struct BoundedStore<K: Hash + Eq> {
    map: DashMap<K, Slot>,
    /// Every key in `map` once, plus stale entries of keys dropped by [`Self::retain_recent`]
    /// (never more than `capacity` entries in all).
    queue: Mutex<Queue<K>>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    /// An empty store that holds at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: DashMap::new(),
            queue: Mutex::new(Queue {
                order: VecDeque::new(),
                added: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<K>> {
        // The lock guards no invariant a panic could break halfway (pushes and pops are
        // single steps), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frees one queue place: drops a stale entry, or evicts the least recently used key.
    fn make_room(&self, queue: &mut Queue<K>) {
        let mut chances = SECOND_CHANCES;
        while let Some((key, added)) = queue.order.pop_front() {
            let used = match self.map.get(&key) {
                Some(slot) if slot.added == added => slot.used.swap(false, Ordering::Relaxed),
                // The key left the table (idle) and this entry is stale: that is room.
                _ => return,
            };
            if used && chances > 0 {
                // Checked since it was queued: in use, so it goes to the back.
                chances -= 1;
                queue.order.push_back((key, added));
                continue;
            }
            self.map.remove_if(&key, |_, slot| slot.added == added);
            return;
        }
    }
}

/// What charging a key in `state` would answer, without charging it.
pub(super) fn look<T, E>(
    state: u64,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    f(decoded(state)).map(|(result, _)| result)
}

/// A stored state as governor sees it: 0 is a key never charged.
fn decoded(state: u64) -> Option<Nanos> {
    (state != 0).then(|| Nanos::from(state))
}

/// governor's compare-and-swap loop over one key's state.
pub(super) fn measure<T, E>(
    tat: &AtomicU64,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let mut prev = tat.load(Ordering::Acquire);
    loop {
        let (result, next) = f(decoded(prev))?;
        match tat.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(current) => prev = current,
        }
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(slot) = self.map.get(key) {
            slot.touch();
            return measure(&slot.tat, f);
        }
        // A new key. The queue's lock is taken before any shard's (here and in
        // `retain_recent`), and no shard lock is held while another is taken.
        let mut queue = self.queue();
        if queue.order.len() >= self.capacity {
            self.make_room(&mut queue);
        }
        let added = queue.added;
        let slot = self.map.entry(key.clone()).or_insert_with(|| Slot {
            tat: AtomicU64::new(0),
            added,
            used: AtomicBool::new(false),
        });
        let result = measure(&slot.tat, f);
        if slot.added == added {
            drop(slot);
            queue.added = added.wrapping_add(1);
            queue.order.push_back((key.clone(), added));
        } else {
            // Added by another thread between the lookup and the lock.
            slot.touch();
        }
        result
    }
}

/// What a call on a bucket's limiter does: charge the bucket, or look at it and answer as a
/// charge would, changing (and adding) nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Charge,
    Look,
}

/// A client's key, with what the call does to its bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Accessed<K> {
    pub key: K,
    pub access: Access,
}

/// A [`BoundedStore`] that one limiter both charges and looks at (its keys are [`Accessed`]),
/// so that both measure time from the limiter's one reference instant: how the per-IP limiter
/// looks at its hourly and daily buckets before charging.
#[derive(Debug)]
pub struct Shared<K: Hash + Eq>(pub BoundedStore<K>);

impl<K: Hash + Eq + Clone> StateStore for Shared<K> {
    type Key = Accessed<K>;

    fn measure_and_replace<T, F, E>(&self, key: &Accessed<K>, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        match key.access {
            Access::Charge => self.0.measure_and_replace(&key.key, f),
            Access::Look => {
                let slot = self.0.map.get(&key.key);
                look(slot.map_or(0, |slot| slot.tat.load(Ordering::Acquire)), f)
            }
        }
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<Accessed<K>> for Shared<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.0);
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&self.0)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = u64::from(drop_below);
        let mut queue = self.queue();
        self.map
            .retain(|_, slot| slot.tat.load(Ordering::Relaxed) > drop_below);
        // Forget the queue entries of the keys just dropped once they are a third of it.
        let live = self.map.len();
        if queue.order.len() > live + live / 2 + 1024 {
            queue
                .order
                .retain(|(key, added)| self.map.get(key).is_some_and(|slot| slot.added == *added));
        }
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
        let mut queue = self.queue();
        if queue.order.capacity() > 2 * queue.order.len() + 1024 {
            queue.order.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Charges `key` as governor would: state becomes `now` (any value that changes it).
    fn charge(store: &BoundedStore<u32>, key: u32, now: u64) {
        store
            .measure_and_replace(&key, |_| Ok::<_, ()>(((), Nanos::from(now))))
            .unwrap();
    }

    fn keys(store: &BoundedStore<u32>) -> Vec<u32> {
        let mut keys: Vec<u32> = store.map.iter().map(|e| *e.key()).collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn a_full_table_drops_its_least_recently_used_key() {
        let store = BoundedStore::new(3);
        for key in 1..=3 {
            charge(&store, key, 100 + u64::from(key));
        }
        // 1 and 3 are charged again; 2 is the one not used since it was added.
        charge(&store, 1, 200);
        charge(&store, 3, 201);
        charge(&store, 4, 202);
        assert_eq!(keys(&store), [1, 3, 4]);
        assert_eq!(store.len(), 3);
        // Now 1 and 3 were seen again by the queue; with no new charges, the oldest goes.
        charge(&store, 5, 203);
        assert_eq!(keys(&store), [3, 4, 5]);
    }

    #[test]
    fn a_key_in_the_table_keeps_its_state_while_new_keys_come() {
        let store = BoundedStore::new(2);
        charge(&store, 7, 500);
        for (n, key) in (100..1100).enumerate() {
            charge(&store, 7, 1_000 + n as u64 * 2);
            charge(&store, key, 1_001 + n as u64 * 2);
            assert!(store.len() <= 2);
        }
        assert!(keys(&store).contains(&7), "the busy key was evicted");
    }

    #[test]
    fn every_key_used_at_once_still_makes_room() {
        // All keys charged since queued: after the second chances, one goes anyway.
        let store = BoundedStore::new(SECOND_CHANCES + 1);
        for round in 0..3u64 {
            for key in 0..=SECOND_CHANCES as u32 {
                charge(&store, key, 10 + round * 100 + u64::from(key));
            }
        }
        charge(&store, 999, 1_000);
        assert_eq!(store.len(), SECOND_CHANCES + 1);
        assert!(keys(&store).contains(&999));
    }

    #[test]
    fn idle_keys_dropped_by_a_sweep_leave_room_and_stale_entries_go() {
        let store = BoundedStore::new(4);
        for key in 1..=4 {
            charge(&store, key, key.into());
        }
        // 1 and 2 are idle (state at or below the mark).
        store.retain_recent(Nanos::from(2));
        assert_eq!(keys(&store), [3, 4]);
        // Their stale queue entries are the room: nobody in the table is evicted.
        charge(&store, 5, 10);
        charge(&store, 6, 11);
        assert_eq!(keys(&store), [3, 4, 5, 6]);
        // A dropped key that comes back is a new key; its old entry does not evict it.
        store.retain_recent(Nanos::from(10));
        charge(&store, 3, 20);
        charge(&store, 7, 21);
        assert_eq!(keys(&store), [3, 6, 7]);
        assert!(store.queue().order.len() <= 4);
    }

    #[test]
    fn the_queue_forgets_dropped_keys_once_they_pile_up() {
        let store = BoundedStore::new(100_000);
        for key in 0..5_000 {
            charge(&store, key, 1);
        }
        store.retain_recent(Nanos::from(1));
        assert!(store.is_empty());
        assert_eq!(store.queue().order.len(), 0);
    }
}
