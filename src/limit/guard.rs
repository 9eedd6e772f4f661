//! The per-client-IP guards around the buckets, and what shadow mode lets through:
//! `limits.failed_auth` (key guessing) and `limits.ip_throttle` (repeated 429s) block a
//! client IP before any key is looked at; `limits.mode = "shadow"` counts and logs what
//! enforcing would have refused, and refuses nothing. Both tripwires outlive reloads.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::StatusCode;

use super::{Decision, IpTripwire};
use crate::config::{LimitMode, LimitsConfig};
use crate::error::GatewayError;
use crate::observability::metrics::{LimitOutcome, SnapshotMetrics};

/// The tripwires of every client IP, and the count of what shadow mode let through.
#[derive(Debug, Default)]
pub struct Guard {
    /// `limits.failed_auth`.
    failed_auth: IpTripwire,
    /// `limits.ip_throttle`.
    ip_throttle: IpTripwire,
    /// Requests shadow mode let through that enforce mode would have rejected.
    would_limit: AtomicU64,
}

impl Guard {
    /// Requests shadow mode let through that enforce mode would have rejected.
    pub fn would_limit_count(&self) -> u64 {
        self.would_limit.load(Ordering::Relaxed)
    }

    /// 429 `ip_throttled` for a client IP that either tripwire blocks (in shadow mode: let
    /// through, logged and counted).
    pub fn admit(
        &self,
        client: IpAddr,
        now: Instant,
        limits: &LimitsConfig,
        metrics: &SnapshotMetrics,
    ) -> Result<(), GatewayError> {
        // Blocked by both: the later end, or the retry would be refused again.
        let blocks = [
            self.failed_auth.blocked(client, now),
            self.ip_throttle.blocked(client, now),
        ];
        let Some(wait) = blocks.into_iter().flatten().max() else {
            return Ok(());
        };
        // Shadow mode rejects nothing for rate limits, IP blocks included.
        if limits.mode == LimitMode::Shadow {
            self.would_limit.fetch_add(1, Ordering::Relaxed);
            metrics.decision(LimitOutcome::WouldLimit, None);
            tracing::info!(
                decision = "would_limit",
                client_ip = %client,
                "shadow mode: client IP blocked, let through"
            );
            return Ok(());
        }
        metrics.decision(LimitOutcome::IpThrottled, None);
        Err(GatewayError::IpThrottled { retry_after: wait })
    }

    /// Counts a 401 against the client IP for `limits.failed_auth`.
    pub fn failed_auth(
        &self,
        error: &GatewayError,
        client: IpAddr,
        now: Instant,
        limits: &LimitsConfig,
    ) {
        if error.status() != StatusCode::UNAUTHORIZED {
            return;
        }
        let rule = &limits.failed_auth;
        if self.failed_auth.record(client, now, rule) {
            tracing::warn!(client_ip = %client, block_for = ?rule.block_for, "failed-auth guard tripped: client IP blocked");
        }
    }

    /// A request over its limit: rejected (and counted towards `ip_throttle`), or in shadow
    /// mode let through, logged and counted.
    pub fn over_limit(
        &self,
        decision: &Decision,
        client: IpAddr,
        now: Instant,
        limits: &LimitsConfig,
        metrics: &SnapshotMetrics,
        plan: Option<usize>,
    ) -> Result<(), GatewayError> {
        if limits.mode == LimitMode::Shadow {
            self.would_limit.fetch_add(1, Ordering::Relaxed);
            metrics.decision(LimitOutcome::WouldLimit, plan);
            tracing::info!(
                decision = "would_limit",
                window = decision.spec.window.name(),
                "shadow mode: over the limit, let through"
            );
            return Ok(());
        }
        metrics.decision(LimitOutcome::Limited, plan);
        if self.ip_throttle.record(client, now, &limits.ip_throttle) {
            tracing::warn!(client_ip = %client, block_for = ?limits.ip_throttle.block_for, "ip throttle tripped: client IP blocked after repeated 429s");
            // The 429 that trips the block says so: told the key's wait, the client would be
            // refused again when it retries.
            return Err(GatewayError::IpThrottled {
                retry_after: limits.ip_throttle.block_for.max(decision.retry_after),
            });
        }
        Err(GatewayError::RateLimited {
            limit: decision.spec.limit.get(),
            window: decision.spec.window,
            retry_after: decision.retry_after,
        })
    }

    /// Forgets expired entries (the server's housekeeping tick).
    pub fn sweep(&self, now: Instant, limits: &LimitsConfig) {
        self.failed_auth.sweep(now, &limits.failed_auth);
        self.ip_throttle.sweep(now, &limits.ip_throttle);
    }
}
