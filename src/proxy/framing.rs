//! The framing and target checks of a client's request head, before routing: a request that a
//! proxy and an upstream could read differently (request smuggling) is refused, never
//! forwarded. Part of the proxy box, beside the header rewriting that relies on them.

use http::Request;
use http::header::{HOST, TRANSFER_ENCODING};

use crate::error::GatewayError;

/// Refuses requests whose framing or target a proxy and an upstream could disagree on
/// (request smuggling): `Transfer-Encoding` together with `Content-Length`, any transfer
/// coding but a single `chunked`, an HTTP/1.1 request without exactly one valid `Host` (RFC
/// 9112 3.2: the upstream, and `X-Forwarded-Host`, would get the attacker's pick), and an
/// absolute-form target or HTTP/2 `:authority` that disagrees with `Host`. hyper already refuses
/// duplicate differing `Content-Length`, HTTP/1.0 with `Transfer-Encoding`, obs-fold, bad
/// chunk sizes and control bytes in headers.
pub fn check<B>(request: &Request<B>) -> Result<(), GatewayError> {
    let headers = request.headers();
    // One pass over the names (standard ones, compared as enum tags) instead of a hashed
    // lookup for each of the two: a request has a handful of fields.
    let (mut coded, mut host, mut hosts) = (false, None, 0);
    for (name, value) in headers {
        if name == TRANSFER_ENCODING {
            coded = true;
        } else if name == HOST {
            host = host.or(Some(value));
            hosts += 1;
        }
    }
    if let Some(why) = coded
        .then(|| super::headers::ambiguous_framing(headers))
        .flatten()
    {
        return Err(GatewayError::BadRequest(why));
    }
    match (host, hosts > 1) {
        (None, _) if request.version() == http::Version::HTTP_11 => {
            return Err(GatewayError::BadRequest("the Host header is missing"));
        }
        (Some(_), true) => {
            return Err(GatewayError::BadRequest("more than one Host header"));
        }
        (Some(host), false) if !valid_host(host.as_bytes()) => {
            return Err(GatewayError::BadRequest(
                "the Host header is not a valid host",
            ));
        }
        _ => {}
    }
    // HTTP/1.1's absolute-form target, or HTTP/2's `:authority` (RFC 9113 8.3.1: a `Host`
    // that names another entity makes the request malformed).
    if let (Some(authority), Some(host)) = (request.uri().authority(), host)
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Err(GatewayError::BadRequest(
            "the Host header disagrees with the request target",
        ));
    }
    Ok(())
}

/// `host[:port]` as RFC 9110 7.2 allows it in `Host` (empty too, for a target without an
/// authority): a URI authority without user info. Checked in place: `http`'s `Authority`
/// parser would copy the value into an allocation on every request.
fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value {
        [b'[', ..] => match value.iter().position(|&b| b == b']') {
            Some(end) => (&value[..=end], &value[end + 1..]),
            None => return false,
        },
        _ => match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        },
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    // RFC 3986: an IP-literal in brackets, or a reg-name / IPv4 address (unreserved,
    // pct-encoded and sub-delims characters).
    let host_ok = match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b":.-_~%!$&'()*+,;=".contains(&b))
        }
        _ => host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b".-_~%!$&'()*+,;=".contains(&b)),
    };
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn host_values() {
        for good in [
            "",
            "t",
            "api.example.com:8080",
            "127.0.0.1",
            "[::1]:8080",
            "[fe80::1%25eth0]",
            "host:",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "x y",
            "user@host",
            "[::1",
            "[::1]x",
            "[]",
            "host:80a",
            "a/b",
            "a:1:2",
            "h\"",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }
}
