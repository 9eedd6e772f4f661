//! The client's IP: the socket peer, or, when the peer is a trusted proxy, the right-most
//! `X-Forwarded-For` hop that is not itself a trusted proxy (nginx's `real_ip_recursive on`).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// Resolves the client IP of a request that arrived from `peer`.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer.ip());
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    // Later headers are later hops: walk every value right to left.
    let values: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for value in values.iter().rev() {
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                // Garbage in the chain: trust nothing left of it.
                return client;
            };
            client = ip;
            if !is_trusted(ip, trusted) {
                return ip;
            }
        }
    }
    client
}

/// Whether `peer` is one of `trusted` (a proxy whose `X-Forwarded-*` headers are believed).
pub fn is_trusted_peer(peer: SocketAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && is_trusted(canonical(peer.ip()), trusted)
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// IPv4-mapped IPv6 addresses are treated as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // "1.2.3.4:5678" or "[::1]:5678"
    hop.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn run(peer: &str, xff: &[&'static str], trusted: &[&str]) -> String {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_static(v));
        }
        let trusted: Vec<IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_ip(peer.parse().unwrap(), &h, &trusted).to_string()
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        assert_eq!(run("198.51.100.7:1", &["203.0.113.1"], &[]), "198.51.100.7");
        assert_eq!(
            run("198.51.100.7:1", &["203.0.113.1"], &["10.0.0.0/8"]),
            "198.51.100.7"
        );
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_hop() {
        let t = &["10.0.0.0/8", "127.0.0.1/32"];
        assert_eq!(run("127.0.0.1:1", &["203.0.113.1"], t), "203.0.113.1");
        assert_eq!(
            run("127.0.0.1:1", &["6.6.6.6, 203.0.113.1, 10.1.1.1"], t),
            "203.0.113.1"
        );
        assert_eq!(
            run("127.0.0.1:1", &["6.6.6.6", "203.0.113.1"], t),
            "203.0.113.1"
        );
        assert_eq!(
            run("127.0.0.1:1", &["10.2.2.2"], t),
            "10.2.2.2",
            "all trusted: left-most"
        );
        assert_eq!(run("127.0.0.1:1", &[], t), "127.0.0.1");
        assert_eq!(run("127.0.0.1:1", &["garbage, 10.3.3.3"], t), "10.3.3.3");
        assert_eq!(
            run("[::ffff:127.0.0.1]:1", &["203.0.113.9"], t),
            "203.0.113.9"
        );
    }
}
