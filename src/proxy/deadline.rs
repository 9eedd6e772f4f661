//! [`Deadline`]: when an attempt's response head is due, and the timers that keep it.
//!
//! A tokio timer costs most when it is made and dropped: it is put into the runtime's timer
//! wheel on its first poll, and taken out when dropped, each under the time driver's lock.
//! Moving a registered timer to a *later* deadline costs one atomic update (tokio puts it
//! back in the wheel itself when the earlier slot comes). So the timers of finished attempts
//! are kept per thread and reused, the most recent first: the next attempt's deadline is
//! usually later than the one the timer is registered for.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::body::BodyProgress;

/// When the upstream's response head is due: `timeout` after the request started, or after
/// its body last moved, whichever is later; never while the body waits for the client.
pub(super) struct Deadline {
    pub(super) at: Instant,
    pub(super) timeout: Duration,
    pub(super) body: Option<Arc<BodyProgress>>,
}

impl Deadline {
    /// Awaits `future` until the deadline; `None` when it passed first. While a body is still
    /// moving the deadline moves with it, so only a stall of `timeout` (the upstream stopped
    /// reading, or has not answered since the last bytes) times out.
    /// `future` comes pinned where the caller made it: taken by value, it would be held
    /// twice in this state machine (as the argument and pinned), and copied on each move.
    pub(super) async fn run<F: Future>(&self, mut future: Pin<&mut F>) -> Option<F::Output> {
        let mut at = self.at;
        let mut timer = Timer::until(at);
        loop {
            // Once the timer has this task's waker, it is polled again only when it fired.
            let mut waiting = false;
            let first = std::future::poll_fn(|cx| {
                if let Poll::Ready(output) = future.as_mut().poll(cx) {
                    return Poll::Ready(Some(output));
                }
                let sleep = timer.sleep();
                if waiting && !sleep.is_elapsed() {
                    return Poll::Pending;
                }
                waiting = true;
                sleep.poll(cx).map(|()| None)
            })
            .await;
            if first.is_some() {
                return first;
            }
            // After a stall of the whole process (a busy host), the timer and the body's next
            // bytes can be due at once: let the connection tasks read what has arrived before
            // judging the body stalled.
            tokio::task::yield_now().await;
            let Some(body) = &self.body else { return None };
            // A body waiting for the client is the client's stall: the body's own
            // `body_read_timeout` answers it (408), not this one (504).
            if body.waiting_on_client() {
                at = Instant::now() + self.timeout;
            } else {
                match body.last() + self.timeout {
                    later if later > at => at = later,
                    _ => return None,
                }
            }
            timer.sleep().reset(at);
        }
    }
}

/// Finished attempts' timers kept on this thread, at most this many (about as many attempts
/// as a thread has in flight at once).
const KEPT: usize = 256;

thread_local! {
    /// Timers of finished attempts, with the runtime they belong to (a thread can run several
    /// runtimes in turn; a timer only works in its own).
    static TIMERS: RefCell<Vec<(tokio::runtime::Id, Pin<Box<Sleep>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// An attempt's timer, given back to this thread's [`TIMERS`] when dropped.
struct Timer {
    runtime: tokio::runtime::Id,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Timer {
    /// A timer set to `at`: the last one kept for this runtime, or a new one.
    fn until(at: Instant) -> Self {
        let runtime = tokio::runtime::Handle::current().id();
        let kept = TIMERS.with(|timers| {
            let mut timers = timers.borrow_mut();
            match timers.last() {
                Some((id, _)) if *id == runtime => timers.pop().map(|(_, sleep)| sleep),
                _ => None,
            }
        });
        let sleep = match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Self {
            runtime,
            sleep: Some(sleep),
        }
    }

    fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.sleep.as_mut().expect("set until dropped").as_mut()
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(mut sleep) = self.sleep.take() else {
            return;
        };
        // The waker of this attempt's task is let go: a kept timer neither holds the task nor
        // wakes it when its registered deadline comes.
        let _ = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        let runtime = self.runtime;
        // `try_with`: a thread that is exiting has no place to keep it.
        let _ = TIMERS.try_with(|timers| {
            if let Ok(mut timers) = timers.try_borrow_mut() {
                // Those of a runtime this thread no longer runs are of no use.
                if timers.first().is_some_and(|(id, _)| *id != runtime) {
                    timers.clear();
                }
                if timers.len() < KEPT {
                    timers.push((runtime, sleep));
                }
            }
        });
    }
}
