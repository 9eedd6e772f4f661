//! Reload over the wire (SPEC.md, Reload): `server.watch` picks up edits of the config and
//! keys files; keys are added and removed, plan limits change, drained buckets stay drained,
//! and a broken file, or one changing a setting that takes a restart, keeps the running
//! config (and is counted as a failed reload).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use tollgate::auth::ApiKey;
use tollgate::reload::file_watch::reload_on_change;

const KEY_A: &str = "tg_test_reload_a_0123456789abcdefghij";
const KEY_B: &str = "tg_test_reload_b_0123456789abcdefghij";

fn key_entry(id: &str, key: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nkey = \"{}\"\nplan = \"tight\"\n",
        ApiKey::new(key).digest()
    )
}

fn main_config(keys_file: &Path, rpm: u32, burst: u32) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nwatch = true\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nkeys_file = \"{}\"\n\
         [plans.tight]\nrequests_per_minute = {rpm}\nburst = {burst}\n\
         [[routes]]\nprefix = \"/\"\nrespond = {{ status = 200, body = \"ok\" }}\n",
        keys_file.display()
    )
}

async fn status(addr: SocketAddr, key: &str) -> u16 {
    get(addr, "/x", &[("X-API-Key", key)]).await.status
}

#[tokio::test]
async fn watched_files_reload_keys_and_limits_and_survive_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, keys) = (dir.path().join("gw.toml"), dir.path().join("keys.toml"));
    std::fs::write(&keys, key_entry("a", KEY_A)).unwrap();
    // One token a minute, one deep: a drained key stays drained for the whole test, however
    // long the polling loops below take.
    std::fs::write(&path, main_config(&keys, 1, 1)).unwrap();
    let gw = TestGateway::start(tollgate::Config::load(&path).unwrap()).await;
    tokio::spawn(reload_on_change(
        path.clone(),
        gw.gateway.clone(),
        Duration::from_millis(100),
    ));
    let addr = gw.addr;

    assert_eq!(status(addr, KEY_A).await, 200);
    assert_eq!(status(addr, KEY_A).await, 429, "burst of 1 drained");
    assert_eq!(status(addr, KEY_B).await, 401);

    // A key added to the keys file.
    std::fs::write(&keys, key_entry("a", KEY_A) + &key_entry("b", KEY_B)).unwrap();
    eventually("key b accepted", || async {
        status(addr, KEY_B).await == 200
    })
    .await;
    assert_eq!(
        status(addr, KEY_A).await,
        429,
        "a drained key stays drained across the reload"
    );

    // A key removed.
    std::fs::write(&keys, key_entry("b", KEY_B)).unwrap();
    eventually("key a revoked", || async {
        status(addr, KEY_A).await == 401
    })
    .await;

    // A broken keys file: logged, counted, the running config stays.
    std::fs::write(&keys, "[[keys]]\nid = 5\n").unwrap();
    eventually("failed reload counted", || async {
        get(gw.admin, "/metrics", &[])
            .await
            .text()
            .contains("tollgate_config_reloads_total{result=\"failed\"} 1")
    })
    .await;
    assert_eq!(
        status(addr, KEY_B).await,
        429,
        "b still known (and drained)"
    );
    assert_eq!(status(addr, KEY_A).await, 401);

    // A plan's limit changed in the main file (and the keys file fixed).
    std::fs::write(&keys, key_entry("b", KEY_B)).unwrap();
    std::fs::write(&path, main_config(&keys, 600, 5)).unwrap();
    eventually("new limit applied", || async {
        let reply = get(addr, "/x", &[("X-API-Key", KEY_B)]).await;
        reply.status == 200 && reply.header("x-ratelimit-limit") == Some("600")
    })
    .await;
}

#[tokio::test]
async fn without_watch_a_changed_file_is_not_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let (path, keys) = (dir.path().join("gw.toml"), dir.path().join("keys.toml"));
    std::fs::write(&keys, key_entry("a", KEY_A)).unwrap();
    std::fs::write(
        &path,
        main_config(&keys, 60, 1).replace("watch = true", "watch = false"),
    )
    .unwrap();
    let gw = TestGateway::start(tollgate::Config::load(&path).unwrap()).await;
    tokio::spawn(reload_on_change(
        path.clone(),
        gw.gateway.clone(),
        Duration::from_millis(50),
    ));
    std::fs::write(&keys, key_entry("a", KEY_A) + &key_entry("b", KEY_B)).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(status(gw.addr, KEY_B).await, 401);
}

/// A reload applies the whole file or none of it: a file that also changes a setting read
/// when the listeners start (here `idle_timeout`, or `watch`) is refused, its new route
/// with it, and counted as failed. The same file without that change is applied.
#[tokio::test]
async fn a_reload_that_changes_a_setting_needing_a_restart_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let text = |server: &str, body: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[routes]]\nprefix = \"/\"\nauth = false\nrespond = {{ status = 200, body = \"{body}\" }}\n"
        )
    };
    std::fs::write(&path, text("", "one")).unwrap();
    let gw = TestGateway::start(tollgate::Config::load(&path).unwrap()).await;
    let failed = "tollgate_config_reloads_total{result=\"failed\"}";

    for (n, server) in ["idle_timeout = \"5s\"", "watch = true"]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&path, text(server, "two")).unwrap();
        tollgate::reload::reload(&path, &gw.gateway);
        assert_eq!(get(gw.addr, "/", &[]).await.text(), "one", "{server}");
        assert_eq!(metric(gw.admin, failed).await, n as f64 + 1.0, "{server}");
    }

    std::fs::write(&path, text("", "two")).unwrap();
    tollgate::reload::reload(&path, &gw.gateway);
    assert_eq!(get(gw.addr, "/", &[]).await.text(), "two");
    assert_eq!(
        metric(gw.admin, "tollgate_config_reloads_total{result=\"ok\"}").await,
        1.0
    );
}
