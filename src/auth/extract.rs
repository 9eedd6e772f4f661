//! Finding the API key in a request: the configured header, `Authorization: Bearer`, or the
//! query parameter when one is configured. Exactly one credential counts; two different ones
//! in one request are refused rather than guessed between.

use std::borrow::Cow;

use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, Uri};

use crate::config::AuthConfig;
pub use crate::config::credential::bearer_token;
use crate::error::GatewayError;

/// Where the credential was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// `auth.header` (default `X-API-Key`).
    Header,
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `?<auth.query_param>=<key>`.
    Query,
}

/// The key bytes a client presented. Never printed.
pub struct Presented<'a> {
    /// The raw key (percent-decoded when it came from the query).
    pub key: Cow<'a, [u8]>,
    /// Where it came from.
    pub source: CredentialSource,
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Presented({:?}, <redacted>)", self.source)
    }
}

/// The one credential of a request, `Ok(None)` when there is none, or
/// `Err(InvalidApiKey)` when two different credentials were sent.
pub fn extract<'a>(
    headers: &'a HeaderMap,
    uri: &'a Uri,
    config: &AuthConfig,
) -> Result<Option<Presented<'a>>, GatewayError> {
    let mut found: Option<Presented<'a>> = None;
    let mut offer = |key: Cow<'a, [u8]>, source| -> Result<(), GatewayError> {
        // An empty value (an unset variable in a client's config) counts as no key.
        if key.is_empty() {
            return Ok(());
        }
        match &found {
            Some(existing) if existing.key != key => Err(GatewayError::InvalidApiKey),
            Some(_) => Ok(()),
            None => {
                found = Some(Presented { key, source });
                Ok(())
            }
        }
    };
    // One pass over the headers, comparing names, instead of two hashed lookups: a request
    // has a handful of headers, and hashing a name (byte by byte) costs more than comparing
    // it with each of them. Header keys are offered before Bearer tokens, as documented.
    // A `Bearer` value is a Bearer token even when `auth.header` is `Authorization` itself:
    // the scheme is never part of a key.
    let mut bearer: Option<&'a [u8]> = None;
    for (name, value) in headers {
        if config.bearer
            && name == AUTHORIZATION
            && let Some(token) = bearer_token(value.as_bytes())
        {
            match bearer {
                _ if token.is_empty() => {}
                Some(seen) if seen != token => return Err(GatewayError::InvalidApiKey),
                _ => bearer = Some(token),
            }
        } else if *name == config.header {
            offer(
                Cow::Borrowed(value.as_bytes().trim_ascii()),
                CredentialSource::Header,
            )?;
        }
    }
    if let Some(token) = bearer {
        offer(Cow::Borrowed(token), CredentialSource::Bearer)?;
    }
    if let (Some(name), Some(query)) = (&config.query_param, uri.query()) {
        for (param, value) in query_pairs(query) {
            if param == name.as_bytes() {
                offer(percent_decode(value), CredentialSource::Query)?;
            }
        }
    }
    Ok(found)
}

/// `a=1&b=2` as raw (undecoded) name/value pairs.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&[u8], &[u8])> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let pair = pair.as_bytes();
        match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        }
    })
}

/// The query without any `name=...` pair, or `None` when nothing is left.
pub fn query_without(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next().is_some_and(|p| p != name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fn percent_decode(value: &[u8]) -> Cow<'_, [u8]> {
    if !value.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(value);
    }
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < value.len() => match (hex(value[i + 1]), hex(value[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Removes the query parameter credential before forwarding, unless `auth.forward_key`.
/// Credential header fields stay in the map: the transport leaves them out as it writes the
/// request ([`AuthConfig::is_credential`]).
pub fn strip_query_credential<B>(request: &mut Request<B>, auth: &AuthConfig) {
    if auth.forward_key {
        return;
    }
    if let (Some(param), Some(query)) = (&auth.query_param, request.uri().query()) {
        // Only rebuild the URI when the parameter is actually there.
        if query_pairs(query).any(|(k, _)| k == param.as_bytes()) {
            let path = request.uri().path();
            let rebuilt = match query_without(query, param) {
                Some(rest) => format!("{path}?{rest}"),
                None => path.to_owned(),
            };
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = rebuilt.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cfg(query: Option<&str>, bearer: bool) -> AuthConfig {
        AuthConfig {
            header: http::HeaderName::from_static("x-api-key"),
            bearer,
            query_param: query.map(str::to_owned),
            forward_key: false,
            keys_file: None,
            expiry_warning: crate::config::DEFAULT_EXPIRY_WARNING,
            store: crate::config::KeyStoreKind::File,
            keys_cache_file: None,
        }
    }

    fn run(
        headers: &[(&'static str, &'static str)],
        uri: &str,
        config: &AuthConfig,
    ) -> Result<Option<(Vec<u8>, CredentialSource)>, GatewayError> {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(*n, HeaderValue::from_static(v));
        }
        let uri: Uri = uri.parse().unwrap();
        extract(&map, &uri, config).map(|p| p.map(|p| (p.key.into_owned(), p.source)))
    }

    #[test]
    fn sources() {
        let c = cfg(Some("api_key"), true);
        assert_eq!(
            run(&[("x-api-key", "k1")], "/", &c).unwrap().unwrap(),
            (b"k1".to_vec(), CredentialSource::Header)
        );
        assert_eq!(
            run(&[("authorization", "Bearer k2")], "/", &c)
                .unwrap()
                .unwrap(),
            (b"k2".to_vec(), CredentialSource::Bearer)
        );
        assert_eq!(
            run(&[("authorization", "bearer   k2 ")], "/", &c)
                .unwrap()
                .unwrap()
                .0,
            b"k2"
        );
        assert_eq!(
            run(&[], "/x?a=1&api_key=k%2B3", &c).unwrap().unwrap(),
            (b"k+3".to_vec(), CredentialSource::Query)
        );
        assert!(run(&[], "/", &c).unwrap().is_none());
        assert!(
            run(&[("authorization", "Basic abc")], "/", &c)
                .unwrap()
                .is_none()
        );
        assert!(run(&[("x-api-key", "")], "/", &c).unwrap().is_none());
    }

    #[test]
    fn an_authorization_header_setting_still_reads_bearer_tokens() {
        let mut c = cfg(None, true);
        c.header = AUTHORIZATION;
        assert_eq!(
            run(&[("authorization", "Bearer k2")], "/", &c)
                .unwrap()
                .unwrap(),
            (b"k2".to_vec(), CredentialSource::Bearer)
        );
        assert_eq!(
            run(&[("authorization", " k1 ")], "/", &c).unwrap().unwrap(),
            (b"k1".to_vec(), CredentialSource::Header)
        );
        assert!(
            run(&[("authorization", "Bearer ")], "/", &c)
                .unwrap()
                .is_none()
        );
        // With `bearer = false` the whole value is the key, as configured.
        c.bearer = false;
        assert_eq!(
            run(&[("authorization", "Bearer k2")], "/", &c)
                .unwrap()
                .unwrap(),
            (b"Bearer k2".to_vec(), CredentialSource::Header)
        );
    }

    #[test]
    fn off_sources_are_ignored() {
        let c = cfg(None, false);
        assert!(
            run(&[("authorization", "Bearer k2")], "/?api_key=k", &c)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn conflicts_are_refused_and_duplicates_allowed() {
        let c = cfg(Some("api_key"), true);
        assert!(
            run(
                &[("x-api-key", "a"), ("authorization", "Bearer b")],
                "/",
                &c
            )
            .is_err()
        );
        assert!(run(&[("x-api-key", "a")], "/?api_key=b", &c).is_err());
        assert!(run(&[("x-api-key", "a"), ("x-api-key", "b")], "/", &c).is_err());
        assert!(
            run(
                &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
                "/",
                &c
            )
            .is_err()
        );
        // Whatever the order in the request, a key header counts before a Bearer token.
        assert_eq!(
            run(
                &[("authorization", "Bearer a"), ("x-api-key", "a")],
                "/",
                &c
            )
            .unwrap()
            .unwrap(),
            (b"a".to_vec(), CredentialSource::Header)
        );
        assert!(
            run(
                &[("x-api-key", "a"), ("authorization", "Bearer a")],
                "/",
                &c
            )
            .unwrap()
            .is_some()
        );
    }

    #[test]
    fn query_rewriting() {
        assert_eq!(
            query_without("a=1&api_key=x&b=2", "api_key").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(query_without("api_key=x", "api_key"), None);
        assert_eq!(&*percent_decode(b"%zz%4"), b"%zz%4");
        assert_eq!(&*percent_decode(b"a%41"), b"aA");
    }
}
