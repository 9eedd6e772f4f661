//! [`GuardedIo`]: a client connection's transport. It reports reads to [`Activity`], tells
//! HTTP/2 from HTTP/1.1, bounds stalled writes, writes tollgate's own answers ([`Refusal`])
//! and lingers on close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::activity::PROTOCOL_H1;
use super::{Activity, Answer, ClientTransport, Refusal};

/// The first bytes of every HTTP/2 connection (RFC 9113 3.4).
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
        // Reads that returned bytes, the count when a peek last found bytes waiting, and the
        // count when a peek last registered a wake-up (`u64::MAX`: none), for
        // `poll_client_gone`.
        reads: u64,
        unread_at: u64,
        watched_at: u64,
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
            reads: 0,
            unread_at: u64::MAX,
            watched_at: u64::MAX,
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
pub(super) fn hyper_refusal(buf: &[u8]) -> Option<StatusCode> {
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

impl<T: ClientTransport> GuardedIo<T> {
    /// Whether the client went away while an HTTP/1.1 request is in flight (see
    /// `client_gone`). hyper flushes the transport on every poll of the connection, so this
    /// is asked whenever the connection's task wakes, and the peek registers that wake-up.
    fn poll_client_gone(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        if *this.unread_at == *this.reads
            || this.activity.in_flight.load(Relaxed) == 0
            || this.activity.protocol.load(Relaxed) != PROTOCOL_H1
        {
            return false;
        }
        let watching = *this.watched_at == *this.reads;
        match this.inner.as_ref().get_ref().poll_gone(cx, watching) {
            Poll::Ready(true) => true,
            Poll::Ready(false) => {
                *this.unread_at = *this.reads;
                *this.watched_at = u64::MAX;
                false
            }
            Poll::Pending => {
                *this.watched_at = *this.reads;
                false
            }
        }
    }
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
        *this.reads += 1;
        this.activity.bytes_read();
        Poll::Ready(Ok(()))
    }
}

impl<T: ClientTransport> AsyncWrite for GuardedIo<T> {
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

    /// Also where a client that went away mid-request is noticed (see
    /// [`Self::poll_client_gone`]).
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if T::TELLS_CLOSE && self.as_mut().poll_client_gone(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client closed the connection while its request was in flight",
            )));
        }
        ready!(self.as_mut().poll_unsaid(cx))?;
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.guard_write(cx, polled)
    }

    /// Shuts the write side; on an HTTP/1.1 connection hyper closes after a response (the
    /// client asked to close, or a request body was left unread), then reads and drops what
    /// the client still sends until it closes too, bounded by [`LINGER_QUIET`] and
    /// [`LINGER_MAX`] (as nginx's lingering close): a close with unread bytes would reset the
    /// connection and could take the response with it.
    ///
    /// [`LINGER_QUIET`]: super::LINGER_QUIET
    /// [`LINGER_MAX`]: super::LINGER_MAX
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
