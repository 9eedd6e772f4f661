//! The admin key API over the wire (SPEC.md, Admin API), `auth.store = "file"`: each write
//! lands in the keys file (comments kept) and holds from the next request on the main
//! listener; the admin token, the failed-auth guard, and the 400/404/409/422 envelopes.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use tollgate::auth::WallClock;
use tollgate::{Config, Gateway};

const TOKEN: &str = "tg_admin_test_token_0123456789abcdefghij";
const EXISTING: &str = "tg_live_existing_0123456789abcdefghijklm";
/// 2026-12-06T00:00:00Z, the gateway's fake wall clock at the start.
const NOW: u64 = 1_796_515_200;

struct Admin {
    gw: TestGateway,
    clock: WallClock,
    keys: PathBuf,
    _dir: tempfile::TempDir,
}

const KEYS: &str = "# Keys managed by the admin API; this comment stays.\n\n[[keys]]\nid = \"existing\"  # made by hand\nkey = \"DIGEST\"\nplan = \"pro\"\n";

/// A gateway with the key API on (`token`), its keys file beside the config.
async fn start(token: bool, extra: &str) -> Admin {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, KEYS.replace("DIGEST", &digest(EXISTING))).unwrap();
    let path = dir.path().join("gw.toml");
    let token_line = if token {
        format!("token = \"{}\"\n", digest(TOKEN))
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{token_line}\
             [auth]\nkeys_file = \"{}\"\n{extra}\n\
             [plans.tiny]\nrequests_per_minute = 2\n\
             [[keys]]\nid = \"in-config\"\nkey = \"{}\"\nplan = \"free\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
            keys.display(),
            digest("tg_live_in_config_0123456789abcdefghijklm"),
        ),
    )
    .unwrap();
    let config = Config::load_to_serve(&path).unwrap_or_else(|e| panic!("{e}"));
    let clock = WallClock::fake(NOW);
    let gateway = Arc::new(Gateway::with_wall_clock(config.clone(), clock.clone()));
    tollgate::reload::key_api::install(&gateway, &path);
    let gw = TestGateway::start_with(config, gateway.clone(), gateway).await;
    Admin {
        gw,
        clock,
        keys,
        _dir: dir,
    }
}

async fn call(admin: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json"));
    }
    request(admin, method, path, &headers, body.as_bytes()).await
}

/// The envelope of a refused call: status, code, and the field it names.
fn assert_refused(r: &Reply, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.shown());
    let v = r.json();
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], code, "{}", r.shown());
    assert_eq!(v["error"]["field"].as_str(), field, "{}", r.shown());
}

async fn create(admin: SocketAddr, body: &str) -> (String, String) {
    let r = call(admin, "POST", "/keys", body).await;
    assert_eq!(r.status, 201, "{}", r.shown());
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_created_key_works_on_the_next_request_and_lands_in_the_file() {
    let a = start(true, "").await;
    let before = std::fs::read_to_string(&a.keys).unwrap();
    let (id, key) = create(
        a.gw.admin,
        r#"{"id": "acme", "plan": "tiny", "scopes": ["x:read"], "metadata": {"customer_id": "cus_9"}, "expires_at": "2027-01-15T00:00:00Z", "prefix": "tg_live_"}"#,
    )
    .await;
    assert_eq!(id, "acme");
    assert!(key.starts_with("tg_live_") && key.len() == 8 + 43);
    let r = with_key(a.gw.addr, "/v1/x", &key).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "acme");
    assert_eq!(
        r.json()["headers"]["x-tollgate-key-meta-customer-id"],
        "cus_9"
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"), "the plan given");

    // The file: what was there, unchanged, then the new table; no plaintext key in it.
    let after = std::fs::read_to_string(&a.keys).unwrap();
    assert!(after.starts_with(&before), "{after}");
    assert!(after.contains("id = \"acme\""));
    assert!(!after.contains(&key));
    assert!(
        after.contains("created_at = \"2026-12-06T00:00:00Z\""),
        "{after}"
    );

    // GET shows it, never a key or digest.
    let r = call(a.gw.admin, "GET", "/keys/acme", "").await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let v = r.json();
    assert_eq!(v["plan"], "tiny");
    assert_eq!(v["scopes"], serde_json::json!(["x:read"]));
    assert_eq!(v["metadata"]["customer_id"], "cus_9");
    assert_eq!(v["expires_at"], "2027-01-15T00:00:00Z");
    assert_eq!(v["created_at"], "2026-12-06T00:00:00Z");
    assert_eq!(v["disabled"], false);
    assert_eq!(v["source"], "keys_file");
    assert!(!r.text().contains("sha256") && !r.text().contains(&key));

    // An id is made up when none is given.
    let (generated, key2) = create(a.gw.admin, r#"{"plan": "free"}"#).await;
    assert!(generated.starts_with("key_"), "{generated}");
    assert_eq!(with_key(a.gw.addr, "/v1/x", &key2).await.status, 200);
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_the_next_request() {
    let a = start(true, "").await;
    assert_eq!(with_key(a.gw.addr, "/v1/x", EXISTING).await.status, 200);
    let r = call(a.gw.admin, "DELETE", "/keys/existing", "").await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let r = with_key(a.gw.addr, "/v1/x", EXISTING).await;
    assert_eq!(r.status, 401, "{}", r.shown());
    assert_eq!(r.json()["error"]["message"], "Invalid or revoked API key");
    assert!(
        !std::fs::read_to_string(&a.keys)
            .unwrap()
            .contains("existing\"")
    );
    assert_refused(
        &call(a.gw.admin, "GET", "/keys/existing", "").await,
        404,
        "not_found",
        None,
    );
    // PATCH disabled revokes too, and can be undone.
    let (_, key) = create(a.gw.admin, r#"{"id": "b", "plan": "free"}"#).await;
    let r = call(a.gw.admin, "PATCH", "/keys/b", r#"{"disabled": true}"#).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["disabled"], true);
    assert_eq!(with_key(a.gw.addr, "/v1/x", &key).await.status, 401);
    call(
        a.gw.admin,
        "PATCH",
        "/keys/b",
        r#"{"disabled": false, "plan": "tiny", "metadata": {"tier": "gold"}}"#,
    )
    .await;
    let r = with_key(a.gw.addr, "/v1/x", &key).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.json()["headers"]["x-tollgate-key-meta-tier"], "gold");
}

#[tokio::test]
async fn after_a_rotation_old_and_new_work_then_only_the_new() {
    let a = start(true, "").await;
    let r = call(
        a.gw.admin,
        "POST",
        "/keys/existing/rotate",
        r#"{"overlap": "1h"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.shown());
    let v = r.json();
    let new = v["key"].as_str().unwrap().to_owned();
    assert_eq!(v["old_expires_at"], "2026-12-06T01:00:00Z");
    for key in [EXISTING, new.as_str()] {
        let r = with_key(a.gw.addr, "/v1/x", key).await;
        assert_eq!(r.status, 200, "{}", r.shown());
        assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "existing");
    }
    // The file keeps the comment on the id line.
    let text = std::fs::read_to_string(&a.keys).unwrap();
    assert!(text.contains("id = \"existing\"  # made by hand"), "{text}");
    a.clock.set(NOW + 3600);
    let r = with_key(a.gw.addr, "/v1/x", EXISTING).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["message"], "API key has expired");
    assert_eq!(with_key(a.gw.addr, "/v1/x", &new).await.status, 200);
    // The overlap is required.
    assert_refused(
        &call(a.gw.admin, "POST", "/keys/existing/rotate", "{}").await,
        422,
        "invalid_field",
        Some("overlap"),
    );
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_and_repeated_failures_block_the_ip() {
    let a = start(
        true,
        "[limits.failed_auth]\nattempts = 3\nwindow = \"60s\"\nblock_for = \"60s\"",
    )
    .await;
    let r = request(a.gw.admin, "GET", "/keys", &[], b"").await;
    assert_refused(&r, 401, "authentication_error", None);
    assert!(r.header("www-authenticate").is_some());
    let r = request(
        a.gw.admin,
        "GET",
        "/keys",
        &[("Authorization", "Bearer wrong")],
        b"",
    )
    .await;
    assert_refused(&r, 401, "authentication_error", None);
    let r = request(
        a.gw.admin,
        "POST",
        "/keys",
        &[("Authorization", "Bearer wrong")],
        br#"{"plan":"free"}"#,
    )
    .await;
    assert_refused(&r, 401, "authentication_error", None);
    // Three failures: the IP is blocked, even with the right token now.
    let r = call(a.gw.admin, "GET", "/keys", "").await;
    assert_refused(&r, 429, "ip_throttled", None);
    assert!(!r.text().contains(TOKEN));
    // Nothing was written.
    assert_eq!(
        std::fs::read_to_string(&a.keys).unwrap(),
        KEYS.replace("DIGEST", &digest(EXISTING))
    );
}

#[tokio::test]
async fn without_admin_token_key_management_is_off() {
    let a = start(false, "").await;
    let r = call(a.gw.admin, "GET", "/keys", "").await;
    assert_refused(&r, 403, "permission_denied", None);
    assert_eq!(
        r.json()["error"]["message"],
        "key management is off: set admin.token"
    );
    let r = call(a.gw.admin, "POST", "/keys", r#"{"plan":"free"}"#).await;
    assert_eq!(r.status, 403);
    // The other admin endpoints are unaffected.
    assert_eq!(get(a.gw.admin, "/healthz", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_parallel_creates_give_twenty_keys_in_the_file_and_all_work() {
    let a = start(true, "").await;
    let admin = a.gw.admin;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                create(admin, &format!(r#"{{"id": "p{i}", "plan": "free"}}"#)).await
            })
        })
        .collect();
    let mut made = Vec::new();
    for t in tasks {
        made.push(t.await.unwrap());
    }
    let text = std::fs::read_to_string(&a.keys).unwrap();
    assert_eq!(text.matches("[[keys]]").count(), 21, "{text}");
    for (id, key) in &made {
        assert!(text.contains(&format!("id = \"{id}\"")), "{id} lost");
        let r = with_key(a.gw.addr, "/v1/x", key).await;
        assert_eq!(r.status, 200, "{id}: {}", r.shown());
        assert_eq!(r.json()["headers"]["x-tollgate-key-id"], id.as_str());
    }
    // And all of them are listed, in pages.
    let first = call(admin, "GET", "/keys?limit=15", "").await.json();
    assert_eq!(first["keys"].as_array().unwrap().len(), 15);
    let next = first["next"].as_str().unwrap();
    let second = call(admin, "GET", &format!("/keys?limit=15&after={next}"), "")
        .await
        .json();
    // 20 made + "existing" + "in-config".
    assert_eq!(second["keys"].as_array().unwrap().len(), 7, "{second}");
    assert!(second["next"].is_null());
}

#[tokio::test]
async fn bad_input_gets_an_envelope_naming_the_field() {
    let a = start(true, "").await;
    let admin = a.gw.admin;
    assert_refused(
        &call(admin, "POST", "/keys", "{not json").await,
        400,
        "bad_request",
        None,
    );
    assert_refused(
        &call(admin, "POST", "/keys", "[1]").await,
        400,
        "bad_request",
        None,
    );
    assert_refused(
        &call(admin, "POST", "/keys", r#"{"plan": "free", "colour": 1}"#).await,
        400,
        "bad_request",
        Some("colour"),
    );
    assert_refused(
        &call(admin, "POST", "/keys", r#"{"id": "x"}"#).await,
        422,
        "invalid_field",
        Some("plan"),
    );
    assert_refused(
        &call(admin, "POST", "/keys", r#"{"plan": "gold"}"#).await,
        422,
        "invalid_field",
        Some("plan"),
    );
    assert_refused(
        &call(admin, "POST", "/keys", r#"{"id": "a b", "plan": "free"}"#).await,
        422,
        "invalid_field",
        Some("id"),
    );
    assert_refused(
        &call(
            admin,
            "POST",
            "/keys",
            r#"{"plan": "free", "expires_at": "soon"}"#,
        )
        .await,
        422,
        "invalid_field",
        Some("expires_at"),
    );
    assert_refused(
        &call(
            admin,
            "POST",
            "/keys",
            r#"{"plan": "free", "metadata": {"Bad Name": "x"}}"#,
        )
        .await,
        422,
        "invalid_field",
        Some("metadata"),
    );
    assert_refused(
        &call(
            admin,
            "POST",
            "/keys",
            r#"{"plan": "free", "requests_per_minute": 0}"#,
        )
        .await,
        422,
        "invalid_field",
        Some("requests_per_minute"),
    );
    assert_refused(
        &call(
            admin,
            "POST",
            "/keys",
            r#"{"id": "existing", "plan": "free"}"#,
        )
        .await,
        409,
        "conflict",
        None,
    );
    assert_refused(
        &call(
            admin,
            "POST",
            "/keys",
            r#"{"id": "in-config", "plan": "free"}"#,
        )
        .await,
        409,
        "conflict",
        None,
    );
    assert_refused(
        &call(admin, "DELETE", "/keys/in-config", "").await,
        409,
        "conflict",
        None,
    );
    assert_refused(
        &call(admin, "PATCH", "/keys/nobody", r#"{"plan": "free"}"#).await,
        404,
        "not_found",
        None,
    );
    assert_refused(
        &call(admin, "DELETE", "/keys/nobody", "").await,
        404,
        "not_found",
        None,
    );
    assert_refused(
        &call(admin, "PUT", "/keys/existing", "{}").await,
        405,
        "method_not_allowed",
        None,
    );
    // None of it changed the file.
    assert_eq!(
        std::fs::read_to_string(&a.keys).unwrap(),
        KEYS.replace("DIGEST", &digest(EXISTING))
    );
}

/// The real binary: `main` installs the key API, and every write is audited on
/// `tollgate::audit` without a key or token in any log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_key_api_and_audits_every_write_without_secrets() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let up = echo_upstream().await;
    let [addr, admin] = free_addrs();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "# managed by the key API\n").unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{addr}\"\n[admin]\nlisten = \"{admin}\"\ntoken = \"{}\"\n\
             [auth]\nkeys_file = \"{}\"\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/v1/\"\nupstream = \"up\"\n",
            digest(TOKEN),
            keys.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&path)
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no admin listener"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (id, key) = create(admin, r#"{"id": "acme", "plan": "free"}"#).await;
    let r = with_key(addr, "/v1/x", &key).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let r = call(admin, "DELETE", &format!("/keys/{id}"), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(with_key(addr, "/v1/x", &key).await.status, 401);
    let r = request(
        admin,
        "GET",
        "/keys",
        &[("Authorization", "Bearer wrong-token")],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logs = logs.join().unwrap();
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"tollgate::audit\""))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("\"action\":\"create\"")
            && l.contains("\"key_id\":\"acme\"")
            && l.contains("\"result\":\"ok\"")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|l| l.contains("\"action\":\"delete\"")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("\"action\":\"authenticate\"") && l.contains("denied")),
        "{audit:#?}"
    );
    assert!(!logs.contains(&key), "a key reached the log");
    assert!(
        !logs.contains(TOKEN) && !logs.contains("wrong-token"),
        "a token reached the log"
    );
}
