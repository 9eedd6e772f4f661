//! Per-connection time bounds, kept by tollgate rather than hyper so that each one means what
//! SPEC says. Part of the accept box: every client connection is driven by [`drive`].
//!
//! - `header_read_timeout`: a request head must be complete this long after its first byte
//!   (or, for a connection's first request, after the connection was accepted).
//! - `idle_timeout`: a keep-alive connection with nothing in flight and no byte of a new
//!   request is closed this long after its last response ended. A request waiting on a slow
//!   upstream is in flight, never idle.
//! - A stalled response: `body_read_timeout` also bounds the other direction. A write that
//!   makes no progress for that long fails the connection ([`GuardedIo`]), and so does a
//!   response body that the connection has stopped asking for (an HTTP/2 client that grants
//!   no flow-control window never blocks a socket write, see [`TrackedBody`]). On HTTP/2 each
//!   stream's body is timed on its own: streams that flow do not cover for one that does not.
//!
//! Answers hyper cannot give in tollgate's format are written by [`GuardedIo`], through the
//! transport ([`Refusal`]): a head that misses `header_read_timeout` on HTTP/1.1 gets a 408
//! envelope, then the connection ends (a connection that has sent nothing is closed silently,
//! as browsers' speculative connections expect); a head hyper cannot parse gets an envelope
//! in place of hyper's empty 400/414/431.
//!
//! hyper's own `header_read_timeout` is off: it starts whenever hyper waits for a head,
//! including between requests, so it closed idle keep-alive connections after the (shorter)
//! header timeout and `idle_timeout` could not mean anything.
//!
//! The state the timers read ([`Activity`]) is written by the connection's IO, its response
//! bodies and the service; the driver computes one deadline from it. Changes that can only
//! move the deadline later (a request starts, a body is polled) wake nobody: the timer fires
//! early, finds the deadline moved, and sleeps again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, ResponseBody};
use crate::config::ServerConfig;

/// The first bytes of every HTTP/2 connection (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const PROTOCOL_UNKNOWN: u8 = 0;
const PROTOCOL_H1: u8 = 1;
const PROTOCOL_H2: u8 = 2;

/// After a 408 for a slow head, the longest the connection is kept to read what the client
/// still sends (so it gets the response rather than a reset) before it is dropped.
const LINGER: Duration = Duration::from_secs(1);

/// Closing an HTTP/1.1 connection after a response, the longest wait for the client's next
/// bytes (or its close) while what it still sends is read and dropped: closed with unread
/// bytes, the connection would be reset, and the client could lose the response it has not
/// read yet (a client still uploading a body reads only when it is done). nginx's
/// `lingering_timeout`.
const LINGER_QUIET: Duration = Duration::from_secs(2);

/// The longest such a close lingers in all (nginx's `lingering_time`).
const LINGER_MAX: Duration = Duration::from_secs(30);

/// A slot of [`Waits`] whose body is not waiting.
const NOT_WAITING: u64 = u64::MAX;

/// HTTP/2: when each response body in flight began waiting, by slot.
#[derive(Debug, Default)]
struct Waits {
    since: Vec<u64>,
    /// Slots of bodies that ended, for the next ones.
    free: Vec<usize>,
}

/// The time bounds of one connection, from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// `header_read_timeout`: from a head's first byte until it is complete.
    pub header_read: Duration,
    /// `idle_timeout`: from the end of the last response until the next head starts.
    pub idle: Duration,
    /// `body_read_timeout`, applied to writes: the longest a response may make no progress.
    pub write_stall: Duration,
}

impl Bounds {
    /// The bounds `[server]` configures.
    pub fn from_settings(settings: &ServerConfig) -> Self {
        Self {
            header_read: settings.header_read_timeout,
            idle: settings.idle_timeout,
            write_stall: settings.body_read_timeout,
        }
    }
}

/// A request tollgate answers itself, through the transport, where hyper cannot answer it
/// in tollgate's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An HTTP/1.1 head not complete within `header_read_timeout` (408).
    HeadTimeout,
    /// A head hyper could not parse, refused with this status (400, 414 or 431).
    Unparsed(StatusCode),
}

/// Renders a [`Refusal`] as a whole HTTP/1.1 response; `None` leaves hyper's answer (or, for
/// a timeout, none).
pub type Answer = Box<dyn Fn(Refusal) -> Option<Bytes> + Send + Sync>;

/// Why a connection's timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A request head did not complete within `header_read_timeout`.
    HeadTimeout,
    /// Nothing happened for `idle_timeout` after the last response.
    Idle,
    /// A response body was not asked for again within the write bound.
    ResponseStalled,
    /// The connection was asked to close and, with nothing in flight, still has not.
    CloseOverdue,
}

impl Expiry {
    fn as_str(self) -> &'static str {
        match self {
            Expiry::HeadTimeout => "header_read_timeout",
            Expiry::Idle => "idle_timeout",
            Expiry::ResponseStalled => "response_stalled",
            Expiry::CloseOverdue => "close_overdue",
        }
    }
}

/// What one connection's timers watch. Times are nanoseconds since `epoch`.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    protocol: AtomicU8,
    /// Requests handed to the service whose response has not ended (or been dropped).
    in_flight: AtomicUsize,
    /// When `in_flight` last dropped to zero (or the connection started).
    idle_since: AtomicU64,
    /// When the first byte of the head now being read arrived, plus one; zero when none is.
    /// A new connection counts as having started its head when it was accepted.
    head_started: AtomicU64,
    /// The server is stopping: the driver wants to know when a head completes.
    draining: AtomicBool,
    /// Response bodies that yielded a frame (or a head) and were not polled since.
    waiting_bodies: AtomicUsize,
    /// The last time the connection asked any response body for more, or one started waiting.
    /// On HTTP/1.1 a connection sends one response at a time, so this is that body's wait.
    body_progress: AtomicU64,
    /// HTTP/2: when each stream's body began to wait, by slot ([`NOT_WAITING`] when it is
    /// not waiting), so the deadline follows the longest wait, not the latest progress.
    waits: Mutex<Waits>,
    /// Something moved the deadline earlier; the driver recomputes it.
    dirty: AtomicBool,
    waker: AtomicWaker,
    /// A write to the client is pending (so bytes of a response may be owed before anything
    /// else can be written).
    writing: AtomicBool,
    /// [`GuardedIo`] is to answer [`Refusal::HeadTimeout`] and end the connection.
    farewell_due: AtomicBool,
    /// The driver closed the connection with nothing in flight (idle, or a stop): the client
    /// owes no bytes, so the close does not linger.
    quiet_close: AtomicBool,
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

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
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
    fn bytes_read(&self) {
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
    fn head_in_progress(&self) -> bool {
        self.protocol.load(Relaxed) != PROTOCOL_H2
            && self.in_flight.load(Relaxed) == 0
            && self.head_started.load(Relaxed) != 0
    }

    /// On a head that timed out, whether a response can still be written: the connection
    /// speaks HTTP/1.1 (a head has begun to arrive) and owes the client no bytes of an earlier
    /// response.
    fn can_answer_head(&self) -> bool {
        self.protocol.load(Relaxed) == PROTOCOL_H1
            && self.in_flight.load(Relaxed) == 0
            && !self.writing.load(Relaxed)
    }

    /// An HTTP/1.1 connection with no request in flight: a response hyper writes now is not
    /// one of tollgate's.
    fn between_requests_h1(&self) -> bool {
        self.protocol.load(Relaxed) == PROTOCOL_H1 && self.in_flight.load(Relaxed) == 0
    }

    /// The connection turned out to speak HTTP/2: bytes between requests are frames (PING,
    /// SETTINGS, WINDOW_UPDATE), not a slow head, so only `idle_timeout` bounds it when idle.
    fn speaks_h2(&self) {
        self.protocol.store(PROTOCOL_H2, Relaxed);
        self.head_started.store(0, Relaxed);
        self.idle_since.store(self.now(), Relaxed);
        self.changed();
    }

    fn speaks_h1(&self) {
        self.protocol.store(PROTOCOL_H1, Relaxed);
    }

    fn body_waiting(&self) {
        if self.waiting_bodies.fetch_add(1, Relaxed) == 0 {
            self.body_progress.store(self.now(), Relaxed);
            self.changed();
        }
    }

    fn body_polled(&self) {
        self.waiting_bodies.fetch_sub(1, Relaxed);
        self.body_progress.store(self.now(), Relaxed);
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        // Each update is one store; a panic cannot leave the table half-written.
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On HTTP/2, a slot for a new response body, waiting from now.
    fn wait_slot(&self) -> Option<usize> {
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
    fn set_wait(&self, slot: usize, waiting: bool) {
        let since = if waiting { self.now() } else { NOT_WAITING };
        self.waits().since[slot] = since;
    }

    fn free_wait_slot(&self, slot: usize) {
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
    fn next_deadline(&self, bounds: &Bounds, closing_since: Option<u64>) -> Option<(u64, Expiry)> {
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
    fn wants_linger(&self) -> bool {
        self.protocol.load(Relaxed) == PROTOCOL_H1 && !self.quiet_close.load(Relaxed)
    }

    fn linger_started(&self) {
        let now = self.now();
        self.linger_last.store(now, Relaxed);
        self.linger_started.store(now + 1, Relaxed);
        self.changed();
    }

    /// Bytes arrived while lingering: the client is still sending (its deadline moves later).
    fn lingered(&self) {
        self.linger_last.store(self.now(), Relaxed);
    }

    /// Resolves when something moved the deadline earlier.
    fn poll_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
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
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

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

/// How a driven connection ended.
#[derive(Debug)]
pub enum Ended<E> {
    /// The connection finished by itself (cleanly or with `E`).
    Finished(Result<(), E>),
    /// A bound expired and the connection was dropped.
    Dropped(&'static str),
}

/// Polls `conn` to completion while enforcing `bounds` from `activity`.
///
/// - Idle past `idle_timeout`, or `stop` turned true: a graceful shutdown (via `shutdown`).
///   On a stop, an HTTP/1.1 request whose head is owed (see [`Activity::head_in_progress`])
///   is served first, and hyper closes the connection after its response; requests in flight
///   always finish; idle keep-alive connections close at once.
/// - A head not complete within `header_read_timeout`: on HTTP/1.1, when nothing else is
///   owed, [`GuardedIo`] answers it ([`Refusal::HeadTimeout`]) and ends the connection;
///   otherwise dropped.
/// - A stalled response, or a connection asked to close (or answered) that still stays open
///   `header_read_timeout` later (after an answer: at most [`LINGER`]) with nothing in
///   flight: dropped.
pub async fn drive<C, E>(
    conn: C,
    mut shutdown: impl FnMut(Pin<&mut C>),
    activity: &Activity,
    mut bounds: Bounds,
    mut stop: watch::Receiver<bool>,
) -> Ended<E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let timer = tokio::time::sleep(Duration::ZERO);
    let mut timer = std::pin::pin!(timer);
    // The deadline the timer is set to. A later deadline does not reset it (resetting touches
    // the timer wheel): it fires early, the deadline is recomputed, and it is set again.
    let mut armed: Option<u64> = None;
    // When `shutdown` was called.
    let mut closing_since: Option<u64> = None;
    let mut stopping = *stop.borrow_and_update();
    let mut watching_stop = !stopping;
    if stopping {
        // Accepted as the server stops: read what the client has already sent before
        // deciding whether there is a request to serve.
        activity.draining.store(true, Relaxed);
        let first = std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await;
        if let Poll::Ready(ended) = first {
            return Ended::Finished(ended);
        }
    }
    loop {
        if stopping && closing_since.is_none() && !activity.head_in_progress() {
            if activity.in_flight.load(Relaxed) == 0 {
                activity.quiet_close.store(true, Relaxed);
            }
            shutdown(conn.as_mut());
            closing_since = Some(activity.now());
        }
        if let Some((at, _)) = activity.next_deadline(&bounds, closing_since)
            && armed.is_none_or(|armed| at < armed)
        {
            timer.as_mut().reset(activity.instant(at));
            armed = Some(at);
        }
        tokio::select! {
            biased;
            ended = conn.as_mut() => return Ended::Finished(ended),
            () = std::future::poll_fn(|cx| activity.poll_changed(cx)) => {}
            () = timer.as_mut(), if armed.is_some() => {
                armed = None;
                let Some((at, expiry)) = activity.next_deadline(&bounds, closing_since) else {
                    continue;
                };
                if at > activity.now() {
                    continue;
                }
                match expiry {
                    Expiry::Idle => {
                        tracing::debug!(reason = expiry.as_str(), "closing the connection");
                        activity.quiet_close.store(true, Relaxed);
                        shutdown(conn.as_mut());
                        closing_since = Some(activity.now());
                    }
                    // Dropped, not shut down: hyper finishes the head of a connection's first
                    // request before a graceful shutdown takes effect, and nothing is in
                    // flight to lose.
                    Expiry::HeadTimeout | Expiry::ResponseStalled | Expiry::CloseOverdue => {
                        if expiry == Expiry::HeadTimeout
                            && activity.can_answer_head()
                            && !activity.farewell_due.swap(true, Relaxed)
                        {
                            tracing::debug!(reason = expiry.as_str(), "answering and closing");
                            closing_since = Some(activity.now());
                            // Now it bounds the lingering read only.
                            bounds.header_read = bounds.header_read.min(LINGER);
                            continue;
                        }
                        tracing::debug!(reason = expiry.as_str(), "dropping the connection");
                        return Ended::Dropped(expiry.as_str());
                    }
                }
            }
            changed = stop.changed(), if watching_stop => {
                // An error means the server is gone without a stop: nothing will send one.
                watching_stop = changed.is_ok() && !*stop.borrow_and_update();
                if changed.is_ok() && !watching_stop {
                    stopping = true;
                    activity.draining.store(true, Relaxed);
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A client connection's transport that reports reads to [`Activity`], tells HTTP/2 from
    /// HTTP/1.1 by the preface, and fails a write that makes no progress for `write_stall`.
    pub struct GuardedIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        write_stall: Duration,
        // Armed while a write, flush or shutdown is pending; boxed and made on the first
        // pending write only.
        stall_timer: Option<Pin<Box<Sleep>>>,
        stall_armed: bool,
        // Bytes of the HTTP/2 preface seen so far, until the protocol is known.
        preface_seen: usize,
        protocol_known: bool,
        // Renders tollgate's answers (see `Refusal`).
        answer: Option<Answer>,
        // What is left to write of an answer, once rendered.
        unsaid: Option<Bytes>,
        // The answer to a head that timed out is written and the write side shut.
        said: bool,
        // Dropped with the transport (see `GuardedIo::closed`).
        open: Option<tokio::sync::oneshot::Sender<()>>,
        // The client closed its side (a read returned nothing).
        eof_seen: bool,
        // The write side is shut; what the client still sends is read and dropped while
        // `lingering` (see `LINGER_QUIET`).
        shut: bool,
        lingering: bool,
    }
}

impl<T> GuardedIo<T> {
    /// Wraps a client transport.
    pub fn new(inner: T, activity: Arc<Activity>, write_stall: Duration) -> Self {
        Self {
            inner,
            activity,
            write_stall,
            stall_timer: None,
            stall_armed: false,
            preface_seen: 0,
            protocol_known: false,
            answer: None,
            unsaid: None,
            said: false,
            open: None,
            eof_seen: false,
            shut: false,
            lingering: false,
        }
    }

    /// Has `answer` render the answers this transport writes itself.
    pub fn answering(mut self, answer: Answer) -> Self {
        self.answer = Some(answer);
        self
    }

    /// Resolves when this transport is dropped: when the connection ends, or, if hyper handed
    /// it to an upgrade, when the tunnel closes.
    pub fn closed(&mut self) -> impl Future<Output = ()> + use<T> {
        let (open, closed) = tokio::sync::oneshot::channel();
        self.open = Some(open);
        async move {
            let _ = closed.await;
        }
    }
}

impl<T> GuardedIo<T> {
    /// Passes a finished write through; on `Pending`, arms or checks the stall timer.
    fn guard_write<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        if polled.is_ready() {
            if *this.stall_armed {
                *this.stall_armed = false;
                this.activity.writing.store(false, Relaxed);
            }
            return polled;
        }
        let deadline = || Instant::now() + *this.write_stall;
        let timer = this
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline())));
        if !*this.stall_armed {
            timer.as_mut().reset(deadline());
            *this.stall_armed = true;
            this.activity.writing.store(true, Relaxed);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client made no progress reading the response",
        )))
    }
}

impl<T: AsyncWrite> GuardedIo<T> {
    /// Writes what is left of `unsaid`.
    fn poll_unsaid(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let this = self.as_mut().project();
            let Some(unsaid) = this.unsaid.as_ref().filter(|u| !u.is_empty()) else {
                return Poll::Ready(Ok(()));
            };
            let polled = this.inner.poll_write(cx, unsaid);
            let written = ready!(self.as_mut().guard_write(cx, polled))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if let Some(unsaid) = self.as_mut().project().unsaid.as_mut() {
                bytes::Buf::advance(unsaid, written);
            }
        }
    }

    /// If `buf` is hyper's own answer to a head it could not parse (an empty 400, 414 or 431
    /// in hyper 1.x's exact format, written with no request in flight), queues tollgate's
    /// answer in its place and reports `buf` as written. (The last bytes of a response body
    /// can be written after its request ended; an upstream whose body ends in exactly those
    /// bytes, written alone, would see them replaced, on its own response only.)
    fn replace_refusal(mut self: Pin<&mut Self>, buf: &[u8]) -> Option<usize> {
        if self.unsaid.is_some() || !self.activity.between_requests_h1() {
            return None;
        }
        let status = hyper_refusal(buf)?;
        let this = self.as_mut().project();
        let answer = this.answer.as_ref()?(Refusal::Unparsed(status))?;
        *this.unsaid = Some(answer);
        Some(buf.len())
    }
}

/// The status of `buf` if it is, exactly, hyper's answer to a head it could not parse:
/// `HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: <29 bytes>\r\n\r\n`
/// (or 414, 431). No response of tollgate's looks like this: they all carry `x-request-id`.
fn hyper_refusal(buf: &[u8]) -> Option<StatusCode> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let status = StatusCode::from_bytes(rest.get(..3)?).ok()?;
    if !matches!(status.as_u16(), 400 | 414 | 431) {
        return None;
    }
    let date = rest[3..]
        .strip_prefix(b" ")?
        .strip_prefix(status.canonical_reason()?.as_bytes())?
        .strip_prefix(b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ")?
        .strip_suffix(b"\r\n\r\n")?;
    (date.len() == 29 && !date.contains(&b'\n')).then_some(status)
}

impl<T: AsyncRead + AsyncWrite> GuardedIo<T> {
    /// Writes the answer to a head that timed out, shuts the write side, then discards what
    /// the client still sends until it closes (closing with unread bytes would reset the
    /// connection, and the client could lose the answer); the driver bounds the wait. Reports
    /// the end of input, so hyper ends the connection.
    fn poll_farewell(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.said {
            let this = self.as_mut().project();
            if this.unsaid.is_none() {
                let answer = this.answer.as_ref().and_then(|a| a(Refusal::HeadTimeout));
                *this.unsaid = Some(answer.unwrap_or_default());
            }
            ready!(self.as_mut().poll_unsaid(cx))?;
            let polled = self.as_mut().project().inner.poll_flush(cx);
            ready!(self.as_mut().guard_write(cx, polled))?;
            let polled = self.as_mut().project().inner.poll_shutdown(cx);
            ready!(self.as_mut().guard_write(cx, polled))?;
            *self.as_mut().project().said = true;
        }
        let mut inner = self.project().inner;
        loop {
            let before = buf.filled().len();
            ready!(inner.as_mut().poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            buf.set_filled(before);
        }
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.activity.farewell_due.load(Relaxed) {
            return self.poll_farewell(cx, buf);
        }
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        let fresh = &buf.filled()[before..];
        if fresh.is_empty() {
            *this.eof_seen = true;
            return Poll::Ready(Ok(()));
        }
        if !*this.protocol_known {
            let want = &H2_PREFACE[*this.preface_seen..];
            let n = want.len().min(fresh.len());
            if fresh[..n] != want[..n] {
                *this.protocol_known = true;
                this.activity.speaks_h1();
            } else {
                *this.preface_seen += n;
                if *this.preface_seen == H2_PREFACE.len() {
                    *this.protocol_known = true;
                    this.activity.speaks_h2();
                    return Poll::Ready(Ok(()));
                }
            }
        }
        this.activity.bytes_read();
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(written) = self.as_mut().replace_refusal(buf) {
            return Poll::Ready(Ok(written));
        }
        ready!(self.as_mut().poll_unsaid(cx))?;
        let polled = self.as_mut().project().inner.poll_write(cx, buf);
        self.guard_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next())
            && let Some(written) = self.as_mut().replace_refusal(only)
        {
            return Poll::Ready(Ok(written));
        }
        ready!(self.as_mut().poll_unsaid(cx))?;
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.guard_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_unsaid(cx))?;
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.guard_write(cx, polled)
    }

    /// Shuts the write side; on an HTTP/1.1 connection hyper closes after a response (the
    /// client asked to close, or a request body was left unread), then reads and drops what
    /// the client still sends until it closes too, bounded by [`LINGER_QUIET`] and
    /// [`LINGER_MAX`] (as nginx's lingering close): a close with unread bytes would reset the
    /// connection and could take the response with it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.said {
            return Poll::Ready(Ok(()));
        }
        if !self.shut {
            ready!(self.as_mut().poll_unsaid(cx))?;
            let polled = self.as_mut().project().inner.poll_shutdown(cx);
            ready!(self.as_mut().guard_write(cx, polled))?;
            let this = self.as_mut().project();
            *this.shut = true;
            *this.lingering = !*this.eof_seen && this.activity.wants_linger();
            if *this.lingering {
                this.activity.linger_started();
            }
        }
        let this = self.project();
        if !*this.lingering {
            return Poll::Ready(Ok(()));
        }
        let mut inner = this.inner;
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(inner.as_mut().poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => this.activity.lingered(),
                // The client closed, or the connection failed: nothing more to wait for.
                _ => {
                    *this.lingering = false;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A response body that keeps its request in flight until it has been sent (or abandoned),
/// and tells [`Activity`] while it waits for the connection to ask for more.
pub struct TrackedBody {
    inner: ResponseBody,
    // Field order: `waiting` is settled in `drop` before `in_flight` ends the request.
    waiting: bool,
    /// HTTP/2: this body's place in the connection's table of waits.
    slot: Option<usize>,
    in_flight: InFlight,
}

impl TrackedBody {
    /// Wraps a response whose head is about to be sent.
    pub fn new(inner: ResponseBody, in_flight: InFlight) -> Self {
        // The head is handed over now; until the connection asks for the body, it waits.
        in_flight.0.body_waiting();
        Self {
            inner,
            waiting: true,
            slot: in_flight.0.wait_slot(),
            in_flight,
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if self.waiting {
            self.in_flight.0.body_polled();
        }
        if let Some(slot) = self.slot {
            self.in_flight.0.free_wait_slot(slot);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.waiting {
            this.waiting = false;
            this.in_flight.0.body_polled();
            if let Some(slot) = this.slot {
                this.in_flight.0.set_wait(slot, false);
            }
        }
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if matches!(polled, Some(Ok(_))) {
            this.waiting = true;
            this.in_flight.0.body_waiting();
            if let Some(slot) = this.slot {
                this.in_flight.0.set_wait(slot, true);
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_refusals_in_its_exact_format_are_recognized() {
        let date = "Sun, 22 Nov 2026 12:55:00 GMT";
        let refusal = |status: &str| {
            format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
            )
        };
        for (line, status) in [
            ("400 Bad Request", 400),
            ("414 URI Too Long", 414),
            ("431 Request Header Fields Too Large", 431),
        ] {
            let found = hyper_refusal(refusal(line).as_bytes()).map(|s| s.as_u16());
            assert_eq!(found, Some(status), "{line}");
        }
        let others = [
            refusal("404 Not Found"),
            refusal("400 Bad Request").replace("\r\n\r\n", "\r\n"),
            refusal("400 Bad Request").replace("date:", "x-request-id: req_1\r\ndate:"),
            refusal("400 Bad Request").replace("content-length: 0", "content-length: 2"),
            refusal("400 Bad Request") + "ok",
            refusal("400 Bad Request").replace("HTTP/1.1", "HTTP/1.0"),
        ];
        for other in others {
            assert_eq!(hyper_refusal(other.as_bytes()), None, "{other:?}");
        }
    }

    const BOUNDS: Bounds = Bounds {
        header_read: Duration::from_nanos(100),
        idle: Duration::from_nanos(1_000),
        write_stall: Duration::from_nanos(500),
    };

    fn fresh() -> Arc<Activity> {
        let activity = Activity::new();
        activity.speaks_h1();
        activity
    }

    #[tokio::test]
    async fn a_new_connection_gets_the_header_timeout_from_its_start() {
        let activity = fresh();
        assert_eq!(
            activity.next_deadline(&BOUNDS, None),
            Some((100, Expiry::HeadTimeout))
        );
    }

    #[tokio::test]
    async fn between_requests_the_idle_timeout_applies_until_a_head_starts() {
        let activity = fresh();
        let in_flight = activity.request_started();
        drop(TrackedBody::new(ResponseBody::empty(), in_flight));
        let idle_since = activity.idle_since.load(Relaxed);
        assert_eq!(
            activity.next_deadline(&BOUNDS, None),
            Some((idle_since + 1_000, Expiry::Idle))
        );
        activity.bytes_read();
        let started = activity.head_started.load(Relaxed) - 1;
        assert!(started >= idle_since);
        assert_eq!(
            activity.next_deadline(&BOUNDS, None),
            Some((started + 100, Expiry::HeadTimeout))
        );
    }

    #[tokio::test]
    async fn a_request_in_flight_has_no_deadline_until_its_response_waits() {
        let activity = fresh();
        let in_flight = activity.request_started();
        // Bytes of a request body are not a new head.
        activity.bytes_read();
        assert_eq!(activity.next_deadline(&BOUNDS, None), None);
        let body = TrackedBody::new(ResponseBody::empty(), in_flight);
        let progress = activity.body_progress.load(Relaxed);
        assert_eq!(
            activity.next_deadline(&BOUNDS, None),
            Some((progress + 500, Expiry::ResponseStalled))
        );
        drop(body);
        assert_eq!(activity.in_flight.load(Relaxed), 0);
        assert_eq!(activity.waiting_bodies.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn on_http2_the_longest_waiting_body_sets_the_deadline() {
        let activity = Activity::new();
        activity.speaks_h2();
        let stalled = TrackedBody::new(ResponseBody::empty(), activity.request_started());
        let first = activity.next_deadline(&BOUNDS, None);
        assert!(matches!(first, Some((_, Expiry::ResponseStalled))));
        // Other streams start, are asked for their bodies to the end, and finish: the
        // connection makes progress, but the stalled stream's wait goes on.
        let waker = futures_util::task::noop_waker();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut flowing = TrackedBody::new(ResponseBody::empty(), activity.request_started());
            let polled = Pin::new(&mut flowing).poll_frame(&mut Context::from_waker(&waker));
            assert!(matches!(polled, Poll::Ready(None)));
            drop(flowing);
            assert_eq!(activity.next_deadline(&BOUNDS, None), first);
        }
        // With the stalled one gone, a later wait sets it.
        let later = TrackedBody::new(ResponseBody::empty(), activity.request_started());
        drop(stalled);
        let (at, expiry) = activity.next_deadline(&BOUNDS, None).unwrap();
        assert_eq!(expiry, Expiry::ResponseStalled);
        assert!(at > first.unwrap().0);
        drop(later);
        let waits = activity.waits();
        assert_eq!(waits.free.len(), waits.since.len(), "every slot freed");
    }

    #[tokio::test]
    async fn http2_bytes_between_requests_do_not_start_a_head() {
        let activity = Activity::new();
        activity.speaks_h2();
        activity.bytes_read();
        let idle_since = activity.idle_since.load(Relaxed);
        assert_eq!(
            activity.next_deadline(&BOUNDS, None),
            Some((idle_since + 1_000, Expiry::Idle))
        );
    }

    #[tokio::test]
    async fn a_closing_connection_with_nothing_in_flight_is_dropped_after_the_header_bound() {
        let activity = fresh();
        assert_eq!(
            activity.next_deadline(&BOUNDS, Some(7)),
            Some((107, Expiry::CloseOverdue))
        );
        let _in_flight = activity.request_started();
        assert_eq!(activity.next_deadline(&BOUNDS, Some(7)), None);
    }

    #[tokio::test]
    async fn the_preface_decides_the_protocol_even_byte_by_byte() {
        use tokio::io::AsyncReadExt;
        for (input, h2) in [(&H2_PREFACE[..], true), (&b"PRI * HTTP/1.1\r\n"[..], false)] {
            let activity = Activity::new();
            let (mut client, server) = tokio::io::duplex(64);
            let mut io = GuardedIo::new(server, activity.clone(), Duration::from_secs(1));
            let mut buf = [0u8; 1];
            for byte in input {
                tokio::io::AsyncWriteExt::write_all(&mut client, &[*byte])
                    .await
                    .unwrap();
                io.read_exact(&mut buf).await.unwrap();
            }
            let protocol = activity.protocol.load(Relaxed);
            assert_eq!(protocol == PROTOCOL_H2, h2, "{input:?}");
            assert_ne!(protocol, PROTOCOL_UNKNOWN);
        }
    }
}
