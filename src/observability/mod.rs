//! Observability: request IDs, the per-request tracing span, log setup, the access log,
//! rate-limited warnings and Prometheus metrics.
//!
//! The first box of the flow after accept: every request gets a [`RequestId`] and a span that
//! every log line of the request is written inside.

pub mod access;
pub mod histogram;
pub mod log_throttle;
pub mod logging;
pub mod metrics;
pub mod request_id;

pub use request_id::RequestId;
