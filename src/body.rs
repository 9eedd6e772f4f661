//! The bodies that flow through the gateway, without boxing.
//!
//! [`RequestBody`] is the client's body on its way upstream: it enforces `max_body_bytes`
//! while streaming and fails a body that stalls for `body_read_timeout`. [`ResponseBody`] is
//! what the client receives: a fixed body tollgate wrote, or the upstream's body streamed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crate::observability::log_throttle::upstream_failures;
use crate::proxy::inflight::InflightSlot;
use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// The boxed error type bodies share with hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// More than `max_body_bytes` arrived.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// No data for `body_read_timeout`.
    #[error("request body stalled")]
    Stalled,
    /// The client connection failed.
    #[error("client body error: {0}")]
    Client(#[from] hyper::Error),
}

/// When a request body last moved (was created, or handed the upstream a frame), shared with
/// the forwarder: an upstream's `timeout` for the response head counts from the last bytes of
/// the request, so an upload that takes longer than `timeout` but keeps moving is not cut off.
#[derive(Debug)]
pub struct BodyProgress {
    base: Instant,
    /// Nanoseconds from `base` to the last movement.
    last: AtomicU64,
    /// Whether the body is waiting for the client's next bytes (the upstream asked for more,
    /// so it is not the upstream holding things up).
    waiting_on_client: AtomicBool,
    /// The client's body has ended (its last frame was handed on).
    finished: AtomicBool,
}

impl BodyProgress {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        }
    }

    /// Whether the body is waiting for the client (a stall there is the client's, bounded by
    /// `body_read_timeout`, not the upstream's).
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Ordering::Relaxed)
    }

    fn set_waiting_on_client(&self, waiting: bool) {
        self.waiting_on_client.store(waiting, Ordering::Relaxed);
    }

    /// Whether the whole body was handed on: an upstream that answers before that has not
    /// read it all, and the client is still sending what nobody will read.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    fn moved(&self) {
        let since = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(since, Ordering::Relaxed);
    }

    /// When the body last moved.
    pub fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// A client request body with a size limit and a stall timeout.
pub struct RequestBody {
    /// `None` for a body known to be empty (a replayed request, see [`RequestBody::empty`]).
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    /// Whether the client body was ever polled.
    touched: bool,
    stall: Duration,
    /// Armed the first time the body waits; boxed so the body stays `Unpin` for the client.
    timer: Option<Pin<Box<Sleep>>>,
    /// Updated on every frame (a streamed body only).
    progress: Option<Arc<BodyProgress>>,
}

impl RequestBody {
    /// Wraps `inner`: at most `limit` bytes, no gap longer than `stall` between frames.
    pub fn new(inner: Incoming, limit: u64, stall: Duration) -> Self {
        Self {
            inner: Some(inner),
            limit,
            seen: 0,
            touched: false,
            stall,
            timer: None,
            progress: Some(Arc::new(BodyProgress::new())),
        }
    }

    /// The client's body, if not a byte of it was read (a request that came back from a
    /// connect that failed).
    pub fn into_unread(self) -> Option<Incoming> {
        self.inner.filter(|_| !self.touched)
    }

    /// Whether the body was ever polled.
    pub fn touched(&self) -> bool {
        self.touched
    }

    /// When the body last moved, for a streamed body.
    pub fn progress(&self) -> Option<Arc<BodyProgress>> {
        self.progress.clone()
    }

    /// A body with no bytes. Unlike a client's stream, it can be made again, so a request
    /// carrying it can be replayed on a fresh connection.
    pub fn empty() -> Self {
        Self {
            inner: None,
            limit: 0,
            seen: 0,
            touched: false,
            stall: Duration::ZERO,
            timer: None,
            progress: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        this.touched = true;
        let polled = Pin::new(inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            progress.set_waiting_on_client(polled.is_pending());
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                            limit: this.limit,
                        })));
                    }
                }
                if let Some(timer) = this.timer.as_mut() {
                    timer.as_mut().reset(Instant::now() + this.stall);
                }
                if let Some(progress) = &this.progress {
                    progress.moved();
                    // hyper stops at a body that says it has ended, without a last poll.
                    if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                        progress.finished.store(true, Ordering::Relaxed);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                if let Some(progress) = &this.progress {
                    progress.moved();
                    progress.finished.store(true, Ordering::Relaxed);
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let stall = this.stall;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(RequestBodyError::Stalled)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// An HTTP/1.x request body left unread this long or this large after an early answer is
/// not waited for: the answer says `Connection: close` instead. Like nginx, which discards
/// the body of a request it answered early, so the connection can carry the next request.
pub const DISCARD_BODY_BYTES: u64 = 64 * 1024;

/// See [`DISCARD_BODY_BYTES`].
pub const DISCARD_BODY_TIME: Duration = Duration::from_secs(1);

/// An HTTP/1.x request that came with a body. Answered without reading it all, the client's
/// next request on the connection would be read from the middle of this body, so hyper
/// closes the connection; unsaid, that close reaches a keep-alive client as a reset.
pub struct UnreadBody {
    /// `Expect: 100-continue`: the client waits for a go-ahead before it sends the body.
    expects_continue: bool,
}

impl UnreadBody {
    /// `Some` for an HTTP/1.x request with a body still to come.
    pub fn of(head: &http::request::Parts, body: &Incoming) -> Option<Self> {
        if head.version >= http::Version::HTTP_2 || http_body::Body::is_end_stream(body) {
            // HTTP/2: an unread body ends its own stream (RST_STREAM), never the connection.
            return None;
        }
        let expects_continue = head
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        Some(Self { expects_continue })
    }

    /// After the answer is made: a body that was never forwarded (`body` still here) is read
    /// and discarded, within [`DISCARD_BODY_BYTES`] and [`DISCARD_BODY_TIME`], so the
    /// connection stays open; otherwise, or when forwarding failed (the body may be half
    /// sent), the answer says `Connection: close` so the client knows before it sends again.
    pub async fn settle(
        self,
        body: Option<Incoming>,
        forwarded_ok: bool,
        response: &mut Response<ResponseBody>,
    ) {
        let kept = match body {
            // A client waiting for `100 Continue` has sent nothing: asking for the body now
            // would tell it to upload something that is refused already.
            Some(body) => !self.expects_continue && discard(body).await,
            // The upstream answered: its connection read what it wanted of the body.
            None => forwarded_ok,
        };
        if !kept {
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Reads `body` to its end and drops the bytes; `false` if it is larger than
/// [`DISCARD_BODY_BYTES`] (declared or seen), fails, or takes longer than
/// [`DISCARD_BODY_TIME`].
async fn discard(mut body: Incoming) -> bool {
    use http_body_util::BodyExt;
    if http_body::Body::size_hint(&body).lower() > DISCARD_BODY_BYTES {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > DISCARD_BODY_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DISCARD_BODY_TIME, read)
        .await
        .unwrap_or(false)
}

/// A body read off an upstream connection by tollgate itself: the plain-http pools'
/// (`proxy::pool`), whose body carries its connection and puts it back when it ends.
pub type CarriedBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// The body of an upstream response: hyper's (hyper-util's client: https upstreams,
/// upgrades), one a plain-http pool's connection reads ([`CarriedBody`]), or one that pool
/// read whole with the head ([`UpstreamBody::arrived`]).
pub struct UpstreamBody(Upstream);

enum Upstream {
    Hyper(Incoming),
    Carried(CarriedBody),
    /// Read whole; `None` once polled.
    Arrived(Option<Bytes>),
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("carried", &matches!(self.0, Upstream::Carried(_)))
            .field("arrived", &matches!(self.0, Upstream::Arrived(_)))
            .finish()
    }
}

impl From<Incoming> for UpstreamBody {
    /// A body hyper-util's client reads.
    fn from(incoming: Incoming) -> Self {
        Self(Upstream::Hyper(incoming))
    }
}

impl UpstreamBody {
    /// A body a pooled connection reads.
    pub fn carried(body: CarriedBody) -> Self {
        Self(Upstream::Carried(body))
    }

    /// A body that arrived whole with its head, its connection already back in the pool.
    pub fn arrived(body: Bytes) -> Self {
        Self(Upstream::Arrived(Some(body)))
    }

    /// The body's bytes, when it arrived whole with its head ([`Self::arrived`]); else the
    /// body as it was.
    pub fn into_arrived(self) -> Result<Bytes, Self> {
        match self.0 {
            Upstream::Arrived(Some(body)) => Ok(body),
            _ => Err(self),
        }
    }

    /// Reads what has already arrived, without waiting: a body that arrived whole (a short
    /// error page) ends, and its connection is released, before the body is dropped unread.
    pub fn read_arrived(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while let Poll::Ready(Some(Ok(_))) = Pin::new(&mut *self).poll_frame(&mut cx) {}
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Upstream::Hyper(incoming) => Pin::new(incoming)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            Upstream::Carried(body) => body.as_mut().poll_frame(cx),
            Upstream::Arrived(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Upstream::Hyper(incoming) => incoming.is_end_stream(),
            Upstream::Carried(body) => body.is_end_stream(),
            Upstream::Arrived(body) => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Upstream::Hyper(incoming) => incoming.size_hint(),
            Upstream::Carried(body) => body.size_hint(),
            Upstream::Arrived(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The subject of the throttled warnings of upstream bodies that fail after their head (one
/// line a second per kind, with the count left out; every failure is still counted).
const AFTER_HEAD: &str = "after the response head";

pin_project! {
    /// A response body: fixed bytes from tollgate, or the upstream's body.
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        /// Written by tollgate (errors, fixed responses).
        Full { #[pin] body: Full<Bytes> },
        /// Streamed from the upstream.
        Upstream {
            #[pin] body: UpstreamBody,
            // The upstream's `max_inflight` slot: held until the body is fully streamed or
            // dropped (client gone), not just until the head arrived.
            permit: Option<InflightSlot>,
            // The upstream's `timeout`, also the longest wait for its next body bytes (as
            // nginx's `proxy_read_timeout`): an upstream that stops sending mid-body cannot
            // hold the client, the slot and the connection forever.
            stall: Duration,
            // Armed the first time the body waits; boxed so the body stays `Unpin`.
            timer: Option<Pin<Box<Sleep>>>,
            // Whether the last poll found nothing: the stall is timed from the first poll that
            // waited, so time the client spent not reading (hyper not polling) never counts.
            waiting: bool,
            // The request's span, so an abort mid-body is logged with its request ID.
            span: tracing::Span,
        },
    }
}

impl ResponseBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full {
            body: Full::new(bytes.into()),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// The upstream's body, streamed, holding `permit` until it ends or is dropped, and
    /// failed when no bytes come for `stall`. Call inside the request's span.
    pub fn upstream(body: UpstreamBody, permit: Option<InflightSlot>, stall: Duration) -> Self {
        ResponseBody::Upstream {
            body,
            permit,
            stall,
            timer: None,
            waiting: false,
            span: tracing::Span::current(),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ResponseBodyProj::Full { body } => body.poll_frame(cx).map_err(|e| match e {}),
            ResponseBodyProj::Upstream {
                body,
                permit,
                stall,
                timer,
                waiting,
                span,
            } => {
                let polled = match body.poll_frame(cx) {
                    Poll::Ready(polled) => {
                        *waiting = false;
                        polled
                    }
                    Poll::Pending => {
                        let stall = *stall;
                        match timer.as_mut() {
                            None => *timer = Some(Box::pin(tokio::time::sleep(stall))),
                            Some(t) if !*waiting => t.as_mut().reset(Instant::now() + stall),
                            Some(_) => {}
                        }
                        *waiting = true;
                        let timer = timer.as_mut().expect("armed above");
                        ready!(timer.as_mut().poll(cx));
                        let kind = crate::error::FailureKind::Timeout.as_str();
                        if let Some(suppressed) = upstream_failures().admit(kind, AFTER_HEAD) {
                            span.in_scope(|| {
                                tracing::warn!(
                                    kind,
                                    stalled_for = ?stall,
                                    suppressed,
                                    "upstream body stalled after the response head: client stream aborted"
                                )
                            });
                        }
                        if let Some(slot) = permit.take() {
                            slot.count_timeout_after_head();
                        }
                        return Poll::Ready(Some(Err("upstream response body stalled".into())));
                    }
                };
                match &polled {
                    // An upstream error mid-body propagates, so hyper aborts the client
                    // stream (no terminating chunk, or a short Content-Length body) instead of
                    // ending it cleanly.
                    Some(Err(error)) => {
                        let kind = crate::error::FailureKind::Reset.as_str();
                        if let Some(suppressed) = upstream_failures().admit(kind, AFTER_HEAD) {
                            span.in_scope(|| {
                                tracing::warn!(
                                    kind,
                                    error = %error,
                                    suppressed,
                                    "upstream failure after the response head: client stream aborted"
                                )
                            });
                        }
                        if let Some(slot) = permit.take() {
                            slot.count_reset_after_head();
                        }
                    }
                    None => {
                        permit.take();
                    }
                    Some(Ok(_)) => {}
                }
                Poll::Ready(polled)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full { body } => body.is_end_stream(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full { body } => body.size_hint(),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
