//! Monthly quota counts across restarts of the real binary (`limits.state_file`, local
//! backend): kept through SIGTERM, at most the last write interval lost to SIGKILL, a
//! corrupt file refused at start with its path and reason, and `check`'s warning when a
//! quota has no state file.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "tg_test_quota_state_0123456789abcdef";

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

/// A config with a quota of 5 a month on key `q`'s plan and a fixed-response route.
fn config_text(addr: SocketAddr, admin: SocketAddr, state_file: Option<&Path>) -> String {
    let state = state_file
        .map(|p| format!("state_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        r#"[server]
listen = "{addr}"
shutdown_grace = "1s"
[admin]
listen = "{admin}"
[limits]
{state}[plans.monthly]
requests_per_minute = 1000
requests_per_month = 5
[[keys]]
id = "q"
key = "{digest}"
plan = "monthly"
[[routes]]
prefix = "/"
respond = {{ status = 200, body = "ok" }}
"#,
        digest = digest(KEY)
    )
}

/// A gateway process, killed if the test fails before it is stopped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on `config` and waits until `addr` accepts connections.
async fn start(config: &Path, addr: SocketAddr) -> Child {
    let mut child = tollgate()
        .arg("--config")
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Drained, so that the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    let child = Child(child);
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

fn stop(mut child: Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.0.wait().unwrap();
    if signal == "-TERM" {
        assert_eq!(status.code(), Some(0), "a clean exit");
    }
}

async fn statuses(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(with_key(addr, "/x", KEY).await.status);
    }
    out
}

fn used_in_file(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["quotas"]["q"]["used"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_counts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let [addr, admin] = free_addrs();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(&config, config_text(addr, admin, Some(&state))).unwrap();

    let gw = start(&config, addr).await;
    assert_eq!(statuses(addr, 3).await, [200, 200, 200]);
    stop(gw, "-TERM");
    assert_eq!(used_in_file(&state), Some(3), "written at shutdown");

    let gw = start(&config, addr).await;
    let usage = get(admin, "/usage/q", &[]).await.json();
    assert_eq!(
        (usage["used"].as_u64(), usage["remaining"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(statuses(addr, 2).await, [200, 200]);
    let r = with_key(addr, "/x", KEY).await;
    assert_envelope(&r, 429, "quota_exceeded");
    stop(gw, "-TERM");
}

/// SIGKILL leaves no time to write: what was counted since the last periodic write (every
/// 10 s) is lost, and nothing before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_what_came_after_the_last_periodic_write() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let [addr, admin] = free_addrs();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(&config, config_text(addr, admin, Some(&state))).unwrap();

    let gw = start(&config, addr).await;
    assert_eq!(statuses(addr, 2).await, [200, 200]);
    let waited = Instant::now();
    while used_in_file(&state) != Some(2) {
        assert!(
            waited.elapsed() < Duration::from_secs(12),
            "no periodic write in 12 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(statuses(addr, 1).await, [200]);
    stop(gw, "-KILL");

    let gw = start(&config, addr).await;
    let used = get(admin, "/usage/q", &[]).await.json()["used"]
        .as_u64()
        .unwrap();
    assert!(
        (2..=3).contains(&used),
        "used {used}: the periodic write's 2, maybe the 3rd"
    );
    stop(gw, "-TERM");
}

#[test]
fn a_corrupt_state_file_is_refused_at_start_with_its_path_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{\"version\":1,\"quotas\":{\"q\":").unwrap();
    let config = dir.path().join("tollgate.toml");
    let [addr, admin] = free_addrs();
    std::fs::write(&config, config_text(addr, admin, Some(&state))).unwrap();
    let out = tollgate()
        .arg("--config")
        .arg(&config)
        .args(["--log-format", "human"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "limits.state_file {}: is not a tollgate state file",
            state.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\":1,\"quotas\":{\"q\":",
        "left as it was"
    );
}

#[test]
fn check_warns_about_a_quota_without_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let [addr, admin] = free_addrs();
    std::fs::write(&config, config_text(addr, admin, None)).unwrap();
    let out = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: plan monthly has requests_per_month, but limits.backend is \"local\" and no limits.state_file is set"),
        "{stderr}"
    );
    // With a state file: no warning.
    let state = dir.path().join("state.json");
    let [addr, admin] = free_addrs();
    std::fs::write(&config, config_text(addr, admin, Some(&state))).unwrap();
    let out = tollgate()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}
