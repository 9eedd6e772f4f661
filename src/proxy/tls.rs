//! The upstream connector: TCP with `connect_timeout`, and TLS (rustls, ring provider) for
//! `https://` upstreams, trusting Mozilla's roots (webpki-roots) plus the upstream's `ca_file`.
//!
//! ALPN offers `h2` and `http/1.1`, so an https upstream that speaks HTTP/2 gets it; plain
//! `http://` upstreams always get HTTP/1.1 (no h2c to upstreams).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use super::quickack::{QuickAck, QuickAckConnector};
use crate::config::UpstreamConfig;

/// The connector every upstream client uses (plain http passes through untouched).
/// The connector of the pooled client: TCP, then TLS for https upstreams, the whole of it
/// bounded by `connect_timeout` (hyper-util's own timeout covers only the TCP connect, so an
/// upstream that accepts and then stalls the handshake would hold a request until `timeout`).
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<QuickAckConnector<HttpConnector<Dial>>>,
    timeout: Duration,
}

/// Where the TCP connect goes: the URI's host as the system resolves it, or one address (a
/// target resolved by `dns_refresh`, whose URI keeps the name for TLS and `Host`).
#[derive(Clone)]
pub enum Dial {
    /// `getaddrinfo` at each connect.
    Name(GaiResolver),
    /// Always this address (its port is replaced by the URI's).
    At(std::net::SocketAddr),
}

impl tower_service::Service<Name> for Dial {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        match self {
            Dial::At(addr) => {
                let addr = *addr;
                Box::pin(async move { Ok(vec![addr].into_iter()) })
            }
            Dial::Name(resolver) => {
                let resolving = resolver.call(name);
                Box::pin(async move {
                    let addrs = resolving.await?;
                    Ok(addrs.collect::<Vec<_>>().into_iter())
                })
            }
        }
    }
}

type Connected = MaybeHttpsStream<TokioIo<QuickAck>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = Connected;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                // A TimedOut io::Error, as the TCP connector's own timeout gives: classified
                // `connect_timeout`, and replayable like any failed connect.
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect_timeout elapsed during the TLS handshake",
                )
                .into()),
            }
        })
    }
}

/// Why a `ca_file` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// Unreadable, or not PEM.
    #[error("ca_file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// PEM, but without a single `CERTIFICATE` section.
    #[error("ca_file {path}: no CERTIFICATE in the file")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate rustls will not use as a trust anchor.
    #[error("ca_file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// Reads every certificate of a PEM file.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let read = |source| CaFileError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(CaFileError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The roots an https upstream is verified against: webpki roots plus `ca_file`.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, CaFileError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in load_ca_file(path)? {
            roots.add(cert).map_err(|source| CaFileError::Invalid {
                path: path.to_owned(),
                source,
            })?;
        }
    }
    Ok(roots)
}

/// Builds the connector for `config`. With `http2`, ALPN offers h2 first; without, only
/// HTTP/1.1 (upgrade requests such as WebSocket need an HTTP/1.1 connection).
///
/// A `ca_file` that cannot be used is logged and left out: certificate checks against it then
/// fail, and requests get 502 (config validation already checked the file exists).
///
/// `at` pins the TCP connect to one address (a resolved hostname target); the URI's name is
/// still the one TLS verifies.
pub fn connector(
    config: &UpstreamConfig,
    http2: bool,
    at: Option<std::net::SocketAddr>,
) -> Connector {
    let dial = match at {
        Some(addr) => Dial::At(addr),
        None => Dial::Name(GaiResolver::new()),
    };
    let mut http = HttpConnector::new_with_resolver(dial);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_nodelay(true);
    // The https layer checks the scheme; the TCP layer must accept https URIs too.
    http.enforce_http(false);

    let https = config.url.scheme() == Some(&http::uri::Scheme::HTTPS);
    // Plain-http upstreams never use the TLS config: skip copying the root store for them.
    let roots = if https {
        root_store(config.ca_file.as_deref()).unwrap_or_else(|error| {
            tracing::error!(upstream = %config.name, %error, "ca_file not usable; using webpki roots only");
            RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }
        })
    } else {
        RootCertStore::empty()
    };
    // An explicit provider: no dependence on a process-wide default being installed.
    let tls =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let inner = if http2 {
        builder
            .enable_http2()
            .wrap_connector(QuickAckConnector(http))
    } else {
        builder.wrap_connector(QuickAckConnector(http))
    };
    Connector {
        inner,
        timeout: config.connect_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["upstream.test".to_owned()])
            .unwrap()
            .cert
            .pem()
    }

    #[test]
    fn ca_file_certificates_join_the_webpki_roots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, self_signed_pem() + &self_signed_pem()).unwrap();
        let base = root_store(None).unwrap().len();
        assert!(base > 100, "webpki roots present: {base}");
        assert_eq!(root_store(Some(&path)).unwrap().len(), base + 2);
    }

    #[test]
    fn unusable_ca_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem file\n").unwrap();
        assert!(matches!(
            load_ca_file(&empty),
            Err(CaFileError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_ca_file(&dir.path().join("missing.pem")),
            Err(CaFileError::Read { .. })
        ));
    }
}
