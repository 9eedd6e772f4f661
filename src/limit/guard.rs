//! The per-client-IP guards around the buckets, and what shadow mode lets through:
//! `limits.failed_auth` (key guessing) and `limits.ip_throttle` (repeated 429s) block a
//! client IP before any key is looked at; `limits.mode = "shadow"` counts and logs what
//! enforcing would have refused, and refuses nothing. Both tripwires outlive reloads.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;

use std::sync::Arc;

use super::{Decision, IpTripwire, Reason};
use crate::config::{LimitMode, LimitsConfig};
use crate::error::GatewayError;
use crate::observability::metrics::{Labels, LimitOutcome, SnapshotMetrics};

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
            metrics.decision(LimitOutcome::WouldLimit, Labels::default());
            tracing::info!(
                decision = "would_limit",
                client_ip = %client,
                "shadow mode: client IP blocked, let through"
            );
            return Ok(());
        }
        metrics.decision(LimitOutcome::IpThrottled, Labels::default());
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

    /// A request over its limit: rejected (and counted towards `ip_throttle`, unless it is
    /// the monthly quota), or in shadow mode let through, logged and counted. `route` is the
    /// request's route prefix, named by a route bucket's 429.
    #[allow(clippy::too_many_arguments)]
    pub fn over_limit(
        &self,
        decision: &Decision,
        client: IpAddr,
        now: Instant,
        limits: &LimitsConfig,
        metrics: &SnapshotMetrics,
        labels: Labels,
        route: &str,
    ) -> Result<(), GatewayError> {
        if decision.reason == Reason::Quota {
            metrics.quota_exhausted(labels.plan);
        }
        if limits.mode == LimitMode::Shadow {
            self.would_limit.fetch_add(1, Ordering::Relaxed);
            metrics.decision(LimitOutcome::WouldLimit, labels);
            tracing::info!(
                decision = "would_limit",
                reason = decision.reason.as_str(),
                window = decision.spec.window.name(),
                route,
                "shadow mode: over the limit, let through"
            );
            return Ok(());
        }
        metrics.decision(LimitOutcome::Limited, labels);
        // A client waiting out its month is not abusive: no count toward ip_throttle.
        if decision.reason == Reason::Quota {
            let decided = super::headers::unix_time(decision.at);
            return Err(GatewayError::QuotaExceeded {
                limit: decision.spec.limit.get(),
                // The next month's first second, which the decision's clock read lands on
                // within a millisecond.
                resets_at: (decided + decision.reset_after + Duration::from_millis(500)).as_secs(),
                retry_after: decision.retry_after,
            });
        }
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
            route: (decision.reason == Reason::Route).then(|| Arc::from(route)),
        })
    }

    /// Forgets expired entries (the server's housekeeping tick).
    pub fn sweep(&self, now: Instant, limits: &LimitsConfig) {
        self.failed_auth.sweep(now, &limits.failed_auth);
        self.ip_throttle.sweep(now, &limits.ip_throttle);
    }
}
