//! TLS termination over the wire (SPEC.md, `[server.tls]`): certificates made here with rcgen,
//! h2 and HTTP/1.1 chosen by ALPN, `X-Forwarded-Proto: https`, certificates that follow a
//! reload, and handshakes that neither block the accept loop nor outlive
//! `server.header_read_timeout`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A certificate for `localhost` / 127.0.0.1, written as PEM files.
struct TestCert {
    der: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

fn make_cert(dir: &Path, name: &str) -> TestCert {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    TestCert {
        der: generated.cert.der().clone(),
        cert,
        key,
    }
}

fn tls_config(cert: &TestCert, server_extra: &str, upstream: SocketAddr) -> tollgate::Config {
    config(
        server_extra,
        &format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [[upstreams]]\nname = \"echo\"\nurl = \"http://{upstream}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"echo\"\nauth = false\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
}

/// A TLS connection trusting only `trust`, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    trust: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// GET `path` over `stream` with HTTP/2 or HTTP/1.1; returns the version, status and the
/// echoed JSON.
async fn get_over(
    stream: TlsStream<TcpStream>,
    h2: bool,
    path: &str,
) -> (Version, u16, serde_json::Value) {
    let io = TokioIo::new(stream);
    let request = |uri: &str| {
        Request::get(uri)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
            .send_request(request(&format!("https://localhost{path}")))
            .await
            .unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(request(path)).await.unwrap()
    };
    let version = response.version();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        version,
        status,
        serde_json::from_slice(&body).unwrap_or_default(),
    )
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn_and_the_upstream_sees_https() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "a");
    let gw = TestGateway::start(tls_config(&cert, "", echo_upstream().await)).await;

    let stream = connect(gw.addr, &cert.der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (version, status, echo) = get_over(stream, true, "/v1/x?q=1").await;
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/v1/x");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
}

/// Over TLS too, an HTTP/1.1 client that goes away (here without a `close_notify`) while its
/// request waits on the upstream cancels it at once (hyper watches the TLS stream there).
#[tokio::test]
async fn a_tls_client_that_goes_away_cancels_its_upstream_request() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "a");
    let (up, mut events) = silent_upstream().await;
    let gw = TestGateway::start(tls_config(&cert, "", up)).await;
    let mut stream = connect(gw.addr, &cert.der, &[b"http/1.1"]).await;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(event.unwrap(), Some("request"));
    let left = Instant::now();
    drop(stream);
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(
        event.expect("the upstream connection was not closed within 5 s"),
        Some("closed")
    );
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
}

#[tokio::test]
async fn http11_over_tls_when_the_client_offers_only_http11() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "a");
    let gw = TestGateway::start(tls_config(&cert, "", echo_upstream().await)).await;

    let stream = connect(gw.addr, &cert.der, &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (version, status, echo) = get_over(stream, false, "/v1/y").await;
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(status, 200);
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    // No ALPN at all: HTTP/1.1 too.
    let stream = connect(gw.addr, &cert.der, &[]).await;
    let (version, status, _) = get_over(stream, false, "/v1/z").await;
    assert_eq!((version, status), (Version::HTTP_11, 200));
}

#[tokio::test]
async fn plain_http_gets_no_answer_and_tls_1_2_clients_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "a");
    let gw = TestGateway::start(tls_config(&cert, "", echo_upstream().await)).await;
    // Plain HTTP on a TLS listener: no HTTP answer, the connection is closed.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(
        !buf.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    // A TLS 1.2-only client is served (1.2 and 1.3 are enabled; rustls has nothing older).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn a_stalled_handshake_neither_blocks_others_nor_outlives_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "a");
    let gw = TestGateway::start(tls_config(
        &cert,
        "header_read_timeout = \"1s\"",
        echo_upstream().await,
    ))
    .await;
    // Connected, never sends a ClientHello.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let stream = connect(gw.addr, &cert.der, &[b"h2"]).await;
    let (_, status, _) = get_over(stream, true, "/").await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed by the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_slow_head_over_tls_gets_a_408_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "a");
    let gw = TestGateway::start(tls_config(
        &cert,
        "header_read_timeout = \"400ms\"",
        echo_upstream().await,
    ))
    .await;
    let mut stream = connect(gw.addr, &cert.der, &[b"http/1.1"]).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    // The response, then close_notify (EOF); a reset or a missing close_notify is an error.
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got))
        .await
        .expect("closed within 5s")
        .expect("a clean TLS close");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let reply = parse_reply(&got)
        .unwrap_or_else(|| panic!("no response in {:?}", String::from_utf8_lossy(&got)));
    assert_eq!(reply.status, 408, "{}", reply.shown());
    assert_eq!(reply.json()["error"]["code"], "request_timeout");
    assert_eq!(reply.header("connection"), Some("close"));
    assert_generated_id(reply.header("x-request-id").expect("X-Request-Id"));
}

#[tokio::test]
async fn a_reload_with_new_files_serves_the_new_certificate_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (make_cert(dir.path(), "a"), make_cert(dir.path(), "b"));
    let up = echo_upstream().await;
    let gw = TestGateway::start(tls_config(&a, "", up)).await;
    let old = connect(gw.addr, &a.der, &[b"http/1.1"]).await;

    gw.gateway.reload(tls_config(&b, "", up));
    let stream = connect(gw.addr, &b.der, &[b"h2"]).await;
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0],
        b.der,
        "new connections get the new certificate"
    );
    assert_eq!(get_over(stream, true, "/").await.1, 200);
    // A connection made before the reload keeps working.
    assert_eq!(get_over(old, false, "/").await.1, 200);
}

#[test]
fn check_rejects_a_key_that_does_not_match_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (make_cert(dir.path(), "a"), make_cert(dir.path(), "b"));
    let text = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        a.cert.display(),
        b.key.display()
    );
    let error = tollgate::Config::from_text(Path::new("t.toml"), &text).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("t.toml:2:8: server.tls: certificate and key not usable"),
        "{error}"
    );
}
