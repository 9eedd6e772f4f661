//! Rate limiting: per-key token buckets (in process, or in Redis shared by every instance,
//! behind one [`LimiterBackend`]), per-client-IP buckets for public routes, the rate-limit
//! response headers, and per-client-IP tripwires (failed-auth guard, repeated-429 throttle).

pub mod backend;
pub mod breaker;
pub mod bucket;
pub mod charge;
pub mod guard;
pub mod headers;
pub mod ip_table;
pub mod quota;
pub mod reason;
pub mod redis;
pub mod redis_connection;
pub mod state_file;
pub mod tripwire;

pub use backend::LimiterBackend;
pub use bucket::{BucketSpec, Decision, KeyedLimiter, Limiter, Reason, Window};
pub use guard::Guard;
pub use tripwire::{IpTripwire, limit_key};

/// One key's buckets and the header parts that describe them, in one allocation: every
/// request charges the one and reads the other, so they share cache lines. Shared by the
/// key's records across reloads while its limits are unchanged.
#[derive(Debug)]
#[repr(C)]
pub struct KeyLimits {
    /// The token buckets.
    pub limiter: Limiter,
    /// The per-key parts of the rate-limit headers.
    pub policy: headers::PolicyHeaders,
    /// The plan's name (header policy names).
    pub plan_name: std::sync::Arc<str>,
    /// Route buckets and the monthly quota, for keys that have either (see `charge.rs`).
    pub extras: Option<Box<charge::Extras>>,
}
