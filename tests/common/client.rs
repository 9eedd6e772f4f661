//! The client side: raw HTTP/1.1 requests written byte for byte, and the [`Reply`] parsed
//! from exactly what came back.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed HTTP response as the client received it.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                redact(&String::from_utf8_lossy(&self.body))
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body for a failure message, with test keys masked ([`redact`]).
    pub fn shown(&self) -> String {
        redact(&self.text())
    }
}

/// Shows the status, headers and body with test keys masked.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), redact(v)))
            .collect();
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &headers)
            .field("body", &self.shown())
            .finish()
    }
}

/// `text` with every test key (`tg_test_...`, `tg_live_...`) masked: failure messages print
/// bodies and headers the echo upstream sent back, and a plaintext key must never reach test
/// output.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["tg_test_", "tg_live_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        out.push_str(&rest[..at]);
        out.push_str("tg_***");
        let tail = &rest[at + "tg_test_".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Writes `request` as is and returns every byte the server sends until it closes (also for
/// answers [`parse_reply`] cannot frame, such as a HEAD's).
pub async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before the whole request is written (413, 431).
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10s");
    buf
}

/// On a connection the client keeps open (keep-alive), writes `request` while reading one
/// whole response (framed by its Content-Length or chunks), as a client that uploads and
/// listens at once. Fails if the write fails (a reset, a broken pipe) or the connection ends
/// before the response does.
pub async fn exchange_on(stream: &mut TcpStream, request: &[u8]) -> io::Result<Reply> {
    let (mut read, mut write) = stream.split();
    let send = async { write.write_all(request).await };
    let receive = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if let Some(reply) = parse_reply(&buf).filter(framed) {
                return Ok(reply);
            }
            let n = read.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {} bytes of a response", buf.len()),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let exchanged = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(send, receive)
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response within 10s"))?;
    match exchanged {
        (Ok(()), Ok(reply)) => Ok(reply),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// A response whose length is known from its head (so [`parse_reply`] did not stop at what
/// has arrived so far).
fn framed(reply: &Reply) -> bool {
    reply.header("content-length").is_some()
        || reply
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
}

/// Writes `request` as is, reads to EOF, parses the (first) response.
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let buf = exchange_raw(addr, request).await;
    parse_reply(&buf).unwrap_or_else(|| {
        panic!(
            "no complete response in {:?}",
            redact(&String::from_utf8_lossy(&buf))
        )
    })
}

/// Parses one HTTP/1.1 response from `buf` (Content-Length, chunked, or to EOF).
pub fn parse_reply(buf: &[u8]) -> Option<Reply> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = response.code?;
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &buf[head_len..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = find("content-length") {
        let len: usize = len.trim().parse().ok()?;
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(Reply {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// `GET path` with extra headers and `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(addr, "GET", path, headers, b"").await
}

/// Any method, with a body (Content-Length set when the body is non-empty).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    send_raw(addr, &bytes).await
}

/// Sends a GET with `Connection: close` and returns everything the client received until
/// the gateway closed the connection.
pub async fn get_until_closed(gw: SocketAddr, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(gw).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the gateway closes the connection");
    buf
}

/// `GET path` with the key in `X-API-Key`.
pub async fn with_key(addr: SocketAddr, path: &str, key: &str) -> Reply {
    get(addr, path, &[("X-API-Key", key)]).await
}
