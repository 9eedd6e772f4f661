//! [`PoolBody`]: the body of a response on a pooled connection, which carries the connection
//! and parks it again in its pool when the body has ended.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::{Conn, Parked};
use crate::body::BoxError;
use crate::proxy::wire::{Decoded, Framing, WireError};

/// The body of a response on a pooled connection, which it carries: read from the socket as
/// the client reads it, and parked again when it has ended.
pub(super) struct PoolBody {
    pub(super) conn: Option<Box<Conn>>,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
}

impl PoolBody {
    /// The body has been read whole: the connection goes back to the pool if it can carry
    /// another request (the response allowed it, the request went whole, no byte is left
    /// over, nobody retired it), else it closes.
    fn finish(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !conn.sent() {
            // The rest of the request may be there already (the body's end, above all).
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = conn.poll_upload(&mut cx);
        }
        if self.keep_alive
            && conn.reusable
            && conn.sent()
            && conn.buf.is_empty()
            && !conn.retired.load(Ordering::Relaxed)
            && let Some(pool) = conn.pool.upgrade()
        {
            conn.shed();
            pool.shard(conn.home).push(Parked {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// The whole body, when it arrived with the head (a length the buffer already holds, the
    /// request sent whole): it is taken off the buffer and the connection goes back to the
    /// pool at once ([`Self::finish`]), so the response's body needs no polling through the
    /// connection. `None` otherwise, with nothing read.
    pub(super) fn arrived_whole(&mut self) -> Option<Bytes> {
        let conn = self.conn.as_mut()?;
        match self.framing {
            Framing::Length(len) if conn.buf.len() as u64 >= len && conn.sent() => {}
            _ => return None,
        }
        let Ok(Decoded::Data(data)) = self.framing.decode(&mut conn.buf) else {
            return None;
        };
        self.finish();
        Some(data)
    }

    fn fail(&mut self, error: WireError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        // The request's body may still be on its way (an upstream that answers as it reads).
        // A socket that fails to take it is left to the reads below to report.
        if !conn.sent()
            && let Poll::Ready(Err(error @ WireError::RequestBody(_))) = conn.poll_upload(cx)
        {
            return this.fail(error);
        }
        loop {
            match this.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.framing.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Trailers(trailers)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => match ready!(conn.poll_read(cx)) {
                    // A body read to the close: its connection never has keep-alive.
                    Ok(0) if this.framing == Framing::Close => {
                        this.framing = Framing::Done;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail(WireError::Closed),
                    Ok(_) => {}
                    Err(error) => return this.fail(error),
                },
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for PoolBody {
    fn drop(&mut self) {
        // A body that ended without being polled to its end (an empty one, which hyper never
        // polls): its connection is released all the same. One dropped before its end
        // closes.
        if self.framing.is_done() {
            self.finish();
        }
    }
}
