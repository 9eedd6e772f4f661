//! Header rewriting between client and upstream: hop-by-hop headers go, `X-Forwarded-*` and
//! `X-Request-Id` are set.

use http::header::{
    CONNECTION, CONTENT_LENGTH, COOKIE, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use std::borrow::Cow;

use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::ClientInfo;
use crate::config::AuthConfig;
// The key's metadata, one field per entry: `X-Tollgate-Key-Meta-<Name>`.
use crate::config::KEY_META_HEADER_PREFIX as KEY_META_PREFIX;
use crate::observability::RequestId;
use crate::observability::request_id::X_REQUEST_ID;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Who the request authenticated as, for the upstream. Identity headers are set by the gateway
/// alone: client copies are always removed.
pub(crate) static X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
/// The key's plan, for the upstream.
pub(crate) static X_TOLLGATE_PLAN: HeaderName = HeaderName::from_static("x-tollgate-plan");

/// Headers the gateway sets or reads for the upstream, which a sender cannot remove by
/// naming them in `Connection` (else a client could hide its identity, or the address chain
/// a trusted proxy built, from the upstream).
fn protected(name: &HeaderName) -> bool {
    name == HOST || *name == X_FORWARDED_FOR || is_identity(name)
}

/// The identity fields: `X-Tollgate-Key-Id`, `X-Tollgate-Plan`, `X-Tollgate-Key-Meta-*`.
fn is_identity(name: &HeaderName) -> bool {
    *name == X_TOLLGATE_KEY_ID
        || *name == X_TOLLGATE_PLAN
        || name.as_str().starts_with(KEY_META_PREFIX)
}

/// An authenticated request's key id, plan and metadata headers.
pub type IdentityHeaders<'a> = (
    &'a HeaderValue,
    &'a HeaderValue,
    &'a [(HeaderName, HeaderValue)],
);

/// Removes every copy of `X-Tollgate-Key-Id`, `X-Tollgate-Plan` and the
/// `X-Tollgate-Key-Meta-*` fields the client sent, so they cannot be spoofed: the gateway
/// alone sets them ([`Added`]). Names are lower case in a `HeaderMap`, so a client's copy is
/// found in any spelling; `_` spellings go in [`drop_underscored`].
pub fn strip_identity(headers: &mut HeaderMap) {
    // Almost no request has one: one pass over the names (a custom name is compared only
    // with names of its length), no hashed lookup, no allocation.
    if !headers.keys().any(is_identity) {
        return;
    }
    let spoofed: Vec<HeaderName> = headers.keys().filter(|n| is_identity(n)).cloned().collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// The fields tollgate sets on a request it forwards, kept beside the request's header map:
/// a pooled connection writes them after the map's own, and saves a hashed insert for each
/// (custom names are hashed byte by byte); other transports insert them
/// ([`Added::insert_into`]). The client's copies are gone from the map by then
/// ([`prepare_request`], [`strip_identity`]).
///
/// The client's credential fields are still in the map: a pooled connection leaves them out
/// as it writes it ([`Added::withholds`]), and saves their hashed removal; other transports
/// remove them first.
#[derive(Debug, Clone, Default)]
pub struct Added<'a> {
    forwarded_for: Option<Cow<'a, HeaderValue>>,
    forwarded_proto: Option<HeaderValue>,
    forwarded_host: Option<HeaderValue>,
    request_id: Option<&'a HeaderValue>,
    identity: Option<IdentityHeaders<'a>>,
    /// `[auth]`, whose credential fields are withheld; `None` with `auth.forward_key`.
    credential: Option<&'a AuthConfig>,
}

impl<'a> Added<'a> {
    /// The fields, by name, in the order they are written.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let (key_id, plan, metadata) = match self.identity {
            Some((key_id, plan, metadata)) => (Some(key_id), Some(plan), metadata),
            None => (None, None, &[][..]),
        };
        [
            (&X_FORWARDED_FOR, self.forwarded_for.as_deref()),
            (&X_FORWARDED_PROTO, self.forwarded_proto.as_ref()),
            (&X_FORWARDED_HOST, self.forwarded_host.as_ref()),
            (&X_REQUEST_ID, self.request_id),
            (&X_TOLLGATE_KEY_ID, key_id),
            (&X_TOLLGATE_PLAN, plan),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .chain(metadata.iter().map(|(name, value)| (name, value)))
    }

    /// Whether the map's field `name: value` is left out of the request: a credential.
    #[inline]
    pub fn withholds(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        self.credential
            .is_some_and(|auth| auth.is_credential(name, value))
    }

    /// Removes the credential fields from `headers` and inserts the added ones, for a
    /// transport that writes the map alone.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        if let Some(auth) = self.credential {
            auth.remove_credentials(headers);
        }
        for (name, value) in self.fields() {
            headers.insert(name, value.clone());
        }
    }

    /// The identity of the key the request authenticated with, if any.
    pub fn with_identity(mut self, identity: Option<IdentityHeaders<'a>>) -> Self {
        self.identity = identity;
        self
    }

    /// Withholds the credential fields `auth` names (`None`: `auth.forward_key`).
    pub fn with_credential(mut self, auth: Option<&'a AuthConfig>) -> Self {
        self.credential = auth;
        self
    }
}

/// Removes client fields with `_` in the name before forwarding: every one unless
/// `server.underscores_in_headers` (`allowed`), as nginx ignores them by default, and always
/// those that, read with `_` as `-` (as CGI, WSGI, PHP and many frameworks read names),
/// stand for a field tollgate sets or removes. Else a client's `X_Tollgate_Key_Id: admin`
/// would reach such an upstream as the identity tollgate vouches for.
pub fn drop_underscored(headers: &mut HeaderMap, allowed: bool, credential: &HeaderName) {
    // Almost no request has one: one pass over the names, no allocation.
    if !headers.keys().any(|name| name.as_str().contains('_')) {
        return;
    }
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            name.as_str().contains('_') && (!allowed || stands_for_ours(name.as_str(), credential))
        })
        .cloned()
        .collect();
    for name in dropped {
        tracing::debug!(
            header = name.as_str(),
            "client header with an underscore dropped"
        );
        headers.remove(name);
    }
}

/// Whether `name` (lower case, as `HeaderName` keeps it), with `_` read as `-`, is a field
/// tollgate sets, reads or removes on the way to the upstream.
fn stands_for_ours(name: &str, credential: &HeaderName) -> bool {
    let dashed = name.replace('_', "-");
    let is = |ours: &str| dashed == ours;
    dashed.starts_with("x-tollgate-")
        || dashed.starts_with("x-forwarded-")
        || is(X_REQUEST_ID.as_str())
        || is("forwarded")
        || is("x-real-ip")
        || is(credential.as_str())
        || is(CONTENT_LENGTH.as_str())
        || is(TRANSFER_ENCODING.as_str())
        || is(KEEP_ALIVE.as_str())
        || is(PROXY_CONNECTION.as_str())
        || is("proxy-authorization")
}

/// What makes a message's framing ambiguous, if anything: a transfer coding other than one
/// `chunked` (a coding passed on undecoded, or one two parsers could read differently), or
/// `Transfer-Encoding` beside `Content-Length` (RFC 9112 6.3: a sign of smuggling).
pub fn ambiguous_framing(headers: &HeaderMap) -> Option<&'static str> {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    let first = codings.next()?;
    let only_chunked = codings.next().is_none()
        && first
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
    if !only_chunked {
        return Some("unsupported Transfer-Encoding");
    }
    if headers.contains_key(CONTENT_LENGTH) {
        return Some("both Transfer-Encoding and Content-Length");
    }
    None
}

/// Removes hop-by-hop headers, including any named in `Connection` (RFC 9110 7.6.1).
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (comparisons, mostly of standard
    // names, which are enum tags) saves seven hashed lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    strip_hop_by_hop(headers);
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !protected(name))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [&CONNECTION, &TE, &TRAILER, &TRANSFER_ENCODING, &UPGRADE] {
        headers.remove(name);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        &CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
    ]
    .contains(&name)
}

/// Rewrites a client request's headers for the upstream, and says what tollgate adds to
/// them ([`Added`], without the identity). `authority` is the request target's (HTTP/2's
/// `:authority`, which stands in for `Host`); `from_h2` says the client spoke HTTP/2. `Host`
/// stays, for the caller to replace with the upstream's or remove.
pub fn prepare_request<'a>(
    headers: &mut HeaderMap,
    client: ClientInfo<'a>,
    request_id: &'a RequestId,
    authority: Option<&Authority>,
    from_h2: bool,
) -> Added<'a> {
    remove_hop_by_hop(headers);
    // An HTTP/1.1 client's Cookie lines go as it sent them, as nginx passes them (RFC 6265
    // allows it one), and its requests skip the lookup.
    if from_h2 {
        join_cookies(headers);
    }
    // One pass over the names for what the client sent of the fields set below: most
    // requests carry none of them, and then the map needs no hashed lookup at all.
    let (mut host, mut chained, mut replaced) = (None, false, false);
    for (name, value) in headers.iter() {
        if name == HOST {
            host = Some(value);
        } else if *name == X_FORWARDED_FOR {
            chained = true;
        } else if *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST || *name == X_REQUEST_ID {
            replaced = true;
        }
    }
    // The pooled client sets Host from the upstream URL, as nginx's $proxy_host.
    let host = host
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    // Like nginx's $proxy_add_x_forwarded_for: the chain so far (every X-Forwarded-For line,
    // in order, as `client_ip` reads them), plus the peer we saw.
    let forwarded_for = if chained {
        let mut joined = Vec::with_capacity(64);
        for value in headers.get_all(&X_FORWARDED_FOR).iter() {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(client.peer_header.as_bytes());
        headers.remove(&X_FORWARDED_FOR);
        HeaderValue::from_bytes(&joined).map_or(Cow::Borrowed(client.peer_header), Cow::Owned)
    } else {
        Cow::Borrowed(client.peer_header)
    };
    // From a trusted proxy (a TLS-terminating load balancer, say), the scheme and host the
    // client used are that proxy's to tell, as Envoy and Kong keep them; from anyone else
    // they are set from this connection, as nginx sets them.
    let mut passed_on = |name: &HeaderName| {
        let value = replaced.then(|| headers.remove(name)).flatten();
        value.filter(|_| client.trusted_peer)
    };
    let forwarded_proto = passed_on(&X_FORWARDED_PROTO)
        .filter(|v| {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"https") || v.eq_ignore_ascii_case(b"http")
        })
        .unwrap_or(HeaderValue::from_static(if client.tls {
            "https"
        } else {
            "http"
        }));
    let forwarded_host = passed_on(&X_FORWARDED_HOST)
        .filter(|v| !v.is_empty())
        .or(host);
    if replaced {
        headers.remove(&X_REQUEST_ID);
    }
    Added {
        forwarded_for: Some(forwarded_for),
        forwarded_proto: Some(forwarded_proto),
        forwarded_host,
        request_id: Some(request_id.header_value()),
        identity: None,
        credential: None,
    }
}

/// An HTTP/2 client sends each cookie as a field of its own (RFC 9113 8.2.3); an HTTP/1.1
/// upstream reads one `Cookie` line, so they are joined with "; " before forwarding, as that
/// RFC requires.
fn join_cookies(headers: &mut HeaderMap) {
    let joined = {
        let mut cookies = headers.get_all(COOKIE).iter();
        let (Some(first), Some(second)) = (cookies.next(), cookies.next()) else {
            return;
        };
        let mut joined = Vec::with_capacity(first.len() + second.len() + 64);
        joined.extend_from_slice(first.as_bytes());
        for value in std::iter::once(second).chain(cookies) {
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(value.as_bytes());
        }
        joined
    };
    // The parts were valid field values, and so is their join.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// Rewrites an upstream response's headers for the client, or says why its framing is not
/// to be trusted (answered 502 `invalid_response`, as nginx does, not relayed as it was read).
pub fn prepare_response(headers: &mut HeaderMap) -> Result<(), &'static str> {
    if !headers.keys().any(is_hop_by_hop) {
        return Ok(());
    }
    if let Some(why) = ambiguous_framing(headers) {
        return Err(why);
    }
    strip_hop_by_hop(headers);
    Ok(())
}
