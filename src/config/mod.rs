//! Configuration: the TOML file of SPEC.md, validated into the types the gateway runs on.
//!
//! Two stages, as in Sōzu: [`file`](mod@file) holds serde structs that mirror the file exactly
//! (`deny_unknown_fields`), which `parse` fills from the text `read` got from disk, with every
//! syntax, unknown-key and type error at its place; `validate` then turns them into the
//! [`Config`] below, collecting every other mistake with its file, line and column. Runtime
//! code only sees [`Config`].
//!
//! The bottom floor of the crate: it imports nothing else of it. [`types`] holds the
//! identifiers every floor above shares (plan name, key id, key digest, window), and [`tls`]
//! loads the certificates `[server.tls]` names.

pub mod credential;
pub mod file;
pub mod keys_edit;
mod parse;
mod read;
mod redis;
mod schema;
pub mod tls;
pub mod types;
pub mod units;
mod validate;

pub use read::MAX_FILE_BYTES;
pub use redis::{ClientIdentity, RedisConfig, RedisPassword, RedisTarget, redact_url};
pub use types::{DigestError, KeyDigest, KeyId, PlanName, Window};
pub use validate::{check_metadata, valid_key_id};

use read::read;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, Uri};
use ipnet::IpNet;

/// Default listen address of the gateway.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default admin listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Default `server.header_read_timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `server.body_read_timeout`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `server.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `server.max_header_bytes` (16 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 16 * 1024;
/// The largest `server.max_header_bytes` accepted (8 MiB, Envoy's ceiling too).
pub const MAX_HEADER_BYTES_CEILING: u64 = 8 << 20;
/// Default `server.max_body_bytes` (10 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Most tokio worker threads `server.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;
/// Default `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default `server.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Longest request target accepted before 414 (8 KiB, as SPEC.md fixes it).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields a request may carry before 431, on HTTP/1.1 and HTTP/2 alike (hyper's
/// HTTP/1.1 parser limit, which HTTP/2 does not have).
pub const MAX_HEADER_FIELDS: usize = 100;
/// Default `auth.header`.
pub const DEFAULT_AUTH_HEADER: &str = "x-api-key";
/// Default `auth.expiry_warning`: responses carry `X-API-Key-Expires` this long before an
/// expiry.
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);
/// Most `metadata` entries on one key.
pub const MAX_KEY_METADATA: usize = 16;
/// Longest `metadata` value, in bytes.
pub const MAX_KEY_METADATA_VALUE: usize = 256;
/// Longest `metadata` name.
pub const MAX_KEY_METADATA_NAME: usize = 64;
/// The prefix of the fields that carry a key's metadata upstream (`X-Tollgate-Key-Meta-<Name>`).
pub const KEY_META_HEADER_PREFIX: &str = "x-tollgate-key-meta-";
/// Default `[redis] url` (and `limits.redis_url`).
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default `limits.backend_timeout`.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_millis(20);
/// Default `limits.ip_throttle.rejections`.
pub const DEFAULT_IP_THROTTLE_REJECTIONS: u32 = 100;
/// Default `limits.ip_throttle.window`.
pub const DEFAULT_IP_THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Default `limits.ip_throttle.block_for`.
pub const DEFAULT_IP_THROTTLE_BLOCK: Duration = Duration::from_secs(5 * 60);
/// Default `limits.failed_auth.attempts`.
pub const DEFAULT_FAILED_AUTH_ATTEMPTS: u32 = 20;
/// Default `limits.failed_auth.window`.
pub const DEFAULT_FAILED_AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Default `limits.failed_auth.block_for`.
pub const DEFAULT_FAILED_AUTH_BLOCK: Duration = Duration::from_secs(15 * 60);
/// Built-in plans, present unless the config redefines them: (name, requests per minute).
pub const BUILTIN_PLANS: [(&str, u32); 3] = [("free", 60), ("pro", 300), ("enterprise", 3000)];
/// Default `upstreams.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `upstreams.timeout`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `upstreams.max_inflight`.
pub const DEFAULT_MAX_INFLIGHT: u32 = 1024;
/// Default `upstreams.retry_after`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Default `upstreams.eject_after`.
pub const DEFAULT_EJECT_AFTER: u32 = 5;
/// Default `upstreams.eject_for`.
pub const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(30);
/// Default `upstreams.max_ejected_percent`.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// Default `upstreams.retries`.
pub const DEFAULT_RETRIES: u32 = 1;
/// Default `upstreams.dns_refresh`.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);
/// Default `upstreams.health_check.interval`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Default `upstreams.health_check.timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `upstreams.health_check.healthy_after`.
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// Default `upstreams.health_check.unhealthy_after`.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
/// Default `upstreams.health_check.expect`.
pub const DEFAULT_HEALTH_EXPECT: (u16, u16) = (200, 399);
/// Most `upstreams.retries`.
pub const MAX_RETRIES: u32 = 3;
/// Default `routes.cost`: tokens a request takes from each bucket it is charged to.
pub const DEFAULT_ROUTE_COST: u32 = 1;
/// Largest `routes.cost`.
pub const MAX_ROUTE_COST: u32 = 1000;
/// How often the local backend writes `limits.state_file`.
pub const STATE_FILE_INTERVAL: Duration = Duration::from_secs(10);
/// Default `respond.content_type`.
pub const DEFAULT_RESPOND_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[errors]`.
    pub errors: ErrorsConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[redis]` (or its short form `limits.redis_url`): the one Redis connection.
    pub redis: RedisConfig,
    /// `[plans.*]`, built-ins included, by name.
    pub plans: BTreeMap<PlanName, Plan>,
    /// `[[keys]]` from the config and `auth.keys_file` together.
    pub keys: Vec<KeyConfig>,
    /// `[[upstreams]]`, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[routes]]`, in file order (the router sorts them).
    pub routes: Vec<RouteConfig>,
    /// SHA-256 (hex) of the config text and the `auth.keys_file` text, in that order: which
    /// config is running, for `tollgate_config_info`.
    pub source_hash: String,
}

/// `[server]`: listeners and the limits every client connection gets.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to listen on. Default `0.0.0.0:8080`.
    pub listen: Vec<SocketAddr>,
    /// Tokio worker threads; 0 = one per core, 1 = the current-thread scheduler. Default 0.
    pub workers: usize,
    /// Reload when the config or keys file changes. Default false.
    pub watch: bool,
    /// The whole request head must arrive within this. Default 10 s.
    pub header_read_timeout: Duration,
    /// A request body that stalls this long fails (408); a response the client stops reading
    /// for this long closes the connection. Default 30 s.
    pub body_read_timeout: Duration,
    /// Keep-alive connections idle this long are closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Largest request head (bytes) before 431. Default 16 KiB.
    pub max_header_bytes: u64,
    /// Largest request body (bytes) before 413. Default 10 MiB.
    pub max_body_bytes: u64,
    /// Connections served at once; more wait in the backlog. Default 10000.
    pub max_connections: NonZeroU32,
    /// How long in-flight requests may take to finish on shutdown. Default 30 s.
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-For` is believed. Default none.
    pub trusted_proxies: Vec<IpNet>,
    /// Client header fields with `_` in the name are forwarded (nginx's
    /// `underscores_in_headers`). Default false: they are dropped, since CGI-style servers read
    /// `X_Tollgate_Key_Id` and `X-Tollgate-Key-Id` as one variable. Either way a field that
    /// reads as one tollgate sets or removes (identity, forwarding, the credential) is dropped.
    pub underscores_in_headers: bool,
    /// TLS termination, when configured.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: PEM files, loaded.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// The rustls config built from them (TLS 1.2+, ALPN h2 and http/1.1).
    pub server_config: Arc<rustls::ServerConfig>,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where `/healthz`, `/readyz` and `/metrics` are served. Default `127.0.0.1:9901`.
    pub listen: SocketAddr,
    /// Digest of the admin bearer token that turns on the key API (`/keys`). Default none:
    /// key management is off.
    pub token: Option<KeyDigest>,
}

/// Shape of every error body tollgate writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `{"success":false,"error":{"code","message"},"request_id","timestamp"}` (default).
    Envelope,
    /// `{"detail","code","request_id"}`.
    Detail,
    /// `{"error","code","success":false,"request_id"}`.
    Simple,
}

/// `[errors]`.
#[derive(Debug, Clone)]
pub struct ErrorsConfig {
    /// Body style. Default `envelope`.
    pub style: ErrorStyle,
    /// Rewrite upstream 502/503/504 bodies into the envelope. Default true.
    pub normalize_upstream_5xx: bool,
    /// Static fields added to every error body. Default none.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Header the key is read from. Default `X-API-Key`.
    pub header: HeaderName,
    /// Also accept `Authorization: Bearer <key>`. Default true.
    pub bearer: bool,
    /// Query parameter the key may be read from. Default off.
    pub query_param: Option<String>,
    /// Forward the credential to the upstream. Default false.
    pub forward_key: bool,
    /// A second file holding `[[keys]]`. Default none.
    pub keys_file: Option<PathBuf>,
    /// Responses to a key whose digest expires within this carry `X-API-Key-Expires`.
    /// Default 14 days; zero turns the header off.
    pub expiry_warning: Duration,
    /// Where keys written by the admin API live. Default [`KeyStoreKind::File`].
    pub store: KeyStoreKind,
    /// `auth.store = "redis"`: the last synced keys, for a cold start with Redis down.
    pub keys_cache_file: Option<PathBuf>,
}

/// `auth.store`: where keys written through the admin API are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStoreKind {
    /// In `auth.keys_file` (default).
    File,
    /// In Redis, shared by every instance.
    Redis,
}

impl Config {
    /// Mistakes that do not stop the config (`check` prints them and exits 0): a monthly
    /// quota whose counts a restart would lose.
    pub fn warnings(&self) -> Vec<String> {
        validate::warnings(self)
    }
}

/// Where rate-limit state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBackend {
    /// In this process (default).
    Local,
    /// In Redis, shared by every instance.
    Redis,
}

/// What to do when the Redis backend errors or is slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorPolicy {
    /// Fall back to the in-process limiter (default).
    Local,
    /// Admit the request.
    Allow,
    /// Answer 503.
    Deny,
}

/// Which rate-limit headers are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitHeaders {
    /// `X-RateLimit-*` (default).
    XRateLimit,
    /// `RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    Ietf,
    /// Both sets.
    Both,
}

/// Whether rate-limit decisions reject requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// Reject with 429 (default).
    Enforce,
    /// Decide, log and count, never reject.
    Shadow,
}

/// A per-client-IP tripwire: `count` events within `window` block the IP for `block_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tripwire {
    /// Events (429s or 401s) that trip it.
    pub count: NonZeroU32,
    /// Window the events are counted in.
    pub window: Duration,
    /// How long the IP is blocked once tripped.
    pub block_for: Duration,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Default `local`.
    pub backend: LimitBackend,
    /// A Redis answer slower than this is a backend error. Default 20 ms.
    pub backend_timeout: Duration,
    /// Default `local`.
    pub on_backend_error: BackendErrorPolicy,
    /// Default `x-ratelimit`.
    pub headers: RateLimitHeaders,
    /// Default `enforce`.
    pub mode: LimitMode,
    /// Repeated 429s from one IP. Default 100 in 60 s blocks for 5 min.
    pub ip_throttle: Tripwire,
    /// Repeated 401s from one IP. Default 20 in 60 s blocks for 15 min.
    pub failed_auth: Tripwire,
    /// Local backend: where monthly quota counts are kept across restarts. Default none.
    pub state_file: Option<PathBuf>,
}

/// `[plans.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Refill rate, requests per minute.
    pub requests_per_minute: NonZeroU32,
    /// Bucket capacity. Default `requests_per_minute`.
    pub burst: NonZeroU32,
    /// Optional hourly bucket.
    pub requests_per_hour: Option<NonZeroU32>,
    /// Optional daily bucket.
    pub requests_per_day: Option<NonZeroU32>,
    /// Optional monthly quota per key (a counter, UTC calendar month).
    pub requests_per_month: Option<NonZeroU32>,
    /// Buckets per key per route, by route prefix (`[plans.<name>.routes."<prefix>"]`).
    pub routes: BTreeMap<String, RouteBucket>,
}

/// A route bucket's limits (`[plans.<name>.routes."<prefix>"]` or a key's `routes`): the
/// same buckets a plan has, charged only for requests to that route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteBucket {
    /// Refill rate, requests per minute.
    pub requests_per_minute: NonZeroU32,
    /// Capacity. Default `requests_per_minute`.
    pub burst: NonZeroU32,
    /// Optional hourly bucket.
    pub requests_per_hour: Option<NonZeroU32>,
    /// Optional daily bucket.
    pub requests_per_day: Option<NonZeroU32>,
}

/// `[[keys]]`.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// Public id.
    pub id: KeyId,
    /// The key's digests (one or more; all share the id, plan and buckets), never empty.
    pub digests: Vec<DigestConfig>,
    /// Plan name (exists in [`Config::plans`]).
    pub plan: PlanName,
    /// Scopes held.
    pub scopes: Vec<String>,
    /// Per-key override of the plan's rate.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Revoked: answered like an unknown key.
    pub disabled: bool,
    /// Per-key override of the plan's monthly quota.
    pub requests_per_month: Option<NonZeroU32>,
    /// Per-key route buckets, by route prefix: they replace the plan's for that route (or
    /// add one where the plan has none).
    pub routes: BTreeMap<String, RouteBucket>,
    /// When every digest of the key stops working, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// Sent upstream as `X-Tollgate-Key-Meta-<Name>`: (name, value), names `[a-z0-9_-]`,
    /// values printable ASCII; at most [`MAX_KEY_METADATA`].
    pub metadata: Vec<(String, String)>,
    /// When the key was made (written by the admin API), in seconds since the Unix epoch.
    pub created_at: Option<u64>,
}

/// One digest of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestConfig {
    /// SHA-256 of the key.
    pub digest: KeyDigest,
    /// When this digest stops working (a rotated-out key), in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl DigestConfig {
    /// A digest that never expires on its own.
    pub fn new(digest: KeyDigest) -> Self {
        Self {
            digest,
            expires_at: None,
        }
    }
}

impl KeyConfig {
    /// When `digest` stops working: the earlier of its own and the key's expiry.
    pub fn expiry_of(&self, digest: &DigestConfig) -> Option<u64> {
        match (self.expires_at, digest.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `[[upstreams]]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Name routes refer to.
    pub name: String,
    /// Base URL: scheme, authority and an optional path prefix (the first target's: every
    /// target shares the scheme and the path prefix).
    pub url: Uri,
    /// `targets` (or `url` as the one target), in file order; never empty.
    pub targets: Vec<TargetConfig>,
    /// How requests are spread over `targets`. Default round robin.
    pub balance: Balance,
    /// Consecutive failures (connect refused or timed out, reset before the response head,
    /// response-head timeout) that eject a target; 0 never ejects. Default 5.
    pub eject_after: u32,
    /// A target's first ejection lasts this; each consecutive one twice as long, up to 10x.
    /// Default 30 s.
    pub eject_for: Duration,
    /// Percent of the targets passive ejection may take out at once (rounded down). Default 50.
    pub max_ejected_percent: u32,
    /// Tries after a failure before any byte of the response head, on another target each,
    /// when safe (a one-target upstream: once, on a fresh connection, after a failed
    /// connect). 0 to 3, default 1.
    pub retries: u32,
    /// Hostname targets are resolved again this often (every address is a target). Default
    /// 30 s.
    pub dns_refresh: Duration,
    /// Active probes of every target, when set.
    pub health_check: Option<HealthCheck>,
    /// Refused or unreachable within this: 502. Default 2 s.
    pub connect_timeout: Duration,
    /// No response head within this: 504. Default 30 s.
    pub timeout: Duration,
    /// Concurrent requests before 503. Default 1024.
    pub max_inflight: NonZeroU32,
    /// Answer every request with 503. Default false.
    pub maintenance: bool,
    /// `Retry-After` on this upstream's 503s. Default 30 s.
    pub retry_after: Duration,
    /// Extra CA certificate (PEM) for `https` upstreams.
    pub ca_file: Option<PathBuf>,
}

/// `[upstreams.health_check]`: a `GET path` to every target every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The path (and query) probed.
    pub path: String,
    /// Time between two probes of a target. Default 5 s.
    pub interval: Duration,
    /// A probe without its response head within this failed. Default 2 s.
    pub timeout: Duration,
    /// Good probes in a row that put a failing target back. Default 2.
    pub healthy_after: u32,
    /// Failed probes in a row that take a target out. Default 3.
    pub unhealthy_after: u32,
    /// The statuses a good probe answers, inclusive. Default 200-399.
    pub expect: (u16, u16),
}

/// One target of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Its URL (scheme, authority and the upstream's path prefix).
    pub url: Uri,
    /// Its share of the requests, relative to the other targets'. Default 1.
    pub weight: NonZeroU32,
}

/// `upstreams.balance`: how an upstream's requests are spread over its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// `"round_robin"`: smooth weighted round robin (nginx's), the default.
    RoundRobin,
    /// `"least_inflight"`: the target with the fewest requests in flight; ties go to the
    /// heavier target, then round robin.
    LeastInflight,
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum RouteTarget {
    /// Forward to the upstream at this index of [`Config::upstreams`].
    Upstream(usize),
    /// Answer with a fixed response.
    Respond(FixedResponse),
}

/// `respond = { status, body, content_type }`.
#[derive(Debug, Clone)]
pub struct FixedResponse {
    /// Status code.
    pub status: StatusCode,
    /// Body bytes.
    pub body: bytes::Bytes,
    /// Content type. Default `text/plain; charset=utf-8`.
    pub content_type: http::HeaderValue,
}

/// `[[routes]]`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Path prefix; the longest matching prefix wins.
    pub prefix: String,
    /// Upstream or fixed response.
    pub target: RouteTarget,
    /// Scopes the key must all hold.
    pub scopes: Vec<String>,
    /// Methods allowed; `None` allows all.
    pub methods: Option<Vec<Method>>,
    /// Whether a key is required. Default true.
    pub auth: bool,
    /// Tokens a request takes from every bucket it is charged to (0..=1000); 0: never
    /// charged. Default 1.
    pub cost: u32,
    /// Remove the prefix before forwarding. Default false.
    pub strip_prefix: bool,
}

/// One mistake in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file it is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but has mistakes; every one found is listed.
    #[error("{}", render_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn render_issues(issues: &[ConfigIssue]) -> String {
    let mut out = String::new();
    for (i, issue) in issues.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&issue.to_string());
    }
    out
}

impl ConfigError {
    /// Every issue, or the read error as one issue-less message.
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Invalid(issues) => issues,
            ConfigError::Read { .. } => &[],
        }
    }
}

impl Config {
    /// Reads, parses and validates the config at `path` (and its `auth.keys_file`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        Self::from_text(path, &text)
    }

    /// [`Config::load`] for a config the gateway is to serve: at start, on reload and in
    /// `check`. It must also have a route: a config with none answers every request 404
    /// while `/readyz` says ready, and it is what a file cut short looks like (an editor or
    /// a deploy tool truncates it, then writes it), since routes are written last. The
    /// issue is at the end of the file, where the routes would go.
    pub fn load_to_serve(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let config = Self::from_text(path, &text)?;
        if config.routes.is_empty() {
            return Err(ConfigError::Invalid(vec![validate::no_routes(path, &text)]));
        }
        Ok(config)
    }

    /// Parses and validates config text; `path` is used in messages and `keys_file` is read
    /// from disk.
    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::from_text_with_keys(path, text, None)
    }

    /// [`Config::load_to_serve`] with `keys_text` in place of the keys file's contents: what
    /// the gateway would run if the keys file held `keys_text`, checked before it is written.
    pub fn load_to_serve_with_keys(path: &Path, keys_text: &str) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let config = Self::from_text_with_keys(path, &text, Some(keys_text))?;
        if config.routes.is_empty() {
            return Err(ConfigError::Invalid(vec![validate::no_routes(path, &text)]));
        }
        Ok(config)
    }

    fn from_text_with_keys(
        path: &Path,
        text: &str,
        keys_text: Option<&str>,
    ) -> Result<Config, ConfigError> {
        use sha2::{Digest, Sha256};
        let hasher = std::cell::RefCell::new(Sha256::new_with_prefix(text.as_bytes()));
        let mut config = validate::load(path, text, |path: &Path| {
            let text = match keys_text {
                Some(keys) => keys.to_owned(),
                None => read(path)?,
            };
            hasher.borrow_mut().update(text.as_bytes());
            Ok(text)
        })?;
        config.source_hash = hex(&hasher.into_inner().finalize());
        Ok(config)
    }

    /// The upstream a route forwards to.
    pub fn upstream(&self, index: usize) -> &UpstreamConfig {
        &self.upstreams[index]
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_to_serve_needs_a_route_and_the_error_is_at_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let full = "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nheader = \"X-Key\"\n\
                    [[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\n";
        // Empty, and cut after `[auth]`: valid TOML, valid settings, no routes.
        let cut = &full[..full.find("[[routes]]").unwrap()];
        for (text, line) in [("", 1), (cut, 5)] {
            std::fs::write(&path, text).unwrap();
            assert!(Config::load(&path).is_ok(), "every value is valid");
            let err = Config::load_to_serve(&path).unwrap_err();
            let issues = err.issues();
            assert!(
                issues.len() == 1
                    && (issues[0].line, issues[0].column) == (line, 1)
                    && issues[0]
                        .message
                        .starts_with("no [[routes]]: every request would be answered 404"),
                "{text:?}: {issues:#?}"
            );
        }
        std::fs::write(&path, full).unwrap();
        assert_eq!(Config::load_to_serve(&path).unwrap().routes.len(), 1);
    }
}
