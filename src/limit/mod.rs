//! Rate limiting: per-key token buckets, per-client-IP buckets for public routes, the
//! rate-limit response headers, and per-client-IP tripwires (failed-auth guard, repeated-429
//! throttle).

pub mod bucket;
pub mod headers;
pub mod tripwire;

pub use bucket::{BucketSpec, Decision, KeyedLimiter, Limiter, Window};
pub use tripwire::IpTripwire;
