//! HTTP/1.1 as the plain-http pool's connections speak it to an upstream: the request head
//! written, the response head parsed, and the framing of both bodies (RFC 9112).
//!
//! Framing follows hyper's client, which these connections replace: a request's body goes
//! with its `Content-Length`, else as its size is known, else chunked (a GET, HEAD or CONNECT
//! of unknown length sends none); a response's body ends with its message (HEAD, 1xx, 204,
//! 304), its chunks (a `Transfer-Encoding` ending in `chunked`), its `Content-Length`, or the
//! connection's close. A response head is parsed by httparse, within hyper's limits (100
//! fields, 400 KiB), and its field values stay slices of the bytes read.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, request};

use super::field_names;
use crate::body::{RequestBody, RequestBodyError};

/// The most fields a response head may have (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// Response heads with at most this many fields (nearly all) keep their field offsets on the
/// stack while they are parsed.
const FEW_FIELDS: usize = 16;

/// The largest response head, and the longest chunk-size line or trailer section (hyper's
/// default read buffer limit).
pub const MAX_HEAD: usize = 8192 + 4096 * 100;

/// Why an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The upstream's response cannot be read as HTTP/1.1 (answered `invalid_response`).
    #[error("invalid response from the upstream: {0}")]
    Invalid(&'static str),
    /// The upstream closed the connection before the message was complete.
    #[error("connection closed before the message completed")]
    Closed,
    /// The socket failed.
    #[error("upstream connection error")]
    Io(#[from] std::io::Error),
    /// The client's body failed on its way up.
    #[error("request body failed")]
    RequestBody(#[source] RequestBodyError),
}

/// How a request's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// No body.
    Nothing,
    /// At most this many more bytes (anything past them is not sent).
    Length(u64),
    /// In chunks, ended by a zero-size chunk.
    Chunked,
}

/// Sets the framing headers of a request as hyper's client does, and says how its body goes.
pub fn request_framing(parts: &mut request::Parts, body: &RequestBody) -> Sending {
    let headers = &mut parts.headers;
    if http_body::Body::is_end_stream(body) {
        headers.remove(TRANSFER_ENCODING);
        return Sending::Nothing;
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(CONTENT_LENGTH);
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        return Sending::Chunked;
    }
    if let Some(length) = content_length(headers).ok().flatten() {
        return Sending::Length(length);
    }
    if let Some(length) = http_body::Body::size_hint(body).exact() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        return Sending::Length(length);
    }
    // GET, HEAD and CONNECT almost never have bodies: hyper sends none rather than chunks.
    if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
        return Sending::Length(0);
    }
    headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    Sending::Chunked
}

/// Writes a request head (origin-form target, HTTP/1.1) to `out`: the fields of its map but
/// those `withheld` says, then `added`.
pub fn encode_head<'f>(
    out: &mut Vec<u8>,
    parts: &request::Parts,
    withheld: impl Fn(&HeaderName, &HeaderValue) -> bool,
    added: impl Iterator<Item = (&'f HeaderName, &'f HeaderValue)>,
) {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut field = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        if !withheld(name, value) {
            field(name, value);
        }
    }
    for (name, value) in added {
        field(name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the size line of a chunk of `len` bytes to `out`.
pub fn encode_chunk_size(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = len;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// It has none, or has been read whole.
    Done,
    /// This many more bytes.
    Length(u64),
    /// Chunks.
    Chunked(Chunk),
    /// Everything until the upstream closes.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// A response head read off the wire.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf`, taking its bytes off it: `None` until
/// the head is complete.
pub fn parse_head(buf: &mut BytesMut, request_method: &Method) -> Result<Option<Head>, WireError> {
    // Each field as offsets into `buf`: name start, name length, value start, value length.
    // A head of a few fields (most) needs only a few of them zeroed first.
    let mut few = [(0u32, 0u32, 0u32, 0u32); FEW_FIELDS];
    let mut many = Vec::new();
    let (len, code, minor, spans) = {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parser = httparse::ParserConfig::default();
        let len = match parser.parse_response_with_uninit_headers(&mut response, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(WireError::Invalid("response head too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Invalid("too many response header fields"));
            }
            Err(_) => return Err(WireError::Invalid("malformed response head")),
        };
        let base = buf.as_ptr() as usize;
        let count = response.headers.len();
        let spans = if count <= FEW_FIELDS {
            &mut few[..]
        } else {
            many.resize(count, (0, 0, 0, 0));
            &mut many[..]
        };
        for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
            // Within `buf`, far below 4 GiB (MAX_HEAD).
            *span = (
                (field.name.as_ptr() as usize - base) as u32,
                field.name.len() as u32,
                (field.value.as_ptr() as usize - base) as u32,
                field.value.len() as u32,
            );
        }
        let code = response.code.unwrap_or(0);
        (len, code, response.version.unwrap_or(1), &spans[..count])
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| WireError::Invalid("invalid status"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Room for what the gateway adds on the way to the client (the rate-limit fields, the
    // request ID): the map is not grown, and rehashed, for them.
    let mut headers = HeaderMap::with_capacity(spans.len() + 8);
    // The framing fields, read as the fields go into the map (no lookups afterwards).
    let mut fields = FramingFields::default();
    for &(name_at, name_len, value_at, value_len) in spans {
        let name = &head[name_at as usize..(name_at + name_len) as usize];
        let name =
            field_names::name(name).map_err(|_| WireError::Invalid("invalid header field name"))?;
        let value = head.slice(value_at as usize..(value_at + value_len) as usize);
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| WireError::Invalid("invalid header field value"))?;
        fields.read(&name, &value);
        headers.append(name, value);
    }
    let (framing, keep_alive) = fields.framing(status, version, request_method)?;
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// What a response head's framing fields say: `Content-Length` (every line and list item
/// the same number), whether the last `Transfer-Encoding` coding is `chunked`, and the
/// `Connection` options.
#[derive(Default)]
struct FramingFields {
    length: Option<u64>,
    bad_length: Option<&'static str>,
    /// `Some(last coding is chunked)` when there is a `Transfer-Encoding`.
    chunked: Option<bool>,
    close: bool,
    keep_alive: bool,
}

impl FramingFields {
    fn read(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == CONTENT_LENGTH {
            for item in value.as_bytes().split(|&b| b == b',') {
                let item = item.trim_ascii();
                if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                    self.bad_length = Some("invalid Content-Length");
                    return;
                }
                let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
                match self.length {
                    Some(seen) if seen != n => self.bad_length = Some("conflicting Content-Length"),
                    _ => self.length = Some(n),
                }
            }
        } else if name == TRANSFER_ENCODING {
            let last = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == CONNECTION {
            for option in value.as_bytes().split(|&b| b == b',') {
                let option = option.trim_ascii();
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }

    /// How the body is framed (RFC 9112 6.3), and whether the connection stays open.
    fn framing(
        &self,
        status: StatusCode,
        version: Version,
        request_method: &Method,
    ) -> Result<(Framing, bool), WireError> {
        let keep_alive = match version {
            Version::HTTP_10 => self.keep_alive,
            _ => !self.close,
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok((Framing::Done, false));
        }
        if *request_method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Framing::Done, keep_alive));
        }
        match self.chunked {
            Some(_) if version == Version::HTTP_10 => Err(WireError::Invalid(
                "Transfer-Encoding in an HTTP/1.0 response",
            )),
            Some(true) => Ok((Framing::Chunked(Chunk::Size), keep_alive)),
            Some(false) => Ok((Framing::Close, false)),
            None => match (self.bad_length, self.length) {
                (Some(why), _) => Err(WireError::Invalid(why)),
                (None, Some(0)) => Ok((Framing::Done, keep_alive)),
                (None, Some(length)) => Ok((Framing::Length(length), keep_alive)),
                (None, None) => Ok((Framing::Close, false)),
            },
        }
    }
}

/// The `Content-Length` of a request, if any: every line and list item the same number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut fields = FramingFields::default();
    for value in headers.get_all(CONTENT_LENGTH) {
        fields.read(&CONTENT_LENGTH, value);
    }
    match fields.bad_length {
        Some(why) => Err(why),
        None => Ok(fields.length),
    }
}

/// What a body's decoder gave.
pub enum Decoded {
    /// Bytes of the body.
    Data(Bytes),
    /// The trailer fields of a chunked body.
    Trailers(HeaderMap),
    /// The body has ended.
    End,
    /// More must be read first.
    More,
}

impl Framing {
    /// Takes the body's next piece off `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self {
                Framing::Done => return Ok(Decoded::End),
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = (*left).min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    *left -= n;
                    if *left == 0 {
                        *self = match self {
                            Framing::Length(_) => Framing::Done,
                            _ => Framing::Chunked(Chunk::DataEnd),
                        };
                    }
                    return Ok(Decoded::Data(data));
                }
                Framing::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(line) = line_end(buf)? else {
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&buf[..line])?;
                    buf.advance(line + 2);
                    *self = Framing::Chunked(match size {
                        0 => Chunk::Trailers,
                        size => Chunk::Data(size),
                    });
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers) => return trailers(buf, self),
            }
        }
    }

    /// Whether the body has been read whole.
    pub fn is_done(&self) -> bool {
        *self == Framing::Done
    }
}

/// Where the CRLF ending the line at the start of `buf` is.
fn line_end(buf: &BytesMut) -> Result<Option<usize>, WireError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => Ok(Some(at)),
        None if buf.len() >= MAX_HEAD => Err(WireError::Invalid("chunk-size line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line's size (extensions after `;` are skipped).
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let invalid = || WireError::Invalid("invalid chunk size");
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(invalid());
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid());
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let digit = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(digit)
    });
    Ok(size)
}

/// The trailer section of a chunked body, then its end.
fn trailers(buf: &mut BytesMut, framing: &mut Framing) -> Result<Decoded, WireError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        *framing = Framing::Done;
        return Ok(Decoded::End);
    }
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let (len, map) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((len, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for field in fields.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| WireError::Invalid("invalid trailer field name"))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| WireError::Invalid("invalid trailer field value"))?;
                map.append(name, value);
            }
            (len, map)
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(WireError::Invalid("trailer section too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Decoded::More),
        Err(_) => return Err(WireError::Invalid("malformed trailer section")),
    };
    buf.advance(len);
    *framing = Framing::Done;
    Ok(Decoded::Trailers(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], method: Method) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(bytes), &method)
    }

    fn body(
        framing: &mut Framing,
        bytes: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>, bool), WireError> {
        let mut buf = BytesMut::from(bytes);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match framing.decode(&mut buf)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::More => return Ok((data, trailers, false)),
            }
        }
    }

    #[test]
    fn every_field_of_a_head_is_kept_however_many_it_has() {
        // Up to FEW_FIELDS the offsets stay on the stack, beyond them in a Vec; the last
        // allowed count and one over the limit too.
        for count in [0, 1, FEW_FIELDS, FEW_FIELDS + 1, 40, MAX_HEADERS] {
            let mut raw = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..count {
                raw.push_str(&format!("X-Field-{i}: value {i}\r\n"));
            }
            raw.push_str("\r\n");
            let head = parse(raw.as_bytes(), Method::GET).unwrap().unwrap();
            let fields: Vec<_> = head
                .headers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.to_str().unwrap().to_owned()))
                .collect();
            let want: Vec<_> = (0..count)
                .map(|i| (format!("x-field-{i}"), format!("value {i}")))
                .collect();
            assert_eq!(fields, want, "{count} fields");
        }
        let mut raw = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            raw.push_str(&format!("X-Field-{i}: {i}\r\n"));
        }
        raw.push_str("\r\n");
        assert!(matches!(
            parse(raw.as_bytes(), Method::GET),
            Err(WireError::Invalid("too many response header fields"))
        ));
    }

    #[test]
    fn a_response_head_is_parsed_with_its_framing_and_keep_alive() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello";
        let mut buf = BytesMut::from(&raw[..]);
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        let values: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buf[..], b"hello", "the body's bytes stay in the buffer");

        assert!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Len", Method::GET)
                .unwrap()
                .is_none()
        );
        let head = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Method::HEAD,
        );
        assert_eq!(
            head.unwrap().unwrap().framing,
            Framing::Done,
            "HEAD: no body"
        );
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
            let head = parse(raw.as_bytes(), Method::GET).unwrap().unwrap();
            assert_eq!(head.framing, Framing::Done, "{status}");
        }
        let head = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Method::GET,
        );
        assert!(!head.unwrap().unwrap().keep_alive);
        let head = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive, "HTTP/1.0 without keep-alive");
        let head = parse(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n",
            Method::GET,
        );
        assert!(head.unwrap().unwrap().keep_alive);
        let head = parse(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.framing, head.keep_alive),
            (Framing::Close, false),
            "read to the close"
        );
        let head = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Method::GET,
        );
        assert_eq!(
            head.unwrap().unwrap().framing,
            Framing::Chunked(Chunk::Size)
        );
        let head = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Method::GET,
        );
        assert_eq!(head.unwrap().unwrap().framing, Framing::Close);
    }

    #[test]
    fn responses_that_cannot_be_read_are_invalid() {
        let invalid = |raw: &[u8]| matches!(parse(raw, Method::GET), Err(WireError::Invalid(_)));
        assert!(invalid(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"));
        assert!(invalid(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        ));
        assert!(invalid(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"));
        assert!(invalid(
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(invalid(b"HTTP/1.1 2000 OK\r\n\r\n"));
        assert!(invalid(b"SMTP ready\r\n\r\n"));
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "a: b\r\n".repeat(101));
        assert!(invalid(many.as_bytes()));
        let huge = format!("HTTP/1.1 200 OK\r\nA: {}", "b".repeat(MAX_HEAD));
        assert!(invalid(huge.as_bytes()));
        let head = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(
            head.unwrap().unwrap().framing,
            Framing::Length(5),
            "a repeated equal length"
        );
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers_and_bad_ones_fail() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let (data, trailers, ended) = body(
            &mut framing,
            b"5;ext=1\r\nhello\r\nA \r\n world etc\r\n0\r\nx-sum: 9\r\n\r\n",
        )
        .unwrap();
        assert_eq!(data, b"hello world etc");
        assert_eq!(trailers.unwrap()["x-sum"], "9");
        assert!(ended && framing.is_done());

        // Split anywhere, it waits for more and goes on.
        let whole = b"3\r\nabc\r\n0\r\n\r\n";
        for at in 0..whole.len() {
            let mut framing = Framing::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(&whole[..at]);
            let mut data = Vec::new();
            let mut pushed = false;
            loop {
                match framing.decode(&mut buf).unwrap() {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::More if !pushed => {
                        buf.extend_from_slice(&whole[at..]);
                        pushed = true;
                    }
                    Decoded::End => break,
                    Decoded::More | Decoded::Trailers(_) => panic!("split at {at}"),
                }
            }
            assert_eq!(data, b"abc", "split at {at}");
        }

        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXY",
            b"11111111111111111\r\n",
            b"5 x\r\n",
        ] {
            let mut framing = Framing::Chunked(Chunk::Size);
            assert!(
                matches!(body(&mut framing, bad), Err(WireError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lengths_and_closes_frame_what_they_say() {
        let mut framing = Framing::Length(3);
        let mut buf = BytesMut::from(&b"abcHTTP"[..]);
        assert!(matches!(framing.decode(&mut buf), Ok(Decoded::Data(d)) if &d[..] == b"abc"));
        assert!(framing.is_done());
        assert_eq!(&buf[..], b"HTTP", "the rest is not the body's");
        let mut framing = Framing::Close;
        let (data, _, ended) = body(&mut framing, b"all of it").unwrap();
        assert_eq!((&data[..], ended), (&b"all of it"[..], false));
    }

    #[test]
    fn request_heads_are_written_in_origin_form_with_chunk_sizes_in_hex() {
        let (mut parts, _) = http::Request::post("http://up/a/b?c=d")
            .header("host", "up")
            .header("x-withheld", "w")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .unwrap()
            .into_parts();
        parts.uri = http::Uri::from_static("/a/b?c=d");
        let mut out = Vec::new();
        let added = (
            HeaderName::from_static("x-added"),
            HeaderValue::from_static("3"),
        );
        let withheld = |name: &HeaderName, _: &HeaderValue| name == "x-withheld";
        encode_head(
            &mut out,
            &parts,
            withheld,
            std::iter::once((&added.0, &added.1)),
        );
        assert_eq!(
            out,
            b"POST /a/b?c=d HTTP/1.1\r\nhost: up\r\nx-two: 1\r\nx-two: 2\r\nx-added: 3\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_chunk_size(&mut out, 0x1a2b);
        encode_chunk_size(&mut out, 0);
        assert_eq!(out, b"1a2b\r\n0\r\n");
    }
}
