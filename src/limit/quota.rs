//! Monthly quotas (`requests_per_month`): a counter per key over the UTC calendar month,
//! reset at 00:00 UTC on the 1st. Not a bucket: nothing refills during the month.
//!
//! The counter is shared by a key's records across reloads (whatever its limits become) and,
//! with the local backend, written to `limits.state_file` (see `state_file.rs`). It is
//! changed only under the key's charge lock (`charge.rs`), so a check and its increment are
//! one step; readers (the usage endpoint, the state file) read the atomics without it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A month as a count of months since January of year 0 (`year * 12 + month0`).
pub type MonthIndex = u32;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month 1-12) of a day count since 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// The month `unix_secs` falls in (UTC).
pub fn month_of(unix_secs: u64) -> MonthIndex {
    let (year, month) = civil_from_days((unix_secs / 86_400) as i64);
    (year.max(0) as u32) * 12 + (month - 1)
}

/// Unix seconds at 00:00 UTC on the 1st of `month`.
pub fn month_start(month: MonthIndex) -> u64 {
    let (year, month0) = (i64::from(month / 12), month % 12);
    (days_from_civil(year, month0 + 1, 1).max(0) as u64) * 86_400
}

/// (start, end) of the month `unix_secs` falls in: the end is the next month's start.
pub fn period(unix_secs: u64) -> (u64, u64) {
    let month = month_of(unix_secs);
    (month_start(month), month_start(month + 1))
}

/// One key's count of requests in a month.
#[derive(Debug, Default)]
pub struct QuotaCounter {
    /// The month `used` counts in.
    month: AtomicU32,
    /// Tokens charged in that month.
    used: AtomicU64,
}

impl QuotaCounter {
    /// A counter holding `used` for `month` (read from the state file).
    pub fn new(month: MonthIndex, used: u64) -> Self {
        Self {
            month: AtomicU32::new(month),
            used: AtomicU64::new(used),
        }
    }

    /// Tokens charged in the month of `unix_secs` (0 in a month not yet charged).
    pub fn used(&self, unix_secs: u64) -> u64 {
        self.used_in(month_of(unix_secs))
    }

    fn used_in(&self, month: MonthIndex) -> u64 {
        if self.month.load(Ordering::Acquire) == month {
            self.used.load(Ordering::Acquire)
        } else {
            0
        }
    }

    /// (month, used) as stored, for the state file.
    pub fn stored(&self) -> (MonthIndex, u64) {
        (
            self.month.load(Ordering::Acquire),
            self.used.load(Ordering::Acquire),
        )
    }

    /// Whether `cost` more fits in `limit` at `unix_secs`: the count after it, or `None`.
    /// Changes nothing; [`Self::charge`] does, under the same lock.
    pub fn check(&self, limit: u32, cost: u32, unix_secs: u64) -> Option<u64> {
        let after = self.used(unix_secs) + u64::from(cost);
        (after <= u64::from(limit)).then_some(after)
    }

    /// Sets the count read from the state file (before any request).
    pub fn restore(&self, month: MonthIndex, used: u64) {
        self.used.store(used, Ordering::Release);
        self.month.store(month, Ordering::Release);
    }

    /// Records `used` for the month of `unix_secs`. Callers hold the key's charge lock.
    pub fn charge(&self, used: u64, unix_secs: u64) {
        // `used` first: a reader that sees the new month then sees its count (or a newer one).
        self.used.store(used, Ordering::Release);
        self.month.store(month_of(unix_secs), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-31T23:59:50Z
    const NEW_YEARS_EVE: u64 = 1_798_761_590;

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(period(0), (0, 31 * 86_400), "January 1970");
        let (start, end) = period(NEW_YEARS_EVE);
        assert_eq!(start, 1_796_083_200, "2026-12-01T00:00:00Z");
        assert_eq!(end, 1_798_761_600, "2027-01-01T00:00:00Z");
        assert_eq!(end - NEW_YEARS_EVE, 10);
        // February of a leap year, and of a year that is not.
        let feb_2028 = month_start(2028 * 12 + 1);
        assert_eq!(month_start(2028 * 12 + 2) - feb_2028, 29 * 86_400);
        let feb_2027 = month_start(2027 * 12 + 1);
        assert_eq!(month_start(2027 * 12 + 2) - feb_2027, 28 * 86_400);
        assert_eq!(month_of(end - 1) + 1, month_of(end));
    }

    #[test]
    fn a_counter_starts_again_in_a_new_month() {
        let counter = QuotaCounter::default();
        let mut now = NEW_YEARS_EVE;
        for n in 1..=5 {
            let after = counter.check(5, 1, now).expect("within the quota");
            assert_eq!(after, n);
            counter.charge(after, now);
        }
        assert_eq!(counter.check(5, 1, now), None, "the 6th");
        assert_eq!(counter.used(now), 5);
        // Ten seconds later it is January: the count starts from zero.
        now += 10;
        assert_eq!(counter.used(now), 0);
        assert_eq!(counter.check(5, 5, now), Some(5));
        assert_eq!(
            counter.check(5, 6, now),
            None,
            "a cost larger than what is left"
        );
    }
}
