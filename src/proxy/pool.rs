//! The connection pool of a plain-http upstream target: HTTP/1.1 keep-alive connections that
//! tollgate speaks itself ([`super::wire`]), driven from the request's own task.
//!
//! A connection is either idle, parked in the pool (nobody polls it), or checked out by one
//! request, which owns it: the request's task writes the request head (and the body's first
//! bytes, in the same write when they are there), reads the response head, and the response
//! body ([`UpstreamBody`]) carries the connection on, reading the socket as the client reads
//! and sending the rest of the request's body, until the body ends and the connection goes
//! back to the pool. There is no task per connection, no hand-off between tasks and no
//! channel: a request costs no wake-up of another task and no second scheduling of its
//! bytes (as Pingora drives its upstream connections). The bytes read stay where they were
//! read: the response's field values and body chunks are slices of the connection's buffer.
//!
//! A parked connection is not watched. A checkout looks at it once before use: one the
//! upstream closed (or that has bytes nobody asked for) shows up then and is dropped, and the
//! request goes on the next one. The housekeeping tick does the same for every idle
//! connection, and closes those idle past the idle timeout. Checkout takes the most recently
//! parked connection, so a light load keeps reusing a few and the rest go idle and close.
//!
//! https upstreams (which may negotiate h2) and upgrade requests go through hyper-util's
//! client.

use std::fmt;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::Body;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Instant;

mod body;

use body::PoolBody;

use super::headers::Added;
use super::quickack;
use super::wire::{self, Head, Sending, WireError};
use crate::body::{RequestBody, UpstreamBody};
use crate::server::workers;

/// One upstream target's idle connections.
pub struct Pool {
    /// `host:port` to connect to.
    target: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// The idle connections, least recently parked first: one list per worker thread
    /// ([`workers`]), each holding the connections made on that worker's runtime. A request
    /// takes one of its own worker's, so a connection's socket, its lock and its cache lines
    /// stay on one core.
    idle: Box<[Shard]>,
}

/// One worker's idle connections, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Vec<Parked>>);

/// A read asks the socket for at least this much room at first; a read that fills all the
/// room it had doubles it, up to [`MAX_READ`] (a large body is read in large pieces).
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// A body chunk up to this size is copied behind the head or its chunk-size line, to go in
/// the same write; a larger one is written from its own bytes.
const COPY_CHUNK: usize = 8 * 1024;

/// At most this much is queued for one write.
const MAX_QUEUED: usize = 64 * 1024;

/// One keep-alive connection. Boxed, so checking out and parking move a pointer.
struct Conn {
    stream: TcpStream,
    /// Read and not yet taken: a response's head and body bytes.
    buf: BytesMut,
    /// How much room the next read asks for.
    read_size: usize,
    /// To write: the request head, chunk-size lines and small chunks, from `out_at` on; then
    /// `data` (a large chunk, uncopied), then `tail` (its CRLF).
    out: Vec<u8>,
    out_at: usize,
    data: Bytes,
    tail: &'static [u8],
    /// The request's body while it is being sent, and how.
    body: Option<RequestBody>,
    sending: Sending,
    /// Some byte of the current request was written.
    written: bool,
    /// Bytes were read since the connection last waited: the upstream may be owed an ACK.
    unacked: bool,
    /// Quick ACKs asked for (what the tests look at).
    #[cfg(test)]
    acks: usize,
    /// Cleared when the connection must not carry another request (its request's body could
    /// not be sent whole).
    reusable: bool,
    /// Set through [`Retire`]: the connection is not parked again.
    retired: Arc<AtomicBool>,
    /// Where it is parked when its response ends (weak: the pool holds its idle connections).
    pool: Weak<Pool>,
    /// The worker whose runtime the socket is registered with, whose idle list it goes to.
    home: usize,
}

impl Conn {
    /// Whether the connection is still open, with nothing unasked for to read: an idle one
    /// the upstream closed, or one it sent bytes on, is dropped. No system call when nothing
    /// happened on the socket since it was last read.
    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
            && matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            )
    }

    /// Lets go of buffers a large response or upload grew, before the connection is parked:
    /// an idle connection keeps at most a first read's room.
    fn shed(&mut self) {
        // Reads past the first room grew the buffer (up to `MAX_READ`): a body that large
        // costs far more than the next request's fresh buffer.
        if self.read_size > MIN_READ {
            self.buf = BytesMut::new();
            self.read_size = MIN_READ;
        }
        if self.out.capacity() > COPY_CHUNK {
            self.out = Vec::with_capacity(1024);
        }
    }

    /// Whether the request has been sent whole.
    fn sent(&self) -> bool {
        self.body.is_none() && !self.queued()
    }

    fn queued(&self) -> bool {
        self.out_at < self.out.len() || !self.data.is_empty() || !self.tail.is_empty()
    }

    /// Sends what it can of the request: what is queued, then the body's frames as they
    /// come. `Ready(Ok)` once it is sent whole.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WireError>> {
        loop {
            if self.data.is_empty()
                && self.out.len() - self.out_at < MAX_QUEUED
                && let Some(body) = &mut self.body
            {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let ended = body.is_end_stream();
                        if let Ok(data) = frame.into_data() {
                            self.queue(data);
                        }
                        if ended {
                            self.end_body();
                        }
                        continue;
                    }
                    Poll::Ready(None) => {
                        self.end_body();
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        self.body = None;
                        self.reusable = false;
                        return Poll::Ready(Err(WireError::RequestBody(error)));
                    }
                    Poll::Pending => {}
                }
            }
            if !self.queued() {
                return match self.body {
                    None => Poll::Ready(Ok(())),
                    Some(_) => Poll::Pending,
                };
            }
            if let Err(error) = ready!(self.poll_write(cx)) {
                self.body = None;
                self.reusable = false;
                self.out.clear();
                self.out_at = 0;
                self.data.clear();
                self.tail = b"";
                return Poll::Ready(Err(error.into()));
            }
        }
    }

    /// Queues a chunk of the body, framed.
    fn queue(&mut self, mut data: Bytes) {
        match &mut self.sending {
            Sending::Nothing => return,
            // Past the declared length nothing is sent (as hyper does).
            Sending::Length(left) => {
                data.truncate((*left).min(data.len() as u64) as usize);
                *left -= data.len() as u64;
                if data.is_empty() {
                    return;
                }
            }
            Sending::Chunked => {
                if data.is_empty() {
                    return;
                }
                wire::encode_chunk_size(&mut self.out, data.len());
            }
        }
        let tail: &'static [u8] = match self.sending {
            Sending::Chunked => b"\r\n",
            _ => b"",
        };
        if data.len() <= COPY_CHUNK {
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(tail);
        } else {
            self.data = data;
            self.tail = tail;
        }
    }

    /// The body has ended: the last chunk is queued.
    fn end_body(&mut self) {
        self.body = None;
        match self.sending {
            Sending::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
            // A body shorter than its length: the upstream waits for the rest, which never
            // comes on this connection.
            Sending::Length(left) if left > 0 => self.reusable = false,
            _ => {}
        }
    }

    /// Writes what is queued.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.queued() {
            let head = &self.out[self.out_at..];
            // A head alone (most requests have no body) goes in a plain `write`: the kernel
            // takes one buffer faster than a vector with empty entries.
            let mut n = if self.data.is_empty() && self.tail.is_empty() {
                ready!(Pin::new(&mut self.stream).poll_write(cx, head))?
            } else {
                let slices = [
                    IoSlice::new(head),
                    IoSlice::new(&self.data),
                    IoSlice::new(self.tail),
                ];
                ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices))?
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written = true;
            let from_out = n.min(self.out.len() - self.out_at);
            self.out_at += from_out;
            n -= from_out;
            let from_data = n.min(self.data.len());
            self.data.advance(from_data);
            self.tail = &self.tail[n - from_data..];
        }
        self.out.clear();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more into `buf`: how much (0 when the upstream has closed).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, WireError>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => {
                self.unacked |= n > 0;
                if n == room {
                    self.read_size = (self.read_size * 2).min(MAX_READ);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error.into())),
            Poll::Pending => {
                // It waits for more of a response after having read part of it: the upstream
                // may be holding the rest back until that part is acknowledged (Nagle's
                // algorithm against a delayed ACK). After a response read whole it does not
                // wait, and the next request carries the ACK: no `setsockopt` then.
                if std::mem::take(&mut self.unacked) {
                    quickack::acknowledge(&self.stream);
                    #[cfg(test)]
                    {
                        self.acks += 1;
                    }
                }
                Poll::Pending
            }
        }
    }

    /// Reads the response head (skipping interim 1xx responses but a 101).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
    ) -> Poll<Result<Head, WireError>> {
        loop {
            if !self.buf.is_empty()
                && let Some(head) = wire::parse_head(&mut self.buf, method)?
            {
                if head.status.is_informational() && head.status != 101 {
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            if ready!(self.poll_read(cx))? == 0 {
                return Poll::Ready(Err(WireError::Closed));
            }
        }
    }
}

struct Parked {
    conn: Box<Conn>,
    since: Instant,
}

/// The connection a response came on. A response tollgate refuses as invalid (ambiguous
/// framing, an unasked protocol switch) retires its connection: after a response two parsers
/// could frame differently, nothing more should be read from that socket.
#[derive(Debug, Clone)]
pub struct Retire(Arc<AtomicBool>);

impl Retire {
    /// The connection takes no further request; it closes once its current exchange is done.
    pub fn retire(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .field("idle", &self.len())
            .finish()
    }
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (refused, unreachable, DNS, or `connect_timeout`, which is
    /// a `TimedOut` io error): nothing was sent.
    #[error("could not connect to the upstream")]
    Connect(#[source] std::io::Error),
    /// The exchange failed after the connection took the request.
    #[error("upstream connection failed")]
    Send(#[source] WireError),
}

impl PoolError {
    /// Whether the request never left tollgate because no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }
}

/// A request on its way to the upstream. Callers keep it in a slot of their own
/// (`&mut Option<Outgoing>`) and lend the slot down: the request is taken out only where it
/// is written, and one that never left is put back there, not handed up through every layer.
pub type Outgoing = Request<RequestBody>;

impl Pool {
    /// A pool for `host:port`.
    pub fn new(target: String, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            target,
            connect_timeout,
            idle_timeout,
            idle: (0..workers::count()).map(|_| Shard::default()).collect(),
        }
    }

    /// Idle connections (those checked out belong to their requests).
    pub fn len(&self) -> usize {
        (0..self.idle.len()).map(|i| self.shard(i).len()).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Worker `index`'s idle connections (the first list for a worker started after the pool
    /// was made).
    fn shard(&self, index: usize) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        self.idle
            .get(index)
            .unwrap_or(&self.idle[0])
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the request in `request` (origin-form URI, `Host` set) on an idle connection, or
    /// on a new one, and returns the response head; its body carries the connection and puts
    /// it back here when it ends. The request is taken from the slot once it is handed to a
    /// connection. A pooled connection that fails before a byte of the request was written
    /// puts it back, and it goes on a new connection, as hyper-util's
    /// `retry_canceled_requests` does. When no connection can be made the request stays in
    /// the slot, so the caller can try it again without a copy.
    pub async fn send(
        self: &Arc<Self>,
        request: &mut Option<Outgoing>,
        added: &Added<'_>,
    ) -> Result<(Response<UpstreamBody>, Retire), PoolError> {
        if let Some(conn) = self.checkout() {
            let retire = Retire(conn.retired.clone());
            match Self::exchange(conn, request, added).await {
                Ok(response) => return Ok((response, retire)),
                // Never written: safe to send again, whatever the method, on a new
                // connection (so this happens at most once).
                Err(error) if request.is_some() => {
                    tracing::debug!(%error, "pooled upstream connection failed before taking the request; resending on a new one");
                }
                Err(error) => return Err(PoolError::Send(error)),
            }
        }
        // Boxed: connecting is the rare path, and its state would otherwise make every
        // request's future larger.
        Box::pin(self.send_on_new_connection(request, added)).await
    }

    /// Sends the request in `request` on a new connection.
    async fn send_on_new_connection(
        self: &Arc<Self>,
        request: &mut Option<Outgoing>,
        added: &Added<'_>,
    ) -> Result<(Response<UpstreamBody>, Retire), PoolError> {
        let conn = self.connect().await?;
        let retire = Retire(conn.retired.clone());
        match Self::exchange(conn, request, added).await {
            Ok(response) => Ok((response, retire)),
            Err(error) => {
                // A fresh connection that failed is not tried again: what it left is dropped.
                *request = None;
                Err(PoolError::Send(error))
            }
        }
    }

    /// The most recently parked connection that is still usable; closed ones met on the way
    /// are dropped.
    fn checkout(&self) -> Option<Box<Conn>> {
        loop {
            let conn = self.shard(workers::current()).pop()?.conn;
            if conn.usable() {
                return Some(conn);
            }
        }
    }

    /// Writes the request in `request` and `added` on `conn` and reads the response head, from
    /// this task. When not a byte of it was written, the request goes back into `request`.
    async fn exchange(
        mut conn: Box<Conn>,
        request: &mut Option<Outgoing>,
        added: &Added<'_>,
    ) -> Result<Response<UpstreamBody>, WireError> {
        // The callers lend a filled slot; an empty one is a connection that took nothing.
        let Some(outgoing) = request.take() else {
            return Err(WireError::Closed);
        };
        let (mut parts, body) = outgoing.into_parts();
        let sending = wire::request_framing(&mut parts, &body);
        wire::encode_head(
            &mut conn.out,
            &parts,
            |name, value| added.withholds(name, value),
            added.fields(),
        );
        conn.sending = sending;
        conn.written = false;
        // What the last response left unacknowledged goes with this request's ACK: only a
        // wait for more of this response asks for a quick one.
        conn.unacked = false;
        // A body with nothing to send stays here, to go back with the request if need be.
        let mut unsent = match sending {
            Sending::Nothing => Some(body),
            _ => {
                conn.body = Some(body);
                None
            }
        };
        let head = std::future::poll_fn(|cx| {
            match conn.poll_upload(cx) {
                // Not a byte went out: the connection was dead before it took the request
                // (an idle one the upstream closed as it was checked out).
                Poll::Ready(Err(WireError::Io(_))) if !conn.written => {
                    return Poll::Ready(Err(WireError::Closed));
                }
                Poll::Ready(Err(error @ WireError::RequestBody(_))) => {
                    return Poll::Ready(Err(error));
                }
                // A socket that stopped taking the request may still have an answer to read
                // (an early 413, say); the read below says.
                _ => {}
            }
            conn.poll_head(cx, &parts.method)
        })
        .await;
        match head {
            Ok(head) => {
                let mut body = PoolBody {
                    conn: Some(conn),
                    framing: head.framing,
                    keep_alive: head.keep_alive,
                };
                let body = match body.arrived_whole() {
                    Some(whole) => UpstreamBody::arrived(whole),
                    None => UpstreamBody::carried(Box::pin(body)),
                };
                let mut response = Response::new(body);
                *response.status_mut() = head.status;
                *response.version_mut() = head.version;
                *response.headers_mut() = head.headers;
                Ok(response)
            }
            Err(error) if !conn.written => {
                let body = unsent
                    .take()
                    .or_else(|| conn.body.take().filter(|b| !b.touched()));
                *request = body.map(|body| Request::from_parts(parts, body));
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Closes idle connections the upstream closed, and those idle past the idle timeout.
    pub fn close_idle(&self) {
        self.close_idle_at(Instant::now());
    }

    fn close_idle_at(&self, now: Instant) {
        for index in 0..self.idle.len() {
            self.shard(index).retain(|parked| {
                now.duration_since(parked.since) < self.idle_timeout && parked.conn.usable()
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Box<Conn>, PoolError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.target))
            .await
            .map_err(|_| {
                PoolError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect_timeout elapsed",
                ))
            })?
            .map_err(PoolError::Connect)?;
        stream.set_nodelay(true).map_err(PoolError::Connect)?;
        Ok(Box::new(Conn {
            stream,
            buf: BytesMut::new(),
            read_size: MIN_READ,
            out: Vec::with_capacity(1024),
            out_at: 0,
            data: Bytes::new(),
            tail: b"",
            body: None,
            sending: Sending::Nothing,
            written: false,
            unacked: false,
            #[cfg(test)]
            acks: 0,
            reusable: true,
            retired: Arc::new(AtomicBool::new(false)),
            pool: Arc::downgrade(self),
            home: workers::current(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::wire::{Decoded, Framing};
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::AtomicUsize;

    /// An upstream on keep-alive connections, counting the connections it accepted: `/` is
    /// `ok`, `/empty` an empty 204, `/big` 1 MiB.
    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let (status, body) = match req.uri().path() {
                                "/empty" => (204, bytes::Bytes::new()),
                                "/big" => (200, bytes::Bytes::from(vec![b'x'; 1 << 20])),
                                _ => (200, bytes::Bytes::from_static(b"ok")),
                            };
                            let mut response = Response::new(http_body_util::Full::new(body));
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(path: &'static str) -> Request<RequestBody> {
        let mut request = Request::new(RequestBody::empty());
        *request.uri_mut() = http::Uri::from_static(path);
        request
            .headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        request
    }

    /// `pool.send` with nothing added to the request's fields.
    async fn send(
        pool: &Arc<Pool>,
        request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Retire), PoolError> {
        pool.send(&mut Some(request), &Added::default()).await
    }

    fn pool(addr: std::net::SocketAddr) -> Arc<Pool> {
        Arc::new(Pool::new(
            addr.to_string(),
            Duration::from_secs(1),
            Duration::from_secs(90),
        ))
    }

    #[tokio::test]
    async fn a_connection_belongs_to_its_request_until_the_body_ends_then_is_reused() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        for _ in 0..3 {
            let (response, _) = send(&pool, get("/big")).await.expect("a response");
            assert_eq!(pool.len(), 0, "checked out while its body is unread");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1 << 20);
            assert_eq!(pool.len(), 1, "parked once the body has ended");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );

        // Two at once: two connections, both parked afterwards.
        let (a, _) = send(&pool, get("/big")).await.unwrap();
        let (b, _) = send(&pool, get("/big")).await.unwrap();
        let _ = a.into_body().collect().await.unwrap();
        let _ = b.into_body().collect().await.unwrap();
        assert_eq!(pool.len(), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A body that came whole with its head is taken off the connection at once, and the
    /// connection is parked before the response is handed on: the next request can have it
    /// while this one's body is still on its way to the client.
    #[tokio::test]
    async fn a_body_that_arrived_with_its_head_frees_its_connection_at_once() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        let (first, _) = send(&pool, get("/")).await.unwrap();
        assert_eq!(pool.len(), 1, "parked with the head");
        let (second, _) = send(&pool, get("/")).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the second took it");
        for response in [first, second] {
            assert_eq!(response.body().size_hint().exact(), Some(2));
            let body = response.into_body().into_arrived().expect("arrived whole");
            assert_eq!(&body[..], b"ok");
        }
        // A body longer than what came with the head is read through the connection.
        let (big, _) = send(&pool, get("/big")).await.unwrap();
        assert_eq!(pool.len(), 0);
        assert!(big.into_body().into_arrived().is_err());
    }

    #[tokio::test]
    async fn an_empty_body_releases_its_connection_unpolled_and_an_unfinished_one_closes_it() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        let (response, _) = send(&pool, get("/empty")).await.unwrap();
        assert_eq!(response.status(), 204);
        drop(response);
        assert_eq!(pool.len(), 1, "an empty body is at its end without a poll");

        let (response, _) = send(&pool, get("/big")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < 1 << 20));
        drop(body);
        assert_eq!(
            pool.len(),
            0,
            "a body dropped before its end takes its connection along"
        );

        let (response, _) = send(&pool, get("/big")).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1 << 20, "a streamed body arrives whole");
        assert_eq!(pool.len(), 1);
        let parked = &pool.shard(0)[0].conn;
        assert!(
            parked.buf.capacity() == 0 && parked.read_size == MIN_READ,
            "a parked connection keeps no large buffer: {} bytes, reads of {}",
            parked.buf.capacity(),
            parked.read_size
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the dropped one only was replaced"
        );
    }

    #[tokio::test]
    async fn a_body_read_as_far_as_it_arrived_releases_its_connection_when_whole() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        let (mut response, _) = send(&pool, get("/")).await.unwrap();
        // Not relayed (a normalized 503's page): read without waiting, then dropped.
        response.body_mut().read_arrived();
        drop(response);
        assert_eq!(pool.len(), 1, "the short body had arrived whole: parked");
        let (response, _) = send(&pool, get("/")).await.unwrap();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "and reused");
    }

    #[tokio::test]
    async fn a_retired_connection_is_not_parked() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        let (response, retire) = send(&pool, get("/big")).await.unwrap();
        retire.retire();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(pool.len(), 0);
        let (response, _) = send(&pool, get("/")).await.unwrap();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // Retired after it was parked with its head (a body that came whole): never used
        // again either.
        let (_, retire) = send(&pool, get("/")).await.unwrap();
        assert_eq!(pool.len(), 1);
        retire.retire();
        let (response, _) = send(&pool, get("/")).await.unwrap();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection");
    }

    #[tokio::test]
    async fn housekeeping_closes_connections_idle_past_the_timeout_or_closed_upstream() {
        let (addr, _) = upstream().await;
        let pool = pool(addr);
        let (response, _) = send(&pool, get("/")).await.unwrap();
        let _ = response.into_body().collect().await.unwrap();
        let since = pool.shard(0)[0].since;
        pool.close_idle_at(since + Duration::from_secs(89));
        assert_eq!(pool.len(), 1, "idle for less than the timeout: kept");
        pool.close_idle_at(since + Duration::from_secs(91));
        assert_eq!(pool.len(), 0, "idle past the timeout: closed");

        // An upstream that closes a connection once it has answered one request.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let pool = self::pool(addr);
        let (response, _) = send(&pool, get("/")).await.unwrap();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(pool.len(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        pool.close_idle();
        assert_eq!(
            pool.len(),
            0,
            "the upstream closed it: gone at the next tick"
        );
    }

    /// An upstream on raw sockets: for each connection, answers every request head (and the
    /// body its framing says) with `answer`, and sends everything it read to `seen`.
    async fn raw_upstream(
        answer: &'static [u8],
    ) -> (
        std::net::SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen_tx = seen_tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        // A request is whole at the end of its chunks, or its length past
                        // the blank line.
                        let text = String::from_utf8_lossy(&got).into_owned();
                        let Some(head_end) = text.find("\r\n\r\n").map(|at| at + 4) else {
                            continue;
                        };
                        let length = text[..head_end]
                            .split("\r\n")
                            .find_map(|line| line.strip_prefix("content-length: "))
                            .map_or(0, |n| n.parse::<usize>().unwrap());
                        let whole = if text[..head_end].contains("transfer-encoding: chunked") {
                            text.ends_with("0\r\n\r\n")
                        } else {
                            got.len() >= head_end + length
                        };
                        if whole {
                            let _ = seen_tx.send(std::mem::take(&mut got));
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, seen)
    }

    #[tokio::test]
    async fn a_chunked_response_arrives_with_its_trailers_and_its_connection_is_reused() {
        let (addr, accepted, _seen) = raw_upstream(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-up: 1\r\n\r\n\
              3\r\nabc\r\n2;ext\r\nde\r\n0\r\nx-sum: 5\r\n\r\n",
        )
        .await;
        let pool = pool(addr);
        for _ in 0..2 {
            let (response, _) = send(&pool, get("/")).await.unwrap();
            assert_eq!(response.status(), 200, "the interim 100 is skipped");
            assert_eq!(response.headers()["x-up"], "1");
            let collected = response.into_body().collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-sum"], "5");
            assert_eq!(&collected.to_bytes()[..], b"abcde");
            assert_eq!(pool.len(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_read_to_the_close_is_whole_and_its_connection_not_reused() {
        let (addr, accepted, _seen) = raw_upstream(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        // The raw upstream keeps the socket open; this one closes after its answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nall of it").await;
            }
        });
        let pool = self::pool(closing);
        let (response, _) = send(&pool, get("/")).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"all of it");
        assert_eq!(
            pool.len(),
            0,
            "a body framed by the close leaves nothing to reuse"
        );

        // Read as far as it came, never ended: the connection is dropped with the body.
        let pool = self::pool(addr);
        let (response, _) = send(&pool, get("/")).await.unwrap();
        drop(response);
        assert_eq!(pool.len(), 0);
        let (response, _) = send(&pool, get("/")).await.unwrap();
        drop(response);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_up_in_chunks_and_a_known_one_with_its_length() {
        let (addr, _, mut seen) = raw_upstream(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let pool = pool(addr);
        // A body of unknown length: the client's chunks, as hyper's server hands them on.
        let (mut client, body) = chunked_client_body().await;
        let mut request = get("/up");
        *request.method_mut() = http::Method::POST;
        *request.body_mut() = body;
        let sending = tokio::spawn({
            let pool = pool.clone();
            async move { send(&pool, request).await.ok().map(|(r, _)| r.status()) }
        });
        use tokio::io::AsyncWriteExt;
        client.write_all(b"6\r\nhello \r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let big = format!("4e20\r\n{}\r\n0\r\n\r\n", "w".repeat(20_000));
        client.write_all(big.as_bytes()).await.unwrap();
        assert_eq!(sending.await.unwrap(), Some(http::StatusCode::NO_CONTENT));
        let got = seen.recv().await.unwrap();
        let (head, body) = got.split_at(got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4);
        let head = String::from_utf8_lossy(head);
        assert!(head.starts_with("POST /up HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert!(!head.contains("content-length"), "{head}");
        let mut framing = Framing::Chunked(wire::Chunk::Size);
        let mut buf = BytesMut::from(body);
        let mut sent = Vec::new();
        loop {
            match framing.decode(&mut buf).unwrap() {
                Decoded::Data(data) => sent.extend_from_slice(&data),
                Decoded::End => break,
                _ => panic!("the upload's chunks end with a last chunk"),
            }
        }
        assert_eq!(sent, [&b"hello "[..], &[b'w'; 20_000][..]].concat());

        // A known length goes as it is, with its Content-Length, head and body in one write.
        let (mut client, body) = client_body(b"content-length: 5\r\n\r\nabcde").await;
        client.flush().await.unwrap();
        let mut request = get("/known");
        *request.method_mut() = http::Method::PUT;
        *request.body_mut() = body;
        request
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(5));
        let (response, _) = send(&pool, request).await.unwrap();
        assert_eq!(response.status(), 204);
        let got = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(got.starts_with("PUT /known HTTP/1.1\r\n"), "{got}");
        assert!(got.ends_with("content-length: 5\r\n\r\nabcde"), "{got}");
    }

    async fn chunked_client_body() -> (TcpStream, RequestBody) {
        client_body(b"transfer-encoding: chunked\r\n\r\n").await
    }

    /// A client's request body as hyper's server hands it over (a request head ending in
    /// `rest`, sent on a socket the test goes on writing the body to).
    async fn client_body(rest: &[u8]) -> (TcpStream, RequestBody) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (body_tx, body_rx) = tokio::sync::oneshot::channel();
        let body_tx = Arc::new(Mutex::new(Some(body_tx)));
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body_tx = body_tx.clone();
                async move {
                    if let Some(tx) = body_tx.lock().unwrap().take() {
                        let _ = tx.send(req.into_body());
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        client.write_all(rest).await.unwrap();
        let incoming = body_rx.await.unwrap();
        (
            client,
            RequestBody::new(incoming, u64::MAX, Duration::from_secs(30)),
        )
    }

    #[tokio::test]
    async fn a_quick_ack_is_asked_for_only_while_a_response_is_held_back() {
        // Responses that arrive whole: the next request carries the ACK.
        let (addr, _) = upstream().await;
        let pool = pool(addr);
        for _ in 0..3 {
            let (response, _) = send(&pool, get("/")).await.unwrap();
            let _ = response.into_body().collect().await.unwrap();
        }
        assert_eq!(
            pool.shard(0)[0].conn.acks,
            0,
            "no setsockopt for whole responses"
        );

        // A head, then its body only later: the wait for the body asks for one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                if matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = stream.write_all(b"ok").await;
            }
        });
        let pool = self::pool(addr);
        for round in 1..=2 {
            let (response, _) = send(&pool, get("/")).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            assert_eq!(pool.shard(0)[0].conn.acks, round, "one per held-back body");
        }
    }
}
