//! The connection pool of a plain-http upstream: HTTP/1.1 keep-alive connections driven by
//! hyper's low-level client, without hyper-util's pooled client.
//!
//! The pooled client costs about a fifth of tollgate's user-space instructions per proxied
//! request (profiled under `benches/load/compare.sh`): a boxed future per request, a keyed
//! pool behind a lock with a SipHash key, and one spawned task per response to put its
//! connection back. Here every live connection stays in one list, busy or not, least recently
//! used first. A request takes a connection that is ready (its previous response fully read),
//! hands it the request, and moves it to the back: nothing needs putting back, and a
//! connection that closed is dropped from the list when a checkout passes it.
//!
//! Where a checkout looks: the few most recently used connections first, so that a light load
//! keeps reusing a small set and the rest go idle and close; then from the least recently
//! used end, because under many concurrent requests the recent ones are busy and the oldest
//! are the likeliest to have finished. With 1000 concurrent requests a scan from the recent
//! end alone passed every busy connection, and with the move it was 22% of tollgate's
//! user-space instructions per request.
//!
//! https upstreams (which may negotiate h2) and upgrade requests still go through
//! hyper-util's client.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::RequestBody;

/// One upstream's connections.
pub struct Pool {
    /// `host:port` to connect to.
    target: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Every live connection, least recently used first.
    connections: Mutex<VecDeque<Pooled>>,
}

/// How many of the most recently used connections a checkout tries before it looks at the
/// least recently used end.
const RECENT_PROBES: usize = 4;

/// The response head of a request handed to a connection, or the request back if the
/// connection closed before taking it.
type PendingResponse =
    Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>>;

struct Pooled {
    sender: SendRequest<RequestBody>,
    last_used: Instant,
    /// Set through [`Retire`]: the connection takes no further request and is dropped.
    retired: Arc<AtomicBool>,
}

impl Pooled {
    /// Whether the connection can take no more requests.
    fn is_done(&self) -> bool {
        self.sender.is_closed() || self.retired.load(Ordering::Relaxed)
    }
}

/// The connection a response came on. A response tollgate refuses as invalid (ambiguous
/// framing, an unasked protocol switch) retires its connection: hyper would otherwise reuse it once the body was read, and after a response
/// two parsers could frame differently, nothing more should be read from that socket.
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
            .field("connections", &self.len())
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

impl Pool {
    /// A pool for `host:port`.
    pub fn new(target: String, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            target,
            connect_timeout,
            idle_timeout,
            connections: Mutex::new(VecDeque::new()),
        }
    }

    /// Live connections, busy or idle.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pooled>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` (origin-form URI, `Host` set) on a ready pooled connection, or on a new
    /// one. A pooled connection the upstream closed before taking the request gives it back,
    /// and it goes on another connection, as hyper-util's `retry_canceled_requests` does.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Retire), PoolFailure> {
        let mut request = Some(request);
        let pending = self.checkout(&mut request);
        let request = match (pending, request) {
            (Some((pending, retire)), _) => match pending.await {
                Ok(response) => return Ok((response, retire)),
                Err(mut error) => match error.take_message() {
                    // Never written: safe to send again, whatever the method, on a new
                    // connection (so this happens at most once).
                    Some(back) => {
                        tracing::debug!(error = %error.error(), "pooled upstream connection closed before taking the request; resending on a new one");
                        back
                    }
                    None => return Err(PoolError::Send(error.into_error()).into()),
                },
            },
            (None, Some(request)) => request,
            (None, None) => unreachable!("checkout takes the request only when it sends it"),
        };
        // Boxed: connecting (resolve, connect, handshake) is the rare path, and its state
        // would otherwise make every request's future, moved several times, kilobytes larger.
        Box::pin(self.send_on_new_connection(request)).await
    }

    /// Sends `request` on a new connection. Its first request is queued before the
    /// connection task first runs (hyper buffers one), so it cannot be refused for not being
    /// ready.
    async fn send_on_new_connection(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Retire), PoolFailure> {
        let mut sender = match self.connect().await {
            Ok(sender) => sender,
            Err(error) => {
                return Err(PoolFailure {
                    error,
                    request: Some(Box::new(request)),
                });
            }
        };
        let pending = sender.try_send_request(request);
        let retired = Arc::new(AtomicBool::new(false));
        let retire = Retire(retired.clone());
        self.lock().push_back(Pooled {
            sender,
            last_used: Instant::now(),
            retired,
        });
        match pending.await {
            Ok(response) => Ok((response, retire)),
            Err(e) => Err(PoolError::Send(e.into_error()).into()),
        }
    }

    /// Hands `request` to a ready connection (see the module docs for which), dropping
    /// closed and long-idle ones on the way. `request` is taken only when a connection is
    /// ready.
    fn checkout(
        &self,
        request: &mut Option<Request<RequestBody>>,
    ) -> Option<(impl Future<Output = PendingResponse> + use<>, Retire)> {
        let now = Instant::now();
        let mut connections = self.lock();
        self.drop_idle(&mut connections, now);
        let n = connections.len();
        let recent = (0..n).rev().take(RECENT_PROBES);
        let oldest = 0..n.saturating_sub(RECENT_PROBES);
        let mut saw_closed = false;
        let mut taken = None;
        for i in recent.chain(oldest) {
            let connection = &mut connections[i];
            if connection.is_done() {
                saw_closed = true;
                continue;
            }
            if connection.sender.is_ready()
                && let Some(request) = request.take()
            {
                taken = Some((
                    connection.sender.try_send_request(request),
                    Retire(connection.retired.clone()),
                ));
                connection.last_used = now;
                // Most recently used goes last (from either end of the list, O(1)).
                if let Some(used) = connections.remove(i) {
                    connections.push_back(used);
                }
                break;
            }
        }
        if saw_closed {
            connections.retain(|c| !c.is_done());
        }
        taken
    }

    /// Closes connections idle past the idle timeout, and forgets closed ones.
    pub fn close_idle(&self) {
        self.close_idle_at(Instant::now());
    }

    fn close_idle_at(&self, now: Instant) {
        // Every connection, not just the idle run at the front: one long response there must
        // not keep the idle ones behind it open.
        self.lock().retain(|c| {
            let idle = c.sender.is_ready() && now.duration_since(c.last_used) >= self.idle_timeout;
            !(c.is_done() || idle)
        });
    }

    /// Least recently used first: the idle ones past `idle_timeout` are at the front.
    fn drop_idle(&self, connections: &mut VecDeque<Pooled>, now: Instant) {
        let expired = connections
            .iter()
            .take_while(|c| {
                c.is_done()
                    || (c.sender.is_ready() && now.duration_since(c.last_used) >= self.idle_timeout)
            })
            .count();
        connections.drain(..expired);
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, PoolError> {
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
        let (sender, connection) =
            http1::handshake(TokioIo::new(super::quickack::QuickAck::new(stream)))
                .await
                .map_err(PoolError::Send)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// An upstream answering every request `ok`, on keep-alive connections; requests for
    /// `/slow` wait 10 s first.
    async fn upstream() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn get() -> Request<RequestBody> {
        let mut request = Request::new(RequestBody::empty());
        request
            .headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        request
    }

    /// Waits until `pool` has `n` connections, of which `ready` are ready for a request.
    async fn settle(pool: &Pool, n: usize, ready: usize) {
        let settled = async {
            loop {
                {
                    let connections = pool.lock();
                    let now_ready = connections.iter().filter(|c| c.sender.is_ready()).count();
                    if connections.len() == n && now_ready == ready {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), settled)
            .await
            .unwrap_or_else(|_| panic!("{} connections, not {n} with {ready} ready", pool.len()));
    }

    /// A pool with `n` connections from `n` requests sent at once: all but one busy on
    /// `/slow`, that one ready again after a fast request.
    async fn all_busy_but_one(n: usize) -> std::sync::Arc<Pool> {
        let pool = std::sync::Arc::new(Pool::new(
            upstream().await.to_string(),
            Duration::from_secs(1),
            Duration::from_secs(90),
        ));
        for i in 0..n {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut request = get();
                if i != n / 2 {
                    *request.uri_mut() = http::Uri::from_static("/slow");
                }
                let _ = pool.send(request).await;
            });
        }
        settle(&pool, n, 1).await;
        pool
    }

    #[tokio::test]
    async fn a_ready_connection_among_busy_ones_is_reused_wherever_it_is() {
        // Eight connections: seven stay busy on `/slow`; the one whose request was fast is
        // ready again, somewhere in the list.
        let pool = all_busy_but_one(8).await;
        {
            // Put the ready one first, the end only the second half of a checkout reaches.
            let mut connections = pool.lock();
            let ready = connections
                .iter()
                .position(|c| c.sender.is_ready())
                .unwrap();
            let connection = connections.remove(ready).unwrap();
            connections.push_front(connection);
        }
        for _ in 0..3 {
            let (response, _) = pool.send(get()).await.ok().expect("a response");
            let _ = response.into_body().collect().await;
            settle(&pool, 8, 1).await;
        }
        assert_eq!(pool.len(), 8, "the ready connection was found each time");
    }

    #[tokio::test]
    async fn connections_are_reused_and_closed_once_idle_past_the_timeout() {
        let pool = Pool::new(
            upstream().await.to_string(),
            Duration::from_secs(1),
            Duration::from_secs(90),
        );
        for _ in 0..3 {
            let (response, _) = pool.send(get()).await.ok().expect("a response");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            // The connection task marks the connection ready once it has read the response.
            let ready = async {
                while !pool.lock()[0].sender.is_ready() {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), ready)
                .await
                .expect("the connection is ready again after its response");
        }
        assert_eq!(
            pool.len(),
            1,
            "one connection for three sequential requests"
        );

        let used = pool.lock()[0].last_used;
        pool.close_idle_at(used + Duration::from_secs(89));
        assert_eq!(pool.len(), 1, "idle for less than the timeout: kept");
        pool.close_idle_at(used + Duration::from_secs(91));
        assert_eq!(pool.len(), 0, "idle past the timeout: closed");
    }

    #[tokio::test]
    async fn housekeeping_closes_idle_connections_behind_busy_ones() {
        // Three connections: two busy on `/slow`, one idle again after a fast request.
        let pool = all_busy_but_one(3).await;
        let last_used = {
            // The busy ones at the least recently used end, where idle ones are looked for.
            let mut connections = pool.lock();
            connections
                .make_contiguous()
                .sort_by_key(|c| c.sender.is_ready());
            connections[2].last_used
        };
        pool.close_idle_at(last_used + Duration::from_secs(91));
        let connections = pool.lock();
        assert_eq!(
            connections.len(),
            2,
            "the idle one closed, the busy ones kept"
        );
        assert!(connections.iter().all(|c| !c.sender.is_ready()));
    }
}
