//! The Redis limiter backend: one GCRA Lua script (`gcra.lua` beside this file) charges every
//! bucket of a key atomically, so every gateway instance sharing the Redis sees one limit.
//!
//! The script is sent by `EVALSHA` (redis-rs [`Script`] loads it again on `NOSCRIPT`) over one
//! multiplexed [`ConnectionManager`], which reconnects on its own; the breaker's probe makes a
//! new one and hands it to requests when it finds Redis back. Keys are
//! `tollgate:{<key id>}:<window>:<limit>:<burst>` ([`redis_key`]): the hash tag puts all
//! buckets of a key in one Redis Cluster slot, as a multi-key script requires.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use http::HeaderValue;

use crate::limit::headers::PolicyHeaders;
use crate::limit::{BucketSpec, Decision, KeyLimits, Limiter};

/// The GCRA script.
const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// Why Redis gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `limits.redis_url` cannot be used (e.g. `rediss://`, this build has no TLS to Redis).
    #[error("redis_url unusable: {0}")]
    BadUrl(String),
    /// Connection, protocol or script error.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The script answered something it never returns.
    #[error("unexpected script reply {0:?}")]
    BadReply([i64; 5]),
}

/// A Redis server holding every key's buckets.
pub struct RedisLimiter {
    url: String,
    client: Result<Client, String>,
    /// The connection requests use. Created on first use, inside the runtime (the manager
    /// spawns a task); replaced by the one a successful probe made.
    connection: ArcSwapOption<ConnectionManager>,
    script: Script,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A limiter on `url`. Nothing connects until the first request.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            client: Client::open(url).map_err(|e| e.to_string()),
            connection: ArcSwapOption::empty(),
            script: Script::new(GCRA_SCRIPT),
        }
    }

    /// The URL it talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn connection(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(connection) = &*self.connection.load() {
            return Ok(ConnectionManager::clone(connection));
        }
        let made = Arc::new(self.new_connection()?);
        let previous = self
            .connection
            .compare_and_swap(&None::<Arc<ConnectionManager>>, Some(made.clone()));
        // Another request may have made one meanwhile: every request uses the one stored.
        Ok(ConnectionManager::clone(previous.as_ref().unwrap_or(&made)))
    }

    /// A new connection manager; nothing connects until its first command.
    fn new_connection(&self) -> Result<ConnectionManager, RedisError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| RedisError::BadUrl(e.clone()))?;
        // Reconnect quickly and give up soon: the caller's timeout and circuit breaker decide
        // what a slow Redis means, and a failed reconnect is simply tried again on a later call.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None);
        Ok(ConnectionManager::new_lazy_with_config(
            client.clone(),
            config,
        )?)
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
        let mut connection = self.new_connection()?;
        let _: [i64; 5] = self
            .script
            .prepare_invoke()
            .key("tollgate:{\u{1}probe}:minute")
            .arg(1)
            .arg(1)
            .invoke_async(&mut connection)
            .await?;
        self.connection.store(Some(Arc::new(connection)));
        Ok(())
    }

    /// Charges one request of key `id` to its buckets in Redis (smallest window first);
    /// `local` (the key's in-process limiter) gives their parameters and header values.
    ///
    /// A connection found dropped (Redis restarted, or an idle connection cut by a firewall)
    /// is tried once more on the new connection the manager makes: otherwise every restart of
    /// Redis would cost a probe interval of `on_backend_error` decisions on a healthy Redis. If the
    /// script ran before the connection dropped, the retry charges the key a second token:
    /// rare, and on the safe side.
    pub async fn charge<'l>(
        &self,
        id: &str,
        local: &'l KeyLimits,
        (route, cost): (usize, u32),
    ) -> Result<(Decision, &'l PolicyHeaders), RedisError> {
        let _ = (route, cost);
        let decision = match self.charge_once(id, &local.limiter).await {
            Err(RedisError::Redis(error))
                if error.is_connection_dropped() && !error.is_connection_refusal() =>
            {
                self.charge_once(id, &local.limiter).await
            }
            result => result,
        }?;
        Ok((decision, &local.policy))
    }

    async fn charge_once(&self, id: &str, local: &Limiter) -> Result<Decision, RedisError> {
        let specs = local.specs();
        let mut connection = self.connection()?;
        let mut invocation = self.script.prepare_invoke();
        for spec in specs {
            invocation.key(redis_key(id, spec));
        }
        for spec in specs {
            invocation
                .arg(spec.interval().as_micros().max(1) as u64)
                .arg(spec.burst.get());
        }
        let reply: [i64; 5] = invocation.invoke_async(&mut connection).await?;
        decision(specs, reply, |bucket| local.limit_value(bucket))
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

/// The script's reply as a [`Decision`]; `limit_value` gives a bucket's `X-RateLimit-Limit`.
fn decision(
    specs: &[BucketSpec],
    reply: [i64; 5],
    limit_value: impl Fn(usize) -> &'static HeaderValue,
) -> Result<Decision, RedisError> {
    let [allowed, bucket, remaining, reset_us, retry_us] = reply;
    let spec = usize::try_from(bucket)
        .ok()
        .and_then(|i| specs.get(i))
        .filter(|_| remaining >= 0 && reset_us >= 0 && retry_us >= 0)
        .ok_or(RedisError::BadReply(reply))?;
    Ok(Decision {
        allowed: allowed == 1,
        spec: *spec,
        bucket: bucket as usize,
        remaining: u32::try_from(remaining)
            .unwrap_or(u32::MAX)
            .min(spec.burst.get()),
        reset_after: Duration::from_micros(reset_us as u64),
        retry_after: Duration::from_micros(retry_us as u64),
        limit_value: limit_value(bucket as usize),
        // The script ran just before its reply came back.
        at: crate::limit::bucket::tsc_now(),
        reason: crate::limit::bucket::Reason::Bucket,
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
    fn replies_become_decisions() {
        let specs = [spec(Window::Minute, 60), spec(Window::Day, 1000)];
        let local = Limiter::new(&specs, crate::limit::bucket::Tsc);
        let values = |bucket| local.limit_value(bucket);
        let d = decision(&specs, [0, 1, 0, 5_000_000, 1_500], values).unwrap();
        assert_eq!(d.limit_value, "1000", "the daily bucket's limit");
        assert!(!d.allowed);
        assert_eq!(d.spec.window, Window::Day);
        assert_eq!(d.retry_after, Duration::from_micros(1_500));
        assert_eq!(d.reset_after, Duration::from_secs(5));
        assert!(
            decision(&specs, [1, 2, 0, 0, 0], values).is_err(),
            "no third bucket"
        );
        assert!(decision(&specs, [1, 0, -1, 0, 0], values).is_err());
    }
}
