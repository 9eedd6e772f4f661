//! [`TrackedBody`]: a response body that keeps its request in flight until it is sent, and
//! tells [`Activity`] while it waits for the connection to ask for more.
//!
//! [`Activity`]: super::Activity

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::InFlight;
use crate::body::{BoxError, ResponseBody};

/// A response body that keeps its request in flight until it has been sent (or abandoned),
/// and tells [`Activity`] while it waits for the connection to ask for more.
///
/// [`Activity`]: super::Activity
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
