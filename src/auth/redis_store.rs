//! Keys kept in Redis (`auth.store = "redis"`), shared by every gateway instance.
//!
//! One hash, [`KEYS_HASH`], holds every key as JSON ([`StoredKey`]) under its id; each write
//! is one atomic compare-and-set script per key (so parallel writers never lose an update)
//! that also publishes the id on [`CHANGES_CHANNEL`]. Instances load the hash at start,
//! follow the channel, and reload the whole hash periodically, so a missed message heals
//! (`reload::key_sync`). The request path never talks to Redis: it reads the in-memory store
//! built from what was loaded.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use redis::{AsyncCommands, Client, Script};
use serde::{Deserialize, Serialize};

use crate::config::{
    DigestConfig, KeyConfig, KeyDigest, KeyId, PlanName, RedisConfig, check_metadata, valid_key_id,
};
use crate::limit::redis_connection::{RedisConnection, RedisConnector};

/// The hash of every key: id -> [`StoredKey`] JSON.
pub const KEYS_HASH: &str = "tollgate:keys";
/// Where each write publishes the id it changed.
pub const CHANGES_CHANNEL: &str = "tollgate:keys:changed";
/// How long a Redis command of the key store may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Sets key `ARGV[1]` of hash `KEYS[1]` to `ARGV[3]` (deletes it when empty) if it is still
/// `ARGV[2]` (absent when empty), and publishes the id on `ARGV[4]`. 1 if written.
const COMPARE_AND_SET: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
";

/// A connection for commands, within [`COMMAND_TIMEOUT`]: the limiter's Redis (`[redis]`,
/// single, Sentinel or Cluster).
pub async fn connect(redis: &RedisConfig) -> Result<RedisConnection, redis::RedisError> {
    timed(RedisConnector::new(redis).connect()).await
}

/// A client to subscribe to [`CHANGES_CHANNEL`] with (see
/// [`RedisConnector::pubsub_client`]).
pub async fn pubsub_client(redis: &RedisConfig) -> Result<Client, redis::RedisError> {
    timed(RedisConnector::new(redis).pubsub_client()).await
}

async fn timed<T>(
    f: impl Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(COMMAND_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })
}

/// One key as Redis (and the cache file) keeps it. Its digests are there, its plaintext
/// never.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// Public id.
    pub id: String,
    /// Digests, first the newest.
    pub digests: Vec<StoredDigest>,
    /// Plan name.
    pub plan: String,
    /// Scopes held.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Metadata sent upstream.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Revoked.
    #[serde(default)]
    pub disabled: bool,
    /// Whole key's expiry, seconds since the Unix epoch.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Per-key rate.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// When it was made, seconds since the Unix epoch.
    #[serde(default)]
    pub created_at: Option<u64>,
}

/// One digest of a [`StoredKey`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDigest {
    /// `sha256:<hex>`.
    pub digest: String,
    /// When it stops working.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

impl StoredKey {
    /// The key as the key store takes it, or why it cannot be used (never a digest).
    pub fn to_config(&self) -> Result<KeyConfig, String> {
        if !valid_key_id(&self.id) {
            return Err("invalid id".to_owned());
        }
        let digests = self
            .digests
            .iter()
            .map(|d| {
                KeyDigest::parse(&d.digest)
                    .map(|digest| DigestConfig {
                        digest,
                        expires_at: d.expires_at,
                    })
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if digests.is_empty() {
            return Err("no digest".to_owned());
        }
        for (name, value) in &self.metadata {
            check_metadata(name, value)?;
        }
        Ok(KeyConfig {
            id: KeyId(Arc::from(self.id.as_str())),
            digests,
            plan: PlanName(Arc::from(self.plan.as_str())),
            scopes: self.scopes.clone(),
            // The plan's quota and route buckets: a key in Redis carries no overrides.
            requests_per_month: None,
            routes: Default::default(),
            requests_per_minute: match self.requests_per_minute {
                None => None,
                Some(n) => Some(NonZeroU32::new(n).ok_or("requests_per_minute = 0")?),
            },
            disabled: self.disabled,
            expires_at: self.expires_at,
            metadata: self.metadata.clone().into_iter().collect(),
            created_at: self.created_at,
        })
    }

    /// The stored form of a key.
    pub fn from_config(key: &KeyConfig) -> Self {
        Self {
            id: key.id.0.to_string(),
            digests: key
                .digests
                .iter()
                .map(|d| StoredDigest {
                    digest: d.digest.to_string(),
                    expires_at: d.expires_at,
                })
                .collect(),
            plan: key.plan.0.to_string(),
            scopes: key.scopes.clone(),
            metadata: key.metadata.iter().cloned().collect(),
            disabled: key.disabled,
            expires_at: key.expires_at,
            requests_per_minute: key.requests_per_minute.map(NonZeroU32::get),
            created_at: key.created_at,
        }
    }
}

/// Every key in Redis, by id. Entries that do not parse are left out and logged (by id).
pub async fn load_all(
    conn: &mut RedisConnection,
) -> Result<BTreeMap<String, StoredKey>, redis::RedisError> {
    let raw: BTreeMap<String, String> = timed(conn.hgetall(KEYS_HASH)).await?;
    Ok(raw
        .into_iter()
        .filter_map(|(id, json)| parse(&id, &json).map(|k| (id, k)))
        .collect())
}

/// One key in Redis.
pub async fn load_one(
    conn: &mut RedisConnection,
    id: &str,
) -> Result<Option<StoredKey>, redis::RedisError> {
    let raw: Option<String> = timed(conn.hget(KEYS_HASH, id)).await?;
    Ok(raw.and_then(|json| parse(id, &json)))
}

fn parse(id: &str, json: &str) -> Option<StoredKey> {
    match serde_json::from_str::<StoredKey>(json) {
        Ok(key) if key.id == id => Some(key),
        _ => {
            tracing::warn!(
                key_id = id,
                "key store: an entry in Redis is not a key tollgate wrote; left out"
            );
            None
        }
    }
}

/// Why a write to the key store did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreWriteError {
    /// Redis failed or was unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Creating an id that exists.
    #[error("a key with id \"{0}\" exists already")]
    Exists(String),
    /// Changing an id that does not exist.
    #[error("no key with id \"{0}\"")]
    Missing(String),
    /// Other writers kept changing the key; nothing was written.
    #[error("key \"{0}\" kept changing under the write; try again")]
    Contended(String),
    /// The change itself was refused by `edit`.
    #[error("{0}")]
    Refused(String),
}

/// Creates key `key.id`, atomically: [`StoreWriteError::Exists`] if the id is taken.
pub async fn create(conn: &mut RedisConnection, key: &StoredKey) -> Result<(), StoreWriteError> {
    let json = serde_json::to_string(key).expect("a key serializes");
    if compare_and_set(conn, &key.id, "", &json).await? {
        Ok(())
    } else {
        Err(StoreWriteError::Exists(key.id.clone()))
    }
}

/// Changes key `id` with `edit` (`None`: delete it), retried while other writers change it
/// in between; each try is one atomic compare-and-set.
pub async fn update(
    conn: &mut RedisConnection,
    id: &str,
    edit: impl Fn(StoredKey) -> Result<Option<StoredKey>, String>,
) -> Result<Option<StoredKey>, StoreWriteError> {
    for _ in 0..16 {
        let raw: Option<String> = timed(conn.hget(KEYS_HASH, id)).await?;
        let Some(raw) = raw else {
            return Err(StoreWriteError::Missing(id.to_owned()));
        };
        let current =
            parse(id, &raw).ok_or_else(|| StoreWriteError::Refused("unreadable entry".into()))?;
        let next = edit(current).map_err(StoreWriteError::Refused)?;
        let json = next
            .as_ref()
            .map(|k| serde_json::to_string(k).expect("a key serializes"))
            .unwrap_or_default();
        if compare_and_set(conn, id, &raw, &json).await? {
            return Ok(next);
        }
    }
    Err(StoreWriteError::Contended(id.to_owned()))
}

async fn compare_and_set(
    conn: &mut RedisConnection,
    id: &str,
    expected: &str,
    next: &str,
) -> Result<bool, redis::RedisError> {
    static SCRIPT: std::sync::LazyLock<Script> =
        std::sync::LazyLock::new(|| Script::new(COMPARE_AND_SET));
    let written: i64 = timed(
        SCRIPT
            .key(KEYS_HASH)
            .arg(id)
            .arg(expected)
            .arg(next)
            .arg(CHANGES_CHANNEL)
            .invoke_async(conn),
    )
    .await?;
    Ok(written == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_key_round_trips_and_bad_entries_are_refused() {
        let key = StoredKey {
            id: "acme".into(),
            digests: vec![StoredDigest {
                digest: KeyDigest::from_bytes([1; 32]).to_string(),
                expires_at: Some(5),
            }],
            plan: "pro".into(),
            scopes: vec!["a".into()],
            metadata: [("tier".to_owned(), "gold".to_owned())].into(),
            disabled: false,
            expires_at: None,
            requests_per_minute: Some(7),
            created_at: Some(1),
        };
        let config = key.to_config().unwrap();
        assert_eq!(StoredKey::from_config(&config), key);
        let mut bad = key.clone();
        bad.digests.clear();
        assert!(bad.to_config().is_err());
        let mut bad = key.clone();
        bad.metadata.insert("Bad".into(), "x".into());
        assert!(bad.to_config().is_err());
        let mut bad = key;
        bad.requests_per_minute = Some(0);
        assert!(bad.to_config().is_err());
        assert!(parse("other", &serde_json::to_string(&bad).unwrap()).is_none());
    }
}
