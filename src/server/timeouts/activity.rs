//! [`Activity`]: what one connection's timers watch, written by its transport, its response
//! bodies and the service, read by the driver; and [`InFlight`], one request's share of it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

use super::{Bounds, Expiry, LINGER_MAX, LINGER_QUIET};

pub(super) const PROTOCOL_UNKNOWN: u8 = 0;
pub(super) const PROTOCOL_H1: u8 = 1;
pub(super) const PROTOCOL_H2: u8 = 2;

/// A slot of [`Waits`] whose body is not waiting.
const NOT_WAITING: u64 = u64::MAX;

/// HTTP/2: when each response body in flight began waiting, by slot.
#[derive(Debug, Default)]
pub(super) struct Waits {
    pub(super) since: Vec<u64>,
    /// Slots of bodies that ended, for the next ones.
    pub(super) free: Vec<usize>,
}

thread_local! {
    /// While a connection's driver polls it ([`PollClock`]): `Some`, with the time once read.
    static POLL_TIME: Cell<Option<Option<Instant>>> = const { Cell::new(None) };
}

/// One poll of a connection by its driver, in which the clock is read at most once: what an
/// HTTP/1.1 connection tells its [`Activity`] in one poll (a head's first bytes read, a
/// response handed over, its body polled, the request ended) happens within microseconds,
/// and its timers count seconds. Outside a poll (HTTP/2 streams run in tasks of their own, a
/// timer that fired) the clock is read each time.
pub(super) struct PollClock(Option<Option<Instant>>);

impl PollClock {
    /// Until the guard drops, [`Activity`] reads the clock once.
    pub(super) fn enter() -> Self {
        Self(POLL_TIME.replace(Some(None)))
    }

    /// The time: the one read in this poll, or now.
    fn now() -> Instant {
        POLL_TIME.with(|time| match time.get() {
            Some(Some(read)) => read,
            Some(None) => {
                let now = Instant::now();
                time.set(Some(Some(now)));
                now
            }
            None => Instant::now(),
        })
    }
}

impl Drop for PollClock {
    fn drop(&mut self) {
        POLL_TIME.set(self.0);
    }
}

/// What one connection's timers watch. Times are nanoseconds since `epoch`.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    pub(super) protocol: AtomicU8,
    /// Requests handed to the service whose response has not ended (or been dropped).
    pub(super) in_flight: AtomicUsize,
    /// When `in_flight` last dropped to zero (or the connection started).
    pub(super) idle_since: AtomicU64,
    /// When the first byte of the head now being read arrived, plus one; zero when none is.
    /// A new connection counts as having started its head when it was accepted.
    pub(super) head_started: AtomicU64,
    /// The server is stopping: the driver wants to know when a head completes.
    pub(super) draining: AtomicBool,
    /// Response bodies that yielded a frame (or a head) and were not polled since.
    pub(super) waiting_bodies: AtomicUsize,
    /// While bodies wait: the last time the connection asked one of them for more, or one
    /// started waiting with none waiting before. On HTTP/1.1 a connection sends one response
    /// at a time, so this is when that body began its wait.
    pub(super) body_progress: AtomicU64,
    /// HTTP/2: when each stream's body began to wait, by slot ([`NOT_WAITING`] when it is
    /// not waiting), so the deadline follows the longest wait, not the latest progress.
    waits: Mutex<Waits>,
    /// Something moved the deadline earlier; the driver recomputes it.
    dirty: AtomicBool,
    waker: AtomicWaker,
    /// A write to the client is pending (so bytes of a response may be owed before anything
    /// else can be written).
    pub(super) writing: AtomicBool,
    /// [`GuardedIo`] is to answer [`Refusal::HeadTimeout`] and end the connection.
    ///
    /// [`GuardedIo`]: super::GuardedIo
    /// [`Refusal::HeadTimeout`]: super::Refusal::HeadTimeout
    pub(super) farewell_due: AtomicBool,
    /// The driver closed the connection with nothing in flight (idle, or a stop): the client
    /// owes no bytes, so the close does not linger.
    pub(super) quiet_close: AtomicBool,
    /// A closing connection lingers (see [`LINGER_QUIET`]): when it started, plus one (zero:
    /// it does not linger) ...
    linger_started: AtomicU64,
    /// ... and when the client last sent bytes while it lingers.
    linger_last: AtomicU64,
}

impl Activity {
    /// A connection accepted now: its first head is bounded by `header_read_timeout` from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            protocol: AtomicU8::new(PROTOCOL_UNKNOWN),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            waiting_bodies: AtomicUsize::new(0),
            body_progress: AtomicU64::new(0),
            waits: Mutex::new(Waits::default()),
            dirty: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            writing: AtomicBool::new(false),
            farewell_due: AtomicBool::new(false),
            quiet_close: AtomicBool::new(false),
            linger_started: AtomicU64::new(0),
            linger_last: AtomicU64::new(0),
        })
    }

    pub(super) fn now(&self) -> u64 {
        let since = PollClock::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    pub(super) fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    /// Tells the driver its deadline may have moved earlier.
    fn changed(&self) {
        self.dirty.store(true, Relaxed);
        // HTTP/1.1 bodies and IO are polled in the driver's own task, which looks at `dirty`
        // after every poll of the connection; HTTP/2 streams run in tasks of their own.
        if self.protocol.load(Relaxed) != PROTOCOL_H1 {
            self.waker.wake();
        }
    }

    /// The service was handed a request: its head is complete.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_started.store(0, Relaxed);
        if self.draining.load(Relaxed) {
            self.changed();
        }
        InFlight(self.clone())
    }

    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.idle_since.store(self.now(), Relaxed);
            self.changed();
        }
    }

    /// Bytes arrived. With nothing in flight on an HTTP/1.1 connection, they start a head.
    pub(super) fn bytes_read(&self) {
        if self.protocol.load(Relaxed) != PROTOCOL_H2
            && self.in_flight.load(Relaxed) == 0
            && self.head_started.load(Relaxed) == 0
        {
            self.head_started.store(self.now() + 1, Relaxed);
            self.changed();
        }
    }

    /// Whether the server is stopping: an HTTP/1.1 response should say `Connection: close`.
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// An HTTP/1.1 connection is waiting for a head it is owed: its first (a new connection
    /// has not sent it yet), or one whose bytes have begun to arrive. A shutdown lets it
    /// arrive and be answered, within `header_read_timeout`, rather than close a connection
    /// the client has just written its request to.
    pub(super) fn head_in_progress(&self) -> bool {
        self.protocol.load(Relaxed) != PROTOCOL_H2
            && self.in_flight.load(Relaxed) == 0
            && self.head_started.load(Relaxed) != 0
    }

    /// On a head that timed out, whether a response can still be written: the connection
    /// speaks HTTP/1.1 (a head has begun to arrive) and owes the client no bytes of an earlier
    /// response.
    pub(super) fn can_answer_head(&self) -> bool {
        self.protocol.load(Relaxed) == PROTOCOL_H1
            && self.in_flight.load(Relaxed) == 0
            && !self.writing.load(Relaxed)
    }

    /// An HTTP/1.1 connection with no request in flight: a response hyper writes now is not
    /// one of tollgate's.
    pub(super) fn between_requests_h1(&self) -> bool {
        self.protocol.load(Relaxed) == PROTOCOL_H1 && self.in_flight.load(Relaxed) == 0
    }

    /// The connection turned out to speak HTTP/2: bytes between requests are frames (PING,
    /// SETTINGS, WINDOW_UPDATE), not a slow head, so only `idle_timeout` bounds it when idle.
    pub(super) fn speaks_h2(&self) {
        self.protocol.store(PROTOCOL_H2, Relaxed);
        self.head_started.store(0, Relaxed);
        self.idle_since.store(self.now(), Relaxed);
        self.changed();
    }

    pub(super) fn speaks_h1(&self) {
        self.protocol.store(PROTOCOL_H1, Relaxed);
    }

    pub(super) fn body_waiting(&self) {
        if self.waiting_bodies.fetch_add(1, Relaxed) == 0 {
            self.body_progress.store(self.now(), Relaxed);
            self.changed();
        }
    }

    pub(super) fn body_polled(&self) {
        // With no body left waiting, nothing reads `body_progress` until one waits again,
        // which sets it: an HTTP/1.1 response (one body at a time) reads no clock here.
        if self.waiting_bodies.fetch_sub(1, Relaxed) > 1 {
            self.body_progress.store(self.now(), Relaxed);
        }
    }

    pub(super) fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        // Each update is one store; a panic cannot leave the table half-written.
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On HTTP/2, a slot for a new response body, waiting from now.
    pub(super) fn wait_slot(&self) -> Option<usize> {
        if self.protocol.load(Relaxed) != PROTOCOL_H2 {
            return None;
        }
        let now = self.now();
        let mut waits = self.waits();
        Some(match waits.free.pop() {
            Some(slot) => {
                waits.since[slot] = now;
                slot
            }
            None => {
                waits.since.push(now);
                waits.since.len() - 1
            }
        })
    }

    /// The body in `slot` began waiting now, or (`waiting` false) was polled.
    pub(super) fn set_wait(&self, slot: usize, waiting: bool) {
        let since = if waiting { self.now() } else { NOT_WAITING };
        self.waits().since[slot] = since;
    }

    pub(super) fn free_wait_slot(&self, slot: usize) {
        let mut waits = self.waits();
        waits.since[slot] = NOT_WAITING;
        waits.free.push(slot);
    }

    /// When the response that has waited longest began waiting.
    fn oldest_wait(&self) -> u64 {
        if self.protocol.load(Relaxed) == PROTOCOL_H2 {
            let oldest = self.waits().since.iter().copied().min();
            if let Some(since) = oldest.filter(|&s| s != NOT_WAITING) {
                return since;
            }
        }
        self.body_progress.load(Relaxed)
    }

    /// The next deadline (nanoseconds since `epoch`) and what it bounds; `None` while requests
    /// are in flight and every response is being sent or waits on its upstream.
    pub(super) fn next_deadline(
        &self,
        bounds: &Bounds,
        closing_since: Option<u64>,
    ) -> Option<(u64, Expiry)> {
        let after = |since: u64, bound: Duration| {
            since.saturating_add(u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX))
        };
        if self.in_flight.load(Relaxed) > 0 {
            return (self.waiting_bodies.load(Relaxed) > 0).then(|| {
                (
                    after(self.oldest_wait(), bounds.write_stall),
                    Expiry::ResponseStalled,
                )
            });
        }
        let lingering = match self.linger_started.load(Relaxed) {
            0 => None,
            started => Some(
                after(self.linger_last.load(Relaxed), LINGER_QUIET)
                    .min(after(started - 1, LINGER_MAX)),
            ),
        };
        let closing = closing_since.map(|since| after(since, bounds.header_read));
        if let Some(at) = lingering.into_iter().chain(closing).min() {
            return Some((at, Expiry::CloseOverdue));
        }
        match self.head_started.load(Relaxed) {
            0 => Some((
                after(self.idle_since.load(Relaxed), bounds.idle),
                Expiry::Idle,
            )),
            started => Some((after(started - 1, bounds.header_read), Expiry::HeadTimeout)),
        }
    }

    /// Whether a close by hyper should linger: on HTTP/1.1, unless the driver closed an idle
    /// connection.
    pub(super) fn wants_linger(&self) -> bool {
        self.protocol.load(Relaxed) == PROTOCOL_H1 && !self.quiet_close.load(Relaxed)
    }

    pub(super) fn linger_started(&self) {
        let now = self.now();
        self.linger_last.store(now, Relaxed);
        self.linger_started.store(now + 1, Relaxed);
        self.changed();
    }

    /// Bytes arrived while lingering: the client is still sending (its deadline moves later).
    pub(super) fn lingered(&self) {
        self.linger_last.store(self.now(), Relaxed);
    }

    /// Resolves when something moved the deadline earlier.
    pub(super) fn poll_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.dirty.swap(false, Relaxed) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.dirty.swap(false, Relaxed) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// One request in flight; ends when dropped (moved into the response body by
/// [`TrackedBody::new`], so the end is when the body has been sent or abandoned).
///
/// [`TrackedBody::new`]: super::TrackedBody::new
#[derive(Debug)]
pub struct InFlight(pub(super) Arc<Activity>);

impl InFlight {
    /// Whether the server is stopping (see [`Activity::draining`]).
    pub fn draining(&self) -> bool {
        self.0.draining()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}
