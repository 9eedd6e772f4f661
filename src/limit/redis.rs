//! The Redis limiter backend: one GCRA Lua script (`gcra.lua` beside this file) charges every
//! bucket of a key atomically, so every gateway instance sharing the Redis sees one limit.
//!
//! The script is sent by `EVALSHA` (redis-rs [`Script`] loads it again on `NOSCRIPT`) over the
//! gateway's [`RedisConnection`] (single server, Sentinel or Cluster, see
//! `redis_connection.rs`), which reconnects on its own; the breaker's probe makes a new one
//! and hands it to requests when it finds Redis back. Keys are
//! `tollgate:{<key id>}:<window>:<limit>:<burst>` ([`redis_key`]): the hash tag puts all
//! buckets of a key in one Redis Cluster slot, as a multi-key script requires, and the
//! Cluster client sends the script to that slot's node.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use redis::Script;

use http::HeaderValue;

use crate::config::RedisConfig;
use crate::limit::bucket::tsc_now;
use crate::limit::charge::{Quota, RouteLimiter};
use crate::limit::headers::{PolicyHeaders, unix_time};
use crate::limit::quota::{MonthIndex, month_of, period};
use crate::limit::redis_connection::{RedisConnection, RedisConnector, error_kind};
use crate::limit::{BucketSpec, Decision, KeyLimits, Limiter, Reason};

/// The GCRA script.
const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// Why Redis gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Connection, protocol or script error. A TLS failure says so first, with what to
    /// check: the crate's own words (e.g. "invalid peer certificate: UnknownIssuer") do not.
    #[error("{}{}", tls_hint(.0), .0)]
    Redis(#[from] redis::RedisError),
    /// The script answered something it never returns.
    #[error("unexpected script reply {0:?}")]
    BadReply([i64; 6]),
}

/// Said before a TLS failure: the crate's words ("invalid peer certificate: UnknownIssuer")
/// do not say where to look.
fn tls_hint(error: &redis::RedisError) -> &'static str {
    if error_kind(error) == "tls" {
        "TLS to Redis failed (check redis.ca_file, client_cert and the server's certificate): "
    } else {
        ""
    }
}

impl RedisError {
    /// The `kind` label of `tollgate_limiter_backend_errors_total` (see
    /// [`error_kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            RedisError::Redis(error) => error_kind(error),
            RedisError::BadReply(_) => "other",
        }
    }
}

/// Redis holding every key's buckets.
#[derive(Debug)]
pub struct RedisLimiter {
    connector: RedisConnector,
    /// The connection requests use. Created on first use, inside the runtime (the manager
    /// spawns a task); replaced by the one a successful probe made.
    connection: ArcSwapOption<RedisConnection>,
    /// Held while the first connection is made: a Cluster's reads the slot map, and a burst
    /// of first requests should not each make (and drop) one.
    connecting: tokio::sync::Mutex<()>,
    script: Script,
}

impl RedisLimiter {
    /// A limiter on the Redis `config` names. Nothing connects until the first request.
    pub fn new(config: &RedisConfig) -> Self {
        Self {
            connector: RedisConnector::new(config),
            connection: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            script: Script::new(GCRA_SCRIPT),
        }
    }

    /// The connection config it talks by.
    pub fn config(&self) -> &RedisConfig {
        self.connector.config()
    }

    /// The connection requests use (made on first use): others that keep state in the same
    /// Redis can send through it rather than open their own.
    pub async fn connection(&self) -> Result<RedisConnection, RedisError> {
        if let Some(connection) = &*self.connection.load() {
            return Ok(RedisConnection::clone(connection));
        }
        let _connecting = self.connecting.lock().await;
        // Another request may have made one while this one waited.
        if let Some(connection) = &*self.connection.load() {
            return Ok(RedisConnection::clone(connection));
        }
        let made = Arc::new(self.connector.connect().await?);
        let previous = self
            .connection
            .compare_and_swap(&None::<Arc<RedisConnection>>, Some(made.clone()));
        // A probe may have stored one meanwhile: every request uses the one stored.
        Ok(RedisConnection::clone(previous.as_ref().unwrap_or(&made)))
    }

    /// The circuit breaker's probe: the charge script itself, on a bucket of no key's (its
    /// id holds a control character, which key ids cannot) that expires within a
    /// millisecond. A `PING` would pass on a Redis that answers but cannot run the script (a
    /// read-only replica after a failover, out of memory), and the breaker would close only to
    /// open again on the next request, every probe.
    ///
    /// It runs on a new connection, which becomes the requests' one when the script answers.
    /// The requests' manager would fail the probe once more after Redis is back: a reconnect
    /// that failed while Redis was down (each gives up after its few quick retries) stays its
    /// connection, and it hands that error to the next command before it tries again: the
    /// first probe after a restart would fail, and the outage last a probe interval longer.
    pub async fn probe(&self) -> Result<(), RedisError> {
        let mut connection = self.connector.connect().await?;
        let _: [i64; 6] = self
            .script
            .prepare_invoke()
            .key("tollgate:{\u{1}probe}:minute")
            .arg(1) // cost
            .arg(1) // one bucket
            .arg(0) // no quota
            .arg(0)
            .arg(1) // interval
            .arg(1) // burst
            .invoke_async(&mut connection)
            .await?;
        self.connection.store(Some(Arc::new(connection)));
        Ok(())
    }

    /// Charges a request of key `id` to route `route` at `cost` tokens in Redis: its plan
    /// buckets (smallest window first), its route bucket and its monthly quota, all or none,
    /// in one script run. `local` (the key's in-process limits) gives their parameters and
    /// header parts. With a quota, the key's local counter is set to the count Redis
    /// answered, for `GET /usage` on this instance (and a start for `on_backend_error =
    /// "local"`).
    ///
    /// A connection found dropped (Redis restarted, or an idle connection cut by a firewall)
    /// is tried once more on the new connection the manager makes: otherwise every restart of
    /// Redis would cost a probe interval of `on_backend_error` decisions on a healthy Redis. If the
    /// script ran before the connection dropped, the retry charges the key a second time:
    /// rare, and on the safe side.
    pub async fn charge<'l>(
        &self,
        id: &str,
        local: &'l KeyLimits,
        (route, cost): (usize, u32),
    ) -> Result<(Decision, &'l PolicyHeaders), RedisError> {
        let extras = local.extras.as_deref();
        let charge = Charge {
            plan: &local.limiter,
            route: extras.and_then(|e| e.route(route)),
            quota: extras.and_then(|e| e.quota.as_ref()),
            cost,
        };
        let policy = match (extras, charge.route) {
            (Some(_), Some(route)) => &route.policy,
            (Some(extras), None) => &extras.policy,
            (None, _) => &local.policy,
        };
        let at = tsc_now();
        let now = unix_time(at);
        let reply = match self.charge_once(id, &charge, now).await {
            Err(RedisError::Redis(error))
                if error.is_connection_dropped() && !error.is_connection_refusal() =>
            {
                self.charge_once(id, &charge, now).await
            }
            result => result,
        }?;
        Ok((charge.decision(reply, (now, at))?, policy))
    }

    async fn charge_once(
        &self,
        id: &str,
        charge: &Charge<'_>,
        now: Duration,
    ) -> Result<[i64; 6], RedisError> {
        let mut connection = self.connection().await?;
        let mut invocation = self.script.prepare_invoke();
        let plan = charge.plan.specs();
        let route = charge.route.map_or(&[][..], |r| r.limiter.specs());
        for spec in plan {
            invocation.key(redis_key(id, spec));
        }
        for spec in route {
            let prefix = charge.route.map_or("", |r| &r.prefix);
            invocation.key(route_key(id, prefix, spec));
        }
        let (start, end) = period(now.as_secs());
        if charge.quota.is_some() {
            invocation.key(quota_key(id, month_of(start)));
        }
        invocation
            .arg(charge.cost)
            .arg(plan.len() + route.len())
            .arg(charge.quota.map_or(0, |q| q.limit.get()))
            // A day after the month ends: a late instance (a skewed clock) still finds it.
            .arg(end + 86_400);
        for spec in plan.iter().chain(route) {
            invocation
                .arg(spec.interval().as_micros().max(1) as u64)
                .arg(spec.burst.get());
        }
        Ok(invocation.invoke_async(&mut connection).await?)
    }
}

/// What one request charges: the key's plan buckets, its route bucket and quota if any.
struct Charge<'l> {
    plan: &'l Limiter,
    route: Option<&'l RouteLimiter>,
    quota: Option<&'l Quota>,
    cost: u32,
}

impl Charge<'_> {
    /// The bucket at `index` in the script's order (plan buckets, then route buckets): its
    /// parameters, its `X-RateLimit-Limit` and what kind it is.
    fn bucket(&self, index: usize) -> Option<(BucketSpec, &'static HeaderValue, Reason)> {
        let plan = self.plan.specs();
        if let Some(spec) = plan.get(index) {
            return Some((*spec, self.plan.limit_value(index), Reason::Bucket));
        }
        let route = self.route?;
        let i = index - plan.len();
        let spec = route.limiter.specs().get(i)?;
        Some((*spec, route.limiter.limit_value(i), Reason::Route))
    }

    /// The script's reply as a decision made at (wall clock, TSC reading) `now`.
    fn decision(&self, reply: [i64; 6], now: (Duration, u64)) -> Result<Decision, RedisError> {
        let buckets = self.plan.specs().len() + self.route.map_or(0, |r| r.limiter.specs().len());
        let used = u64::try_from(reply[5]).map_err(|_| RedisError::BadReply(reply))?;
        if reply[0] == 0 && reply[1] == buckets as i64 {
            let quota = self.quota.ok_or(RedisError::BadReply(reply))?;
            return Ok(quota.decision(false, 0, now, buckets));
        }
        let decision = decision(|i| self.bucket(i), reply)?;
        match self.quota {
            Some(quota) if decision.allowed => {
                quota.counter.charge(used, now.0.as_secs());
                let left = u64::from(quota.limit.get()).saturating_sub(used);
                let counted = quota.decision(true, left, now, buckets);
                Ok(if counted.remaining < decision.remaining {
                    counted
                } else {
                    decision
                })
            }
            _ => Ok(decision),
        }
    }
}

/// `tollgate:{<key id>}:<window>:<limit>:<burst>`. A bucket of other parameters is another
/// bucket: a key whose plan or limits change starts full at its new size, as in process, and
/// is not held to a state the old parameters left (a drained deep bucket read as a new
/// shallow one would refuse for as long as the old one took to refill).
pub fn redis_key(id: &str, spec: &BucketSpec) -> String {
    format!(
        "tollgate:{{{id}}}:{}:{}:{}",
        spec.window.name(),
        spec.limit,
        spec.burst
    )
}

/// `tollgate:{<key id>}:route:<prefix>:<window>:<limit>:<burst>`: a key's bucket for one
/// route, carrying its limits as plan buckets do.
pub fn route_key(id: &str, prefix: &str, spec: &BucketSpec) -> String {
    format!(
        "tollgate:{{{id}}}:route:{prefix}:{}:{}:{}",
        spec.window.name(),
        spec.limit,
        spec.burst
    )
}

/// `tollgate:{<key id>}:month:<YYYY-MM>`: a key's quota count in one month. It carries no
/// limit: a changed quota counts on from what was used.
pub fn quota_key(id: &str, month: MonthIndex) -> String {
    format!(
        "tollgate:{{{id}}}:month:{:04}-{:02}",
        month / 12,
        month % 12 + 1
    )
}

/// The script's reply for a bucket as a [`Decision`]; `bucket` gives a bucket's parameters,
/// `X-RateLimit-Limit` and kind by its index.
fn decision(
    bucket: impl Fn(usize) -> Option<(BucketSpec, &'static HeaderValue, Reason)>,
    reply: [i64; 6],
) -> Result<Decision, RedisError> {
    let [allowed, index, remaining, reset_us, retry_us, _] = reply;
    let (spec, limit_value, reason) = usize::try_from(index)
        .ok()
        .and_then(&bucket)
        .filter(|_| remaining >= 0 && reset_us >= 0 && retry_us >= 0)
        .ok_or(RedisError::BadReply(reply))?;
    Ok(Decision {
        allowed: allowed == 1,
        spec,
        bucket: index as usize,
        remaining: u32::try_from(remaining)
            .unwrap_or(u32::MAX)
            .min(spec.burst.get()),
        reset_after: Duration::from_micros(reset_us as u64),
        retry_after: Duration::from_micros(retry_us as u64),
        limit_value,
        // The script ran just before its reply came back.
        at: tsc_now(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Window;
    use std::num::NonZeroU32;

    fn spec(window: Window, limit: u32) -> BucketSpec {
        BucketSpec {
            window,
            limit: NonZeroU32::new(limit).unwrap(),
            burst: NonZeroU32::new(limit).unwrap(),
        }
    }

    #[test]
    fn keys_share_one_hash_tag() {
        assert_eq!(
            redis_key("acme-prod", &spec(Window::Minute, 300)),
            "tollgate:{acme-prod}:minute:300:300"
        );
        assert_eq!(
            redis_key("acme-prod", &spec(Window::Day, 1000)),
            "tollgate:{acme-prod}:day:1000:1000"
        );
    }

    #[test]
    fn route_and_quota_keys_share_the_hash_tag() {
        assert_eq!(
            route_key("acme-prod", "/v1/reports/", &spec(Window::Minute, 10)),
            "tollgate:{acme-prod}:route:/v1/reports/:minute:10:10"
        );
        assert_eq!(
            quota_key("acme-prod", 2026 * 12 + 11),
            "tollgate:{acme-prod}:month:2026-12"
        );
    }

    #[test]
    fn replies_become_decisions() {
        let specs = [spec(Window::Minute, 60), spec(Window::Day, 1000)];
        let local = Limiter::new(&specs, crate::limit::bucket::Tsc);
        let values = |i: usize| {
            specs
                .get(i)
                .map(|s| (*s, local.limit_value(i), Reason::Bucket))
        };
        let d = decision(values, [0, 1, 0, 5_000_000, 1_500, 0]).unwrap();
        assert_eq!(d.limit_value, "1000", "the daily bucket's limit");
        assert!(!d.allowed);
        assert_eq!(d.spec.window, Window::Day);
        assert_eq!(d.retry_after, Duration::from_micros(1_500));
        assert_eq!(d.reset_after, Duration::from_secs(5));
        assert!(
            decision(values, [1, 2, 0, 0, 0, 0]).is_err(),
            "no third bucket"
        );
        assert!(decision(values, [1, 0, -1, 0, 0, 0]).is_err());
    }
}
