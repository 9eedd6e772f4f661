//! The identifiers every floor above config shares: plan names, key ids, key digests and the
//! window a bucket's limit is stated in.
//!
//! They live at the bottom so that config, errors, auth, limits and metrics can all name them
//! without importing each other. Hashing a presented key into a [`KeyDigest`] is
//! authentication's work and lives with it (`auth::key`).

use std::fmt;
use std::sync::Arc;

/// A plan's name (`free`, `pro`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanName(pub Arc<str>);

impl fmt::Display for PlanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key's public identifier, safe for logs, metrics and headers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub Arc<str>);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SHA-256 digest of an API key, written `sha256:<64 lowercase hex>` in config.
#[derive(Clone, Copy, Eq, PartialOrd, Ord)]
pub struct KeyDigest([u8; 32]);

impl PartialEq for KeyDigest {
    /// Four 8-byte compares, inline (the derived one calls `memcmp`), and in constant time.
    fn eq(&self, other: &Self) -> bool {
        let differ =
            self.0
                .chunks_exact(8)
                .zip(other.0.chunks_exact(8))
                .fold(0u64, |acc, (a, b)| {
                    let a = u64::from_ne_bytes(a.try_into().expect("8 bytes"));
                    let b = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
                    acc | (a ^ b)
                });
        differ == 0
    }
}

impl std::hash::Hash for KeyDigest {
    /// The digest is uniformly distributed already: its first 8 bytes are hash enough
    /// (see `auth::store::DigestHasher`).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Why a `key = "..."` value is not a digest. Never carries the value itself.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not `sha256:` + 64 hex characters at all; may be a plaintext key pasted by mistake.
    #[error(
        "key must be a digest \"sha256:<64 hex>\", not the key itself; produce it with `tollgate hash-key` (the value is not shown)"
    )]
    NotADigest,
    /// Right prefix, wrong body.
    #[error("key digest must be \"sha256:\" followed by 64 hex characters")]
    BadHex,
}

impl KeyDigest {
    /// A digest from its 32 bytes (`auth::key` computes them from a presented key).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses `sha256:<64 hex>` (hex case is ignored).
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or(DigestError::NotADigest)?;
        if hex.len() != 64 {
            return Err(DigestError::BadHex);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or(DigestError::BadHex)?;
            let lo = hex_value(pair[1]).ok_or(DigestError::BadHex)?;
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The window a bucket's limit is stated in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// `requests_per_minute`.
    Minute,
    /// `requests_per_hour`.
    Hour,
    /// `requests_per_day`.
    Day,
    /// `requests_per_month`: a calendar quota, not a bucket (its length here is nominal,
    /// 30 days; the quota's period is the UTC calendar month).
    Month,
}

impl Window {
    /// Length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
            Window::Month => 30 * 86_400,
        }
    }

    /// "minute", "hour", "day".
    pub fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_digests() {
        assert_eq!(
            KeyDigest::parse("tg_live_abc"),
            Err(DigestError::NotADigest)
        );
        assert_eq!(KeyDigest::parse("sha256:abc"), Err(DigestError::BadHex));
        assert_eq!(
            KeyDigest::parse(&format!("sha256:{}", "g".repeat(64))),
            Err(DigestError::BadHex)
        );
    }
}
