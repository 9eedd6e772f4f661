//! [`ClientTransport`]: noticing, without reading, that an HTTP/1.1 client went away while
//! its request is in flight, so that the request (and its upstream exchange) is cancelled
//! then, as nginx (`proxy_ignore_client_abort off`) and Envoy do, not when the upstream
//! answers.
//!
//! hyper can watch for this itself: with `half_close` off, it reads the client socket on every
//! poll while a request is in flight, through every layer of the transport. On plain TCP
//! tollgate turns that off and [`GuardedIo`] peeks instead, at one byte, where the socket
//! says it is readable. A peek that finds the end of input (or an error) fails the
//! connection; one that finds bytes (a pipelined request, or body bytes hyper has not read
//! yet) waits until hyper reads again. On TLS the bytes on the socket are records, not the
//! stream: hyper keeps watching there.
//!
//! [`GuardedIo`]: super::GuardedIo

use std::io;
use std::mem::MaybeUninit;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A client connection's transport, and whether it can tell that the client closed.
pub trait ClientTransport: AsyncRead + AsyncWrite {
    /// Whether [`Self::poll_gone`] can tell; when not, hyper's own watch (`half_close` off)
    /// must stay on.
    const TELLS_CLOSE: bool;

    /// `Ready(true)`: the client closed its side (or the connection failed). `Ready(false)`:
    /// bytes wait to be read, so this cannot tell until they are. `Pending`: neither, and
    /// the task is woken when that changes. `watching`: the last call returned `Pending` and
    /// nothing was read since, so the wake-up it registered still stands (only readiness
    /// takes it, and then the socket is readable).
    fn poll_gone(&self, cx: &mut Context<'_>, watching: bool) -> Poll<bool>;
}

impl ClientTransport for TcpStream {
    const TELLS_CLOSE: bool = true;

    fn poll_gone(&self, cx: &mut Context<'_>, watching: bool) -> Poll<bool> {
        if watching {
            // A look without registering the wake-up again (which takes the socket's waiter
            // lock): the peek runs only if the socket is readable.
            let mut peeked = false;
            let looked = self.try_io(Interest::READABLE, || {
                peeked = true;
                SockRef::from(self).peek(&mut [MaybeUninit::uninit()])
            });
            match looked {
                Ok(0) => return Poll::Ready(true),
                Ok(_) => return Poll::Ready(false),
                // Not readable: still registered.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !peeked => {
                    return Poll::Pending;
                }
                // Readable for nothing (the wake-up was spent): register again below.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(true),
            }
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        // Pending without a syscall while the socket is not readable: a read that did not
        // fill its buffer left it so.
        self.poll_peek(cx, &mut buf)
            .map(|peeked| !matches!(peeked, Ok(1..)))
    }
}

impl ClientTransport for tokio_rustls::server::TlsStream<TcpStream> {
    const TELLS_CLOSE: bool = false;

    fn poll_gone(&self, _: &mut Context<'_>, _: bool) -> Poll<bool> {
        Poll::Pending
    }
}

#[cfg(test)]
impl ClientTransport for tokio::io::DuplexStream {
    const TELLS_CLOSE: bool = false;

    fn poll_gone(&self, _: &mut Context<'_>, _: bool) -> Poll<bool> {
        Poll::Pending
    }
}
