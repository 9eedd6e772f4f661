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

mod activity;
mod client_gone;
mod driver;
mod guarded_io;
#[cfg(test)]
mod tests;
mod tracked_body;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::config::ServerConfig;

pub use activity::{Activity, InFlight};
pub use client_gone::ClientTransport;
pub use driver::{Ended, drive};
pub use guarded_io::GuardedIo;
pub use tracked_body::TrackedBody;

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
