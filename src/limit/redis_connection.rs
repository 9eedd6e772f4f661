//! The one Redis connection of the gateway, as `[redis]` configures it: a single server
//! (`redis://`, `rediss://`), a primary found through Sentinel, or a Cluster. Everything that
//! keeps state in Redis (the limiter today) talks through a [`RedisConnection`], a cloneable
//! handle that implements [`redis::aio::ConnectionLike`], so a script or command is sent the
//! same way whatever the deployment.
//!
//! The redis crate does the work: [`ConnectionManager`] for a single server (reconnects by
//! itself), its Sentinel client to find the primary, its async Cluster client (slot routing,
//! `MOVED`/`ASK`, topology refresh), and its rustls TLS (ring, webpki roots or `ca_file`,
//! optional client certificate). [`error_kind`] sorts the crate's errors for the metrics.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use arc_swap::ArcSwapOption;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionAddr, ErrorKind,
    IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind,
    TlsCertificates, TlsMode, Value,
};

use crate::config::{RedisConfig, RedisTarget};

/// How long a new connection (TCP, TLS handshake, `AUTH`) may take. Callers bound each
/// command by their own timeout (`limits.backend_timeout`); this only keeps a dead address
/// from holding a connect attempt for the OS's minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Cluster: how often a command is retried after `MOVED`, `ASK` or a lost node (the crate
/// refreshes the slot map meanwhile). Few: a slot moves in one redirect, and the caller's
/// timeout decides what a slow cluster means.
const CLUSTER_RETRIES: u32 = 3;

/// A connection to Redis, whatever the deployment; cheap to clone (every clone shares the
/// same multiplexed connection).
#[derive(Clone)]
pub enum RedisConnection {
    /// One server; reconnects by itself.
    Single(ConnectionManager),
    /// The primary the sentinels name, asked again after an error.
    Sentinel(SentinelConnection),
    /// A Redis Cluster: each command goes to its key's slot.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConnection::Single(_) => "RedisConnection::Single",
            RedisConnection::Sentinel(_) => "RedisConnection::Sentinel",
            RedisConnection::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Sentinel(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConnection::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Sentinel(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Makes [`RedisConnection`]s for one `[redis]` config.
pub struct RedisConnector {
    config: RedisConfig,
}

impl std::fmt::Debug for RedisConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnector")
            .field("redis", &self.config.describe())
            .finish()
    }
}

impl RedisConnector {
    /// A connector for `config`; nothing connects yet.
    pub fn new(config: &RedisConfig) -> Self {
        Self {
            config: config.clone(),
        }
    }

    /// The config it connects by.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// A new connection. A single server's connects lazily (on its first command); a
    /// Sentinel's asks the sentinels for the primary on its first command; a Cluster's reads
    /// the slot map from a seed node now.
    pub async fn connect(&self) -> RedisResult<RedisConnection> {
        let config = &self.config;
        match &config.target {
            RedisTarget::Single { url } => {
                let client = self.client_of(url.as_str())?;
                // Reconnect quickly and give up soon: the caller's timeout and circuit breaker
                // decide what a slow Redis means, and a failed reconnect is simply tried again
                // on a later call.
                let manager = ConnectionManagerConfig::new()
                    .set_number_of_retries(3)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                Ok(RedisConnection::Single(
                    ConnectionManager::new_lazy_with_config(client, manager)?,
                ))
            }
            RedisTarget::Sentinel {
                sentinels,
                master_name,
            } => {
                let shared = Arc::new(SentinelShared {
                    client: tokio::sync::Mutex::new(self.sentinel_client(sentinels, master_name)?),
                    primary: ArcSwapOption::empty(),
                });
                let watched = sentinels
                    .iter()
                    .map(|(host, port)| match self.certificates() {
                        Some(certs) => Client::build_with_tls(self.addr(host, *port), certs),
                        None => Client::open(self.addr(host, *port)),
                    })
                    .collect::<RedisResult<Vec<_>>>()?;
                tokio::spawn(watch_failovers(
                    Arc::downgrade(&shared),
                    watched,
                    master_name.clone(),
                ));
                Ok(RedisConnection::Sentinel(SentinelConnection { shared }))
            }
            RedisTarget::Cluster { nodes } => {
                let scheme = if config.tls { "rediss" } else { "redis" };
                let seeds: Vec<String> = nodes
                    .iter()
                    .map(|(host, port)| format!("{scheme}://{}:{port}", bracket(host)))
                    .collect();
                let mut builder = ClusterClient::builder(seeds)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(password) = &config.password {
                    builder = builder.password(password.expose());
                }
                if config.tls {
                    builder = builder.tls(TlsMode::Secure);
                    if let Some(certs) = self.certificates() {
                        builder = builder.certs(certs);
                    }
                }
                let connection = builder.build()?.get_async_connection().await?;
                Ok(RedisConnection::Cluster(connection))
            }
        }
    }

    /// A plain client of the node to exchange pub/sub messages on (the key store's change
    /// channel): the server, the primary the sentinels name now, or a Cluster's first seed
    /// node (a Cluster passes every `PUBLISH` to every node).
    pub async fn pubsub_client(&self) -> RedisResult<Client> {
        match &self.config.target {
            RedisTarget::Single { url } => self.client_of(url.as_str()),
            RedisTarget::Sentinel {
                sentinels,
                master_name,
            } => {
                self.sentinel_client(sentinels, master_name)?
                    .async_get_client()
                    .await
            }
            RedisTarget::Cluster { nodes } => {
                let (host, port) = nodes.first().ok_or_else(|| {
                    RedisError::from((ErrorKind::InvalidClientConfig, "no cluster node"))
                })?;
                let scheme = if self.config.tls { "rediss" } else { "redis" };
                self.client_of(&format!("{scheme}://{}:{port}", bracket(host)))
            }
        }
    }

    /// A client of `url` with the configured password and certificates.
    fn client_of(&self, url: &str) -> RedisResult<Client> {
        let mut info = url.into_connection_info()?;
        if let Some(password) = &self.config.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        match self.certificates() {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        }
    }

    /// The client that asks `sentinels` for the primary of `master_name`.
    fn sentinel_client(
        &self,
        sentinels: &[(String, u16)],
        master_name: &str,
    ) -> RedisResult<SentinelClient> {
        let config = &self.config;
        let addrs = sentinels.iter().map(|(host, port)| self.addr(host, *port));
        let mut builder =
            SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?;
        if let Some(password) = &config.password {
            builder = builder.set_client_to_redis_password(password.expose());
        }
        if config.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certs) = self.certificates() {
                builder = builder
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs);
            }
        }
        builder.build()
    }

    /// `ca_file` and the client identity, when any is configured (the webpki roots
    /// otherwise).
    fn certificates(&self) -> Option<TlsCertificates> {
        let config = &self.config;
        if config.ca_pem.is_none() && config.client_identity.is_none() {
            return None;
        }
        Some(TlsCertificates {
            client_tls: config.client_identity.as_ref().map(|id| ClientTlsConfig {
                client_cert: id.cert_pem.clone(),
                client_key: id.key_pem.clone(),
            }),
            root_cert: config.ca_pem.clone(),
        })
    }

    fn addr(&self, host: &str, port: u16) -> ConnectionAddr {
        if self.config.tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        }
    }
}

/// `[::1]` for an IPv6 host in a URL.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The primary the sentinels name, over one multiplexed connection. The sentinels are asked
/// on first use, and again after a connection error or a `READONLY` reply (the node was
/// demoted in a failover) or a `+switch-master` announcement ([`watch_failovers`]): the
/// connection is forgotten and the next command asks anew.
#[derive(Clone)]
pub struct SentinelConnection {
    shared: Arc<SentinelShared>,
}

struct SentinelShared {
    /// Asks the sentinels; one question at a time (a failover makes every caller ask).
    client: tokio::sync::Mutex<SentinelClient>,
    /// The primary's connection, until an error says to ask again.
    primary: ArcSwapOption<MultiplexedConnection>,
}

impl SentinelConnection {
    async fn primary(&self) -> RedisResult<Arc<MultiplexedConnection>> {
        if let Some(primary) = self.shared.primary.load_full() {
            return Ok(primary);
        }
        let mut client = self.shared.client.lock().await;
        // Another caller may have asked while this one waited for the lock.
        if let Some(primary) = self.shared.primary.load_full() {
            return Ok(primary);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let primary = Arc::new(client.get_async_connection_with_config(&config).await?);
        self.shared.primary.store(Some(primary.clone()));
        Ok(primary)
    }

    /// After `error` on `used`: forget it if the primary must be asked for again. Only that
    /// connection: one a concurrent caller already found stays.
    fn after_error(&self, used: &Arc<MultiplexedConnection>, error: &RedisError) {
        if asks_for_new_primary(error) {
            self.shared.primary.compare_and_swap(used, None);
        }
    }

    fn get_db(&self) -> i64 {
        self.shared
            .primary
            .load()
            .as_ref()
            .map_or(0, |c| c.get_db())
    }

    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let used = self.primary().await?;
            let result = MultiplexedConnection::clone(&used)
                .req_packed_command(cmd)
                .await;
            if let Err(error) = &result {
                self.after_error(&used, error);
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let used = self.primary().await?;
            let result = MultiplexedConnection::clone(&used)
                .req_packed_commands(cmd, offset, count)
                .await;
            if let Err(error) = &result {
                self.after_error(&used, error);
            }
            result
        })
    }
}

/// Listens to the sentinels' `+switch-master` announcements (one sentinel at a time, the
/// next when it goes away) and forgets the primary when `master_name`'s moves, so the next
/// command asks for the new one. Without this, a failover that leaves the old primary up
/// (`SENTINEL FAILOVER`, or a partition) would go unnoticed until Sentinel demotes it, up to
/// its 10 s `INFO` period later, and every decision meanwhile be written where it is lost.
/// Ends, within a second, when the connection it serves is dropped.
async fn watch_failovers(
    shared: Weak<SentinelShared>,
    sentinels: Vec<Client>,
    master_name: String,
) {
    const CHECK_EVERY: Duration = Duration::from_secs(1);
    let prefix = format!("{master_name} ");
    loop {
        for sentinel in &sentinels {
            if shared.strong_count() == 0 {
                return;
            }
            let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(CONNECT_TIMEOUT, sentinel.get_async_pubsub()).await
            else {
                continue;
            };
            if pubsub.subscribe("+switch-master").await.is_err() {
                continue;
            }
            let mut messages = pubsub.into_on_message();
            loop {
                match tokio::time::timeout(CHECK_EVERY, messages.next()).await {
                    Ok(Some(message)) => {
                        let payload: String = message.get_payload().unwrap_or_default();
                        if payload.starts_with(&prefix) {
                            let Some(shared) = shared.upgrade() else {
                                return;
                            };
                            tracing::info!(
                                switch = %payload,
                                "redis sentinel announced a new primary"
                            );
                            shared.primary.store(None);
                        }
                    }
                    // The sentinel went away: the next one.
                    Ok(None) => break,
                    Err(_) if shared.strong_count() == 0 => return,
                    Err(_) => {}
                }
            }
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Whether an error means the node may no longer be the primary (or is gone).
fn asks_for_new_primary(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    ) || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

/// What kind of failure `error` is, for `tollgate_limiter_backend_errors_total{kind}`:
/// `tls` (handshake, certificate), `auth` (wrong or missing password), `readonly` (a replica,
/// e.g. a demoted primary), `moved` (cluster redirects or topology that did not settle),
/// `timeout`, `io` (connection refused, reset, closed), or `other` (e.g. a script error).
pub fn error_kind(error: &RedisError) -> &'static str {
    if is_tls(error) {
        return "tls";
    }
    let code = error.code().unwrap_or("");
    match error.kind() {
        ErrorKind::AuthenticationFailed => return "auth",
        ErrorKind::Server(ServerErrorKind::ReadOnly) => return "readonly",
        ErrorKind::Server(
            ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::CrossSlot,
        )
        | ErrorKind::ClusterConnectionNotFound => return "moved",
        ErrorKind::Server(ServerErrorKind::NoPerm) => return "auth",
        _ => {}
    }
    if matches!(code, "WRONGPASS" | "NOAUTH") {
        "auth"
    } else if error.is_timeout() {
        "timeout"
    } else if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::Server(ServerErrorKind::MasterDown)
        )
    {
        "io"
    } else {
        "other"
    }
}

/// Whether a TLS handshake or certificate check failed: a `rustls::Error` somewhere in the
/// chain, or its words in the message. (tokio-rustls wraps it in an `io::Error`, which the
/// crate keeps behind an `Arc<dyn Error>`: neither `source` nor a downcast reaches it.)
fn is_tls(error: &RedisError) -> bool {
    const RUSTLS_WORDS: [&str; 5] = [
        "invalid peer certificate",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
        "tls handshake",
    ];
    let text = error.to_string().to_ascii_lowercase();
    if RUSTLS_WORDS.iter().any(|w| text.contains(w)) {
        return true;
    }
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && inner.is::<rustls::Error>()
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_kind() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(error_kind(&io), "io");
        let tls = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(error_kind(&tls), "tls");
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "bad password"));
        assert_eq!(error_kind(&auth), "auth");
        let script = RedisError::from((ErrorKind::UnexpectedReturnType, "nope"));
        assert_eq!(error_kind(&script), "other");
    }
}
