//! The connection pool of a plain-http upstream target: HTTP/1.1 keep-alive connections
//! driven by hyper's low-level client, from the request's own task.
//!
//! A connection is either idle, parked in the pool (nobody polls it), or checked out by one
//! request, which owns it: the request's task writes the request and reads the response head
//! by polling hyper's connection itself, and the response body ([`UpstreamBody`]) carries the
//! connection on, polling it as the client reads, until the body ends and the connection goes
//! back to the pool. There is no task per connection and no hand-off between tasks: a request
//! costs no wake-up of another task, no channel hop to it and back, and no second scheduling
//! of the body's bytes (as Pingora drives its upstream connections).
//!
//! A parked connection is not watched. A checkout polls it once before use: one the upstream
//! closed (or that has bytes nobody asked for) shows up then and is dropped, and the request
//! goes on the next one. The housekeeping tick does the same for every idle connection, and
//! closes those idle past the idle timeout. Checkout takes the most recently parked
//! connection, so a light load keeps reusing a few and the rest go idle and close.
//!
//! https upstreams (which may negotiate h2) and upgrade requests still go through
//! hyper-util's client.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::quickack::{Deferred, QuickAck};
use crate::body::{Carrier, RequestBody, UpstreamBody};
use crate::server::workers;

/// hyper's side of one upstream connection: polled, it writes requests and reads responses.
type Driver = http1::Connection<TokioIo<QuickAck>, RequestBody>;

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

/// One keep-alive connection: the handle requests are given to, and the state machine that
/// carries them over the socket. Boxed, so checking out and parking move a pointer.
struct Conn {
    sender: SendRequest<RequestBody>,
    /// `None` once it has finished (closed or failed): dropping it answers a request it never
    /// took, with the request.
    driver: Option<Driver>,
    /// Set through [`Retire`]: the connection is not parked again.
    retired: Arc<AtomicBool>,
    /// Where it is parked when its response ends (weak: the pool holds its idle connections).
    pool: Weak<Pool>,
    /// The worker whose runtime the socket is registered with, whose idle list it goes to.
    home: usize,
    /// Whether the socket owes the upstream an ACK (see [`super::quickack`]).
    ack: Arc<Deferred>,
    /// What hyper's side of the connection wakes: the relay to the task driving it.
    relay: Arc<Relay>,
    /// `relay` as a waker, made once.
    relay_waker: Waker,
}

/// Wakes the task that drives a connection, while armed.
///
/// hyper's side of a connection leaves wakers behind that have nothing left to say: its body
/// channel wakes the sender's last task whenever the body takes a chunk, even after the
/// sender is gone. Woken for that, the task that drives the connection (the client's
/// connection task) would be polled again for nothing. So hyper is given this relay, and it
/// is disarmed whenever the task polls the body's channel or hands the connection on: only
/// what the connection does while armed (its socket, above all) wakes the task. A wake missed
/// while disarmed costs nothing: the connection is polled again, armed, before the task waits
/// on it (see `UpstreamBody::poll_frame`).
#[derive(Default)]
struct Relay {
    armed: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.armed.load(Ordering::Acquire) {
            self.task.wake();
        }
    }
}

impl Conn {
    /// Polls the connection once: whether it is still open and ready for a request. An idle
    /// connection the upstream closed, or one with bytes it was not asked for, finishes here.
    ///
    /// Polled without a task to wake: nothing watches a parked connection, and the request
    /// that checks it out must not be woken by its own hand-over (it polls the connection
    /// right after, with its own context).
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.poll_drive(&mut cx).is_pending()
            && self.sender.is_ready()
            && !self.retired.load(Ordering::Relaxed)
    }
}

/// A checked-out connection travels in its response's body, which polls it as the client
/// reads and hands it back here at the end.
impl Carrier for Conn {
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(driver) = &mut self.driver else {
            return Poll::Ready(());
        };
        self.relay.task.register(cx.waker());
        self.relay.armed.store(true, Ordering::Release);
        let mut cx = Context::from_waker(&self.relay_waker);
        let mut polled = Pin::new(&mut *driver).poll(&mut cx);
        // It read part of a response and waits for the rest: the upstream may be holding the
        // rest back until it is acknowledged (Nagle's algorithm against a delayed ACK), so
        // acknowledge now, from the wait of one more poll. After a response read whole it
        // waits for the next request, which carries the ACK: no `setsockopt` then.
        if polled.is_pending() && self.ack.take_due() && !self.sender.is_ready() {
            self.ack.acknowledge_next_wait(true);
            polled = Pin::new(&mut *driver).poll(&mut cx);
            self.ack.acknowledge_next_wait(false);
        }
        ready!(polled).ok();
        self.driver = None;
        Poll::Ready(())
    }

    fn quiet(&mut self) {
        self.relay.armed.store(false, Ordering::Release);
    }

    fn release(mut self: Box<Self>) {
        self.quiet();
        // The task that read the body may be gone by the next checkout.
        drop(self.relay.task.take());
        // Parked when hyper's side is waiting for the next request, as it is once a response
        // was read whole and the request written whole; else it gets one more poll to get
        // there. One that does not (the upstream answered before it took the whole request
        // body, or closed) is dropped: it holds the client's body, which must not wait for a
        // checkout. The checkout polls a parked one again before use.
        if let Some(pool) = self.pool.upgrade()
            && self.driver.is_some()
            && !self.retired.load(Ordering::Relaxed)
            && (self.sender.is_ready() || self.usable())
        {
            pool.shard(self.home).push(Parked {
                conn: self,
                since: Instant::now(),
            });
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
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made (refused, unreachable, DNS, or `connect_timeout`, which is
    /// a `TimedOut` io error): nothing was sent.
    Connect(std::io::Error),
    /// The connection failed after the request was handed to it.
    Send(hyper::Error),
}

/// A request that got no response head: why, and the request itself when it never left
/// (no connection could be made), so it can be tried again without a copy.
pub struct PoolFailure {
    /// What went wrong.
    pub error: PoolError,
    /// The request, when it was never handed to a connection.
    pub request: Option<Box<Request<RequestBody>>>,
}

impl From<PoolError> for PoolFailure {
    fn from(error: PoolError) -> Self {
        Self {
            error,
            request: None,
        }
    }
}

impl PoolError {
    /// Whether the request never left tollgate because no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Connect(_) => f.write_str("could not connect to the upstream"),
            PoolError::Send(_) => f.write_str("upstream connection failed"),
        }
    }
}

impl StdError for PoolError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            PoolError::Connect(e) => Some(e),
            PoolError::Send(e) => Some(e),
        }
    }
}

/// What one exchange on a connection gave: the response head (the connection travels on in
/// its body), or the failure with the request when the connection never took it.
type Exchanged = Result<Response<UpstreamBody>, (hyper::Error, Option<Request<RequestBody>>)>;

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

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection, or on a new one,
    /// and returns the response head; its body carries the connection and puts it back here
    /// when it ends. A pooled connection the upstream closed before taking the request gives
    /// it back, and it goes on a new connection, as hyper-util's `retry_canceled_requests`
    /// does.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Retire), PoolFailure> {
        let request = match self.checkout() {
            Some(conn) => {
                let retire = Retire(conn.retired.clone());
                match Self::exchange(conn, request).await {
                    Ok(response) => return Ok((response, retire)),
                    // Never written: safe to send again, whatever the method, on a new
                    // connection (so this happens at most once).
                    Err((error, Some(back))) => {
                        tracing::debug!(%error, "pooled upstream connection closed before taking the request; resending on a new one");
                        back
                    }
                    Err((error, None)) => return Err(PoolError::Send(error).into()),
                }
            }
            None => request,
        };
        // Boxed: connecting is the rare path, and its state would otherwise make every
        // request's future, moved several times, larger.
        Box::pin(self.send_on_new_connection(request)).await
    }

    /// Sends `request` on a new connection.
    async fn send_on_new_connection(
        self: &Arc<Self>,
        request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Retire), PoolFailure> {
        let conn = match self.connect().await {
            Ok(conn) => conn,
            Err(error) => {
                return Err(PoolFailure {
                    error,
                    request: Some(Box::new(request)),
                });
            }
        };
        let retire = Retire(conn.retired.clone());
        match Self::exchange(conn, request).await {
            Ok(response) => Ok((response, retire)),
            Err((error, _)) => Err(PoolError::Send(error).into()),
        }
    }

    /// The most recently parked connection that is still usable; closed ones met on the way
    /// are dropped.
    fn checkout(&self) -> Option<Box<Conn>> {
        loop {
            let mut conn = self.shard(workers::current()).pop()?.conn;
            if conn.usable() {
                return Some(conn);
            }
        }
    }

    /// Hands `request` to `conn` and drives the connection from this task until the response
    /// head is in.
    async fn exchange(mut conn: Box<Conn>, request: Request<RequestBody>) -> Exchanged {
        let pending = conn.sender.try_send_request(request);
        let mut pending = std::pin::pin!(pending);
        let head = std::future::poll_fn(|cx| {
            // The answer comes from the connection, polled here and only here: once that poll
            // is done it is there or not, so no task needs waking for it (a wake would poll
            // this request's whole connection again for nothing). Once the connection has
            // finished (closed, or failed), hyper has answered, with the request itself when
            // it never took it.
            let driven = conn.poll_drive(cx);
            let mut quiet = Context::from_waker(std::task::Waker::noop());
            match pending.as_mut().poll(&mut quiet) {
                Poll::Pending if driven.is_ready() => pending.as_mut().poll(cx),
                polled => polled,
            }
        })
        .await;
        match head {
            Ok(response) => {
                // Handed to the body, which polls the connection when it has nothing to give.
                conn.quiet();
                Ok(response.map(|incoming| match conn.driver {
                    Some(_) => UpstreamBody::carried(incoming, conn),
                    None => UpstreamBody::from(incoming),
                }))
            }
            Err(mut error) => {
                let back = error.take_message();
                Err((error.into_error(), back))
            }
        }
    }

    /// Closes idle connections the upstream closed, and those idle past the idle timeout.
    pub fn close_idle(&self) {
        self.close_idle_at(Instant::now());
    }

    fn close_idle_at(&self, now: Instant) {
        for index in 0..self.idle.len() {
            self.shard(index).retain_mut(|parked| {
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
        let (io, ack) = QuickAck::deferred(stream);
        let (sender, driver) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(PoolError::Send)?;
        let relay = Arc::new(Relay::default());
        Ok(Box::new(Conn {
            sender,
            driver: Some(driver),
            retired: Arc::new(AtomicBool::new(false)),
            pool: Arc::downgrade(self),
            home: workers::current(),
            ack,
            relay_waker: Waker::from(relay.clone()),
            relay,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
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
            let (response, _) = pool.send(get("/")).await.ok().expect("a response");
            assert_eq!(pool.len(), 0, "checked out while its body is unread");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            assert_eq!(pool.len(), 1, "parked once the body has ended");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );

        // Two at once: two connections, both parked afterwards.
        let (a, _) = pool.send(get("/")).await.ok().unwrap();
        let (b, _) = pool.send(get("/")).await.ok().unwrap();
        let _ = a.into_body().collect().await.unwrap();
        let _ = b.into_body().collect().await.unwrap();
        assert_eq!(pool.len(), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_empty_body_releases_its_connection_unpolled_and_an_unfinished_one_closes_it() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        let (response, _) = pool.send(get("/empty")).await.ok().unwrap();
        assert_eq!(response.status(), 204);
        drop(response);
        assert_eq!(pool.len(), 1, "an empty body is at its end without a poll");

        let (response, _) = pool.send(get("/big")).await.ok().unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < 1 << 20));
        drop(body);
        assert_eq!(
            pool.len(),
            0,
            "a body dropped before its end takes its connection along"
        );

        let (response, _) = pool.send(get("/big")).await.ok().unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1 << 20, "a streamed body arrives whole");
        assert_eq!(pool.len(), 1);
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
        let (mut response, _) = pool.send(get("/")).await.ok().unwrap();
        // Not relayed (a normalized 503's page): read without waiting, then dropped.
        response.body_mut().read_arrived();
        drop(response);
        assert_eq!(pool.len(), 1, "the short body had arrived whole: parked");
        let (response, _) = pool.send(get("/")).await.ok().unwrap();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "and reused");
    }

    #[tokio::test]
    async fn a_retired_connection_is_not_parked() {
        let (addr, accepted) = upstream().await;
        let pool = pool(addr);
        let (response, retire) = pool.send(get("/")).await.ok().unwrap();
        retire.retire();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(pool.len(), 0);
        let (response, _) = pool.send(get("/")).await.ok().unwrap();
        let _ = response.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn housekeeping_closes_connections_idle_past_the_timeout_or_closed_upstream() {
        let (addr, _) = upstream().await;
        let pool = pool(addr);
        let (response, _) = pool.send(get("/")).await.ok().unwrap();
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
        let (response, _) = pool.send(get("/")).await.ok().unwrap();
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
}
