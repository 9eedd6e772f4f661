//! Memory of the per-client-IP table (`plans.anonymous`, governor over dashmap): RSS before
//! and after 1M distinct client IPs each make one request, then after 1M more (the table is
//! full at 1M: each new IP takes the place of the least recently used one, so RSS must stay
//! put). Not a criterion bench: it prints the measured RSS growth.
//!
//! Run: `cargo bench --bench ip_table_memory`   (under `cargo test` it uses 10k IPs)

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use tollgate::limit::ip_table::MAX_TRACKED_CLIENTS;
use tollgate::limit::{BucketSpec, KeyedLimiter, Window};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

fn main() {
    // Test runners (cargo nextest) list a target's tests first: this target is one test.
    if std::env::args().any(|a| a == "--list") {
        if !std::env::args().any(|a| a == "--ignored") {
            println!("ip_table_memory: test");
        }
        return;
    }
    let ips: u32 = if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        10_000
    };
    let spec = BucketSpec {
        window: Window::Minute,
        limit: NonZeroU32::new(30).unwrap(),
        burst: NonZeroU32::new(30).unwrap(),
    };
    let before = rss_kib();
    // Under `cargo test`, a table as much smaller as the run.
    let capacity = MAX_TRACKED_CLIENTS.min(ips as usize);
    let table: KeyedLimiter<IpAddr> =
        KeyedLimiter::with_capacity(&[spec], Default::default(), capacity);
    for n in 0..ips {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        assert!(table.check(&ip).allowed);
    }
    let after = rss_kib();
    assert_eq!(table.len(), ips as usize);
    let grown = after.saturating_sub(before);
    println!(
        "ip_table_memory: {ips} client IPs, RSS {before} KiB -> {after} KiB: +{grown} KiB ({:.0} bytes per IP)",
        grown as f64 * 1024.0 / f64::from(ips)
    );
    for n in ips..2 * ips {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        assert!(table.check(&ip).allowed);
    }
    let full = rss_kib();
    assert_eq!(table.len(), capacity, "the table stays at its cap");
    println!(
        "ip_table_memory: {ips} more client IPs into the full table: RSS {after} KiB -> {full} KiB ({:+} KiB), {} tracked",
        full as i64 - after as i64,
        table.len()
    );
}
