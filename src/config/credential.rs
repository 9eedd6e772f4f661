//! Which request fields carry the client's credential under `[auth]`: what authentication
//! reads, and what is left out of the request the upstream sees unless `auth.forward_key`.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::AuthConfig;

/// The token of `Bearer <token>` (scheme case-insensitive), or `None` for other schemes.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let rest = &value[6..];
    match rest.first() {
        None => Some(rest),
        Some(b' ' | b'\t') => Some(rest.trim_ascii()),
        Some(_) => None,
    }
}

impl AuthConfig {
    /// Whether a request field carries a credential: every line of `auth.header`, and with
    /// `auth.bearer` every `Authorization: Bearer` line (other schemes are the upstream's).
    #[inline]
    pub fn is_credential(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        *name == self.header
            || (self.bearer && name == AUTHORIZATION && bearer_token(value.as_bytes()).is_some())
    }

    /// Removes every credential field from `headers` ([`Self::is_credential`]).
    pub fn remove_credentials(&self, headers: &mut HeaderMap) {
        headers.remove(&self.header);
        let bearer = |v: &HeaderValue| self.is_credential(&AUTHORIZATION, v);
        if self.bearer && headers.get_all(AUTHORIZATION).iter().any(bearer) {
            let kept: Vec<HeaderValue> = (headers.get_all(AUTHORIZATION).iter())
                .filter(|v| !bearer(v))
                .cloned()
                .collect();
            headers.remove(AUTHORIZATION);
            for value in kept {
                headers.append(AUTHORIZATION, value);
            }
        }
    }
}
