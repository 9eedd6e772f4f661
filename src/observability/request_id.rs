//! Request IDs: kept from the client when well-formed, otherwise `req_` + 24 base62 chars.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::RngCore;

use crate::header_bytes;

/// The base62 alphabet used for generated keys and request IDs.
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied ID that is kept.
pub const MAX_LEN: usize = 128;

/// Random base62 characters after `req_` in a generated ID (~143 bits).
const GENERATED_CHARS: usize = 24;
const _: () = assert!(
    GENERATED_CHARS.is_multiple_of(6),
    "six characters per 64-bit draw"
);

/// The ID of one request: in the response header, the upstream request, every log line and
/// the error body. Holds a validated `HeaderValue`, so cloning is a reference-count bump.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's `X-Request-Id` if it is 1-128 chars of `[A-Za-z0-9._:-]`, else a new one.
    /// Two `X-Request-Id` fields get a new one too: which the client meant would be a guess,
    /// and whatever logged the other could not be matched.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        // One pass over the names, not a hashed lookup (a custom name is hashed byte by
        // byte): a request has a handful of fields, and a name of another length or a
        // standard one is told apart at once.
        let mut ids = headers
            .iter()
            .filter(|(name, _)| **name == X_REQUEST_ID)
            .map(|(_, value)| value);
        match (ids.next(), ids.next()) {
            (Some(id), None) if is_valid(id.as_bytes()) => Self(id.clone()),
            _ => Self::generate(),
        }
    }

    /// Parses a string under the same rules (for tests and tools).
    pub fn parse(s: &str) -> Option<Self> {
        is_valid(s.as_bytes()).then(|| Self(HeaderValue::from_str(s).expect("validated")))
    }

    /// A fresh `req_` + 24 base62 characters.
    pub fn generate() -> Self {
        let mut buf = [0u8; 4 + GENERATED_CHARS];
        buf[..4].copy_from_slice(b"req_");
        // Six characters from each 64-bit draw: its first six base-62 digits, the draw read
        // as a fraction in [0, 1), each multiplication by 62 bringing the next digit above
        // the point. Every six-character group takes each of its 62^6 values from 2^64 / 62^6
        // (about 3.2e8) draws, give or take one: uniform to within one part in 300 million,
        // with no draw rejected and no branch per character.
        let mut rng = rand::rng();
        for group in buf[4..].chunks_exact_mut(6) {
            let mut fraction = rng.next_u64();
            for b in group {
                let product = u128::from(fraction) * 62;
                *b = BASE62[(product >> 64) as usize];
                fraction = product as u64;
            }
        }
        // Shared bytes from the start, without an allocation of its own: the ID is copied into
        // the upstream request and the response, and each copy is a reference count.
        Self(header_bytes::value(&buf).expect("base62 is a valid header value"))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        // Only ever built from validated ASCII (so valid UTF-8, checked a word at a time).
        std::str::from_utf8(self.0.as_bytes()).unwrap_or_default()
    }

    /// The ID as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

/// Whether a client-supplied ID is kept.
pub fn is_valid(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity() {
        assert!(is_valid(b"abc-123_x.y:z"));
        assert!(is_valid(&[b'a'; 128]));
        assert!(!is_valid(&[b'a'; 129]));
        assert!(!is_valid(b""));
        assert!(!is_valid(b"has space"));
        assert!(!is_valid(b"semi;colon"));
        assert!(!is_valid("ünï".as_bytes()));
    }

    #[test]
    fn generated_ids() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 28);
        assert!(a.as_str().starts_with("req_"));
        assert!(a.as_str()[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn generated_characters_are_spread_over_the_alphabet() {
        const IDS: usize = 20_000;
        let mut at = [[0u32; 62]; GENERATED_CHARS];
        for _ in 0..IDS {
            let id = RequestId::generate();
            for (i, b) in id.as_str()[4..].bytes().enumerate() {
                let symbol = BASE62.iter().position(|&c| c == b).unwrap();
                at[i][symbol] += 1;
            }
        }
        // Each of the 62 symbols in every position (a missing one has odds of about 1e-139)...
        for (i, counts) in at.iter().enumerate() {
            assert!(counts.iter().all(|&n| n > 0), "position {i}: {counts:?}");
        }
        // ...and each as often as the others overall: 7,742 expected, 88 the standard
        // deviation; 10% is nine of those.
        let expected = (IDS * GENERATED_CHARS / 62) as f64;
        for symbol in 0..62 {
            let n = f64::from(at.iter().map(|counts| counts[symbol]).sum::<u32>());
            assert!(
                (n - expected).abs() < expected / 10.0,
                "{}: {n} of {expected}",
                BASE62[symbol] as char
            );
        }
    }

    #[test]
    fn kept_or_replaced() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("client-id-1"));
        assert_eq!(RequestId::from_headers(&h).as_str(), "client-id-1");
        h.append(&X_REQUEST_ID, HeaderValue::from_static("client-id-2"));
        assert!(
            RequestId::from_headers(&h).as_str().starts_with("req_"),
            "two IDs: neither is kept"
        );
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("bad id"));
        assert!(RequestId::from_headers(&h).as_str().starts_with("req_"));
    }
}
