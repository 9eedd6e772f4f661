//! The admin key API's operations. `auth.store = "redis"` writes go to Redis ([`shared`]);
//! with `auth.store = "file"`, each write re-reads the config
//! and keys file, edits the key's `[[keys]]` table (`config::keys_edit`, comments kept),
//! validates the whole config as it would be with the new keys file, writes the file
//! atomically and reloads the gateway with it, so the change holds from the next request.
//! Writes run one at a time (re-reading before each, so none is lost); other instances
//! watching the same file follow it with their `watch` reload.
//!
//! Above the stack, beside the other reloads: it swaps the gateway's snapshot. Every write
//! is logged on the `tollgate::audit` target (action, key id, result, client IP), never a
//! key, digest or token.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::auth::key;
use crate::config::keys_edit::{self, KeysDocument, KeysEditError, NewKey};
use crate::config::units::{format_rfc3339, parse_duration, parse_rfc3339};
use crate::config::{
    Config, ConfigError, KeyConfig, KeyDigest, KeyStoreKind, MAX_KEY_METADATA, check_metadata,
    valid_key_id,
};
use crate::error::GatewayError;
use crate::server::admin::keys::{ApiError, KeyAdmin, KeyCall, KeyOp, off};
use crate::stack::Gateway;

mod shared;

/// Keys in one `GET /keys` page unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// Most keys in one page.
pub const MAX_PAGE: usize = 1000;
/// Random base62 characters of a generated key id (`key_` + these).
const GENERATED_ID_CHARS: usize = 20;

/// Serves the key API for the gateway running the config at `config_path`.
pub fn install(gateway: &Arc<Gateway>, config_path: &Path) {
    gateway.set_key_admin(Arc::new(KeyApi {
        inner: Arc::new(Inner {
            config_path: config_path.to_owned(),
            gateway: Arc::downgrade(gateway),
            writer: Mutex::new(()),
        }),
    }));
}

/// The key API of one gateway.
#[derive(Debug)]
pub struct KeyApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config_path: PathBuf,
    // Weak: the gateway holds this API.
    gateway: Weak<Gateway>,
    /// One writer at a time.
    writer: Mutex<()>,
}

impl KeyAdmin for KeyApi {
    fn authorize(&self, token: Option<&[u8]>, client: IpAddr) -> Result<(), ApiError> {
        let gateway = self.inner.gateway()?;
        let snapshot = gateway.snapshot();
        let Some(expected) = snapshot.config.admin.token else {
            return Err(off());
        };
        let now = Instant::now();
        let limits = &snapshot.config.limits;
        // A guessing client is blocked here as on the main listener.
        if let Err(blocked) = gateway
            .guard()
            .admit(client, now, limits, &snapshot.metrics)
        {
            return Err(ApiError::new(
                blocked.status(),
                blocked.code(),
                blocked.message(),
            ));
        }
        match token {
            Some(token) if KeyDigest::of(token) == expected => Ok(()),
            _ => {
                gateway
                    .guard()
                    .failed_auth(&GatewayError::InvalidApiKey, client, now, limits);
                tracing::warn!(target: "tollgate::audit", action = "authenticate", result = "denied", client_ip = %client, "admin key API: missing or wrong admin token");
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "a valid admin token is required: Authorization: Bearer <admin token>",
                ))
            }
        }
    }

    fn call(&self, op: KeyOp, client: IpAddr) -> KeyCall<'_> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let action = op.action();
            let named = match &op {
                KeyOp::Get(id) | KeyOp::Patch(id, _) | KeyOp::Rotate(id, _) | KeyOp::Delete(id) => {
                    Some(id.clone())
                }
                _ => None,
            };
            // File reads, validation and fsync: off the runtime's workers.
            let outcome = tokio::task::spawn_blocking(move || inner.run(op))
                .await
                .unwrap_or_else(|_| Err(internal("the key operation failed unexpectedly")));
            if !matches!(action, "list" | "get") {
                let key_id = match &outcome {
                    Ok((_, body)) => body["id"].as_str().map(str::to_owned).or(named),
                    Err(_) => named,
                };
                let key_id = key_id.unwrap_or_default();
                match &outcome {
                    Ok((status, _)) => {
                        tracing::info!(target: "tollgate::audit", action, key_id, result = "ok", status = status.as_u16(), client_ip = %client, "admin key API")
                    }
                    Err(e) => {
                        tracing::warn!(target: "tollgate::audit", action, key_id, result = "refused", status = e.status.as_u16(), reason = %e.message, client_ip = %client, "admin key API")
                    }
                }
            }
            outcome
        })
    }
}

type Reply = Result<(StatusCode, Value), ApiError>;

impl Inner {
    fn gateway(&self) -> Result<Arc<Gateway>, ApiError> {
        self.gateway.upgrade().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the gateway is shutting down",
            )
        })
    }

    fn run(&self, op: KeyOp) -> Reply {
        let now = self.gateway()?.wall_clock().now();
        match op {
            KeyOp::List { limit, after } => self.list(limit, after),
            KeyOp::Get(id) => self.get(&id),
            KeyOp::Create(body) => self.create(body, now),
            KeyOp::Patch(id, body) => self.patch(&id, body),
            KeyOp::Rotate(id, body) => self.rotate(&id, body, now),
            KeyOp::Delete(id) if self.redis()? => shared::delete(self, &id),
            KeyOp::Delete(id) => self.write(|doc, current| {
                editable(doc, current, &id)?;
                doc.remove(&id).map_err(edit_error)?;
                Ok((StatusCode::OK, json!({ "id": id, "deleted": true })))
            }),
        }
    }

    /// Whether keys are written to Redis (`auth.store = "redis"`) rather than the keys file.
    fn redis(&self) -> Result<bool, ApiError> {
        Ok(self.gateway()?.snapshot().config.auth.store == KeyStoreKind::Redis)
    }

    /// Every key with where it is kept (`config`, `keys_file`, `redis`), as the files are now
    /// and Redis was last loaded.
    fn all_keys(&self) -> Result<Vec<(KeyConfig, &'static str)>, ApiError> {
        let config = Config::load_to_serve(&self.config_path).map_err(config_error)?;
        let in_file = match &config.auth.keys_file {
            Some(path) => KeysDocument::read(path).map_err(edit_error)?.ids(),
            None => Vec::new(),
        };
        let mut keys: Vec<(KeyConfig, &'static str)> = config
            .keys
            .into_iter()
            .map(|k| {
                let source = if in_file.iter().any(|i| **i == *k.id.0) {
                    "keys_file"
                } else {
                    "config"
                };
                (k, source)
            })
            .collect();
        if self.redis()? {
            let shared = self.gateway()?.shared_keys();
            keys.extend(shared.iter().map(|k| (k.clone(), "redis")));
        }
        Ok(keys)
    }

    fn get(&self, id: &str) -> Reply {
        let keys = self.all_keys()?;
        let (key, source) = keys
            .iter()
            .find(|(k, _)| *k.id.0 == *id)
            .ok_or_else(|| ApiError::no_key(id))?;
        Ok((StatusCode::OK, view(key, source)))
    }

    fn list(&self, limit: Option<String>, after: Option<String>) -> Reply {
        let limit = match limit {
            None => DEFAULT_PAGE,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=MAX_PAGE).contains(l))
                .ok_or_else(|| {
                    ApiError::field("limit", format!("limit must be from 1 to {MAX_PAGE}"))
                })?,
        };
        let all = self.all_keys()?;
        let mut keys: Vec<&(KeyConfig, &str)> = all
            .iter()
            .filter(|(k, _)| after.as_deref().is_none_or(|a| *k.id.0 > *a))
            .collect();
        keys.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let more = keys.len() > limit;
        keys.truncate(limit);
        let next = more.then(|| keys.last().map(|(k, _)| k.id.0.to_string()));
        let page: Vec<Value> = keys.iter().map(|(k, source)| view(k, source)).collect();
        Ok((
            StatusCode::OK,
            json!({ "keys": page, "next": next.flatten() }),
        ))
    }

    fn create(&self, body: Value, now: u64) -> Reply {
        let body = fields(
            body,
            &[
                "id",
                "plan",
                "scopes",
                "metadata",
                "expires_at",
                "requests_per_minute",
                "prefix",
            ],
        )?;
        let id = match body.get("id") {
            None | Some(Value::Null) => generated_id(),
            Some(v) => {
                let id = string(v, "id")?;
                if !valid_key_id(&id) {
                    return Err(ApiError::field(
                        "id",
                        "id may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-128 characters)",
                    ));
                }
                id
            }
        };
        let Some(plan) = body.get("plan") else {
            return Err(ApiError::field("plan", "plan is required"));
        };
        let plan = string(plan, "plan")?;
        let prefix = prefix(&body)?;
        let secret = key::generate(&prefix);
        let mut new = NewKey {
            id: id.clone(),
            digest: Some(secret.digest()),
            plan,
            created_at: Some(now),
            ..Default::default()
        };
        if let Some(v) = body.get("scopes") {
            new.scopes = scopes(v)?;
        }
        if let Some(v) = body.get("metadata").filter(|v| !v.is_null()) {
            new.metadata = metadata(v)?;
        }
        new.expires_at = optional(&body, "expires_at", instant)?.flatten();
        new.requests_per_minute = optional(&body, "requests_per_minute", rpm)?.flatten();
        if self.redis()? {
            shared::create(self, &new)?;
            return Ok((
                StatusCode::CREATED,
                json!({ "id": id, "key": secret.expose() }),
            ));
        }
        self.write(|doc, current| {
            known_plan(current, &new.plan)?;
            if current.keys.iter().any(|k| *k.id.0 == *id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("a key with id \"{id}\" exists already"),
                ));
            }
            doc.add(&new).map_err(edit_error)?;
            Ok(())
        })?;
        Ok((
            StatusCode::CREATED,
            json!({ "id": id, "key": secret.expose() }),
        ))
    }

    fn patch(&self, id: &str, body: Value) -> Reply {
        let body = fields(
            body,
            &[
                "plan",
                "scopes",
                "metadata",
                "disabled",
                "expires_at",
                "requests_per_minute",
            ],
        )?;
        let mut set: Vec<(&str, Option<toml_edit::Value>)> = Vec::new();
        if let Some(v) = body.get("plan") {
            set.push(("plan", Some(string(v, "plan")?.into())));
        }
        if let Some(v) = body.get("scopes") {
            let scopes = scopes(v)?;
            set.push((
                "scopes",
                (!scopes.is_empty()).then(|| scopes.iter().collect::<toml_edit::Array>().into()),
            ));
        }
        if let Some(v) = body.get("metadata") {
            let metadata = if v.is_null() {
                Vec::new()
            } else {
                metadata(v)?
            };
            set.push((
                "metadata",
                (!metadata.is_empty()).then(|| keys_edit::metadata_table(&metadata).into()),
            ));
        }
        if let Some(v) = body.get("disabled") {
            let disabled = v
                .as_bool()
                .ok_or_else(|| ApiError::field("disabled", "disabled must be true or false"))?;
            set.push(("disabled", disabled.then(|| true.into())));
        }
        if let Some(at) = optional(&body, "expires_at", instant)? {
            set.push(("expires_at", at.map(|at| format_rfc3339(at).into())));
        }
        if let Some(rpm) = optional(&body, "requests_per_minute", rpm)? {
            set.push(("requests_per_minute", rpm.map(|r| i64::from(r).into())));
        }
        if self.redis()? {
            shared::patch(self, id, &set)?;
            return self.get(id);
        }
        self.write(|doc, current| {
            editable(doc, current, id)?;
            if let Some((_, Some(plan))) = set.iter().find(|(f, _)| *f == "plan") {
                known_plan(current, plan.as_str().unwrap_or_default())?;
            }
            for (field, value) in set {
                doc.set_field(id, field, value).map_err(edit_error)?;
            }
            Ok(())
        })?;
        self.get(id)
    }

    fn rotate(&self, id: &str, body: Value, now: u64) -> Reply {
        let body = fields(body, &["overlap", "prefix"])?;
        let Some(overlap) = body.get("overlap") else {
            return Err(ApiError::field(
                "overlap",
                "overlap is required, e.g. \"7d\" (\"0s\" ends the old key at once)",
            ));
        };
        let overlap = parse_duration(&string(overlap, "overlap")?)
            .map_err(|e| ApiError::field("overlap", format!("overlap: {e}")))?;
        let prefix = prefix(&body)?;
        let secret = key::generate(&prefix);
        let old_expires_at = now + overlap.as_secs();
        if self.redis()? {
            shared::rotate(self, id, secret.digest(), old_expires_at, now)?;
        } else {
            self.write(|doc, current| {
                editable(doc, current, id)?;
                doc.rotate(id, secret.digest(), old_expires_at, now)
                    .map_err(edit_error)
            })?;
        }
        Ok((
            StatusCode::CREATED,
            json!({
                "id": id,
                "key": secret.expose(),
                "old_expires_at": format_rfc3339(old_expires_at),
            }),
        ))
    }

    /// One write: re-read, edit, validate the whole config as it would be, write the keys
    /// file atomically, and apply it to the gateway.
    fn write<T>(
        &self,
        edit: impl FnOnce(&mut KeysDocument, &Config) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let _one = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = Config::load_to_serve(&self.config_path).map_err(config_error)?;
        let Some(keys_path) = current.auth.keys_file.clone() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_keys_file",
                "the key API writes keys into auth.keys_file: set it in the config",
            ));
        };
        let mut doc = KeysDocument::read(&keys_path).map_err(edit_error)?;
        let out = edit(&mut doc, &current)?;
        let text = doc.text();
        let config = Config::load_to_serve_with_keys(&self.config_path, &text).map_err(|e| {
            let first = e.to_string().lines().next().unwrap_or_default().to_owned();
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("the keys file would not be valid: {first}"),
            )
        })?;
        keys_edit::write_atomic(&keys_path, text.as_bytes())
            .map_err(|e| internal(&format!("cannot write the keys file: {e}")))?;
        let gateway = self.gateway()?;
        let stay = super::restart_only_changes(&gateway.snapshot().config, &config);
        if stay.is_empty() {
            gateway.reload(config);
        } else {
            // The config file itself changed meanwhile in a way a reload cannot apply; the
            // keys file is written and the next restart applies both.
            tracing::error!(
                settings = stay.join(", "),
                "admin key API: keys file written, but the config file has changes that take a restart; the running keys stay until then"
            );
        }
        Ok(out)
    }
}

/// A key's public view: never a key or digest.
fn view(k: &KeyConfig, source: &str) -> Value {
    let at = |t: Option<u64>| t.map(format_rfc3339);
    let metadata: Map<String, Value> = k
        .metadata
        .iter()
        .map(|(n, v)| (n.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "id": &*k.id.0,
        "plan": &*k.plan.0,
        "scopes": k.scopes,
        "metadata": metadata,
        "disabled": k.disabled,
        "expires_at": at(k.expires_at),
        "digests": k.digests.iter().map(|d| json!({ "expires_at": at(d.expires_at) })).collect::<Vec<_>>(),
        "requests_per_minute": k.requests_per_minute.map(|r| r.get()),
        "created_at": at(k.created_at),
        "source": source,
    })
}

/// The body's fields, refusing any not in `allowed` (400 naming it).
fn fields(body: Value, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        let mut e = ApiError::bad_request(format!(
            "unknown field \"{unknown}\"; allowed: {}",
            allowed.join(", ")
        ));
        e.field = Some(unknown.clone());
        return Err(e);
    }
    Ok(map)
}

/// A field that may be absent (`None`), `null` (`Some(None)`: clear it) or a value.
fn optional<T>(
    body: &Map<String, Value>,
    field: &str,
    parse: impl Fn(&Value, &str) -> Result<T, ApiError>,
) -> Result<Option<Option<T>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => parse(v, field).map(|t| Some(Some(t))),
    }
}

fn string(v: &Value, field: &str) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| ApiError::field(field, format!("{field} must be a string")))
}

fn instant(v: &Value, field: &str) -> Result<u64, ApiError> {
    parse_rfc3339(&string(v, field)?).map_err(|e| ApiError::field(field, format!("{field}: {e}")))
}

fn rpm(v: &Value, field: &str) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            ApiError::field(
                field,
                format!("{field} must be a whole number from 1 to {}", u32::MAX),
            )
        })
}

fn scopes(v: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::field(
            "scopes",
            "scopes must be a list of non-empty strings without spaces",
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|s| {
            s.as_str()
                .filter(|s| !s.is_empty() && !s.chars().any(char::is_whitespace))
                .map(str::to_owned)
                .ok_or_else(bad)
        })
        .collect()
}

fn metadata(v: &Value) -> Result<Vec<(String, String)>, ApiError> {
    let map = v
        .as_object()
        .ok_or_else(|| ApiError::field("metadata", "metadata must be an object of strings"))?;
    if map.len() > MAX_KEY_METADATA {
        return Err(ApiError::field(
            "metadata",
            format!(
                "metadata has {} entries; at most {MAX_KEY_METADATA}",
                map.len()
            ),
        ));
    }
    map.iter()
        .map(|(name, value)| {
            let value = value.as_str().ok_or_else(|| {
                ApiError::field(
                    "metadata",
                    format!("metadata \"{}\" must be a string", name.escape_default()),
                )
            })?;
            check_metadata(name, value).map_err(|e| ApiError::field("metadata", e))?;
            Ok((name.clone(), value.to_owned()))
        })
        .collect()
}

fn prefix(body: &Map<String, Value>) -> Result<String, ApiError> {
    let Some(v) = body.get("prefix") else {
        return Ok(String::new());
    };
    let prefix = string(v, "prefix")?;
    if prefix.len() > 32
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ApiError::field(
            "prefix",
            "prefix may only hold ASCII letters, digits and '_' (at most 32)",
        ));
    }
    Ok(prefix)
}

fn known_plan(config: &Config, plan: &str) -> Result<(), ApiError> {
    if config.plans.keys().any(|p| *p.0 == *plan) {
        return Ok(());
    }
    let known: Vec<&str> = config.plans.keys().map(|p| &*p.0).collect();
    Err(ApiError::field(
        "plan",
        format!(
            "plan \"{}\" is not defined; defined plans: {}",
            plan.escape_default(),
            known.join(", ")
        ),
    ))
}

/// Only keys of the keys file can be changed through the API: 404 for an unknown id, 409
/// for one written in the config file itself.
fn editable(doc: &KeysDocument, config: &Config, id: &str) -> Result<(), ApiError> {
    if doc.ids().iter().any(|i| i == id) {
        return Ok(());
    }
    if config.keys.iter().any(|k| *k.id.0 == *id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "key \"{id}\" is written in the config file, not the keys file; change it there"
            ),
        ));
    }
    Err(ApiError::no_key(id))
}

fn generated_id() -> String {
    let suffix = key::generate("");
    format!("key_{}", &suffix.expose()[..GENERATED_ID_CHARS])
}

fn edit_error(e: KeysEditError) -> ApiError {
    match e {
        KeysEditError::NoSuchKey(id) => ApiError::no_key(&id),
        KeysEditError::DuplicateId(id) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("a key with id \"{id}\" exists already"),
        ),
        other => internal(&other.to_string()),
    }
}

fn config_error(e: ConfigError) -> ApiError {
    let first = e.to_string().lines().next().unwrap_or_default().to_owned();
    internal(&format!("the running config's files do not load: {first}"))
}

fn internal(message: &str) -> ApiError {
    tracing::error!(error = message, "admin key API");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        message.to_owned(),
    )
}
