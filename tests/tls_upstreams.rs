//! `https://` upstreams: the CA file, h2 by ALPN, a CA file rewritten in place and reloaded,
//! and idempotent requests retried once after a failed connect.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// A self-signed certificate for 127.0.0.1 and localhost, and its PEM in a file.
struct TestCert {
    config: Arc<rustls::ServerConfig>,
    _dir: tempfile::TempDir,
    pem_path: std::path::PathBuf,
}

fn test_cert() -> TestCert {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
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
async fn tls_upstream(cert: &TestCert, drop_first: usize) -> (SocketAddr, Arc<AtomicUsize>) {
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

#[tokio::test]
async fn https_upstream_with_ca_file_negotiates_h2() {
    let cert = test_cert();
    let (up, _) = tls_upstream(&cert, 0).await;
    let ca = cert.pem_path.display().to_string();
    let gw = proxy_gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    for _ in 0..3 {
        let reply = get(gw.addr, "/", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.shown());
        assert_eq!(reply.text(), "HTTP/2.0", "h2 negotiated by ALPN");
    }
    // An upgrade needs HTTP/1.1: it goes over a connection that offered only that.
    let reply = get(
        gw.addr,
        "/",
        &[("Connection", "upgrade"), ("Upgrade", "websocket")],
    )
    .await;
    assert_eq!(reply.text(), "HTTP/1.1");

    // Without the CA the certificate is not trusted: 502, nothing leaked.
    let gw = proxy_gateway(&format!("https://127.0.0.1:{}", up.port()), "", "").await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
}

/// A `ca_file` rewritten in place is read again on reload: the upstream's clients are rebuilt
/// when the file's bytes changed, though its path did not.
#[tokio::test]
async fn a_reload_reads_a_ca_file_rewritten_in_place() {
    let cert = test_cert();
    let other = test_cert();
    let (up, _) = tls_upstream(&cert, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // First the wrong CA: the upstream's certificate is not trusted.
    std::fs::copy(&other.pem_path, &ca).unwrap();
    let text = format!(
        "[[upstreams]]\nname = \"up\"\nurl = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n",
        up.port(),
        ca.display()
    );
    let gw = TestGateway::start(config("", &text)).await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
    // The right CA, same path, then a reload of the same config text.
    std::fs::copy(&cert.pem_path, &ca).unwrap();
    gw.gateway.reload(config("", &text));
    let reply = get(gw.addr, "/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.shown());
    assert_eq!(reply.text(), "HTTP/2.0");
}

#[tokio::test]
async fn idempotent_requests_are_retried_once_after_a_connect_failure() {
    // The upstream's first connection fails during the TLS handshake: no request byte was
    // sent, so the GET is replayed on a fresh connection.
    let cert = test_cert();
    let ca = cert.pem_path.display().to_string();
    for (method, status, connections) in [
        ("GET", 200, 2),
        ("DELETE", 200, 2),
        ("POST", 502, 1),
        ("PATCH", 502, 1),
    ] {
        let (up, seen) = tls_upstream(&cert, 1).await;
        let gw = proxy_gateway(
            &format!("https://127.0.0.1:{}", up.port()),
            &format!("ca_file = \"{ca}\""),
            "",
        )
        .await;
        let reply = request(gw.addr, method, "/", &[], b"").await;
        assert_eq!(reply.status, status, "{method}: {}", reply.text());
        if status != 200 {
            assert_failure(&reply, status, "bad_gateway", up);
        }
        assert_eq!(seen.load(Ordering::SeqCst), connections, "{method}");
    }
    // Twice refused: one retry only, then 502.
    let (up, seen) = tls_upstream(&cert, 5).await;
    let gw = proxy_gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    let reply = get(gw.addr, "/", &[]).await;
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    // A PUT with a body cannot be replayed.
    let (up, seen) = tls_upstream(&cert, 1).await;
    let gw = proxy_gateway(
        &format!("https://127.0.0.1:{}", up.port()),
        &format!("ca_file = \"{ca}\""),
        "",
    )
    .await;
    let reply = request(gw.addr, "PUT", "/", &[], b"body").await;
    assert_eq!(reply.status, 502);
    assert_failure(&reply, 502, "bad_gateway", up);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}
