//! `auth.store = "redis"`: following the keys kept in Redis (`auth::redis_store`) into the
//! gateway's in-memory store. At start the whole hash is loaded (or, with Redis down,
//! `auth.keys_cache_file`, which is written after every sync that changed something); then
//! the change channel is followed, one key re-read per message, and the whole hash is read
//! again every resync interval, so a missed message (a dropped subscription, a write made
//! while this instance was cut off) heals. Redis down: the keys already loaded keep
//! working; the request path never waits on Redis.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::auth::redis_store::{self, CHANGES_CHANNEL, StoredKey};
use crate::config::keys_edit::write_atomic;
use crate::config::{KeyStoreKind, RedisConfig};
use crate::limit::redis_connection::RedisConnection;
use crate::stack::Gateway;

/// How often the whole key hash is read again, whatever the channel said.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(10);
/// Pause before subscribing again after the subscription failed or ended.
const RETRY: Duration = Duration::from_millis(500);

/// Loads the keys from Redis (or the cache file) into `gateway` and starts following them;
/// `None` unless `auth.store = "redis"`.
pub async fn start(
    gateway: &Arc<Gateway>,
    resync: Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    let snapshot = gateway.snapshot();
    let auth = &snapshot.config.auth;
    if auth.store != KeyStoreKind::Redis {
        return None;
    }
    let redis = snapshot.config.redis.clone();
    let mut follower = Follower {
        gateway: gateway.clone(),
        redis,
        cache: auth.keys_cache_file.clone(),
        keys: BTreeMap::new(),
        conn: None,
    };
    match follower.full_sync().await {
        Ok(()) => tracing::info!(
            keys = follower.keys.len(),
            "key store: keys loaded from Redis"
        ),
        Err(e) => follower.cold_start(&e),
    }
    Some(tokio::spawn(follower.run(resync)))
}

struct Follower {
    gateway: Arc<Gateway>,
    redis: RedisConfig,
    cache: Option<PathBuf>,
    /// What was last applied, by id.
    keys: BTreeMap<String, StoredKey>,
    conn: Option<RedisConnection>,
}

impl Follower {
    async fn run(mut self, resync: Duration) {
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let subscribed = async {
                let client = redis_store::pubsub_client(&self.redis).await?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(CHANGES_CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::time::timeout(redis_store::COMMAND_TIMEOUT, subscribed).await;
            let Ok(Ok(pubsub)) = pubsub else {
                // Redis down: the keys loaded stay; try again soon (each try also resyncs).
                tokio::time::sleep(RETRY).await;
                continue;
            };
            // Subscribed first, then read: nothing written in between is missed.
            if let Err(e) = self.full_sync().await {
                tracing::debug!(error = %e, "key store: resync failed");
            }
            let mut messages = pubsub.into_on_message();
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else { break };
                        let Ok(id) = message.get_payload::<String>() else { continue };
                        if self.sync_one(&id).await.is_err() {
                            let _ = self.full_sync().await;
                        }
                    }
                    _ = tick.tick() => {
                        if let Err(e) = self.full_sync().await {
                            tracing::debug!(error = %e, "key store: resync failed");
                        }
                    }
                }
            }
            tracing::warn!(
                "key store: the Redis subscription ended; the loaded keys stay, resubscribing"
            );
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn connection(&mut self) -> Result<&mut RedisConnection, redis::RedisError> {
        if self.conn.is_none() {
            self.conn = Some(redis_store::connect(&self.redis).await?);
        }
        Ok(self.conn.as_mut().expect("just made"))
    }

    /// Reads every key; applies them if anything changed.
    async fn full_sync(&mut self) -> Result<(), redis::RedisError> {
        let loaded = match redis_store::load_all(self.connection().await?).await {
            Ok(keys) => keys,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        if loaded != self.keys {
            self.keys = loaded;
            self.apply();
        }
        Ok(())
    }

    /// Reads one key (after a change message).
    async fn sync_one(&mut self, id: &str) -> Result<(), redis::RedisError> {
        let loaded = match redis_store::load_one(self.connection().await?, id).await {
            Ok(key) => key,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        if self.keys.get(id) != loaded.as_ref() {
            match loaded {
                Some(key) => self.keys.insert(id.to_owned(), key),
                None => self.keys.remove(id),
            };
            self.apply();
        }
        Ok(())
    }

    /// Hands the keys to the gateway and writes the cache file.
    fn apply(&self) {
        self.gateway.set_shared_keys(configs(self.keys.values()));
        if let Some(cache) = &self.cache {
            let list: Vec<&StoredKey> = self.keys.values().collect();
            let json = serde_json::to_vec_pretty(&list).expect("keys serialize");
            if let Err(e) = write_cache(cache, &json) {
                tracing::warn!(path = %cache.display(), error = %e, "key store: cannot write keys_cache_file");
            }
        }
    }

    /// Redis is down at start: the cache file's keys, if there is one.
    fn cold_start(&mut self, error: &redis::RedisError) {
        let Some(cache) = &self.cache else {
            tracing::warn!(error = %error, "key store: Redis unreachable at start and no auth.keys_cache_file: serving the config's keys only until Redis is back");
            return;
        };
        let read = std::fs::read(cache)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<Vec<StoredKey>>(&bytes).map_err(|e| e.to_string())
            });
        match read {
            Ok(list) => {
                self.keys = list.into_iter().map(|k| (k.id.clone(), k)).collect();
                self.gateway.set_shared_keys(configs(self.keys.values()));
                tracing::warn!(error = %error, path = %cache.display(), keys = self.keys.len(), "key store: Redis unreachable at start: serving the keys of keys_cache_file until Redis is back");
            }
            Err(e) => {
                tracing::warn!(error = %error, path = %cache.display(), cache_error = e, "key store: Redis unreachable at start and keys_cache_file unreadable: serving the config's keys only until Redis is back");
            }
        }
    }
}

/// The keys as the key store takes them; one that does not validate is left out, by id.
pub fn configs<'a>(keys: impl Iterator<Item = &'a StoredKey>) -> Vec<crate::config::KeyConfig> {
    keys.filter_map(|k| match k.to_config() {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::warn!(
                key_id = k.id,
                error = e,
                "key store: a key in Redis is left out"
            );
            None
        }
    })
    .collect()
}

/// The cache holds digests: readable by the gateway's user alone.
fn write_cache(path: &Path, json: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !path.exists() {
        std::fs::write(path, b"[]")?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    write_atomic(path, json)
}
