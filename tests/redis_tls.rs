//! Redis over TLS (`rediss://`, SPEC.md "Redis"), against a real `redis-server --tls-port`
//! with certificates made here with rcgen: limits exact across two gateways, mutual TLS, a
//! server whose CA is not trusted (one clear log line, `on_backend_error` decides), and the
//! password from `password_env` never in the logs.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::{RedisProc, write_file};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

const KEY_A: &str = "tg_test_redis_tls_a_0123456789abcdef";
const PASSWORD: &str = "s3cret-redis-pw-7f1c";
const PASSWORD_VAR: &str = "TOLLGATE_TEST_REDIS_TLS_PASSWORD";

/// A CA and, signed by it, a server certificate for 127.0.0.1 and a client certificate; all
/// PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client_cert, client_key) = leaf(vec!["tollgate-client".into()]);
        Self {
            ca: write_file(dir, &format!("{name}-ca.pem"), &ca.pem()),
            server_cert: write_file(dir, &format!("{name}-server.pem"), &server_cert),
            server_key: write_file(dir, &format!("{name}-server-key.pem"), &server_key),
            client_cert: write_file(dir, &format!("{name}-client.pem"), &client_cert),
            client_key: write_file(dir, &format!("{name}-client-key.pem"), &client_key),
        }
    }
}

/// A TLS-only Redis (`--port 0`) serving `pki`'s server certificate; `clients` asks for a
/// client certificate signed by its CA; `password` sets `requirepass`.
fn tls_redis(dir: &Path, pki: &Pki, clients: bool, password: Option<&str>) -> RedisProc {
    RedisProc::start(|port| {
        let mut args = RedisProc::base_args(dir);
        args.extend(
            [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                pki.server_cert.to_str().unwrap(),
                "--tls-key-file",
                pki.server_key.to_str().unwrap(),
                "--tls-ca-cert-file",
                pki.ca.to_str().unwrap(),
                "--tls-auth-clients",
                if clients { "yes" } else { "no" },
            ]
            .map(String::from),
        );
        if let Some(password) = password {
            args.extend(["--requirepass".to_owned(), password.to_owned()]);
        }
        args
    })
}

/// Key `a` on a plan of one token a minute, `burst` deep, limited in the Redis `redis`
/// (a `[redis]` section body) names; Redis down means 503.
fn config_text(redis: &str, burst: u32, up: SocketAddr) -> String {
    format!(
        r#"
[limits]
backend = "redis"
backend_timeout = "2s"
on_backend_error = "deny"
[redis]
{redis}
[plans.tight]
requests_per_minute = 1
burst = {burst}
[[keys]]
id = "a"
key = "{a}"
plan = "tight"
[[upstreams]]
name = "up"
url = "http://{up}"
[[routes]]
prefix = "/v1/"
upstream = "up"
"#,
        a = digest(KEY_A),
    )
}

async fn tls_gateway(redis: &str, burst: u32) -> TestGateway {
    let up = echo_upstream().await;
    TestGateway::start(config("", &config_text(redis, burst, up))).await
}

fn metrics_of(gw: &TestGateway) -> String {
    gw.gateway.metrics().encode()
}

fn backend_errors(text: &str, kind: &str) -> f64 {
    metric_in(
        text,
        &format!("tollgate_limiter_backend_errors_total{{kind=\"{kind}\"}}"),
    )
    .unwrap_or_else(|| panic!("no kind {kind} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_over_rediss_admit_exactly_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "good");
    let redis = tls_redis(dir.path(), &pki, false, None);
    let section = format!(
        "url = \"rediss://127.0.0.1:{}\"\nca_file = \"{}\"",
        redis.port,
        pki.ca.display()
    );
    let one = tls_gateway(&section, 25).await;
    let two = tls_gateway(&section, 25).await;
    let mut tasks = Vec::new();
    for i in 0..48 {
        let addr = if i % 2 == 0 { one.addr } else { two.addr };
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                statuses.push(with_key(addr, "/v1/x", KEY_A).await.status);
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        (admitted, limited),
        (25, 71),
        "exactly the capacity, across both"
    );
    for gw in [&one, &two] {
        let text = metrics_of(gw);
        for kind in ["timeout", "io", "tls", "auth", "other"] {
            assert_eq!(backend_errors(&text, kind), 0.0, "{kind}");
        }
        assert_eq!(
            metric_in(&text, "tollgate_redis_info{mode=\"single\",tls=\"true\"}"),
            Some(1.0),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_a_gateway_without_a_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "mtls");
    let redis = tls_redis(dir.path(), &pki, true, None);
    let url = format!("url = \"rediss://127.0.0.1:{}\"", redis.port);
    let with_cert = tls_gateway(
        &format!(
            "{url}\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
        2,
    )
    .await;
    let without = tls_gateway(&format!("{url}\nca_file = \"{}\"", pki.ca.display()), 2).await;

    // Decided by Redis (deny would answer 503): the bucket of 2 is shared, the third is 429.
    let statuses = [
        with_key(with_cert.addr, "/v1/x", KEY_A).await.status,
        with_key(with_cert.addr, "/v1/x", KEY_A).await.status,
        with_key(with_cert.addr, "/v1/x", KEY_A).await.status,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(backend_errors(&metrics_of(&with_cert), "tls"), 0.0);

    let r = with_key(without.addr, "/v1/x", KEY_A).await;
    assert_eq!(r.status, 503, "{}", r.shown());
    assert_eq!(
        r.json()["error"]["code"],
        "service_unavailable",
        "{}",
        r.shown()
    );
    assert_eq!(backend_errors(&metrics_of(&without), "tls"), 1.0);
}

/// A gateway process (the real binary) with `password_env` set in its environment; its
/// stderr, and the admin address.
struct Process {
    child: std::process::Child,
    logs: std::thread::JoinHandle<String>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Process {
    async fn start(dir: &Path, name: &str, redis: &str) -> Self {
        let up = echo_upstream().await;
        let [addr, admin] = free_addrs();
        let text = format!(
            "[server]\nlisten = \"{addr}\"\n[admin]\nlisten = \"{admin}\"\n{}",
            config_text(redis, 5, up)
        );
        let path = write_file(dir, &format!("{name}.toml"), &text);
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(&path)
            .args(["--log-format", "json", "--log-level", "debug"])
            .env(PASSWORD_VAR, PASSWORD)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut all);
            all
        });
        let started = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "no gateway");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            logs,
            addr,
            admin,
        }
    }

    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.logs.join().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_refused_with_one_clear_log_line_and_the_password_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let server_pki = Pki::new(dir.path(), "server");
    let other_pki = Pki::new(dir.path(), "other");
    let redis = tls_redis(dir.path(), &server_pki, false, Some(PASSWORD));
    let section = |ca: &Path| {
        format!(
            "url = \"rediss://127.0.0.1:{}\"\nca_file = \"{}\"\npassword_env = \"{PASSWORD_VAR}\"",
            redis.port,
            ca.display()
        )
    };

    // Trusting another CA: refused, every request decided by on_backend_error (503), for
    // longer than the warning throttle's second.
    let wrong = Process::start(dir.path(), "wrong", &section(&other_pki.ca)).await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_millis(1500) {
        statuses.push(with_key(wrong.addr, "/v1/x", KEY_A).await.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let tls_errors = metric(
        wrong.admin,
        "tollgate_limiter_backend_errors_total{kind=\"tls\"}",
    )
    .await;
    assert!(tls_errors >= 1.0, "{tls_errors}");
    let logs = wrong.stop();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"WARN\"") && l.contains("redis"))
        .collect();
    assert_eq!(warnings.len(), 1, "one line per outage:\n{logs}");
    for words in ["TLS to Redis failed", "UnknownIssuer", "\"kind\":\"tls\""] {
        assert!(warnings[0].contains(words), "{words} in {}", warnings[0]);
    }
    assert!(
        !logs.contains(PASSWORD),
        "the password in the logs:\n{logs}"
    );

    // The right CA and the password: Redis decides (a bucket of 5).
    let right = Process::start(dir.path(), "right", &section(&server_pki.ca)).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(with_key(right.addr, "/v1/x", KEY_A).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let logs = right.stop();
    assert!(
        !logs.contains(PASSWORD),
        "the password in the logs:\n{logs}"
    );
    assert!(!logs.contains("\"WARN\""), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_one_warning_and_its_end_one_info_line_with_its_duration() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "outage");
    let mut redis = tls_redis(dir.path(), &pki, false, Some(PASSWORD));
    let gw = Process::start(
        dir.path(),
        "outage",
        &format!(
            "url = \"rediss://127.0.0.1:{}\"\nca_file = \"{}\"\npassword_env = \"{PASSWORD_VAR}\"",
            redis.port,
            pki.ca.display()
        ),
    )
    .await;
    // on_backend_error = "deny": every 200 is a Redis decision, every 503 a fallback.
    assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 200);
    redis.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(1500) {
        assert_eq!(with_key(gw.addr, "/v1/x", KEY_A).await.status, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();
    while with_key(gw.addr, "/v1/x", KEY_A).await.status != 200 {
        assert!(down.elapsed() < Duration::from_secs(6), "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outage = down.elapsed();
    let logs = gw.stop();
    let lines = |level: &str, words: &str| -> Vec<serde_json::Value> {
        logs.lines()
            .filter(|l| l.contains(level) && l.contains(words))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let warnings = lines("\"WARN\"", "redis limiter backend failed");
    assert_eq!(warnings.len(), 1, "one warning per outage:\n{logs}");
    assert_eq!(warnings[0]["kind"], "io", "{}", warnings[0]);
    let recovered = lines("\"INFO\"", "redis limiter backend answering again");
    assert_eq!(recovered.len(), 1, "one line at its end:\n{logs}");
    let outage_ms = recovered[0]["outage_ms"].as_u64().unwrap();
    assert!(
        (1400..=outage.as_millis() as u64 + 50).contains(&outage_ms),
        "outage_ms {outage_ms}, seen by the client {outage:?}"
    );
    assert!(!logs.contains(PASSWORD));
}
