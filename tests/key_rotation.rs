//! `tollgate rotate-key` (SPEC.md, Key lifecycle): the binary rewrites the keys file keeping
//! its comments and order, prints the new key once, and the old and new keys both work until
//! the overlap ends (checked on a gateway whose wall clock the test moves); a write cut
//! between the temp file and the rename leaves the old file whole.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use tollgate::auth::{ApiKey, WallClock};
use tollgate::{Config, Gateway};

const OLD: &str = "tg_live_rotate_old_0123456789abcdefghijk";

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn keys_text() -> String {
    format!(
        "# Keys of the billing team. Rotate with `tollgate rotate-key`.\n\n\
         [[keys]]\n\
         id = \"acme\"          # Acme Corp, contract 42\n\
         key = \"{}\"  # issued 2026-01-01\n\
         plan = \"pro\"\n\
         metadata = {{ customer_id = \"cus_123\" }}\n\n\
         # Never rotated.\n\
         [[keys]]\n\
         id = \"other\"\n\
         key = \"{}\"\n\
         plan = \"free\"\n",
        digest(OLD),
        digest("tg_live_other_0123456789abcdefghijklmn"),
    )
}

/// A config whose `keys_file` is `keys.toml`, both in a temp dir.
fn files(up: std::net::SocketAddr) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, keys_text()).unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [auth]\nkeys_file = \"{}\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
            keys.display()
        ),
    )
    .unwrap();
    (dir, keys, config)
}

fn rotate(keys: &Path, id: &str, failpoint: bool) -> std::process::Output {
    let mut cmd = tollgate();
    cmd.args(["rotate-key", "--keys-file"]).arg(keys).args([
        "--id",
        id,
        "--overlap",
        "7d",
        "--prefix",
        "tg_live_",
    ]);
    if failpoint {
        cmd.env("TOLLGATE_FAILPOINT", "keys-write-before-rename");
    }
    cmd.output().unwrap()
}

#[tokio::test]
async fn rotate_key_keeps_comments_and_both_keys_work_until_the_overlap_ends() {
    let up = echo_upstream().await;
    let (_dir, keys, config_path) = files(up);
    let before = std::fs::read_to_string(&keys).unwrap();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = rotate(&keys, "acme", false);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        redact(&String::from_utf8_lossy(&out.stderr))
    );
    let new_key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:  "))
        .expect("the new key is printed")
        .to_owned();
    assert!(new_key.starts_with("tg_live_") && new_key.len() == 8 + 43);
    assert_eq!(stdout.matches(&new_key).count(), 1, "printed once");

    // The diff: one line changed, the key line, its comment kept; every other line as it was.
    let after = std::fs::read_to_string(&keys).unwrap();
    let (old_lines, new_lines): (Vec<&str>, Vec<&str>) =
        (before.lines().collect(), after.lines().collect());
    assert_eq!(old_lines.len(), new_lines.len(), "{after}");
    let changed: Vec<(&str, &str)> = old_lines
        .iter()
        .zip(&new_lines)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (*a, *b))
        .collect();
    assert_eq!(changed.len(), 1, "{after}");
    let expires = stdout
        .lines()
        .find_map(|l| l.strip_prefix("the old key of \"acme\" works until "))
        .expect("the old key's end is printed");
    assert_eq!(
        changed[0].1,
        format!(
            "key = [\"{}\", {{ digest = \"{}\", expires_at = \"{expires}\" }}]  # issued 2026-01-01",
            ApiKey::new(new_key.as_str()).digest(),
            digest(OLD)
        )
    );
    let expires_at = tollgate::config::units::parse_rfc3339(expires).unwrap();
    assert!((started + 7 * 86_400..=started + 7 * 86_400 + 60).contains(&expires_at));

    // The rotated file as the gateway loads it: both keys work until the overlap ends.
    let config = Config::load_to_serve(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let clock = WallClock::fake(started);
    let gateway = Arc::new(Gateway::with_wall_clock(config.clone(), clock.clone()));
    let gw = TestGateway::start_with(config, gateway.clone(), gateway).await;
    for key in [OLD, new_key.as_str()] {
        let r = with_key(gw.addr, "/v1/x", key).await;
        assert_eq!(r.status, 200, "{}", r.shown());
        assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "acme");
        assert_eq!(
            r.json()["headers"]["x-tollgate-key-meta-customer-id"],
            "cus_123"
        );
    }
    // Within 14 days of its end, the old key is warned; the new one is not.
    let r = with_key(gw.addr, "/v1/x", OLD).await;
    assert!(r.header("x-api-key-expires").is_some(), "{}", r.shown());
    clock.set(expires_at - 1);
    assert_eq!(with_key(gw.addr, "/v1/x", OLD).await.status, 200);
    clock.set(expires_at);
    let r = with_key(gw.addr, "/v1/x", OLD).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["message"], "API key has expired");
    let r = with_key(gw.addr, "/v1/x", &new_key).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert!(r.header("x-api-key-expires").is_none());
}

#[test]
fn a_write_cut_between_the_temp_file_and_the_rename_leaves_the_old_file_intact() {
    let (_dir, keys, _config) = files("127.0.0.1:9".parse().unwrap());
    let before = std::fs::read(&keys).unwrap();
    let out = rotate(&keys, "acme", true);
    assert!(
        !out.status.success(),
        "the process was killed at the failpoint"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("key:"),
        "no key is shown for a write that did not happen"
    );
    assert_eq!(std::fs::read(&keys).unwrap(), before, "old file intact");
    // The temp file it was writing is all that is left of the attempt, beside the old file.
    let temps: Vec<String> = std::fs::read_dir(keys.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert_eq!(temps.len(), 1, "{temps:?}");
    // And the next rotation goes through.
    assert!(rotate(&keys, "acme", false).status.success());
    assert_ne!(std::fs::read(&keys).unwrap(), before);
}

#[test]
fn an_unknown_id_changes_nothing() {
    let (_dir, keys, _config) = files("127.0.0.1:9".parse().unwrap());
    let before = std::fs::read(&keys).unwrap();
    let out = rotate(&keys, "nobody", false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key with id \"nobody\""));
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read(&keys).unwrap(), before);
}
