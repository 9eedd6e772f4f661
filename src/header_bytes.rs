//! Short byte strings made per request (header values: a generated request ID, a large
//! `Remaining` count; an error body) on shared bytes without an allocation each: written into
//! a per-thread chunk and split off it, as hyper's parser splits header values off its read
//! buffer. A value holds a reference to its chunk; a chunk is freed when its last value is
//! dropped.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;

/// The size of a chunk: a few dozen values. Small, because a value that lives long (the
/// request ID of a long stream) keeps its whole chunk.
const CHUNK_BYTES: usize = 1024;

thread_local! {
    static CHUNK: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `bytes` as a header value, or `None` if they are not a valid one.
pub fn value(bytes: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(self::bytes(bytes)).ok()
}

/// A copy of `bytes`, shared.
pub fn bytes(bytes: &[u8]) -> Bytes {
    CHUNK.with(|chunk| {
        let mut chunk = chunk.borrow_mut();
        if chunk.capacity() - chunk.len() < bytes.len() {
            *chunk = BytesMut::with_capacity(CHUNK_BYTES.max(bytes.len()));
        }
        chunk.extend_from_slice(bytes);
        chunk.split().freeze()
    })
}

/// `n` in decimal as a header value.
pub fn number(n: u64) -> HeaderValue {
    value(decimal(n, &mut [0; 20])).expect("digits are a valid header value")
}

/// `n` in decimal, written at the end of `buf`.
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_bytes_across_chunks_and_refuse_invalid_ones() {
        // More than a chunk's worth, each checked after all are made: none overwrote another.
        let made: Vec<(u64, HeaderValue)> = (0..3_000u64)
            .map(|i| (i * 7_919_993, number(i * 7_919_993)))
            .collect();
        for (n, value) in &made {
            assert_eq!(value.to_str().unwrap(), n.to_string());
        }
        assert_eq!(number(0), "0");
        assert_eq!(number(u64::MAX), u64::MAX.to_string().as_str());
        assert_eq!(value(b"req_abc").unwrap(), "req_abc");
        assert!(value(b"bad\nvalue").is_none());
        // A value as long as a chunk, and one longer.
        let long = vec![b'a'; CHUNK_BYTES + 1];
        assert_eq!(value(&long).unwrap().as_bytes(), &long[..]);
        assert_eq!(value(&long[..CHUNK_BYTES]).unwrap().len(), CHUNK_BYTES);
    }
}
