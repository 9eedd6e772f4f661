//! Observability: request IDs, the per-request tracing span, log setup and the access log.
//!
//! The first box of the flow after accept: every request gets a [`RequestId`] and a span that
//! every log line of the request is written inside.

pub mod logging;
pub mod request_id;

pub use request_id::RequestId;
