//! `auth.store = "redis"` over the wire, with two gateway instances and a real
//! `redis-server` (started per test on a free loopback port, as in tests/redis.rs): a key
//! created through one instance's admin API works on the other within 1 s, a revoke holds on
//! both, Redis stopped leaves both serving the keys they have, a change written while the
//! instances were cut off is picked up by the resync, and a cold start with Redis down
//! serves the keys of `auth.keys_cache_file`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tollgate::{Config, Gateway};

const TOKEN: &str = "tg_admin_redis_token_0123456789abcdefghi";
/// The instances' full resync interval in these tests.
const RESYNC: Duration = Duration::from_millis(500);

/// A `redis-server` on a loopback port, appending to a file in its own directory, so a
/// restart keeps the keys (as a production Redis with persistence does).
struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = Self {
                port,
                dir: tempfile::tempdir().unwrap(),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if let Ok(mut conn) = redis::Client::open(self.url())
                .unwrap()
                .get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return true;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One gateway instance with the key API and the Redis key store.
struct Instance {
    gw: TestGateway,
    _sync: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

async fn instance(redis: &str, up: SocketAddr, cache: &Path) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{}\"\n\
             [auth]\nstore = \"redis\"\nkeys_cache_file = \"{}\"\n\
             [limits]\nredis_url = \"{redis}\"\n\
             [limits.failed_auth]\nattempts = 1000000\n\
             [[keys]]\nid = \"in-config\"\nkey = \"{}\"\nplan = \"free\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
            digest(TOKEN),
            cache.display(),
            digest("tg_live_in_config_0123456789abcdefghijklm"),
        ),
    )
    .unwrap();
    let config = Config::load_to_serve(&path).unwrap_or_else(|e| panic!("{e}"));
    let gateway = Arc::new(Gateway::new(config.clone()));
    tollgate::reload::key_api::install(&gateway, &path);
    let sync = tollgate::reload::key_sync::start(&gateway, RESYNC).await;
    assert!(sync.is_some(), "the key store follows Redis");
    let gw = TestGateway::start_with(config, gateway.clone(), gateway).await;
    Instance {
        gw,
        _sync: sync,
        _dir: dir,
    }
}

async fn admin(gw: &TestGateway, method: &str, path: &str, body: &str) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    request(
        gw.admin,
        method,
        path,
        &[("Authorization", &auth)],
        body.as_bytes(),
    )
    .await
}

async fn create(gw: &TestGateway, id: &str) -> String {
    let r = admin(
        gw,
        "POST",
        "/keys",
        &format!(r#"{{"id": "{id}", "plan": "pro", "metadata": {{"customer_id": "cus_{id}"}}}}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.shown());
    r.json()["key"].as_str().unwrap().to_owned()
}

/// Polls `key` on `gw` every 5 ms until it gets `status`; the time it took. (The instances'
/// failed-auth guard is set high: these 401s are the test's polling, not guessing.)
async fn until_status(gw: &TestGateway, key: &str, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if with_key(gw.addr, "/v1/x", key).await.status == status {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "no {status} within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn cache_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_on_a_works_on_b_within_a_second_and_a_revoke_on_b_holds_on_a() {
    let redis = RedisServer::start();
    let up = echo_upstream().await;
    let files = tempfile::tempdir().unwrap();
    let a = instance(&redis.url(), up, &cache_path(&files, "a.json")).await;
    let b = instance(&redis.url(), up, &cache_path(&files, "b.json")).await;

    let key = create(&a.gw, "acme").await;
    // On A at once: the write is applied to the instance that made it.
    assert_eq!(with_key(a.gw.addr, "/v1/x", &key).await.status, 200);
    let seen = until_status(&b.gw, &key, 200, Duration::from_secs(1)).await;
    eprintln!("created on A, working on B after {seen:?}");
    let r = with_key(b.gw.addr, "/v1/x", &key).await;
    assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "acme");
    assert_eq!(
        r.json()["headers"]["x-tollgate-key-meta-customer-id"],
        "cus_acme"
    );
    // GET on B shows it, from Redis, never its digest.
    let r = admin(&b.gw, "GET", "/keys/acme", "").await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["source"], "redis");
    assert!(!r.text().contains("sha256"));

    let r = admin(&b.gw, "DELETE", "/keys/acme", "").await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(with_key(b.gw.addr, "/v1/x", &key).await.status, 401);
    let refused = until_status(&a.gw, &key, 401, Duration::from_secs(1)).await;
    eprintln!("revoked on B, refused on A after {refused:?}");

    // Rotation through A: both keys work on B, one identity.
    let k2 = create(&a.gw, "beta").await;
    let r = admin(&a.gw, "POST", "/keys/beta/rotate", r#"{"overlap": "1h"}"#).await;
    assert_eq!(r.status, 201, "{}", r.shown());
    let k3 = r.json()["key"].as_str().unwrap().to_owned();
    until_status(&b.gw, &k3, 200, Duration::from_secs(1)).await;
    assert_eq!(with_key(b.gw.addr, "/v1/x", &k2).await.status, 200);
    // An id of the config's own keys cannot be taken.
    let r = admin(
        &a.gw,
        "POST",
        "/keys",
        r#"{"id": "in-config", "plan": "pro"}"#,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.shown());
    // The cache files hold what was synced: digests, never keys.
    let cache = std::fs::read_to_string(cache_path(&files, "b.json")).unwrap();
    assert!(
        cache.contains("\"beta\"") && !cache.contains(&k3),
        "{cache}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_both_keep_serving_and_a_change_made_meanwhile_is_picked_up() {
    let mut redis = RedisServer::start();
    let up = echo_upstream().await;
    let files = tempfile::tempdir().unwrap();
    let a = instance(&redis.url(), up, &cache_path(&files, "a.json")).await;
    let b = instance(&redis.url(), up, &cache_path(&files, "b.json")).await;
    let key = create(&a.gw, "acme").await;
    until_status(&b.gw, &key, 200, Duration::from_secs(1)).await;

    let time = async |gw: &TestGateway| {
        let started = Instant::now();
        for _ in 0..20 {
            assert_eq!(with_key(gw.addr, "/v1/x", &key).await.status, 200);
        }
        started.elapsed() / 20
    };
    let (up_a, up_b) = (time(&a.gw).await, time(&b.gw).await);
    redis.kill();
    let (down_a, down_b) = (time(&a.gw).await, time(&b.gw).await);
    eprintln!(
        "mean request, Redis up: A {up_a:?} B {up_b:?}; Redis down: A {down_a:?} B {down_b:?}"
    );
    // No request waits on Redis for a key: far below the 2 s Redis command timeout.
    assert!(down_a < Duration::from_millis(200) && down_b < Duration::from_millis(200));
    // Writes need Redis: refused, nothing changed.
    let r = admin(&a.gw, "POST", "/keys", r#"{"id": "later", "plan": "pro"}"#).await;
    assert_eq!(r.status, 503, "{}", r.shown());

    // Back, with its data; a key written straight into the hash, with no message published
    // (as if the instances missed it): the resync finds it.
    assert!(redis.spawn(), "redis-server restarts on its port");
    let digest_text = digest("tg_live_written_while_away_0123456789abcd");
    let stored = format!(
        r#"{{"id":"direct","digests":[{{"digest":"{digest_text}","expires_at":null}}],"plan":"pro"}}"#
    );
    let _: () = redis::cmd("HSET")
        .arg("tollgate:keys")
        .arg("direct")
        .arg(stored)
        .query(&mut redis.connection())
        .unwrap();
    for gw in [&a.gw, &b.gw] {
        let took = until_status(
            gw,
            "tg_live_written_while_away_0123456789abcd",
            200,
            Duration::from_secs(5),
        )
        .await;
        eprintln!("written while away, picked up after {took:?}");
        assert_eq!(with_key(gw.addr, "/v1/x", &key).await.status, 200, "kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_redis_down_serves_the_keys_of_the_cache_file() {
    let mut redis = RedisServer::start();
    let up = echo_upstream().await;
    let files = tempfile::tempdir().unwrap();
    let cache = cache_path(&files, "keys-cache.json");
    let key = {
        let a = instance(&redis.url(), up, &cache).await;
        create(&a.gw, "acme").await
    };
    assert!(cache.exists(), "written after the sync");
    redis.kill();
    let c = instance(&redis.url(), up, &cache).await;
    let r = with_key(c.gw.addr, "/v1/x", &key).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "acme");
    // The config's own keys work too, and an unknown key does not.
    assert_eq!(
        with_key(
            c.gw.addr,
            "/v1/x",
            "tg_live_in_config_0123456789abcdefghijklm"
        )
        .await
        .status,
        200
    );
    assert_eq!(
        with_key(
            c.gw.addr,
            "/v1/x",
            "tg_live_unknown_0123456789abcdefghijklm"
        )
        .await
        .status,
        401
    );
}
