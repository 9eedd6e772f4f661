//! The certificate loader for TLS termination on the client side: rustls (ring provider), TLS
//! 1.2 and 1.3 only, ALPN `h2` then `http/1.1`, a PEM certificate chain and private key.
//!
//! The [`ServerConfig`] is built during config validation (so `tollgate check` and a reload
//! reject unusable files) and lives in the config snapshot: a reload with new files serves the
//! new certificate to new connections, while existing connections keep theirs. The server runs
//! the handshake in the connection's task, never in the accept loop, bounded by
//! `server.header_read_timeout`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why `[server.tls]` files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Unreadable, or not PEM.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// PEM, but without a `CERTIFICATE` section.
    #[error("{}: no CERTIFICATE in the file", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key does not match the certificate, or rustls will not use them.
    #[error("certificate and key not usable: {0}")]
    Rejected(rustls::Error),
}

/// Loads the certificate chain and key and builds the rustls server config.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
        move |source| TlsError::Pem {
            path: path.to_owned(),
            source,
        }
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    // An explicit provider (as for upstreams): no process-wide default needed.
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Rejected)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(TlsError::Rejected)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_pair_loads_and_offers_h2_first() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        let config = server_config(&c, &k).unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");

        let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        std::fs::write(&k, other.signing_key.serialize_pem()).unwrap();
        assert!(matches!(server_config(&c, &k), Err(TlsError::Rejected(_))));
        std::fs::write(&c, "not pem").unwrap();
        assert!(matches!(
            server_config(&c, &k),
            Err(TlsError::NoCertificate { .. })
        ));
    }
}
