//! Test harness: the real server on 127.0.0.1:0, small real upstreams, and a raw HTTP/1.1
//! client that shows exactly what a client sees on the wire. One file a role:
//!
//! - [`gateway`]: configs and the gateway under test (in process), its `/metrics`;
//! - [`client`]: raw HTTP/1.1 requests and the [`Reply`] a client sees;
//! - [`upstream`]: upstreams to proxy to (echo, counting, raw fault, refusing);
//! - [`assert`]: assertions on replies (envelopes, request IDs, upstream failures);
//! - [`tls_upstream`]: https upstreams and their self-signed certificates;
//! - [`key_store`]: the one-plan [`tollgate::auth::KeyStore`] fixture of unit-level tests;
//! - [`redis_server`]: `redis-server` processes for the Redis deployment tests.

// Each test binary uses its own part of the harness: the rest is unused there.
#![allow(dead_code, unused_imports)]

pub mod assert;
pub mod client;
pub mod gateway;
pub mod key_store;
pub mod redis_server;
pub mod tls_upstream;
pub mod upstream;

pub use assert::*;
pub use client::*;
pub use gateway::*;
pub use upstream::*;
