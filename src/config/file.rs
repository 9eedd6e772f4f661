//! The config file as written: serde structs that mirror the TOML of SPEC.md one to one.
//!
//! First stage of the two-stage config (see `validate.rs` for the second). Everything here is
//! `deny_unknown_fields`, and values that need checking beyond their TOML type (durations,
//! sizes, URLs, CIDRs, cross references) are kept as [`Spanned`] raw values so that
//! validation can point at the exact line and column, and report every mistake at once.
//! The field names are also the schema: `schema.rs` reads them to report every unknown key of
//! a file before deserializing, so a field added here is a key the file may hold.
//! Runtime code never sees these types.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A raw string value with its location in the file.
pub type SpannedStr = Spanned<String>;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[server]`: listeners and client-facing limits.
    #[serde(default)]
    pub server: ServerFile,
    /// `[admin]`: health and metrics listener.
    #[serde(default)]
    pub admin: AdminFile,
    /// `[errors]`: error body style.
    #[serde(default)]
    pub errors: ErrorsFile,
    /// `[auth]`: where API keys are read from.
    #[serde(default)]
    pub auth: AuthFile,
    /// `[limits]`: rate limiter backend and throttles.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[redis]`: the Redis connection (single, Sentinel or Cluster; TLS; password).
    pub redis: Option<Spanned<RedisFile>>,
    /// `[plans.<name>]`: per-plan limits.
    #[serde(default)]
    pub plans: BTreeMap<String, Spanned<PlanFile>>,
    /// `[[keys]]`: API keys, by digest.
    #[serde(default)]
    pub keys: Vec<KeyFile>,
    /// `[[upstreams]]`: backends.
    #[serde(default)]
    pub upstreams: Vec<UpstreamFile>,
    /// `[[routes]]`: path prefixes to upstreams or fixed responses.
    #[serde(default)]
    pub routes: Vec<RouteFile>,
}

/// The `auth.keys_file`: only `[[keys]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// `[[keys]]`.
    #[serde(default)]
    pub keys: Vec<KeyFile>,
}

/// One address or a list of them. (Untagged enums lose inner spans, so the span is outside.)
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `listen = "0.0.0.0:8080"`
    One(String),
    /// `listen = ["0.0.0.0:8080", "[::]:8080"]`
    Many(Vec<String>),
}

/// A size: bytes as an integer, or a string such as `"16KiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeFile {
    /// Plain bytes.
    Bytes(i64),
    /// `"16KiB"`, `"10MiB"`, `"512B"`.
    Text(String),
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Option<Spanned<OneOrMany>>,
    pub workers: Option<Spanned<usize>>,
    pub watch: Option<bool>,
    pub header_read_timeout: Option<SpannedStr>,
    pub body_read_timeout: Option<SpannedStr>,
    pub idle_timeout: Option<SpannedStr>,
    pub max_header_bytes: Option<Spanned<SizeFile>>,
    pub max_body_bytes: Option<Spanned<SizeFile>>,
    pub max_connections: Option<Spanned<i64>>,
    pub shutdown_grace: Option<SpannedStr>,
    pub trusted_proxies: Option<Vec<SpannedStr>>,
    pub underscores_in_headers: Option<bool>,
    pub tls: Option<TlsFile>,
}

/// `[server.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: SpannedStr,
    pub key: SpannedStr,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<SpannedStr>,
    pub token: Option<SpannedStr>,
}

/// `[errors]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorsFile {
    pub style: Option<SpannedStr>,
    pub normalize_upstream_5xx: Option<bool>,
    pub fields: Option<Spanned<BTreeMap<String, toml::Value>>>,
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub header: Option<SpannedStr>,
    pub bearer: Option<bool>,
    pub query_param: Option<SpannedStr>,
    pub forward_key: Option<bool>,
    pub keys_file: Option<SpannedStr>,
    pub expiry_warning: Option<SpannedStr>,
    pub store: Option<SpannedStr>,
    pub keys_cache_file: Option<SpannedStr>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub backend: Option<SpannedStr>,
    pub redis_url: Option<SpannedStr>,
    pub backend_timeout: Option<SpannedStr>,
    pub on_backend_error: Option<SpannedStr>,
    pub headers: Option<SpannedStr>,
    pub mode: Option<SpannedStr>,
    pub ip_throttle: Option<IpThrottleFile>,
    pub failed_auth: Option<FailedAuthFile>,
    pub state_file: Option<SpannedStr>,
}

/// `[redis]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    pub url: Option<SpannedStr>,
    pub sentinels: Option<Spanned<Vec<SpannedStr>>>,
    pub master_name: Option<SpannedStr>,
    pub cluster: Option<Spanned<Vec<SpannedStr>>>,
    pub password_env: Option<SpannedStr>,
    pub ca_file: Option<SpannedStr>,
    pub client_cert: Option<SpannedStr>,
    pub client_key: Option<SpannedStr>,
}

/// `[limits.ip_throttle]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpThrottleFile {
    pub rejections: Option<Spanned<i64>>,
    pub window: Option<SpannedStr>,
    pub block_for: Option<SpannedStr>,
}

/// `[limits.failed_auth]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedAuthFile {
    pub attempts: Option<Spanned<i64>>,
    pub window: Option<SpannedStr>,
    pub block_for: Option<SpannedStr>,
}

/// `[plans.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    pub requests_per_minute: Spanned<i64>,
    pub burst: Option<Spanned<i64>>,
    pub requests_per_hour: Option<Spanned<i64>>,
    pub requests_per_day: Option<Spanned<i64>>,
    pub requests_per_month: Option<Spanned<i64>>,
    /// `[plans.<name>.routes."<prefix>"]`: a bucket per key for that route.
    #[serde(default)]
    pub routes: BTreeMap<String, Spanned<RouteBucketFile>>,
}

/// `[plans.<name>.routes."<prefix>"]`, or a key's `routes = { "<prefix>" = { ... } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteBucketFile {
    pub requests_per_minute: Spanned<i64>,
    pub burst: Option<Spanned<i64>>,
    pub requests_per_hour: Option<Spanned<i64>>,
    pub requests_per_day: Option<Spanned<i64>>,
}

/// `[[keys]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub id: SpannedStr,
    pub key: Spanned<KeyDigestsFile>,
    pub plan: SpannedStr,
    #[serde(default)]
    pub scopes: Vec<SpannedStr>,
    pub requests_per_minute: Option<Spanned<i64>>,
    #[serde(default)]
    pub disabled: bool,
    pub requests_per_month: Option<Spanned<i64>>,
    /// Per-route bucket overrides, by route prefix.
    #[serde(default)]
    pub routes: BTreeMap<String, Spanned<RouteBucketFile>>,
    pub expires_at: Option<SpannedStr>,
    pub metadata: Option<Spanned<BTreeMap<String, String>>>,
    pub created_at: Option<SpannedStr>,
}

/// `key = "sha256:..."`, or a list of digests of one key id. (Untagged enums lose inner
/// spans, so the span is outside.)
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum KeyDigestsFile {
    /// One digest.
    One(String),
    /// `["sha256:<new>", { digest = "sha256:<old>", expires_at = "..." }]`.
    Many(Vec<DigestEntryFile>),
}

/// One digest in a `key = [...]` list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DigestEntryFile {
    /// `"sha256:..."`.
    Digest(String),
    /// `{ digest = "sha256:...", expires_at = "2027-01-15T00:00:00Z" }`.
    Expiring(ExpiringDigestFile),
}

/// `{ digest, expires_at }` in a `key = [...]` list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpiringDigestFile {
    pub digest: String,
    pub expires_at: Option<String>,
}

/// `[[upstreams]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub name: SpannedStr,
    pub url: Option<SpannedStr>,
    pub targets: Option<Spanned<Vec<Spanned<TargetFile>>>>,
    pub balance: Option<SpannedStr>,
    pub eject_after: Option<Spanned<i64>>,
    pub eject_for: Option<SpannedStr>,
    pub max_ejected_percent: Option<Spanned<i64>>,
    pub retries: Option<Spanned<i64>>,
    pub dns_refresh: Option<SpannedStr>,
    pub health_check: Option<Spanned<HealthCheckFile>>,
    pub connect_timeout: Option<SpannedStr>,
    pub timeout: Option<SpannedStr>,
    pub max_inflight: Option<Spanned<i64>>,
    #[serde(default)]
    pub maintenance: bool,
    pub retry_after: Option<SpannedStr>,
    pub ca_file: Option<SpannedStr>,
}

/// `[upstreams.health_check]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub path: SpannedStr,
    pub interval: Option<SpannedStr>,
    pub timeout: Option<SpannedStr>,
    pub healthy_after: Option<Spanned<i64>>,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub expect: Option<SpannedStr>,
}

/// One of `targets`: a URL, or a URL with a weight. (Untagged enums lose inner spans, so the
/// span is outside.)
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TargetFile {
    /// `"http://10.0.0.11:3000"`, weight 1.
    Url(String),
    /// `{ url = "http://10.0.0.12:3000", weight = 2 }`.
    Weighted(WeightedTargetFile),
}

/// `{ url = "...", weight = 2 }` in `targets`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedTargetFile {
    pub url: String,
    pub weight: Option<i64>,
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub prefix: SpannedStr,
    pub upstream: Option<SpannedStr>,
    #[serde(default)]
    pub scopes: Vec<SpannedStr>,
    pub methods: Option<Vec<SpannedStr>>,
    pub auth: Option<bool>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub respond: Option<Spanned<RespondFile>>,
    pub cost: Option<Spanned<i64>>,
}

/// `respond = { status = 200, body = "ok", content_type = "text/plain" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondFile {
    pub status: Spanned<i64>,
    #[serde(default)]
    pub body: String,
    pub content_type: Option<String>,
}
