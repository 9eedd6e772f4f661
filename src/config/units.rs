//! Durations (`"250ms"`, `"10s"`, `"5m"`), sizes (`4096`, `"16KiB"`, `"10MiB"`) and instants
//! (RFC 3339, `"2027-01-15T00:00:00Z"`) as ops write them.

use std::time::Duration;

/// Parses a duration such as `"250ms"`, `"10s"`, `"5m"`, `"1h"` or `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty duration; write it like \"250ms\", \"10s\" or \"5m\"".to_owned());
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration \"{trimmed}\" has no unit; write it like \"{trimmed}s\" or \"{trimmed}ms\""
        ));
    }
    let duration = humantime::parse_duration(trimmed).map_err(|e| {
        format!("invalid duration \"{trimmed}\" ({e}); write it like \"250ms\", \"10s\" or \"5m\"")
    })?;
    // No timeout, window or block needs more, and deadlines computed from larger ones would
    // overflow the clock.
    if duration > MAX_DURATION {
        return Err(format!(
            "duration \"{trimmed}\" is too long; the most is 365d"
        ));
    }
    Ok(duration)
}

/// The longest duration a config may give: 365 days.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a size: a bare number of bytes or a number with a unit: `B`, `KiB`, `MiB`, `GiB`
/// (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000). Unit case is ignored.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let hint = "write it like 16384, \"16KiB\" or \"10MiB\"";
    if number.is_empty() {
        return Err(format!("invalid size \"{trimmed}\"; {hint}"));
    }
    let number: u64 = number
        .parse()
        .map_err(|_| format!("size \"{trimmed}\" is too large"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("invalid size unit in \"{trimmed}\"; {hint}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size \"{trimmed}\" is too large"))
}

/// The latest instant an `expires_at` may name: the end of unsigned 32-bit Unix time
/// (2106-02-07), so a key record keeps its expiry in four bytes of its first cache line.
pub const MAX_UNIX_SECS: u64 = u32::MAX as u64 - 1;

/// Parses an RFC 3339 instant (`"2027-01-15T00:00:00Z"`, `"2027-01-15T01:00:00+01:00"`,
/// fractions of a second allowed and dropped) into seconds since the Unix epoch.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let hint = "write it in RFC 3339, like \"2027-01-15T00:00:00Z\"";
    let bad = || format!("invalid time \"{trimmed}\"; {hint}");
    // humantime reads UTC ("Z") only: a numeric offset is read here and applied after.
    let (utc, offset_secs): (String, i64) = match trimmed.as_bytes() {
        [.., b'Z' | b'z'] => (format!("{}Z", &trimmed[..trimmed.len() - 1]), 0),
        [.., sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()) =>
        {
            let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return Err(bad());
            }
            let offset = (hours * 60 + minutes) * 60;
            (
                format!("{}Z", &trimmed[..trimmed.len() - 6]),
                if *sign == b'+' { offset } else { -offset },
            )
        }
        _ => return Err(bad()),
    };
    let at = humantime::parse_rfc3339_weak(&utc).map_err(|_| bad())?;
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("time \"{trimmed}\" is before 1970"))?
        .as_secs() as i64
        - offset_secs;
    match u64::try_from(secs) {
        Ok(secs) if secs <= MAX_UNIX_SECS => Ok(secs),
        Ok(_) => Err(format!(
            "time \"{trimmed}\" is after 2106-02-07, the latest tollgate keeps"
        )),
        Err(_) => Err(format!("time \"{trimmed}\" is before 1970")),
    }
}

/// Seconds since the Unix epoch as RFC 3339 UTC, `"2027-01-15T00:00:00Z"`.
pub fn format_rfc3339(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix_secs))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:10Z").unwrap(), 10);
        assert_eq!(
            parse_rfc3339("2027-01-15T00:00:00Z").unwrap(),
            1_799_971_200
        );
        assert_eq!(
            parse_rfc3339("2027-01-15T01:30:00+01:30").unwrap(),
            1_799_971_200
        );
        assert_eq!(
            parse_rfc3339("2027-01-14T23:00:00-01:00").unwrap(),
            1_799_971_200
        );
        assert_eq!(
            parse_rfc3339("2027-01-15T00:00:00.250Z").unwrap(),
            1_799_971_200
        );
        assert_eq!(format_rfc3339(1_799_971_200), "2027-01-15T00:00:00Z");
        assert!(
            parse_rfc3339("2027-01-15")
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(parse_rfc3339("2027-01-15T00:00:00").is_err());
        assert!(parse_rfc3339("2027-13-15T00:00:00Z").is_err());
        assert!(
            parse_rfc3339("2200-01-01T00:00:00Z")
                .unwrap_err()
                .contains("2106")
        );
        assert!(parse_rfc3339("1969-12-31T23:00:00Z").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("16 furlongs").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
