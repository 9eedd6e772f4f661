//! The validated `[redis]` section: where the one Redis connection of the gateway goes (a
//! single server, a Sentinel-watched primary, or a Cluster), with its TLS material and
//! password. The limiter, and whatever else shares state across instances, connect through
//! it (`limit::redis_connection`). `limits.redis_url` is the short form of `[redis] url`.

use std::fmt;

/// Where Redis is, and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Single server, Sentinel or Cluster.
    pub target: RedisTarget,
    /// Whether the connections use TLS (`rediss://`).
    pub tls: bool,
    /// The password `password_env` named, read from the environment at load; or the one in
    /// the URL. `None`: no `AUTH`.
    pub password: Option<RedisPassword>,
    /// `ca_file`: PEM certificates trusted instead of the built-in (webpki) roots.
    pub ca_pem: Option<Vec<u8>>,
    /// `client_cert` and `client_key` (PEM), for mutual TLS.
    pub client_identity: Option<ClientIdentity>,
}

/// Which kind of deployment `[redis]` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `url`: one server (`redis://`, `rediss://`, `unix://`).
    Single {
        /// The URL as written (it may hold a password: never log it).
        url: String,
    },
    /// `sentinels` + `master_name`: the primary is asked of the sentinels.
    Sentinel {
        /// `host:port` of each sentinel.
        sentinels: Vec<(String, u16)>,
        /// The name the sentinels watch the primary under.
        master_name: String,
    },
    /// `cluster`: seed nodes; the rest of the topology is learnt from them.
    Cluster {
        /// `host:port` of each seed node.
        nodes: Vec<(String, u16)>,
    },
}

impl RedisTarget {
    /// `single`, `sentinel` or `cluster`: the `mode` label of `tollgate_redis_info`.
    pub fn mode_name(&self) -> &'static str {
        match self {
            RedisTarget::Single { .. } => "single",
            RedisTarget::Sentinel { .. } => "sentinel",
            RedisTarget::Cluster { .. } => "cluster",
        }
    }
}

/// A client certificate chain and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain.
    pub cert_pem: Vec<u8>,
    /// The private key.
    pub key_pem: Vec<u8>,
}

/// A Redis password: `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(String);

impl RedisPassword {
    /// Wraps a password.
    pub fn new(password: String) -> Self {
        Self(password)
    }

    /// The password itself, for `AUTH` only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisPassword(<redacted>)")
    }
}

// Hand-written so that neither the URL (which may carry a password) nor the key material is
// ever printed by a `{:?}` of the config.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.target.mode_name())
            .field("tls", &self.tls)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_pem.is_some())
            .field("client_cert", &self.client_identity.is_some())
            .finish()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIdentity(<redacted>)")
    }
}

impl RedisConfig {
    /// A plain single server at `url` (no TLS material, no password but the URL's).
    pub fn single(url: &str) -> Self {
        Self {
            target: RedisTarget::Single {
                url: url.to_owned(),
            },
            tls: url.starts_with("rediss://"),
            password: None,
            ca_pem: None,
            client_identity: None,
        }
    }

    /// Where it points, for logs: the mode and addresses, never a password.
    pub fn describe(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let list = |nodes: &[(String, u16)]| {
            nodes
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match &self.target {
            RedisTarget::Single { url } => redact_url(url),
            RedisTarget::Sentinel {
                sentinels,
                master_name,
            } => format!(
                "sentinel {scheme}://{} master {master_name}",
                list(sentinels)
            ),
            RedisTarget::Cluster { nodes } => format!("cluster {scheme}://{}", list(nodes)),
        }
    }
}

/// `url` without its userinfo and query, either of which may carry a password
/// (`redis://:secret@host` -> `redis://host`, `unix:///run/redis.sock?pass=secret` ->
/// `unix:///run/redis.sock`).
pub fn redact_url(url: &str) -> String {
    let url = url.split_once('?').map_or(url, |(before, _)| before);
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_secret_is_printed() {
        let mut config = RedisConfig::single("rediss://:hunter2@r:6380");
        config.password = Some(RedisPassword::new("s3cret".into()));
        config.client_identity = Some(ClientIdentity {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"PRIVATE KEY BYTES".to_vec(),
        });
        let shown = format!("{config:?} {}", config.describe());
        for secret in ["hunter2", "s3cret", "PRIVATE KEY BYTES"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("rediss://r:6380"), "{shown}");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://h:1/0");
        assert_eq!(
            redact_url("unix:///run/redis.sock?db=1&pass=hunter2"),
            "unix:///run/redis.sock"
        );
    }
}
