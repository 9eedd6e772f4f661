//! Key expiry on the request path: an expired digest is refused (401 "API key has expired"),
//! one close to its expiry is answered with `X-API-Key-Expires` so its client learns of a
//! rotation before it bites. Evaluated per request against the wall clock, so an expiry
//! needs no reload; the [`WallClock`] is injectable, so tests move time instead of waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};

use super::KeyRecord;
use crate::error::GatewayError;
use crate::observability::log_throttle::LogThrottle;

/// `X-API-Key-Expires: <IMF-fixdate>`, on responses to a digest within `auth.expiry_warning`
/// of its expiry.
pub static X_API_KEY_EXPIRES: HeaderName = HeaderName::from_static("x-api-key-expires");

/// The clock expiries are checked against: the system's, or a fake one tests set.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    /// Seconds since the Unix epoch, when faked.
    fake: Option<Arc<AtomicU64>>,
}

impl WallClock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that reads `at` (seconds since the Unix epoch) until [`WallClock::set`].
    pub fn fake(at: u64) -> Self {
        Self {
            fake: Some(Arc::new(AtomicU64::new(at))),
        }
    }

    /// Moves a fake clock to `at`; no-op on the system clock.
    pub fn set(&self, at: u64) {
        if let Some(fake) = &self.fake {
            fake.store(at, Ordering::Relaxed);
        }
    }

    /// Now, in seconds since the Unix epoch. The system clock is read as the limiter reads
    /// it (a TSC reading placed against an anchor that follows the system clock every
    /// 100 ms, `limit::headers::unix_time`): no `clock_gettime` per request.
    #[inline]
    pub fn now(&self) -> u64 {
        match &self.fake {
            Some(fake) => fake.load(Ordering::Relaxed),
            None => crate::limit::headers::unix_time(crate::limit::bucket::tsc_now()).as_secs(),
        }
    }
}

/// One log line a second for expired keys, whatever their number (a client retrying an
/// expired key would otherwise write one per request).
static EXPIRED_LOG: LogThrottle = LogThrottle::new();

/// Refuses an expired digest; for one that expires within `warning`, the instant to announce
/// in `X-API-Key-Expires`. The clock is read only for digests that expire at all.
#[inline]
pub fn check(
    record: &KeyRecord,
    clock: &WallClock,
    warning: Duration,
) -> Result<Option<u32>, GatewayError> {
    let Some(expires) = record.expires() else {
        return Ok(None);
    };
    let now = clock.now();
    if now >= u64::from(expires) {
        if let Some(suppressed) = EXPIRED_LOG.admit() {
            tracing::info!(
                key_id = &*record.id.0,
                reason = "expired",
                suppressed,
                "API key refused: expired"
            );
        }
        return Err(GatewayError::ExpiredApiKey);
    }
    Ok((now + warning.as_secs() >= u64::from(expires)).then_some(expires))
}

/// The `X-API-Key-Expires` value for an expiry: an IMF-fixdate (RFC 9110 5.6.7).
pub fn header_value(expires: u32) -> HeaderValue {
    let at = UNIX_EPOCH + Duration::from_secs(u64::from(expires));
    HeaderValue::from_str(&httpdate::fmt_http_date(at)).expect("an HTTP date is a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_imf_fixdate() {
        assert_eq!(header_value(1_799_971_200), "Fri, 15 Jan 2027 00:00:00 GMT");
    }

    #[test]
    fn a_fake_clock_moves_when_set() {
        let clock = WallClock::fake(10);
        let copy = clock.clone();
        clock.set(20);
        assert_eq!(copy.now(), 20);
        assert!(WallClock::system().now() > 1_700_000_000);
    }
}
