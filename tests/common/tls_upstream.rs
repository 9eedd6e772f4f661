//! https upstreams for tests: a self-signed certificate (also its own CA file) and a server
//! speaking HTTP/1.1 and h2 by ALPN.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::upstream::fault_upstream;

/// A self-signed certificate, and its PEM in a file.
pub struct TestCert {
    pub config: Arc<rustls::ServerConfig>,
    _dir: tempfile::TempDir,
    pub pem_path: std::path::PathBuf,
}

/// A certificate for 127.0.0.1 and localhost.
pub fn test_cert() -> TestCert {
    cert_for(&["127.0.0.1", "localhost"])
}

/// A certificate for `names`.
pub fn cert_for(names: &[&str]) -> TestCert {
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem_path = dir.path().join("upstream-ca.pem");
    std::fs::write(&pem_path, certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestCert {
        config: Arc::new(config),
        _dir: dir,
        pem_path,
    }
}

/// An https upstream (HTTP/1.1 and h2 by ALPN) answering with the HTTP version it saw.
/// The first `drop_first` connections are closed before the TLS handshake completes.
pub async fn tls_upstream(cert: &TestCert, drop_first: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.config.clone());
    let (addr, accepted) = fault_upstream(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(|req: Request<Incoming>| async move {
                let version = format!("{:?}", req.version());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(version))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await;
    if drop_first == 0 {
        return (addr, accepted);
    }
    // Put a gate in front: the first connections are closed at once (a failed handshake,
    // no request byte sent), later ones are relayed to the TLS server.
    let gate = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate_addr = gate.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = gate.accept().await {
            if counter.fetch_add(1, Ordering::SeqCst) < drop_first {
                drop(stream);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut inner) = TcpStream::connect(addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut inner).await;
                }
            });
        }
    });
    (gate_addr, seen)
}
