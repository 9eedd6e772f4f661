//! The transport of an upstream connection: a TCP stream that acknowledges what it has read
//! at once (`TCP_QUICKACK`) when it waits for the rest of a response.
//!
//! Many simple backends write a response head and its body in two writes with Nagle's
//! algorithm on (Python's `http.server`, for one). The second write waits until the first is
//! acknowledged, and Linux delays the ACK of a connection it sees as interactive (a request
//! out, a response in) by up to 40 ms: every response on a reused connection then takes
//! ~44 ms instead of well under one. Quick acknowledgement lasts only until the kernel's next
//! ACK decision, so it is asked for each time the connection waits for more after having read
//! something: the moment an ACK the upstream may be waiting for is still held back.
//!
//! The plain-http pool's connections call [`acknowledge`] only when they wait for more of a
//! response: after a response read whole the next request carries the ACK, so a response
//! that arrives in one piece costs no `setsockopt`. hyper-util's connections (https
//! upstreams, upgrades; through [`QuickAckConnector`]) cannot tell the two waits apart and
//! acknowledge at every wait after a read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A [`TcpStream`] that acknowledges what it read before it waits for more.
#[derive(Debug)]
pub struct QuickAck {
    stream: TcpStream,
    /// Bytes were read since the last wait: an ACK may be pending.
    read: bool,
}

impl QuickAck {
    /// Wraps `stream`; it acknowledges whenever it waits after having read.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            read: false,
        }
    }
}

/// Acknowledges what `stream` has read, now (on Linux; elsewhere the option does not exist).
pub fn acknowledge(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // A failure only means a delayed ACK, as without the option.
        let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.read = true,
            Poll::Pending if std::mem::take(&mut self.read) => acknowledge(&self.stream),
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl hyper_util::client::legacy::connect::Connection for QuickAck {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.stream.connected()
    }
}

/// hyper-util's TCP connector (https upstreams and upgrades), its streams made [`QuickAck`].
#[derive(Clone)]
pub struct QuickAckConnector<C>(pub C);

impl<C> tower_service::Service<http::Uri> for QuickAckConnector<C>
where
    C: tower_service::Service<http::Uri, Response = TokioIo<TcpStream>>,
    C::Future: Send + 'static,
{
    type Response = TokioIo<QuickAck>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TokioIo::new(QuickAck::new(io.into_inner())))
        })
    }
}
