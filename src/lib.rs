//! tollgate: a rate-limiting reverse proxy / API gateway.
//!
//! A request's path through the gateway, one module per box:
//!
//! ```text
//! accept (server/) -> request id + trace span -> route match -> auth -> rate limit -> proxy -> upstream
//!                     (observability/)          (route.rs)    (auth/)   (limit/)     (proxy/)
//! every rejection or failure on the way -> error.rs (one GatewayError -> one envelope renderer)
//! config/ (file structs -> validated Config, hot-swapped)     server/admin.rs (/healthz /readyz /metrics)
//! ```
//!
//! [`stack`] is the one place the pipeline is assembled; [`server`] hands it every request.

#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod config;
pub mod error;
pub mod header_bytes;
pub mod limit;
pub mod observability;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod stack;

pub use config::Config;
pub use error::GatewayError;
pub use server::admin;
pub use server::{Handler, RequestContext, Server};
pub use stack::Gateway;
