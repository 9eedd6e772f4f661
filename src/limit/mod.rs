//! Rate limiting: per-client-IP tripwires (failed-auth guard, repeated-429 throttle), and
//! (from the limits issue) the per-key token buckets.

pub mod tripwire;

pub use tripwire::IpTripwire;
