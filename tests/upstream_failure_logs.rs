//! The log lines of upstream failures, read from the real binary's stderr: each carries its
//! failure kind and the request ID, and a repeated failure is logged once a second with a
//! count.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs the real binary with JSON logs, collecting its stderr lines.
struct Process {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn start(config: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                sink.lock().unwrap().push(line.unwrap_or_default());
            }
        });
        let process = Self { child, lines };
        process.wait_for(|l| l.contains("admin listening"));
        process
    }

    /// Writes `config` (listeners on port 0) to a file, starts the binary on it, and returns
    /// it with the address it logs it listens on. (A port picked here and released for the
    /// process to bind could be taken by another test in between.)
    fn serving(config: &str) -> (Self, SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{config}"
            ),
        )
        .unwrap();
        let process = Self::start(&path);
        let listening = process.wait_for(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["message"] == "listening")
        });
        let addr = serde_json::from_str::<serde_json::Value>(&listening).unwrap()["addr"]
            .as_str()
            .unwrap_or_else(|| panic!("no addr in {listening}"))
            .parse()
            .unwrap();
        (process, addr, dir)
    }

    fn wait_for(&self, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| found(l)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no such log line in:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An upstream that speaks plain HTTP where TLS is expected: every handshake fails.
async fn plain_where_tls_is_expected() -> SocketAddr {
    fault_upstream(|mut stream| async move {
        let mut hello = [0u8; 512];
        let _ = stream.read(&mut hello).await;
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    })
    .await
    .0
}

/// An upstream that sends a 200 head announcing 1,000 bytes and 10 of them, then resets the
/// connection after `wait`.
async fn cut_after_the_head(wait: Duration) -> SocketAddr {
    fault_upstream(move |mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
        tokio::time::sleep(wait).await;
        let _ = stream.set_zero_linger();
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_log_lines_carry_the_kind_and_the_request_id() {
    let dead = refusing_addr();
    let (hang, _) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let cut = cut_after_the_head(Duration::from_millis(100)).await;
    let plain = plain_where_tls_is_expected().await;
    let (process, addr, _dir) = Process::serving(&format!(
        "[[upstreams]]\nname = \"dead\"\nurl = \"http://{dead}\"\n\
             [[upstreams]]\nname = \"hang\"\nurl = \"http://{hang}\"\ntimeout = \"300ms\"\n\
             [[upstreams]]\nname = \"cut\"\nurl = \"http://{cut}\"\n\
             [[upstreams]]\nname = \"plain\"\nurl = \"https://{plain}\"\n\
             [[routes]]\nprefix = \"/dead/\"\nupstream = \"dead\"\nauth = false\n\
             [[routes]]\nprefix = \"/hang/\"\nupstream = \"hang\"\nauth = false\n\
             [[routes]]\nprefix = \"/cut/\"\nupstream = \"cut\"\nauth = false\n\
             [[routes]]\nprefix = \"/plain/\"\nupstream = \"plain\"\nauth = false\n"
    ));
    for (path, status, code, kind) in [
        ("/dead/x", 502, "bad_gateway", "connect_refused"),
        ("/hang/x", 504, "gateway_timeout", "timeout"),
    ] {
        let reply = get(addr, path, &[]).await;
        let upstream = if kind == "timeout" { hang } else { dead };
        let id = assert_failure(&reply, status, code, upstream);
        let line = process.wait_for(|l| l.contains(&id) && l.contains("upstream failure"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], kind, "{}", redact(&line.to_string()));
        assert_eq!(v["level"], "WARN", "{}", redact(&line.to_string()));
        assert_eq!(
            v["span"]["request_id"],
            id.as_str(),
            "{}",
            redact(&line.to_string())
        );
    }

    // A failed TLS handshake is `connect_refused` too; its reason is in a warning of its own.
    let reply = get(addr, "/plain/x", &[]).await;
    let id = assert_failure(&reply, 502, "bad_gateway", plain);
    let line = process.wait_for(|l| l.contains(&id) && l.contains("could not connect"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "WARN", "{}", redact(&line.to_string()));
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt message")),
        "{}",
        redact(&line.to_string())
    );
    let line = process.wait_for(|l| l.contains(&id) && l.contains("upstream failure"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v["kind"],
        "connect_refused",
        "{}",
        redact(&line.to_string())
    );

    // After the head: the 200 is already out, so the abort is logged from the body.
    let raw = String::from_utf8_lossy(&get_until_closed(addr, "/cut/x").await).into_owned();
    let id = raw
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("x-request-id"))
        .map(|(_, value)| value.trim().to_owned())
        .expect("X-Request-Id on the 200");
    let line = process.wait_for(|l| l.contains(&id) && l.contains("client stream aborted"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["kind"], "reset", "{}", redact(&line.to_string()));
    assert_eq!(
        v["span"]["request_id"],
        id.as_str(),
        "{}",
        redact(&line.to_string())
    );
}

/// Overload and maintenance 503s come in floods (every request while an upstream is saturated
/// or switched off): the warning is written at most once a second per kind and upstream, each
/// line counting the ones left out before it (`suppressed`), so the lines still account for
/// every failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_upstream_failures_log_one_line_a_second_with_a_count() {
    // Holds every request: with max_inflight = 1 the first one keeps the only slot.
    let (slow, accepted) = fault_upstream(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let (process, addr, _dir) = Process::serving(&format!(
        "[[upstreams]]\nname = \"busy\"\nurl = \"http://{slow}\"\nmax_inflight = 1\n\
             timeout = \"60s\"\n\
             [[upstreams]]\nname = \"off\"\nurl = \"http://{slow}\"\nmaintenance = true\n\
             [[routes]]\nprefix = \"/busy/\"\nupstream = \"busy\"\nauth = false\n\
             [[routes]]\nprefix = \"/off/\"\nupstream = \"off\"\nauth = false\n"
    ));
    // Takes the slot: the request is sent, its answer never awaited.
    let mut holder = TcpStream::connect(addr).await.unwrap();
    holder
        .write_all(b"GET /busy/hold HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot is never taken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 2.5 s of both floods, then after a quiet second one more of each: its line carries the
    // count of the last second of the flood.
    let flood_started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut failed = 0;
                while flood_started.elapsed() < Duration::from_millis(2_500) {
                    for path in ["/busy/x", "/off/x"] {
                        assert_eq!(get(addr, path, &[]).await.status, 503, "{path}");
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let mut each = 0;
    for task in tasks {
        each += task.await.unwrap() / 2;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for path in ["/busy/x", "/off/x"] {
        assert_eq!(get(addr, path, &[]).await.status, 503, "{path}");
    }
    each += 1;
    let span = flood_started.elapsed();

    // (lines, failures they account for) of `kind` on `upstream`.
    let logged = |kind: &str, upstream: &str| {
        let lines = process.lines.lock().unwrap();
        let mine: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "upstream failure" && v["upstream"] == upstream)
            .collect();
        for v in &mine {
            assert_eq!(v["kind"], kind, "{v}");
            assert_eq!(v["level"], "WARN", "{v}");
            assert!(v["span"]["request_id"].is_string(), "{v}");
        }
        let accounted: u64 = mine
            .iter()
            .map(|v| 1 + v["suppressed"].as_u64().unwrap_or(0))
            .sum();
        (mine.len(), accounted)
    };
    for (kind, upstream) in [("overloaded", "busy"), ("maintenance", "off")] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while logged(kind, upstream).1 < each && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (lines, accounted) = logged(kind, upstream);
        eprintln!("{upstream}: {each} failures in {span:?}, {lines} lines");
        assert!(each >= 50, "a flood of {each} failures only");
        assert_eq!(
            accounted, each,
            "{upstream}: the lines' counts add up to the failures"
        );
        assert!(
            lines as u64 <= span.as_secs() + 2,
            "{lines} lines for {each} {kind} failures in {span:?}: more than one a second"
        );
    }
}

/// The reason a connect failed (a TLS handshake that fails on every request) and an upstream
/// body cut after its head are written at most once a second too, with the count left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_connect_and_mid_body_failures_log_one_line_a_second() {
    let plain = plain_where_tls_is_expected().await;
    let cut = cut_after_the_head(Duration::from_millis(20)).await;
    let (process, addr, _dir) = Process::serving(&format!(
        "[[upstreams]]\nname = \"plain\"\nurl = \"https://{plain}\"\n\
             [[upstreams]]\nname = \"cut\"\nurl = \"http://{cut}\"\n\
             [[routes]]\nprefix = \"/plain/\"\nupstream = \"plain\"\nauth = false\n\
             [[routes]]\nprefix = \"/cut/\"\nupstream = \"cut\"\nauth = false\n"
    ));
    let started = Instant::now();
    let (mut connects, mut cuts) = (0u64, 0u64);
    while started.elapsed() < Duration::from_millis(2_000) {
        assert_eq!(get(addr, "/plain/x", &[]).await.status, 502);
        connects += 1;
        get_until_closed(addr, "/cut/x").await;
        cuts += 1;
    }
    let span = started.elapsed();
    // (lines, failures they account for) with `message`.
    let logged = |message: &str| {
        let lines = process.lines.lock().unwrap();
        let mine: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
            .collect();
        let accounted: u64 = mine
            .iter()
            .map(|v| 1 + v["suppressed"].as_u64().unwrap_or(0))
            .sum();
        (mine.len() as u64, accounted)
    };
    // A GET that could not connect is tried once more: two connect failures per request.
    for (message, failures) in [
        ("could not connect to the upstream", 2 * connects),
        ("client stream aborted", cuts),
    ] {
        let (lines, accounted) = logged(message);
        eprintln!("{message}: {failures} failures in {span:?}, {lines} lines");
        assert!(failures >= 20, "only {failures} failures");
        assert!(lines >= 1, "{message}: not logged at all");
        assert!(
            lines <= span.as_secs() + 2,
            "{lines} '{message}' lines for {failures} failures in {span:?}"
        );
        // The last second's count is carried by a line not yet written: no more than the
        // failures are accounted for.
        assert!(accounted <= failures, "{accounted} > {failures}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_ejection_and_return_are_logged_and_access_lines_name_the_target() {
    let dead = refusing_addr();
    let up = echo_upstream().await;
    let (process, addr, _dir) = Process::serving(&format!(
        "[[upstreams]]\nname = \"pair\"\ntargets = [\"http://{dead}\", \"http://{up}\"]\n\
             eject_after = 1\neject_for = \"1s\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"pair\"\nauth = false\n"
    ));
    let json = |line: String| serde_json::from_str::<serde_json::Value>(&line).unwrap();
    for id in ["lb-1", "lb-2"] {
        assert_eq!(get(addr, "/", &[("X-Request-Id", id)]).await.status, 200);
    }
    let ejected = json(process.wait_for(|l| l.contains("upstream target ejected")));
    assert_eq!(ejected["level"], "WARN");
    assert_eq!(ejected["upstream"], "pair");
    assert_eq!(ejected["upstream_target"], dead.to_string());
    assert_eq!(ejected["ejected_for_s"], 1);
    // Both requests were answered by the live target, one after a retry.
    for id in ["lb-1", "lb-2"] {
        let access = json(
            process
                .wait_for(|l| l.contains("tollgate::access") && l.contains(&format!("\"{id}\""))),
        );
        assert_eq!(access["upstream_target"], up.to_string(), "{access}");
    }

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, "/", &[]).await.status, 200);
    let back = json(process.wait_for(|l| l.contains("back in rotation")));
    assert_eq!(back["level"], "WARN");
    assert_eq!(back["upstream_target"], dead.to_string());
}
