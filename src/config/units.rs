//! Durations (`"250ms"`, `"10s"`, `"5m"`) and sizes (`4096`, `"16KiB"`, `"10MiB"`) as ops write them.

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
