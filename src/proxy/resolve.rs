//! Hostname targets: every address a target's hostname resolves to is a target of the
//! target's weight, resolved again every `dns_refresh`. A failed resolution keeps the last
//! addresses (one WARN line until it resolves again).
//!
//! Part of the proxy box. A target's `Host` (and, for https, the name its certificate must
//! hold) stays the configured name; only the connect goes to the address. Until the first
//! resolution of a hostname target (just after start), its requests resolve at connect.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use http::Uri;
use http::uri::Scheme;

use super::targets::TargetSet;
use crate::config::{TargetConfig, UpstreamConfig};
use crate::observability::metrics::Metrics;

/// The addresses of `host:port`, or why there are none.
pub type Lookup = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// A function from `host, port` to its lookup.
type LookupFn = dyn Fn(&str, u16) -> Lookup + Send + Sync;

/// How hostname targets are resolved: the system's resolver (`getaddrinfo`), or one given to
/// `Gateway::with_resolver` (tests).
#[derive(Clone)]
pub struct Resolver(Arc<LookupFn>);

impl Resolver {
    /// A resolver that answers with `lookup`.
    pub fn new(lookup: impl Fn(&str, u16) -> Lookup + Send + Sync + 'static) -> Self {
        Self(Arc::new(lookup))
    }

    /// The system's resolver.
    pub fn system() -> Self {
        Self::new(|host, port| {
            let host = host.to_owned();
            Box::pin(async move {
                Ok(tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .collect())
            })
        })
    }

    fn lookup(&self, host: &str, port: u16) -> Lookup {
        (self.0)(host, port)
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// One target as the balancer sees it: a configured target, at one of its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The configured target's URL.
    pub url: Uri,
    /// The address to connect to; `None` connects to the URL's authority (an https IP
    /// literal, or a hostname not resolved yet).
    pub addr: Option<SocketAddr>,
    /// The configured target's weight.
    pub weight: NonZeroU32,
}

/// The host and port of a target whose host is a name, not an address.
fn hostname(target: &TargetConfig) -> Option<(&str, u16)> {
    let host = target.url.host()?;
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if literal.parse::<IpAddr>().is_ok() {
        return None;
    }
    let https = target.url.scheme() == Some(&Scheme::HTTPS);
    Some((
        host,
        target
            .url
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 }),
    ))
}

/// Whether any target of `config` is resolved by name.
pub fn has_hostnames(config: &UpstreamConfig) -> bool {
    config.targets.iter().any(|t| hostname(t).is_some())
}

/// The endpoints of `config`, a hostname target at the addresses `previous` had for it (a
/// reload keeps them until the next resolution).
pub fn endpoints(config: &UpstreamConfig, previous: Option<&TargetSet>) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for target in &config.targets {
        let known = previous
            .filter(|_| hostname(target).is_some())
            .map(|set| set.addresses_of(&target.url))
            .unwrap_or_default();
        push(&mut out, target, &known);
    }
    out
}

/// The address of a plain-http target whose host is an IP literal.
fn literal(target: &TargetConfig) -> Option<SocketAddr> {
    if target.url.scheme() != Some(&Scheme::HTTP) {
        return None;
    }
    let host = target.url.host()?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, target.url.port_u16().unwrap_or(80)))
}

/// `target` at each of `addresses`, or, when there are none, at its IP literal or its URL's
/// authority.
fn push(out: &mut Vec<Endpoint>, target: &TargetConfig, addresses: &[SocketAddr]) {
    let own = literal(target);
    let addresses = match (addresses, &own) {
        ([], Some(own)) => std::slice::from_ref(own),
        ([], None) => {
            out.push(Endpoint {
                url: target.url.clone(),
                addr: None,
                weight: target.weight,
            });
            return;
        }
        (addresses, _) => addresses,
    };
    for addr in addresses {
        // An address another target already has (a name resolving to a listed IP) is
        // one target, not two.
        if out.iter().any(|e| e.addr == Some(*addr)) {
            continue;
        }
        out.push(Endpoint {
            url: target.url.clone(),
            addr: Some(*addr),
            weight: target.weight,
        });
    }
}

/// Resolves `config`'s hostname targets now and every `dns_refresh` after, replacing the
/// upstream's target set when their addresses change, until the set is dropped.
pub(super) async fn refresh(
    set: Weak<ArcSwap<TargetSet>>,
    config: UpstreamConfig,
    resolver: Resolver,
    metrics: Arc<Metrics>,
) {
    // Names whose last resolution failed: said once, and once more when they resolve.
    let mut failing: BTreeSet<String> = BTreeSet::new();
    loop {
        let Some(shared) = set.upgrade() else { return };
        let current = shared.load_full();
        drop(shared);
        let mut resolved = Vec::new();
        for target in &config.targets {
            let Some((host, port)) = hostname(target) else {
                push(&mut resolved, target, &[]);
                continue;
            };
            let addresses = match resolver.lookup(host, port).await {
                Ok(mut addresses) if !addresses.is_empty() => {
                    addresses.sort();
                    addresses.dedup();
                    if failing.remove(host) {
                        tracing::info!(upstream = %config.name, host, "upstream target resolves again");
                    }
                    addresses
                }
                outcome => {
                    if failing.insert(host.to_owned()) {
                        let error = match outcome {
                            Err(e) => e.to_string(),
                            Ok(_) => "no address".to_owned(),
                        };
                        tracing::warn!(
                            upstream = %config.name,
                            host,
                            error,
                            "cannot resolve an upstream target; keeping its last addresses"
                        );
                    }
                    current.addresses_of(&target.url)
                }
            };
            push(&mut resolved, target, &addresses);
        }
        if resolved != current.endpoints() {
            let Some(shared) = set.upgrade() else { return };
            let next = TargetSet::new(&config, &resolved, Some(&current), true, &metrics);
            tracing::info!(
                upstream = %config.name,
                targets = %next.labels(),
                "upstream targets resolved"
            );
            shared.store(Arc::new(next));
        }
        tokio::time::sleep(config.dns_refresh).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> TargetConfig {
        TargetConfig {
            url: url.parse().unwrap(),
            weight: NonZeroU32::MIN,
        }
    }

    #[test]
    fn only_plain_http_names_are_resolved() {
        assert_eq!(
            hostname(&target("http://api.internal:3000")),
            Some(("api.internal", 3000))
        );
        assert_eq!(
            hostname(&target("http://api.internal")),
            Some(("api.internal", 80))
        );
        assert_eq!(hostname(&target("http://10.0.0.1:3000")), None);
        assert_eq!(hostname(&target("http://[::1]:3000")), None);
        assert_eq!(
            hostname(&target("https://api.internal")),
            Some(("api.internal", 443))
        );
    }

    #[test]
    fn a_name_is_one_endpoint_per_address_and_a_listed_address_is_not_doubled() {
        let a: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let b: SocketAddr = "[::1]:3000".parse().unwrap();
        let mut out = Vec::new();
        push(&mut out, &target("http://127.0.0.1:3000"), &[]);
        push(&mut out, &target("http://localhost:3000"), &[a, b]);
        let addrs: Vec<_> = out.iter().map(|e| e.addr).collect();
        assert_eq!(addrs, [Some(a), Some(b)]);
        let mut out = Vec::new();
        push(&mut out, &target("http://localhost:3000"), &[]);
        assert_eq!(out[0].addr, None, "not resolved yet: at connect");
    }
}
