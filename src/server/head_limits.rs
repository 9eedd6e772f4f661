//! The size limits of a request head, checked before anything else: nothing about an
//! oversized request is worth routing. HTTP/1.1 and HTTP/2 get the same rules (hyper's
//! HTTP/1.1 parser refuses the worst heads before they get here, see `timeouts`).

use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Request};

use crate::config::{MAX_HEADER_FIELDS, MAX_URI_BYTES, ServerConfig};
use crate::error::GatewayError;

/// 414 for a target over [`MAX_URI_BYTES`], 431 for a head over `max_header_bytes` or
/// [`MAX_HEADER_FIELDS`] fields, 413 for a declared body over `max_body_bytes`.
pub fn check<B>(request: &Request<B>, server: &ServerConfig) -> Result<(), GatewayError> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(1, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(GatewayError::UriTooLong {
            limit: MAX_URI_BYTES,
        });
    }
    // The whole head: the request line (`GET /path HTTP/1.1`, CRLF), then each field.
    let request_line = request.method().as_str().len() + target + 12;
    let head_bytes: usize = request_line
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    // One rule for both protocols: HTTP/1.1's parser counts fields, HTTP/2 has no count.
    if head_bytes as u64 > server.max_header_bytes || too_many_fields(request.headers()) {
        return Err(GatewayError::HeadersTooLarge {
            limit: server.max_header_bytes,
        });
    }
    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|len| len > server.max_body_bytes) {
        return Err(GatewayError::PayloadTooLarge {
            limit: server.max_body_bytes,
        });
    }
    Ok(())
}

/// More than [`MAX_HEADER_FIELDS`] fields, counting an HTTP/2 client's `Cookie` crumbs (RFC
/// 9113 8.2.3) as the one line they are joined into.
fn too_many_fields(headers: &HeaderMap) -> bool {
    let fields = headers.len();
    if fields <= MAX_HEADER_FIELDS {
        return false;
    }
    let cookies = headers.get_all(http::header::COOKIE).iter().count();
    fields - cookies.saturating_sub(1) > MAX_HEADER_FIELDS
}
