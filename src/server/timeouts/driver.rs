//! [`drive`]: polls one connection while it enforces its time bounds, from one deadline
//! computed from [`Activity`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;

use super::activity::PollClock;
use super::{Activity, Bounds, Expiry, LINGER};

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
///
/// [`GuardedIo`]: super::GuardedIo
/// [`Refusal::HeadTimeout`]: super::Refusal::HeadTimeout
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
    // The timer has this task's waker since it was last set: until it fires (the driver
    // deregisters it, `is_elapsed`), polling it again would only register the same waker.
    let mut waiting = false;
    // When `shutdown` was called.
    let mut closing_since: Option<u64> = None;
    let mut stopping = *stop.borrow_and_update();
    let mut watching_stop = !stopping;
    // Whether the stop has been sent, read without the wait: an atomic read of the channel's
    // version, where polling the wait takes the channel's waiter lock.
    let sent = stop.clone();
    // The wait has registered this task's waker, which the stop wakes.
    let mut registered = false;
    // One wait for the stop for the whole connection, not one per turn of the loop below:
    // each new wait registers with (and each dropped one leaves) the stop channel's waiter
    // list, which every connection shares. True when the stop came; false when the server is
    // gone without one (nothing will send it).
    let stop_signal = async move {
        loop {
            if stop.changed().await.is_err() {
                return false;
            }
            if *stop.borrow_and_update() {
                return true;
            }
        }
    };
    let mut stop_signal = std::pin::pin!(stop_signal);
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
            waiting = false;
        }
        tokio::select! {
            biased;
            ended = std::future::poll_fn(|cx| {
                let _clock = PollClock::enter();
                conn.as_mut().poll(cx)
            }) => return Ended::Finished(ended),
            () = std::future::poll_fn(|cx| activity.poll_changed(cx)) => {}
            () = std::future::poll_fn(|cx| {
                if waiting && !timer.is_elapsed() {
                    return Poll::Pending;
                }
                let fired = timer.as_mut().poll(cx);
                waiting = fired.is_pending();
                fired
            }), if armed.is_some() => {
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
            // Polled once to register, then only once the stop was sent: the connection's
            // task wakes for every read and write, and the wait's waker stays registered.
            stopped = std::future::poll_fn(|cx| {
                if registered && matches!(sent.has_changed(), Ok(false)) {
                    return Poll::Pending;
                }
                registered = true;
                stop_signal.as_mut().poll(cx)
            }), if watching_stop => {
                watching_stop = false;
                if stopped {
                    stopping = true;
                    activity.draining.store(true, Relaxed);
                }
            }
        }
    }
}
