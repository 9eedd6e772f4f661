//! Key expiry on the request path: an expired digest is refused (401 "API key has expired"),
//! one close to its expiry is answered with `X-API-Key-Expires` so its client learns of a
//! rotation before it bites. Evaluated per request against the wall clock, so an expiry
//! needs no reload; the [`WallClock`] is injectable, so tests move time instead of waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    /// Now, in seconds since the Unix epoch. The system clock is read through a coarse copy
    /// that a thread of its own refreshes every [`COARSE_TICK`]: one atomic load per
    /// request, no clock read (a `clock_gettime` is about 50 ns on a VM, a TSC reading
    /// placed against a wall-clock anchor about 30). An expiry takes effect within a tick.
    #[inline]
    pub fn now(&self) -> u64 {
        match &self.fake {
            Some(fake) => fake.load(Ordering::Relaxed),
            None => coarse_now(),
        }
    }
}

/// How often the coarse wall clock is refreshed.
pub const COARSE_TICK: Duration = Duration::from_millis(100);

/// The coarse wall clock: seconds since the Unix epoch; 0 until started (or when no thread
/// could be started to keep it: then every read asks the system).
static COARSE_SECS: AtomicU64 = AtomicU64::new(0);
static COARSE_TICKER: Once = Once::new();

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_secs())
}

#[inline]
fn coarse_now() -> u64 {
    let now = COARSE_SECS.load(Ordering::Relaxed);
    if now != 0 {
        return now;
    }
    COARSE_TICKER.call_once(|| {
        COARSE_SECS.store(system_now(), Ordering::Relaxed);
        let ticker = std::thread::Builder::new()
            .name("wall-clock".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(COARSE_TICK);
                    COARSE_SECS.store(system_now(), Ordering::Relaxed);
                }
            });
        if let Err(e) = ticker {
            COARSE_SECS.store(0, Ordering::Relaxed);
            tracing::warn!(error = %e, "cannot start the wall-clock thread; key expiries read the system clock per request");
        }
    });
    match COARSE_SECS.load(Ordering::Relaxed) {
        0 => system_now(),
        now => now,
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
        let system = WallClock::system().now();
        assert!(system.abs_diff(system_now()) <= 1, "{system}");
    }
}
