//! API keys as presented by clients ([`ApiKey`], which never prints itself), hashed into the
//! [`KeyDigest`] config stores (`sha256:<64 hex>`; the type lives in `config::types`, the
//! hashing of the hot path here), plus key generation for `tollgate gen-key`.

use std::fmt;

use rand::Rng;
use sha2::{Digest, Sha256};

pub use crate::config::{DigestError, KeyDigest};
use crate::observability::request_id::BASE62;

/// A plaintext API key. Its `Debug` and `Display` are redacted, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a presented key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key's SHA-256 digest, the only form tollgate stores or compares.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(self.0.as_bytes())
    }

    /// The plaintext, for the one place that must print it: `tollgate gen-key`.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// Hashing is authentication's work, so this half of `KeyDigest` lives with it.
impl KeyDigest {
    /// Hashes raw key bytes (sha2 uses the CPU's SHA extensions where present).
    ///
    /// A key short enough to fit one padded block (55 bytes or fewer: every generated key,
    /// and the usual formats of other gateways) is padded on the stack and compressed once;
    /// that skips the streaming hasher's buffering, about a third of the instructions of an
    /// authentication. Longer keys take the streaming path. Both give the standard digest.
    pub fn of(bytes: &[u8]) -> Self {
        const MAX_ONE_BLOCK: usize = 64 - 1 - 8;
        if bytes.len() > MAX_ONE_BLOCK {
            return Self::from_bytes(Sha256::digest(bytes).into());
        }
        let mut block = [0u8; 64];
        block[..bytes.len()].copy_from_slice(bytes);
        block[bytes.len()] = 0x80;
        block[56..].copy_from_slice(&(bytes.len() as u64 * 8).to_be_bytes());
        let mut state = SHA256_INITIAL;
        sha2::compress256(&mut state, &[block.into()]);
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        Self::from_bytes(out)
    }
}

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_INITIAL: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// Base62 characters in a generated key: 43 * log2(62) = 256 bits of entropy.
pub const GENERATED_KEY_CHARS: usize = 43;

/// A new random key: `prefix` + 43 base62 characters from the OS-seeded CSPRNG.
pub fn generate(prefix: &str) -> ApiKey {
    let mut rng = rand::rng();
    let mut key = String::with_capacity(prefix.len() + GENERATED_KEY_CHARS);
    key.push_str(prefix);
    for _ in 0..GENERATED_KEY_CHARS {
        key.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    ApiKey(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_block_digest_equals_the_streaming_one_at_every_length() {
        // 0..=55 take the one-block path, 56.. the streaming one; 55/56 and 63/64/65 are
        // where SHA-256's padding changes shape.
        for len in 0..=130 {
            let key: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let streamed: [u8; 32] = Sha256::digest(&key).into();
            assert_eq!(KeyDigest::of(&key).as_bytes(), &streamed, "length {len}");
        }
    }

    #[test]
    fn digest_matches_known_vector() {
        // sha256("test"), the digest in SPEC.md's example.
        let d = ApiKey::new("test").digest();
        assert_eq!(
            d.to_string(),
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(KeyDigest::parse(&d.to_string()).unwrap(), d);
        assert_eq!(
            KeyDigest::parse(&d.to_string().to_uppercase().replace("SHA256", "sha256")).unwrap(),
            d
        );
    }

    #[test]
    fn api_key_never_prints_itself() {
        let k = ApiKey::new("tg_live_secret");
        assert!(!format!("{k:?} {k}").contains("secret"));
    }

    #[test]
    fn generated_keys_are_base62_and_distinct() {
        let a = generate("tg_live_");
        let b = generate("tg_live_");
        assert_ne!(a, b);
        let body = a.expose().strip_prefix("tg_live_").unwrap();
        assert_eq!(body.len(), GENERATED_KEY_CHARS);
        assert!(body.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
