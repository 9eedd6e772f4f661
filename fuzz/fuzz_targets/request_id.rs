//! Request-ID validation on arbitrary bytes: `is_valid` agrees with SPEC.md (1-128 characters
//! of `[A-Za-z0-9._:-]`), a valid client ID is kept byte for byte (by `parse` and by
//! `from_headers`), an invalid one is replaced by a generated ID, and generated IDs are valid.

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::observability::request_id::{MAX_LEN, RequestId, X_REQUEST_ID, is_valid};

/// SPEC.md's rule, written independently of the gateway's.
fn spec_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id.iter().all(
            |&b| matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'-'),
        )
}

fn assert_generated(id: &RequestId) {
    let s = id.as_str();
    assert_eq!(s.len(), 28, "req_ + 24 characters");
    assert!(s.starts_with("req_"));
    assert!(s[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(is_valid(s.as_bytes()));
    assert_eq!(id.header_value().as_bytes(), s.as_bytes());
}

fuzz_target!(|data: &[u8]| {
    let valid = is_valid(data);
    assert_eq!(valid, spec_valid(data));

    if let Ok(text) = std::str::from_utf8(data) {
        match RequestId::parse(text) {
            Some(id) => {
                assert!(valid);
                assert_eq!(id.as_str(), text, "a parsed ID round-trips");
                assert_eq!(id.to_string(), text);
                assert_eq!(id.header_value().as_bytes(), data);
                assert_eq!(RequestId::parse(id.as_str()), Some(id));
            }
            None => assert!(!valid),
        }
    }

    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(data) {
        headers.insert(&X_REQUEST_ID, value);
    }
    let id = RequestId::from_headers(&headers);
    if valid {
        assert_eq!(id.as_str().as_bytes(), data, "a valid client ID is kept");
    } else {
        assert_generated(&id);
    }
    assert!(is_valid(id.as_str().as_bytes()));
    assert_generated(&RequestId::generate());
});
