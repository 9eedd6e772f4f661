//! The access log: one line per request at target `tollgate::access`, written by the server
//! once the response head is ready, inside the request's span.
//!
//! Fields: `request_id`, `client_ip` (through trusted proxies), `key_id`, `plan`, `method`,
//! `path` (never the query string, which may hold a key), `status`, `upstream_status`,
//! `latency_us`, `upstream_latency_us`, `upstream_target` (`host:port`), `bytes` (response body length when known up front).
//! Never the key itself. Turn it off with `--log-level info,tollgate::access=off`.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{KeyId, PlanName};

/// The log target of access lines.
pub const TARGET: &str = "tollgate::access";

/// What the pipeline knows about a request that the server's access line reports; handed
/// over in the response's extensions (and removed before the response is written).
#[derive(Debug, Clone)]
pub struct AccessInfo {
    /// The client's address, resolved through `server.trusted_proxies`.
    pub client_ip: IpAddr,
    /// The authenticated key's public id.
    pub key_id: Option<KeyId>,
    /// The plan the request was charged to.
    pub plan: Option<PlanName>,
    /// The upstream's status, when one answered.
    pub upstream_status: Option<http::StatusCode>,
    /// Time to the upstream's response head (or failure), when forwarded.
    pub upstream_latency: Option<Duration>,
    /// The finer kind of a failure (`connect_refused`, `timeout`, `backend_down`, …), when the
    /// response is one.
    pub failure_kind: Option<&'static str>,
    /// The `host:port` of the upstream target the request was last sent to.
    pub upstream_target: Option<std::sync::Arc<str>>,
}

impl AccessInfo {
    /// Whether access lines are written at all (a cached callsite check).
    pub fn wanted() -> bool {
        tracing::enabled!(target: TARGET, tracing::Level::INFO)
    }
}
