//! Where API keys' buckets live: in this process ([`Limiter`], governor) or in Redis, shared by
//! every instance. The request path calls [`LimiterBackend::check`] and does not know which.
//!
//! With Redis, each call is bounded by `limits.backend_timeout`; an error or timeout opens a
//! [`Breaker`] until a background probe ([`probe_waits`]: soon after the failure, then at
//! most every [`MAX_PROBE_INTERVAL`](crate::limit::breaker::MAX_PROBE_INTERVAL)) finds Redis
//! answering, and meanwhile `limits.on_backend_error` decides requests: the key's in-process
//! buckets (`local`), admit (`allow`) or 503 (`deny`). Per-client-IP buckets
//! (`plans.anonymous`) and the IP tripwires are always local.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::{BackendErrorPolicy, LimitBackend, LimitMode, LimitsConfig, RedisConfig};
use crate::error::{FailureKind, GatewayError};
use crate::limit::breaker::{Breaker, probe_waits};
use crate::limit::headers::PolicyHeaders;
use crate::limit::redis::RedisLimiter;
use crate::limit::{Decision, KeyLimits};
use crate::observability::log_throttle::LogThrottle;
use crate::observability::metrics::Metrics;

/// `Retry-After` of the 503 `on_backend_error = "deny"` answers with.
pub const BACKEND_DOWN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The limiter backend of one config snapshot.
#[derive(Debug, Clone)]
pub enum LimiterBackend {
    /// Each key's [`Limiter`], in this process.
    Local,
    /// Redis, with a circuit breaker in front.
    Redis(Arc<Guarded>),
}

/// The Redis limiter behind its circuit breaker.
#[derive(Debug)]
pub struct Guarded {
    redis: RedisLimiter,
    breaker: Breaker,
    /// The latest config's `backend_timeout` in nanoseconds, for the background probes: a
    /// probe slower than requests may be would close the breaker only for requests to time
    /// out again.
    probe_timeout: AtomicU64,
    /// Wakes the prober when an outage begins, and when this is dropped (so that it ends).
    outage_began: Arc<Notify>,
    /// The outage warning's: one line a second however fast Redis flaps.
    warning: LogThrottle,
    /// Whether the current outage's warning was written. One left out is written by the
    /// prober once the throttle allows (the log must not go quiet about an outage that
    /// lasts), and the end of an outage never mentioned is not logged either.
    outage_logged: AtomicBool,
    /// When the current outage began (the start of its first failed call), for the recovery
    /// line's duration.
    outage_since: Mutex<Option<Instant>>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.outage_began.notify_one();
    }
}

impl LimiterBackend {
    /// The backend `limits` asks for, on the Redis `redis` names; the Redis connection (and
    /// breaker state) of `previous` is kept when `[redis]` is unchanged.
    pub fn new(
        limits: &LimitsConfig,
        redis: &RedisConfig,
        previous: Option<&LimiterBackend>,
    ) -> Self {
        match limits.backend {
            LimitBackend::Local => LimiterBackend::Local,
            LimitBackend::Redis => {
                let guarded = match previous {
                    Some(LimiterBackend::Redis(old)) if old.redis.config() == redis => old.clone(),
                    _ => Arc::new(Guarded {
                        redis: RedisLimiter::new(redis),
                        breaker: Breaker::default(),
                        probe_timeout: AtomicU64::new(0),
                        outage_began: Arc::new(Notify::new()),
                        warning: LogThrottle::new(),
                        outage_logged: AtomicBool::new(false),
                        outage_since: Mutex::new(None),
                    }),
                };
                guarded
                    .probe_timeout
                    .store(limits.backend_timeout.as_nanos() as u64, Ordering::Relaxed);
                LimiterBackend::Redis(guarded)
            }
        }
    }

    /// Charges a request of key `id`, whose in-process limits are `local`, to route `route`
    /// at `cost` tokens (see `charge.rs`). The decision comes with the header parts that
    /// describe it.
    ///
    /// `Ok(None)`: admitted without a decision (Redis failed, `on_backend_error = "allow"`);
    /// `Err`: 503 (Redis failed, `deny`).
    pub async fn check<'l>(
        &self,
        id: &str,
        local: &'l KeyLimits,
        (route, cost): (usize, u32),
        limits: &LimitsConfig,
        metrics: &Metrics,
    ) -> Result<Option<(Decision, &'l PolicyHeaders)>, GatewayError> {
        match self {
            LimiterBackend::Local => Ok(Some(local.charge(route, cost))),
            // Boxed: the Redis call's state (the client's futures, a timer) is kilobytes, and
            // inline it would be part of every request's future, copied with each of its
            // moves, whichever backend serves.
            LimiterBackend::Redis(guarded) => {
                Box::pin(guarded.check(id, local, (route, cost), limits, metrics)).await
            }
        }
    }
}

impl Guarded {
    async fn check<'l>(
        self: &Arc<Self>,
        id: &str,
        local: &'l KeyLimits,
        (route, cost): (usize, u32),
        limits: &LimitsConfig,
        metrics: &Metrics,
    ) -> Result<Option<(Decision, &'l PolicyHeaders)>, GatewayError> {
        if self.breaker.is_healthy() {
            let asked = Instant::now();
            let charge = self.redis.charge(id, local, (route, cost));
            let error = match tokio::time::timeout(limits.backend_timeout, charge).await {
                Ok(Ok(decision)) => {
                    if self.breaker.success() {
                        self.log_recovery();
                    }
                    return Ok(Some(decision));
                }
                Ok(Err(error)) => (error.kind(), error.to_string()),
                Err(_) => (
                    "timeout",
                    format!("no answer within {:?}", limits.backend_timeout),
                ),
            };
            let (kind, error) = error;
            metrics.backend_error(kind);
            // One warning per outage at most, not one per request; failed probes are debug.
            if self.breaker.failure() {
                // From the failed call's start: it may have waited for a reconnect.
                *self.outage_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(asked);
                self.start_prober();
                self.outage_began.notify_one();
                let logged = self.warning.admit().map(|suppressed| {
                    tracing::warn!(
                        %error,
                        kind,
                        redis = %self.redis.config().describe(),
                        on_backend_error = policy_name(limits.on_backend_error),
                        suppressed,
                        "redis limiter backend failed; deciding by on_backend_error until it answers"
                    )
                });
                self.outage_logged
                    .store(logged.is_some(), Ordering::Relaxed);
            } else {
                tracing::debug!(%error, kind, "redis limiter backend still failing");
            }
        }
        metrics.backend_fallback(policy_name(limits.on_backend_error));
        match limits.on_backend_error {
            BackendErrorPolicy::Local => Ok(Some(local.charge(route, cost))),
            BackendErrorPolicy::Allow => Ok(None),
            // Shadow mode rejects nothing for rate limits, an unreachable limiter included.
            BackendErrorPolicy::Deny if limits.mode == LimitMode::Shadow => Ok(None),
            BackendErrorPolicy::Deny => Err(GatewayError::ServiceUnavailable {
                kind: FailureKind::BackendDown,
                retry_after: BACKEND_DOWN_RETRY_AFTER,
            }),
        }
    }

    /// Starts, once, the task that probes Redis while the breaker is open. It holds the
    /// backend weakly and ends with it (a reload to another URL).
    fn start_prober(self: &Arc<Self>) {
        if self.breaker.start_prober() {
            tokio::spawn(probe_while_open(
                Arc::downgrade(self),
                self.outage_began.clone(),
            ));
        }
    }

    /// One probe; true when Redis answered and the breaker is closed.
    async fn probe(&self) -> bool {
        let timeout = Duration::from_nanos(self.probe_timeout.load(Ordering::Relaxed));
        let error = match tokio::time::timeout(timeout, self.redis.probe()).await {
            Ok(Ok(())) => {
                if self.breaker.success() {
                    self.log_recovery();
                }
                return true;
            }
            Ok(Err(error)) => (error.kind(), error.to_string()),
            Err(_) => ("timeout", format!("no answer within {timeout:?}")),
        };
        let (kind, error) = error;
        if !self.outage_logged.load(Ordering::Relaxed)
            && let Some(suppressed) = self.warning.readmit()
        {
            self.outage_logged.store(true, Ordering::Relaxed);
            tracing::warn!(
                %error,
                kind,
                redis = %self.redis.config().describe(),
                suppressed,
                "redis limiter backend failed; deciding by on_backend_error until it answers"
            );
        } else {
            tracing::debug!(%error, kind, "redis limiter backend still failing");
        }
        false
    }

    /// The end of an outage: one INFO line with how long it lasted (from its first failure
    /// to the first answer: for a failover, the time requests were decided without Redis).
    fn log_recovery(&self) {
        let since = self
            .outage_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if self.outage_logged.swap(false, Ordering::Relaxed) {
            let outage_ms = since.map_or(0, |s| s.elapsed().as_millis() as u64);
            tracing::info!(
                outage_ms,
                redis = %self.redis.config().describe(),
                "redis limiter backend answering again"
            );
        }
    }
}

/// Waits for each outage, then probes until Redis answers ([`probe_waits`]).
async fn probe_while_open(guarded: Weak<Guarded>, outage_began: Arc<Notify>) {
    loop {
        outage_began.notified().await;
        for wait in probe_waits() {
            tokio::time::sleep(wait).await;
            let Some(guarded) = guarded.upgrade() else {
                return;
            };
            if guarded.breaker.is_healthy() || guarded.probe().await {
                break;
            }
        }
    }
}

fn policy_name(policy: BackendErrorPolicy) -> &'static str {
    match policy {
        BackendErrorPolicy::Local => "local",
        BackendErrorPolicy::Allow => "allow",
        BackendErrorPolicy::Deny => "deny",
    }
}
