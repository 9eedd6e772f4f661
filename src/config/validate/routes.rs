//! `[[upstreams]]` and `[[routes]]`: where requests go, and the fixed responses.

use std::collections::HashMap;

use http::{HeaderValue, Method, StatusCode};

use super::*;

impl Validator<'_, '_> {
    pub(super) fn upstreams(&mut self, upstreams: &[UpstreamFile]) -> Vec<UpstreamConfig> {
        let mut names: HashMap<&str, ()> = HashMap::new();
        let mut out = Vec::new();
        for u in upstreams {
            let name = u.name.get_ref().trim();
            if !valid_identifier(name, 64) {
                self.error(
                    u.name.span(),
                    "upstream name may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-64 characters)",
                );
            }
            if names.insert(name, ()).is_some() {
                self.error(u.name.span(), format!("duplicate upstream name \"{name}\""));
            }
            let (url, targets) = self.targets(u, name);
            let field = |f: &str| format!("upstream \"{name}\": {f}");
            let cfg = UpstreamConfig {
                name: name.to_owned(),
                url,
                targets,
                balance: self.enumeration(
                    &u.balance,
                    &[
                        ("round_robin", Balance::RoundRobin),
                        ("least_inflight", Balance::LeastInflight),
                    ],
                    Balance::RoundRobin,
                    &field("balance"),
                ),
                eject_after: self.whole_in(
                    &u.eject_after,
                    0..=1000,
                    DEFAULT_EJECT_AFTER,
                    &field("eject_after"),
                ),
                eject_for: self.duration(&u.eject_for, DEFAULT_EJECT_FOR, &field("eject_for")),
                max_ejected_percent: self.whole_in(
                    &u.max_ejected_percent,
                    0..=100,
                    DEFAULT_MAX_EJECTED_PERCENT,
                    &field("max_ejected_percent"),
                ),
                retries: self.whole_in(
                    &u.retries,
                    0..=MAX_RETRIES,
                    DEFAULT_RETRIES,
                    &field("retries"),
                ),
                dns_refresh: self.duration(
                    &u.dns_refresh,
                    DEFAULT_DNS_REFRESH,
                    &field("dns_refresh"),
                ),
                health_check: u
                    .health_check
                    .as_ref()
                    .map(|h| self.health_check(h.get_ref(), name)),
                connect_timeout: self.duration(
                    &u.connect_timeout,
                    DEFAULT_CONNECT_TIMEOUT,
                    &field("connect_timeout"),
                ),
                timeout: self.duration(&u.timeout, DEFAULT_UPSTREAM_TIMEOUT, &field("timeout")),
                max_inflight: self.positive_or(
                    &u.max_inflight,
                    DEFAULT_MAX_INFLIGHT,
                    &field("max_inflight"),
                ),
                maintenance: u.maintenance,
                retry_after: self.duration(
                    &u.retry_after,
                    DEFAULT_RETRY_AFTER,
                    &field("retry_after"),
                ),
                ca_file: u
                    .ca_file
                    .as_ref()
                    .map(|c| self.existing_file(c, &field("ca_file"))),
            };
            out.push(cfg);
        }
        out
    }

    pub(super) fn routes(
        &mut self,
        routes: &[RouteFile],
        upstreams: &[UpstreamConfig],
    ) -> Vec<RouteConfig> {
        let mut prefixes: HashMap<&str, ()> = HashMap::new();
        let mut out = Vec::new();
        for r in routes {
            let prefix = r.prefix.get_ref().as_str();
            if !prefix.starts_with('/')
                || prefix
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
            {
                self.error(r.prefix.span(), format!("route prefix \"{prefix}\" must start with '/' and hold no spaces, '?' or '#'"));
            } else if let Some((c, encoded)) = unmatchable(prefix) {
                let why = if c.is_ascii() {
                    "requests with it unencoded in the path are refused (400)"
                } else {
                    "clients send non-ASCII characters percent-encoded (a request path is ASCII)"
                };
                self.error(
                    r.prefix.span(),
                    format!("route prefix \"{prefix}\" would match no request: it holds '{c}', and {why}; write it percent-encoded: \"{encoded}\""),
                );
            }
            if prefixes.insert(prefix, ()).is_some() {
                self.error(
                    r.prefix.span(),
                    format!("duplicate route prefix \"{prefix}\""),
                );
            }
            let target = match (&r.upstream, &r.respond) {
                (Some(_), Some(respond)) => {
                    self.error(
                        respond.span(),
                        format!("route \"{prefix}\": set either upstream or respond, not both"),
                    );
                    None
                }
                (None, None) => {
                    self.error(
                        r.prefix.span(),
                        format!("route \"{prefix}\" needs an upstream or a respond"),
                    );
                    None
                }
                (Some(up), None) => {
                    let wanted = up.get_ref().trim();
                    match upstreams.iter().position(|u| u.name == wanted) {
                        Some(i) => Some(RouteTarget::Upstream(i)),
                        None => {
                            let known: Vec<&str> =
                                upstreams.iter().map(|u| u.name.as_str()).collect();
                            self.error(
                                up.span(),
                                format!(
                                    "route \"{prefix}\": upstream \"{wanted}\" is not defined; defined upstreams: {}",
                                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                                ),
                            );
                            None
                        }
                    }
                }
                (None, Some(respond)) => self.respond(respond, prefix).map(RouteTarget::Respond),
            };
            let methods = r.methods.as_ref().map(|methods| {
                let mut parsed = Vec::new();
                for m in methods {
                    let text = m.get_ref().trim();
                    match Method::from_bytes(text.as_bytes()) {
                        Ok(method) if text.bytes().all(|b| b.is_ascii_uppercase()) => parsed.push(method),
                        _ => self.error(m.span(), format!("route \"{prefix}\": \"{text}\" is not an HTTP method like \"GET\" (upper case)")),
                    }
                }
                if parsed.is_empty() && methods.is_empty() {
                    self.error(r.prefix.span(), format!("route \"{prefix}\": methods is empty, so nothing could match; remove it to allow every method"));
                }
                parsed
            });
            let scopes = self.scopes(&r.scopes);
            if r.auth == Some(false)
                && let Some(first) = r.scopes.first()
            {
                // A client could skip them by sending no key at all.
                self.error(
                    first.span(),
                    format!("route \"{prefix}\": scopes need a key, so a public route (auth = false) cannot require them; remove auth = false or the scopes"),
                );
            }
            let cost = self.whole_in(
                &r.cost,
                0..=MAX_ROUTE_COST,
                DEFAULT_ROUTE_COST,
                &format!("route \"{prefix}\": cost"),
            );
            if let Some(target) = target {
                out.push(RouteConfig {
                    cost,
                    prefix: prefix.to_owned(),
                    target,
                    scopes,
                    methods,
                    auth: r.auth.unwrap_or(true),
                    strip_prefix: r.strip_prefix,
                });
            }
        }
        out
    }

    fn respond(&mut self, respond: &Spanned<RespondFile>, prefix: &str) -> Option<FixedResponse> {
        let r = respond.get_ref();
        let status = u16::try_from(*r.status.get_ref())
            .ok()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok());
        let Some(status) = status else {
            self.error(
                r.status.span(),
                format!(
                    "route \"{prefix}\": respond.status must be 200-599, got {}",
                    r.status.get_ref()
                ),
            );
            return None;
        };
        let content_type = r
            .content_type
            .as_deref()
            .unwrap_or(DEFAULT_RESPOND_CONTENT_TYPE);
        let Ok(content_type) = HeaderValue::from_str(content_type) else {
            self.error(
                respond.span(),
                format!("route \"{prefix}\": respond.content_type is not a valid header value"),
            );
            return None;
        };
        Some(FixedResponse {
            status,
            body: bytes::Bytes::from(r.body.clone()),
            content_type,
        })
    }
}

/// When a route prefix holds characters no request path holds as they are, the first of
/// them and the prefix with each percent-encoded (upper-case hex, RFC 3986's normal form):
/// non-ASCII characters, which clients percent-encode, and `<`, `>` and `` ` ``, which the
/// request parser refuses unencoded.
fn unmatchable(prefix: &str) -> Option<(char, String)> {
    use std::fmt::Write;
    let never = |c: char| !c.is_ascii() || matches!(c, '<' | '>' | '`');
    let first = prefix.chars().find(|&c| never(c))?;
    let mut encoded = String::with_capacity(prefix.len() * 3);
    for c in prefix.chars() {
        if never(c) {
            for b in c.encode_utf8(&mut [0; 4]).bytes() {
                let _ = write!(encoded, "%{b:02X}");
            }
        } else {
            encoded.push(c);
        }
    }
    Some((first, encoded))
}
