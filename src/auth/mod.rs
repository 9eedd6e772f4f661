//! Authentication: API keys, their digests and (from the auth issue) the key store and scopes.
//!
//! Sits after route matching in the flow. Keys are only ever held as SHA-256 digests.

pub mod key;

pub use key::{ApiKey, KeyDigest};
