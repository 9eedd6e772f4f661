//! No file-descriptor or memory growth from failing upstream requests.
//!
//! A test binary of its own: it reads this process's `/proc/self/fd` and `VmRSS`, which other
//! tests running in parallel threads of the same process would disturb.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One keep-alive client connection sending GETs and reading each response whole.
struct KeepAliveClient {
    stream: BufReader<TcpStream>,
}

impl KeepAliveClient {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    /// Sends a GET and returns the status.
    async fn get(&mut self, path: &str) -> u16 {
        let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(self.stream.read_u8().await.expect("response head"));
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let length: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("error envelopes have a Content-Length");
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await.unwrap();
        text[9..12].parse().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_refused_requests_leak_no_fds_or_memory() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{dead}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await;
    let mut client = KeepAliveClient::connect(gw.addr).await;

    // Warm-up: allocator arenas, pool structures, lazily built tables.
    for _ in 0..1_000 {
        assert_eq!(client.get("/warm").await, 502);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (fds_before, rss_before) = (open_fds(), rss_kib());

    let started = Instant::now();
    for _ in 0..10_000 {
        assert_eq!(client.get("/v1/fail").await, 502);
    }
    let took = started.elapsed();
    // Sockets of failed connects are closed by the time the 502 is written; give the
    // runtime a moment for anything deferred.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds_after, rss_after) = (open_fds(), rss_kib());

    eprintln!(
        "10,000 refused requests (each GET also retried once) in {took:?}: \
         fds {fds_before} -> {fds_after}, VmRSS {rss_before} KiB -> {rss_after} KiB \
         ({:+} KiB)",
        rss_after as i64 - rss_before as i64
    );
    assert!(
        fds_after <= fds_before + 10,
        "fds grew: {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < rss_before + 10 * 1024,
        "RSS grew by more than 10 MiB: {rss_before} -> {rss_after} KiB"
    );
}
