//! Real Redis processes for the Redis deployment tests (TLS, Sentinel, Cluster): each a
//! `redis-server` (or `redis-server --sentinel`) child on a free loopback port, without
//! persistence, in a temporary directory, killed on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released: the server must bind it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` child process; killed on drop.
pub struct RedisProc {
    /// The port it listens on (the TLS port for a TLS-only server).
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

impl RedisProc {
    /// Starts `redis-server` with `args(port)` on a free port and waits until the port
    /// accepts connections. Another process may take the port between the pick and the
    /// bind: then the server exits at once, and another port is tried.
    pub fn start(args: impl Fn(u16) -> Vec<String>) -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
                args: Vec::new(),
            };
            server.args = args(server.port);
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    /// Starts it again, on the same port with the same arguments, after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        assert!(self.spawn(), "port {} taken while it was down", self.port);
    }

    /// Spawns the server and waits until its port accepts; false if it exited first.
    fn spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (tests/run.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The usual arguments of a throwaway server: loopback, no persistence, files in `dir`.
    pub fn base_args(dir: &Path) -> Vec<String> {
        [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A plain server (no TLS, no persistence, nothing written) on a free port.
    pub fn plain() -> Self {
        Self::start(|port| {
            let mut args = vec!["--port".to_owned(), port.to_string()];
            args.extend(Self::base_args(&std::env::temp_dir()));
            args
        })
    }

    /// `redis://127.0.0.1:<port>` (a plain server's URL).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A blocking connection to a plain server.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_millis(500))
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p port args...`: its stdout, trimmed; panics if it fails.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    try_redis_cli(port, args).unwrap_or_else(|e| panic!("redis-cli {args:?}: {e}"))
}

/// `redis-cli -p port args...`: its stdout, trimmed, or its error (a connection Sentinel
/// dropped in a failover, say).
pub fn try_redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH (it comes with redis-server)");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // redis-cli exits 0 after some connection errors, with the error on stdout.
    if out.status.success() && !stdout.starts_with("Error:") {
        Ok(stdout)
    } else {
        Err(format!("{stdout} {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
