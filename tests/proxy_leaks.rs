//! No file-descriptor or memory growth from failing upstream requests, and the memory of an
//! HTTP/2 burst returned once idle.
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
    rss_kib_of("self")
}

/// `VmRSS` of a process (`"self"` or a pid), in KiB.
fn rss_kib_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The tests of this binary run one at a time: one reads this process's RSS, which the other's
/// HTTP/2 client would disturb.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _serial = SERIAL.lock().await;
    let dead = refusing_addr();
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

/// The `tollgate` binary, killed when the test ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `conns` h2c connections, each with `streams` GETs in flight at once, all answered 200.
async fn h2_burst(addr: SocketAddr, conns: usize, streams: usize) {
    let mut connections = tokio::task::JoinSet::new();
    for _ in 0..conns {
        connections.spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .expect("h2c handshake");
            let driver = tokio::spawn(conn);
            let mut requests = tokio::task::JoinSet::new();
            for i in 0..streams {
                let mut sender = sender.clone();
                requests.spawn(async move {
                    let req = http::Request::get(format!("http://gw/burst/{i}"))
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let response = sender.send_request(req).await.expect("h2 response");
                    assert_eq!(response.status(), 200);
                    http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .expect("h2 body");
                });
            }
            while let Some(done) = requests.join_next().await {
                done.unwrap();
            }
            drop(sender);
            let _ = driver.await;
        });
    }
    while let Some(done) = connections.join_next().await {
        done.unwrap();
    }
}

/// The binary (not the in-process server: the trim is the binary's) serves 10,000 concurrent
/// HTTP/2 streams twice; their memory is freed, and the process must hand it back to the OS
/// once idle (within two trim intervals of quiet), not keep its peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_an_h2_burst_is_returned_when_idle() {
    let _serial = SERIAL.lock().await;
    let [port, admin] = free_addrs().map(|addr| addr.port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [plans.anonymous]\nrequests_per_minute = 60000000\n\
             [limits.ip_throttle]\nrejections = 2000000000\nwindow = \"1s\"\nblock_for = \"1s\"\n\
             [[routes]]\nprefix = \"/\"\nauth = false\nrespond = {{ status = 200, body = \"ok\" }}\n"
        ),
    )
    .unwrap();
    let child = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(&path)
            .args(["--log-level", "warn"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_start = rss_kib_of(&pid);

    let started = Instant::now();
    let mut peak = 0;
    for _ in 0..2 {
        h2_burst(addr, 100, 100).await;
        peak = peak.max(rss_kib_of(&pid));
    }
    let took = started.elapsed();

    // Idle: the process must come back near where it started. Without returning freed
    // memory it stays at its peak (tens of MiB above the start) for good.
    let bound = rss_start + 16 * 1024;
    let idle = Instant::now();
    let mut rss_idle = rss_kib_of(&pid);
    while rss_idle > bound && idle.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_idle = rss_kib_of(&pid);
    }
    eprintln!(
        "2 × 10,000 concurrent h2 streams in {took:?}: VmRSS {rss_start} KiB at start, \
         {peak} KiB after a burst, {rss_idle} KiB after {:?} idle",
        idle.elapsed()
    );
    assert!(
        rss_idle <= bound,
        "RSS not returned when idle: {rss_start} KiB at start, {peak} KiB after the bursts, \
         {rss_idle} KiB after {:?} idle (bound: start + 16 MiB)",
        idle.elapsed()
    );
}

/// The per-connection half of the bound on a burst's memory: the server's first SETTINGS frame
/// caps concurrent streams at 100 (hyper's default is 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_take_at_most_100_concurrent_streams() {
    let _serial = SERIAL.lock().await;
    let gw = TestGateway::start(config(
        "",
        "[[routes]]\nprefix = \"/\"\nauth = false\nrespond = { status = 200, body = \"ok\" }\n",
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // The client preface, then an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    let max_concurrent_streams = payload
        .chunks_exact(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == 0x3)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(max_concurrent_streams, Some(100));
}
