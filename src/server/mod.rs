//! Accepting clients: listeners, connection limits, TLS termination ([`config::tls`]), HTTP/1.1 + h2
//! (h2c by prior knowledge, or h2 by ALPN over TLS), the per-connection time bounds
//! ([`timeouts`]: header, idle, stalled writes), the per-request ID and span, panic
//! containment, and graceful shutdown.
//!
//! The first box of the flow. Every request is handed to a [`Handler`] (the [`Gateway`]
//! pipeline in production) inside a span that carries its request ID; whatever the handler
//! does, even panic, the client gets a response with `X-Request-Id`.
//!
//! [`Gateway`]: crate::stack::Gateway
//! [`config::tls`]: crate::config::tls

pub mod admin;
pub mod client_ip;
pub mod head_limits;
pub mod signals;
pub mod timeouts;
pub mod usage;
pub mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig as TlsServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::body::ResponseBody;
use crate::config::{Config, MAX_HEADER_FIELDS, MAX_URI_BYTES, ServerConfig};
use crate::error::GatewayError;
use crate::observability::RequestId;
use crate::observability::access::AccessInfo;
use crate::observability::log_throttle::upstream_failures;
use crate::observability::request_id::X_REQUEST_ID;
use timeouts::{
    Activity, Bounds, ClientTransport, Ended, GuardedIo, InFlight, Refusal, TrackedBody,
};
use workers::Workers;

/// hyper's read buffer never goes below this, so oversized heads still reach our own checks
/// (and get a JSON 431/414) unless they are far over the limit.
const MIN_READ_BUFFER: usize = 64 * 1024;

/// HTTP/2 data a stream may buffer beyond what the client has read: with a client that stops
/// reading, this (times the open streams) is what its responses can hold, like HTTP/1.1's
/// write buffer.
const H2_MAX_SEND_BUF: usize = 64 * 1024;

/// HTTP/2 streams a client may have open at once on one connection
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`): the smallest value RFC 9113 recommends, HAProxy's
/// default (nginx: 128, hyper: 200). Each open stream is a spawned task of a few KiB plus its
/// buffers, so the peak memory of a flood is about `max_connections` × this × that.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Pause after an accept error (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What the server knows about a request before the pipeline sees it.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request's ID (kept or generated).
    pub request_id: RequestId,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer's IP as a header value (for `X-Forwarded-For`), built once per connection.
    pub peer_header: HeaderValue,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Turns a request into a response. Implementations never fail: every error is a response.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        request: Request<Incoming>,
        ctx: &RequestContext,
    ) -> impl Future<Output = Response<ResponseBody>> + Send;

    /// Renders an error answered outside the handler in the current style, and counts it as
    /// an answered request: a caught panic, or a request head the parser refused or that
    /// timed out (written by the connection's transport).
    fn render_error(&self, error: &GatewayError, request_id: &RequestId) -> Response<ResponseBody>;

    /// Housekeeping, called every [`TICK_INTERVAL`] while serving (evicting idle per-IP state).
    fn tick(&self) {}

    /// The TLS config new connections get (it follows reloads), or `None` to keep the one the
    /// listeners were bound with.
    fn tls_config(&self) -> Option<Arc<TlsServerConfig>> {
        None
    }

    /// The admin listener's `/metrics` text, if this handler keeps metrics.
    fn metrics(&self) -> Option<String> {
        None
    }

    /// The admin listener's `GET /usage/<key id>` body, or `None` for an unknown key id.
    fn usage(&self, _key_id: &str) -> Option<serde_json::Value> {
        None
    }

    /// What serves the admin key API (`/keys`), if anything: without it, 403.
    fn key_admin(&self) -> Option<Arc<dyn admin::keys::KeyAdmin>> {
        None
    }
}

/// How often [`Handler::tick`] runs.
pub const TICK_INTERVAL: Duration = Duration::from_secs(10);

/// Bound listeners, ready to serve.
pub struct Server<H> {
    handler: Arc<H>,
    listeners: Vec<TcpListener>,
    admin: TcpListener,
    settings: ServerConfig,
    ready: Arc<AtomicBool>,
    /// The worker threads connections are dealt to; without, they run where accepted.
    workers: Option<Arc<Workers>>,
}

/// What a connection task needs besides its socket.
struct Accepted<H> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<H>,
    /// The TLS config the listeners were bound with: whether the listeners speak TLS at all
    /// (fixed until a restart), and the certificate if a reload drops `[server.tls]`.
    tls: Option<Arc<TlsServerConfig>>,
    handshake_timeout: Duration,
    bounds: Bounds,
    /// `server.max_header_bytes` (for the 431 tollgate writes in place of hyper's).
    max_header_bytes: u64,
    /// Turns true when the server stops: connections finish what is in flight and close.
    stop: watch::Receiver<bool>,
    /// Held by every connection task; the server's drain waits until all are dropped.
    drain: mpsc::Sender<()>,
}

impl<H> Clone for Accepted<H> {
    fn clone(&self) -> Self {
        Self {
            builder: self.builder.clone(),
            handler: self.handler.clone(),
            tls: self.tls.clone(),
            handshake_timeout: self.handshake_timeout,
            bounds: self.bounds,
            max_header_bytes: self.max_header_bytes,
            stop: self.stop.clone(),
            drain: self.drain.clone(),
        }
    }
}

impl<H: Handler> Server<H> {
    /// Binds every `server.listen` address and the admin address of `config`.
    pub async fn bind(config: &Config, handler: Arc<H>) -> io::Result<Self> {
        let mut listeners = Vec::with_capacity(config.server.listen.len());
        for &addr in &config.server.listen {
            let listener = bind_tcp(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            listeners.push(listener);
        }
        let admin_addr = config.admin.listen;
        let admin = bind_tcp(admin_addr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on admin address {admin_addr}: {e}"),
            )
        })?;
        Ok(Self {
            handler,
            listeners,
            admin,
            settings: config.server.clone(),
            ready: Arc::new(AtomicBool::new(false)),
            workers: None,
        })
    }

    /// Deals accepted connections out to `workers` in turn, each served whole on its worker's
    /// thread.
    pub fn with_workers(mut self, workers: Arc<Workers>) -> Self {
        self.workers = Some(workers);
        self
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives in-flight requests up
    /// to `server.shutdown_grace` to finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (drain_tx, mut drained) = mpsc::channel::<()>(1);
        let accepted = Accepted {
            // The listeners speak TLS or not until a restart, so one builder serves them all.
            builder: Arc::new(connection_builder(
                &self.settings,
                self.settings.tls.is_none(),
            )),
            handler: self.handler.clone(),
            tls: self.settings.tls.as_ref().map(|t| t.server_config.clone()),
            handshake_timeout: self.settings.header_read_timeout,
            bounds: Bounds::from_settings(&self.settings),
            max_header_bytes: self.settings.max_header_bytes,
            stop: stop_rx.clone(),
            drain: drain_tx,
        };
        let limit = Arc::new(Semaphore::new(self.settings.max_connections.get() as usize));

        let mut accept_loops = JoinSet::new();
        for listener in self.listeners {
            tracing::info!(addr = %listener.local_addr()?, tls = accepted.tls.is_some(), "listening");
            accept_loops.spawn(accept_loop(
                listener,
                accepted.clone(),
                self.workers.clone(),
                limit.clone(),
                stop_rx.clone(),
            ));
        }
        tracing::info!(addr = %self.admin.local_addr()?, "admin listening");
        let handler = self.handler.clone();
        let admin_task = tokio::spawn(admin::serve(
            self.admin,
            self.ready.clone(),
            Arc::new(move || handler.metrics()),
            {
                let handler = self.handler.clone();
                Arc::new(move |id: &str| handler.usage(id))
            },
            admin::Timeouts {
                head: self.settings.header_read_timeout,
                lifetime: self.settings.idle_timeout,
            },
            self.handler.key_admin(),
        ));
        let ticker = {
            let handler = self.handler.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(TICK_INTERVAL);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    // Sweeping large tables must not stall a worker thread.
                    let handler = handler.clone();
                    let _ = tokio::task::spawn_blocking(move || handler.tick()).await;
                }
            })
        };
        self.ready.store(true, Ordering::SeqCst);

        shutdown.await;
        tracing::info!(grace = ?self.settings.shutdown_grace, "shutting down: no new connections, draining in-flight requests");
        self.ready.store(false, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        while accept_loops.join_next().await.is_some() {}
        // Every connection task holds a clone of the drain sender; `recv` ends when the last
        // one is gone.
        drop(accepted);
        match tokio::time::timeout(self.settings.shutdown_grace, drained.recv()).await {
            Ok(_) => tracing::info!("drained, exiting"),
            Err(_) => tracing::warn!("shutdown grace elapsed; closing remaining connections"),
        }
        admin_task.abort();
        ticker.abort();
        Ok(())
    }
}

/// `tells_close`: the transport notices a client that goes away mid-request itself (plain
/// TCP, see `timeouts::ClientTransport`), so hyper need not read the socket while a request
/// is in flight to notice it (`half_close`). hyper's watch reads through every layer of the
/// transport on every poll, and keeps the read buffer of each request from being reused.
fn connection_builder(settings: &ServerConfig, tells_close: bool) -> auto::Builder<TokioExecutor> {
    let head_limit = settings.max_header_bytes as usize + MAX_URI_BYTES;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Off: hyper's timer also runs between requests, which would close idle keep-alive
        // connections after the header timeout; `timeouts` keeps both bounds instead.
        .header_read_timeout(None)
        // Bounds the read buffer and, for a client that does not read, the write buffer.
        .max_buf_size(MIN_READ_BUFFER.max(2 * head_limit))
        // More fields: hyper's 431, rewritten as tollgate's envelope (see `timeouts`).
        .max_headers(MAX_HEADER_FIELDS)
        .keep_alive(true)
        .half_close(tells_close);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(2 * head_limit).unwrap_or(u32::MAX));
    builder
}

async fn accept_loop<H: Handler>(
    listener: TcpListener,
    accepted: Accepted<H>,
    workers: Option<Arc<Workers>>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            break;
        }
        // Over max_connections, stop accepting: new clients wait in the kernel backlog.
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, every accept fails: one line a second.
                    if let Some(suppressed) = upstream_failures().admit("accept", "") {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        // The TLS handshake happens in the connection's task: a slow client never holds up
        // the accept loop.
        spawn_connection(&accepted, workers.as_deref(), stream, peer, permit);
    }
    accept_backlog(listener, &accepted, workers.as_deref(), &limit);
}

/// Starts serving one accepted connection: on the next worker in turn, or here.
fn spawn_connection<H: Handler>(
    accepted: &Accepted<H>,
    workers: Option<&Workers>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let accepted = accepted.clone();
    match workers {
        Some(workers) => workers.spawn(stream, move |stream| {
            connection(accepted, stream, peer, permit)
        }),
        None => drop(tokio::spawn(connection(accepted, stream, peer, permit))),
    }
}

/// On stop, takes the connections the kernel has already completed (within
/// `max_connections`) before the listener closes. Closing it would reset them; taken, each
/// gets the answer to a request it already sent, or a clean close.
fn accept_backlog<H: Handler>(
    listener: TcpListener,
    accepted: &Accepted<H>,
    workers: Option<&Workers>,
    limit: &Arc<Semaphore>,
) {
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok(permit) = limit.clone().try_acquire_owned() {
        let Ok((stream, peer)) = listener.accept() else {
            break;
        };
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            let _ = stream.set_nodelay(true);
            spawn_connection(accepted, workers, stream, peer, permit);
        }
    }
}

/// One client connection: the TLS handshake if the listeners speak TLS, then HTTP.
async fn connection<H: Handler>(
    accepted: Accepted<H>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Some(bound) = &accepted.tls else {
        serve_http(&accepted, stream, peer, false).await;
        drop(permit);
        return;
    };
    let config = accepted
        .handler
        .tls_config()
        .unwrap_or_else(|| bound.clone());
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    match tokio::time::timeout(accepted.handshake_timeout, handshake).await {
        Ok(Ok(stream)) => serve_http(&accepted, stream, peer, true).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
    drop(permit);
}

async fn serve_http<H, T>(accepted: &Accepted<H>, stream: T, peer: SocketAddr, tls: bool)
where
    H: Handler,
    T: ClientTransport + Unpin + Send + 'static,
{
    debug_assert_eq!(
        T::TELLS_CLOSE,
        accepted.tls.is_none(),
        "see connection_builder"
    );
    let activity = Activity::new();
    let mut io = GuardedIo::new(stream, activity.clone(), accepted.bounds.write_stall)
        .answering(refusals(accepted, peer, tls));
    let transport_closed = io.closed();
    let handler = accepted.handler.clone();
    let requests = activity.clone();
    // Shared bytes: each request's copy is a reference count, not an allocation.
    let peer_header = HeaderValue::from_maybe_shared(Bytes::from_owner(peer.ip().to_string()))
        .expect("an IP is a valid header value");
    let service = service_fn(move |request| {
        // Counted from here, not from when the handler runs: a request waiting on a slow
        // upstream is in flight, and the idle timer must not touch its connection.
        let in_flight = requests.request_started();
        // The request's future is `respond`'s own, not one wrapping it: hyper moves it into
        // its slot once, and nothing copies the request into an inner future first.
        respond(
            handler.clone(),
            request,
            (peer, peer_header.clone(), tls),
            in_flight,
        )
    });
    let connection = accepted
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    let ended = timeouts::drive(
        connection,
        |connection| connection.graceful_shutdown(),
        &activity,
        accepted.bounds,
        accepted.stop.clone(),
    )
    .await;
    match ended {
        Ended::Finished(Ok(())) => {}
        Ended::Finished(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended with an error")
        }
        Ended::Dropped(reason) => tracing::debug!(%peer, reason, "connection dropped"),
    }
    // Upgraded (a WebSocket tunnel), the socket lives on in the tunnel's task: it still
    // counts against `max_connections`, and a stopping server waits for it (within
    // `shutdown_grace`) as for any connection.
    transport_closed.await;
}

/// Binds a listening socket as nginx does: `SO_REUSEADDR` (a restart does not wait out
/// `TIME_WAIT`), and an IPv6 address IPv6-only (`IPV6_V6ONLY`), so `[::]:8080` can be listed
/// beside `0.0.0.0:8080`; without it, on Linux's default, the IPv6 wildcard also takes the
/// IPv4 port and the second bind fails. (An IPv4-mapped address cannot be IPv6-only.)
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let SocketAddr::V6(v6) = addr
        && v6.ip().to_ipv4_mapped().is_none()
    {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // tokio's (mio's) backlog.
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Renders the answers a connection's transport writes itself ([`Refusal`]), as envelopes
/// with a new request ID, each logged on `tollgate::access`.
fn refusals<H: Handler>(accepted: &Accepted<H>, peer: SocketAddr, tls: bool) -> timeouts::Answer {
    let handler = accepted.handler.clone();
    let max_header_bytes = accepted.max_header_bytes;
    Box::new(move |refusal| {
        let (error, why) = match refusal {
            Refusal::HeadTimeout => (GatewayError::HeadTimeout, "request head timed out"),
            Refusal::Unparsed(status) => (
                match status {
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => GatewayError::HeadersTooLarge {
                        limit: max_header_bytes,
                    },
                    StatusCode::URI_TOO_LONG => GatewayError::UriTooLong {
                        limit: MAX_URI_BYTES,
                    },
                    _ => GatewayError::BadRequest("the request head could not be parsed"),
                },
                "request head refused by the parser",
            ),
        };
        let request_id = RequestId::generate();
        tracing::info!(
            target: "tollgate::access",
            request_id = %request_id,
            client_ip = %peer.ip(),
            status = error.status().as_u16(),
            tls,
            "{why}"
        );
        let mut response = handler.render_error(&error, &request_id);
        response
            .headers_mut()
            .insert(&X_REQUEST_ID, request_id.header_value().clone());
        http1_bytes(response)
    })
}

/// `response` as HTTP/1.1 bytes, with `Connection: close`: an answer tollgate writes itself
/// where hyper cannot (no request head was parsed). `None` if its body is not ready at once.
fn http1_bytes(response: Response<ResponseBody>) -> Option<Bytes> {
    use http::header::{CONNECTION, CONTENT_LENGTH, DATE};
    let (parts, body) = response.into_parts();
    let mut body = std::pin::pin!(body);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut content = Vec::new();
    loop {
        match http_body::Body::poll_frame(body.as_mut(), &mut cx) {
            std::task::Poll::Ready(None) => break,
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    content.extend_from_slice(&data);
                }
            }
            _ => return None,
        }
    }
    let status = parts.status;
    let mut out = Vec::with_capacity(256 + content.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if [CONNECTION, CONTENT_LENGTH, DATE].contains(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let len = content.len();
    out.extend_from_slice(
        format!("content-length: {len}\r\nconnection: close\r\ndate: {date}\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(&content);
    Some(Bytes::from(out))
}

/// `Box::pin(make())`, with the box allocated before the future is made, so that the future
/// is built in the box. `Box::pin(future)` builds it on the stack and copies all of it into
/// the box: the whole size of its largest state (kilobytes for a request's), whatever state
/// it starts in.
#[inline(always)]
fn in_box<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Runs one request through `handler` inside its span, turning a panic into a 500 envelope,
/// stamps `X-Request-Id` on whatever comes back, and hands the response to hyper with its
/// body tracked by the connection's timers (`in_flight`). The client is the connection's
/// peer, its address as a header value (shared by the connection's requests), and whether it
/// came over TLS.
async fn respond<H: Handler>(
    handler: Arc<H>,
    request: Request<Incoming>,
    (peer, peer_header, tls): (SocketAddr, HeaderValue, bool),
    in_flight: InFlight,
) -> Result<Response<TrackedBody>, Infallible> {
    let http1 = request.version() < http::Version::HTTP_2;
    // For the access log's latency: the TSC (quanta), not the system clock.
    let started = quanta::Instant::now();
    let ctx = RequestContext {
        request_id: RequestId::from_headers(request.headers()),
        peer,
        peer_header,
        tls,
    };
    let span = tracing::info_span!(
        "request",
        request_id = %ctx.request_id,
        key_id = tracing::field::Empty
    );
    let access =
        AccessInfo::wanted().then(|| (request.method().clone(), request.uri().path().to_owned()));

    // Boxed: the handler's future is kilobytes; inline, the wrappers below and hyper would
    // copy it with each move, and every request's future would be twice its size.
    let outcome = AssertUnwindSafe(in_box(|| handler.handle(request, &ctx)))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    let mut response = match outcome {
        Ok(response) => response,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("non-string panic payload");
            span.in_scope(|| tracing::error!(panic = message, "request handler panicked"));
            handler.render_error(&GatewayError::Internal, &ctx.request_id)
        }
    };
    response
        .headers_mut()
        .insert(&X_REQUEST_ID, ctx.request_id.header_value().clone());
    if let Some((method, path)) = access {
        // Taken only when logged: the handler adds it only then.
        let info = response.extensions_mut().remove::<AccessInfo>();
        let info = info.as_ref();
        span.in_scope(|| {
            tracing::info!(
                target: "tollgate::access",
                request_id = %ctx.request_id,
                client_ip = %info.map_or(peer.ip(), |i| i.client_ip),
                key_id = info.and_then(|i| i.key_id.as_ref()).map(|k| &*k.0),
                plan = info.and_then(|i| i.plan.as_ref()).map(|p| &*p.0),
                %method,
                path,
                status = response.status().as_u16(),
                upstream_status = info.and_then(|i| i.upstream_status).map(|s| s.as_u16()),
                kind = info.and_then(|i| i.failure_kind),
                latency_us = started.elapsed().as_micros() as u64,
                upstream_latency_us = info
                    .and_then(|i| i.upstream_latency)
                    .map(|d| d.as_micros() as u64),
                upstream_target = info.and_then(|i| i.upstream_target.as_deref()),
                bytes = http_body::Body::size_hint(response.body()).exact(),
                tls,
                "request"
            )
        });
    }
    // Stopping: this is the connection's last request, and the client hears it now (the
    // shutdown may reach hyper only after this head is written).
    if http1 && in_flight.draining() {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response.map(|body| TrackedBody::new(body, in_flight)))
}
