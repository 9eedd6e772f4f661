//! Authentication: who is calling. Sits after route matching in the flow.
//!
//! [`extract`] finds the one credential of a request, [`store`] maps its SHA-256 digest to a
//! key record (id, plan, scopes), and [`authenticate`] applies the route's rules: a key is
//! required unless the route is public, and it must hold every scope the route lists.
//! Plaintext keys are never stored, logged or echoed; config holds digests only.

pub mod expiry;
pub mod extract;
pub mod key;
pub mod redis_store;
pub mod store;

pub use expiry::WallClock;
pub use key::{ApiKey, KeyDigest};
pub use store::{KeyRecord, KeyStore};

pub use extract::strip_query_credential;
use extract::{CredentialSource, Presented};
use http::{HeaderMap, Uri};

use crate::config::AuthConfig;
use crate::error::GatewayError;

/// Who a request authenticated as, borrowed from the key store of the request's snapshot.
#[derive(Debug)]
pub struct Identity<'s> {
    /// The key's record.
    pub record: &'s KeyRecord,
    /// Where the key was found (to remove it before forwarding).
    pub source: CredentialSource,
    /// The digest's expiry, when it is within `auth.expiry_warning` (for `X-API-Key-Expires`).
    pub expires_soon: Option<u32>,
}

/// Where keys are looked up: the config's store, and the store shared through Redis
/// (`auth.store = "redis"`), if any. A `&KeyStore` is the config's alone.
#[derive(Debug, Clone, Copy)]
pub struct KeySources<'s> {
    /// Keys of the config and keys file.
    pub config: &'s KeyStore,
    /// Keys loaded from Redis.
    pub shared: Option<&'s KeyStore>,
}

impl<'s> From<&'s KeyStore> for KeySources<'s> {
    fn from(config: &'s KeyStore) -> Self {
        Self {
            config,
            shared: None,
        }
    }
}

impl<'s> KeySources<'s> {
    /// The enabled record of a presented key, hashed once for both stores.
    #[inline]
    pub fn lookup(&self, presented: &[u8]) -> Option<&'s KeyRecord> {
        let digest = KeyDigest::of(presented);
        self.config
            .get(&digest)
            .or_else(|| self.shared.and_then(|s| s.get(&digest)))
    }
}

/// Authenticates a request for a route that requires a key (`required`) or is public.
/// `Ok(None)` only on a public route with no key. A digest past its expiry (on `clock`) is
/// refused like a revoked key, with its own message.
pub fn authenticate<'s>(
    headers: &HeaderMap,
    uri: &Uri,
    config: &AuthConfig,
    store: impl Into<KeySources<'s>>,
    clock: &WallClock,
    required: bool,
    required_scopes: &[String],
) -> Result<Option<Identity<'s>>, GatewayError> {
    let presented: Option<Presented<'_>> = extract::extract(headers, uri, config)?;
    let Some(presented) = presented else {
        return if required {
            Err(GatewayError::MissingApiKey)
        } else {
            Ok(None)
        };
    };
    let record = store
        .into()
        .lookup(&presented.key)
        .ok_or(GatewayError::InvalidApiKey)?;
    let expires_soon = expiry::check(record, clock, config.expiry_warning)?;
    if let Some(scope) = record.missing_scope(required_scopes) {
        return Err(GatewayError::ScopeDenied {
            scope: scope.to_owned(),
        });
    }
    Ok(Some(Identity {
        record,
        source: presented.source,
        expires_soon,
    }))
}
