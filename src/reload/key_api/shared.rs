//! The key API's writes with `auth.store = "redis"`: each one atomic per key in Redis
//! (`auth::redis_store`), published to every instance, and applied to this one at once.

use http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Inner, known_plan};
use crate::auth::redis_store::{self, StoreWriteError, StoredDigest, StoredKey};
use crate::config::keys_edit::NewKey;
use crate::config::units::parse_rfc3339;
use crate::config::{Config, KeyDigest};
use crate::limit::redis_connection::RedisConnection;

type Reply = Result<(StatusCode, Value), ApiError>;

/// Runs a Redis call from the blocking thread the key API works on.
fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Handle::current().block_on(f)
}

fn config(inner: &Inner) -> Result<Config, ApiError> {
    Config::load_to_serve(&inner.config_path).map_err(super::config_error)
}

/// Runs `write` on a Redis connection of the config's settings, then re-reads `id` and
/// applies it to this instance (the others follow the published change).
fn with_redis<T>(
    inner: &Inner,
    id: &str,
    write: impl AsyncFnOnce(&mut RedisConnection) -> Result<T, StoreWriteError>,
) -> Result<T, ApiError> {
    let gateway = inner.gateway()?;
    let snapshot = gateway.snapshot();
    block_on(async {
        let mut conn = redis_store::connect(&snapshot.config.redis)
            .await
            .map_err(unreachable)?;
        let out = write(&mut conn).await.map_err(store_error)?;
        let now = redis_store::load_one(&mut conn, id)
            .await
            .map_err(unreachable)?;
        let mut keys: Vec<_> = gateway
            .shared_keys()
            .iter()
            .filter(|k| *k.id.0 != *id)
            .cloned()
            .collect();
        if let Some(key) = now.and_then(|k| k.to_config().ok()) {
            keys.push(key);
        }
        gateway.set_shared_keys(keys);
        Ok(out)
    })
}

/// `POST /keys`.
pub(super) fn create(inner: &Inner, new: &NewKey) -> Result<(), ApiError> {
    let current = config(inner)?;
    known_plan(&current, &new.plan)?;
    if current.keys.iter().any(|k| *k.id.0 == *new.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("key \"{}\" is written in the config file", new.id),
        ));
    }
    let stored = StoredKey {
        id: new.id.clone(),
        digests: new
            .digest
            .iter()
            .map(|d| StoredDigest {
                digest: d.to_string(),
                expires_at: None,
            })
            .collect(),
        plan: new.plan.clone(),
        scopes: new.scopes.clone(),
        metadata: new.metadata.iter().cloned().collect(),
        disabled: false,
        expires_at: new.expires_at,
        requests_per_minute: new.requests_per_minute,
        created_at: new.created_at,
    };
    with_redis(inner, &new.id, async |conn| {
        redis_store::create(conn, &stored).await
    })
}

/// `PATCH /keys/<id>`: the fields as the file store would write them.
pub(super) fn patch(
    inner: &Inner,
    id: &str,
    set: &[(&str, Option<toml_edit::Value>)],
) -> Result<(), ApiError> {
    let current = config(inner)?;
    if let Some((_, Some(plan))) = set.iter().find(|(f, _)| *f == "plan") {
        known_plan(&current, plan.as_str().unwrap_or_default())?;
    }
    with_redis(inner, id, async |conn| {
        redis_store::update(conn, id, |mut key| {
            for (field, value) in set {
                apply(&mut key, field, value.as_ref());
            }
            Ok(Some(key))
        })
        .await
        .map(drop)
    })
}

/// One validated field onto a stored key.
fn apply(key: &mut StoredKey, field: &str, value: Option<&toml_edit::Value>) {
    match field {
        "plan" => {
            key.plan = value
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        }
        "scopes" => {
            key.scopes = value
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        }
        "metadata" => {
            key.metadata = value
                .and_then(|v| v.as_inline_table())
                .map(|t| {
                    t.iter()
                        .filter_map(|(n, v)| Some((n.to_owned(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        }
        "disabled" => key.disabled = value.and_then(|v| v.as_bool()).unwrap_or(false),
        "expires_at" => {
            key.expires_at = value
                .and_then(|v| v.as_str())
                .and_then(|t| parse_rfc3339(t).ok())
        }
        "requests_per_minute" => {
            key.requests_per_minute = value
                .and_then(|v| v.as_integer())
                .and_then(|n| u32::try_from(n).ok())
        }
        _ => {}
    }
}

/// `POST /keys/<id>/rotate`: as `KeysDocument::rotate` does it in a file.
pub(super) fn rotate(
    inner: &Inner,
    id: &str,
    new: KeyDigest,
    old_expires_at: u64,
    now: u64,
) -> Result<(), ApiError> {
    with_redis(inner, id, async |conn| {
        redis_store::update(conn, id, |mut key| {
            let mut digests = vec![StoredDigest {
                digest: new.to_string(),
                expires_at: None,
            }];
            for d in key.digests {
                let expires = d
                    .expires_at
                    .map_or(old_expires_at, |e| e.min(old_expires_at));
                if expires > now {
                    digests.push(StoredDigest {
                        digest: d.digest,
                        expires_at: Some(expires),
                    });
                }
            }
            key.digests = digests;
            Ok(Some(key))
        })
        .await
        .map(drop)
    })
}

/// `DELETE /keys/<id>`.
pub(super) fn delete(inner: &Inner, id: &str) -> Reply {
    with_redis(inner, id, async |conn| {
        redis_store::update(conn, id, |_| Ok(None)).await
    })?;
    Ok((StatusCode::OK, json!({ "id": id, "deleted": true })))
}

fn unreachable(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "admin key API: Redis unreachable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        "the key store (Redis) is unreachable; nothing was changed, try again",
    )
}

fn store_error(e: StoreWriteError) -> ApiError {
    match e {
        StoreWriteError::Redis(e) => unreachable(e),
        StoreWriteError::Exists(id) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("a key with id \"{id}\" exists already"),
        ),
        StoreWriteError::Missing(id) => ApiError::no_key(&id),
        other => ApiError::new(StatusCode::CONFLICT, "conflict", other.to_string()),
    }
}
