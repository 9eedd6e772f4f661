//! API key authentication and scopes over the wire (SPEC.md, Authentication).

mod common;

use std::time::Duration;

use common::*;

const GOOD: &str = "tg_test_good_0123456789abcdefghij";
const READER: &str = "tg_test_reader_0123456789abcdefgh";
const REVOKED: &str = "tg_test_revoked_0123456789abcdefg";

/// Keys, an echo upstream, a scoped route, a public route.
async fn setup(
    server_extra: &str,
    auth: &str,
    limits: &str,
) -> (TestGateway, std::net::SocketAddr) {
    let up = echo_upstream().await;
    let text = format!(
        r#"
[auth]
{auth}
{limits}
[[keys]]
id = "acme-prod"
key = "{good}"
plan = "pro"
scopes = ["campaigns:read", "campaigns:write"]

[[keys]]
id = "reader"
key = "{reader}"
plan = "free"
scopes = ["campaigns:read"]

[[keys]]
id = "revoked"
key = "{revoked}"
plan = "free"
disabled = true

[[upstreams]]
name = "up"
url = "http://{up}"

[[routes]]
prefix = "/v1/"
upstream = "up"

[[routes]]
prefix = "/v1/campaigns/write"
upstream = "up"
scopes = ["campaigns:write"]

[[routes]]
prefix = "/public/"
upstream = "up"
auth = false
"#,
        good = digest(GOOD),
        reader = digest(READER),
        revoked = digest(REVOKED),
    );
    let gw = TestGateway::start(config(server_extra, &text)).await;
    (gw, up)
}

fn assert_401(reply: &Reply, message: &str) {
    assert_eq!(reply.status, 401, "{}", reply.shown());
    let v = reply.json();
    assert_eq!(v["error"]["code"], "authentication_error");
    assert_eq!(v["error"]["message"], message);
    assert_eq!(v["request_id"], reply.header("x-request-id").unwrap());
}

const REQUIRED: &str = "API key is required";
const INVALID: &str = "Invalid or revoked API key";

#[tokio::test]
async fn missing_unknown_disabled_and_empty_keys_are_401() {
    let (gw, _) = setup("", "", "").await;
    assert_401(&get(gw.addr, "/v1/x", &[]).await, REQUIRED);
    assert_401(&get(gw.addr, "/v1/x", &[("X-API-Key", "")]).await, REQUIRED);
    assert_401(
        &get(gw.addr, "/v1/x", &[("X-API-Key", "tg_test_unknown")]).await,
        INVALID,
    );
    assert_401(
        &get(gw.addr, "/v1/x", &[("X-API-Key", REVOKED)]).await,
        INVALID,
    );
    // A digest is not a key: presenting the config's value does not authenticate.
    assert_401(
        &get(gw.addr, "/v1/x", &[("X-API-Key", &digest(GOOD))]).await,
        INVALID,
    );
    let r = get(gw.addr, "/v1/x", &[("X-API-Key", GOOD)]).await;
    assert_eq!(r.status, 200, "{}", r.shown());
}

#[tokio::test]
async fn invalid_utf8_in_the_key_header_is_a_401() {
    let (gw, _) = setup("", "", "").await;
    let mut req =
        b"GET /v1/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-API-Key: \xff\xfe\x80abc\r\n\r\n"
            .to_vec();
    let r = send_raw(gw.addr, &req).await;
    assert_401(&r, INVALID);
    req.clear();
}

#[tokio::test]
async fn bearer_and_query_param() {
    let (gw, _) = setup("", "query_param = \"api_key\"", "").await;
    let bearer = format!("Bearer {GOOD}");
    let r = get(gw.addr, "/v1/x", &[("Authorization", &bearer)]).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let r = get(gw.addr, &format!("/v1/x?a=1&api_key={GOOD}&b=2"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.shown());
    // The query parameter is removed before forwarding, other parameters stay.
    assert!(
        r.json()["query"] == "a=1&b=2",
        "the key parameter is removed and the others kept"
    );
    // Another Authorization scheme is not a key.
    assert_401(
        &get(gw.addr, "/v1/x", &[("Authorization", "Basic dXNlcjpwYXNz")]).await,
        REQUIRED,
    );
}

#[tokio::test]
async fn query_param_and_bearer_when_off() {
    let (gw, _) = setup("", "bearer = false", "").await;
    assert_401(
        &get(gw.addr, &format!("/v1/x?api_key={GOOD}"), &[]).await,
        REQUIRED,
    );
    let bearer = format!("Bearer {GOOD}");
    let r = get(gw.addr, "/v1/x", &[("Authorization", &bearer)]).await;
    assert_401(&r, REQUIRED);
}

#[tokio::test]
async fn two_different_credentials_are_401_and_the_same_twice_is_fine() {
    let (gw, _) = setup("", "query_param = \"api_key\"", "").await;
    let bearer_reader = format!("Bearer {READER}");
    let r = get(
        gw.addr,
        "/v1/x",
        &[("X-API-Key", GOOD), ("Authorization", &bearer_reader)],
    )
    .await;
    assert_401(&r, INVALID);
    let r = get(
        gw.addr,
        &format!("/v1/x?api_key={READER}"),
        &[("X-API-Key", GOOD)],
    )
    .await;
    assert_401(&r, INVALID);
    let r = get(
        gw.addr,
        "/v1/x",
        &[("X-API-Key", GOOD), ("X-API-Key", READER)],
    )
    .await;
    assert_401(&r, INVALID);
    let bearer_good = format!("Bearer {GOOD}");
    let r = get(
        gw.addr,
        "/v1/x",
        &[("X-API-Key", GOOD), ("Authorization", &bearer_good)],
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn missing_scope_is_403_naming_the_scope() {
    let (gw, _) = setup("", "", "").await;
    let r = get(gw.addr, "/v1/campaigns/write/1", &[("X-API-Key", READER)]).await;
    assert_eq!(r.status, 403, "{}", r.shown());
    let v = r.json();
    assert_eq!(v["error"]["code"], "permission_denied");
    assert_envelope(&r, 403, "permission_denied");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("campaigns:write"),
        "{v}"
    );
    let r = get(gw.addr, "/v1/campaigns/write/1", &[("X-API-Key", GOOD)]).await;
    assert_eq!(r.status, 200);
}

/// A path spelled differently (escapes, doubled slashes, dot segments, segment parameters)
/// reaches the route the upstream will serve it as, scopes and all.
#[tokio::test]
async fn a_scoped_route_cannot_be_reached_by_respelling_its_path() {
    let (gw, _) = setup("", "", "").await;
    for path in [
        "/v1/campaigns/%77rite",
        "/v1//campaigns/write",
        "/v1/x/../campaigns/write",
        "/v1/./campaigns/./write",
        "/v1/x/%2E%2E/campaigns/write",
        "/v1/public/..;/campaigns/write",
        "/v1/campaigns;x=1/write",
    ] {
        let r = get(gw.addr, path, &[("X-API-Key", READER)]).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "permission_denied", "{path}");
        assert_envelope(&r, 403, "permission_denied");
    }
    let r = get(gw.addr, "/v1/campaigns%2Fwrite", &[("X-API-Key", READER)]).await;
    assert_eq!(r.status, 400, "an encoded slash is ambiguous: {}", r.text());
    assert_envelope(&r, 400, "bad_request");
    // The upstream gets the path in the form it was routed by.
    let r = get(
        gw.addr,
        "/v1/x/../campaigns/%77rite?draft=1",
        &[("X-API-Key", GOOD)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert_eq!(r.json()["path"], "/v1/campaigns/write");
    assert_eq!(r.json()["query"], "draft=1");
}

#[tokio::test]
async fn public_routes_need_no_key_but_check_one_if_given() {
    let (gw, _) = setup("", "", "").await;
    let r = get(gw.addr, "/public/x", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("x-tollgate-key-id").is_none());
    assert_401(
        &get(gw.addr, "/public/x", &[("X-API-Key", "tg_test_wrong")]).await,
        INVALID,
    );
    let r = get(gw.addr, "/public/x", &[("X-API-Key", GOOD)]).await;
    assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "acme-prod");
}

#[tokio::test]
async fn credentials_are_stripped_and_identity_headers_cannot_be_spoofed() {
    let (gw, _) = setup("", "", "").await;
    let r = get(
        gw.addr,
        "/v1/x",
        &[
            ("X-API-Key", GOOD),
            ("X-Tollgate-Key-Id", "admin"),
            ("X-Tollgate-Plan", "enterprise"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let h = &r.json()["headers"];
    assert!(
        h.get("x-api-key").is_none(),
        "credential forwarded: {}",
        redact(&h.to_string())
    );
    assert_eq!(h["x-tollgate-key-id"], "acme-prod");
    assert_eq!(h["x-tollgate-plan"], "pro");
    assert_eq!(
        r.json()["repeated"],
        serde_json::json!([]),
        "client copies forwarded"
    );
    assert!(!r.text().contains(GOOD));

    let bearer = format!("Bearer {GOOD}");
    let r = get(gw.addr, "/v1/x", &[("Authorization", &bearer)]).await;
    assert!(r.json()["headers"].get("authorization").is_none());

    // On a public route without a key, client copies are removed and nothing is set.
    let r = get(
        gw.addr,
        "/public/x",
        &[
            ("X-Tollgate-Key-Id", "admin"),
            ("X-Tollgate-Plan", "enterprise"),
        ],
    )
    .await;
    let h = &r.json()["headers"];
    assert!(
        h.get("x-tollgate-key-id").is_none() && h.get("x-tollgate-plan").is_none(),
        "{}",
        redact(&h.to_string())
    );
}

/// The key may come from any of several `Authorization` lines: every Bearer line is removed
/// before forwarding, and other schemes are left for the upstream.
#[tokio::test]
async fn a_bearer_key_among_several_authorization_lines_is_not_forwarded() {
    let (gw, _) = setup("", "", "").await;
    let bearer = format!("Bearer {GOOD}");
    let r = get(
        gw.addr,
        "/v1/x",
        &[
            ("Authorization", "Basic dXNlcjpwYXNz"),
            ("Authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.shown());
    assert!(!r.text().contains(GOOD), "key forwarded upstream");
    let h = &r.json()["headers"];
    assert_eq!(h["authorization"], "Basic dXNlcjpwYXNz");
    assert_eq!(h["x-tollgate-key-id"], "acme-prod");
}

/// An upgrade request goes through hyper-util's client, which writes the header map as it
/// is: the credential fields are removed from it there, as the pool leaves them out.
#[tokio::test]
async fn the_credential_is_not_forwarded_with_an_upgrade_request_either() {
    let (gw, _) = setup("", "", "").await;
    let upgrade = [("Connection", "upgrade"), ("Upgrade", "websocket")];
    let bearer = format!("Bearer {GOOD}");
    for credential in [("X-API-Key", GOOD), ("Authorization", bearer.as_str())] {
        let r = get(gw.addr, "/v1/x", &[upgrade[0], upgrade[1], credential]).await;
        assert_eq!(r.status, 200, "{}", r.shown());
        let h = &r.json()["headers"];
        assert_eq!(h["upgrade"], "websocket", "sent as an upgrade");
        assert!(!r.text().contains(GOOD), "key forwarded upstream");
        assert!(h.get("x-api-key").is_none() && h.get("authorization").is_none());
        assert_eq!(h["x-tollgate-key-id"], "acme-prod");
    }
    // Other schemes of `Authorization` are the upstream's.
    let r = get(
        gw.addr,
        "/v1/x",
        &[
            upgrade[0],
            upgrade[1],
            ("Authorization", "Basic dXNlcjpwYXNz"),
            ("X-API-Key", GOOD),
        ],
    )
    .await;
    assert_eq!(r.json()["headers"]["authorization"], "Basic dXNlcjpwYXNz");
    assert!(!r.text().contains(GOOD), "key forwarded upstream");
}

/// Naming the identity headers in `Connection` (hop-by-hop, so removed by proxies) must not
/// keep them from the upstream.
#[tokio::test]
async fn a_client_cannot_strip_the_identity_headers_through_connection() {
    let (gw, _) = setup("", "", "").await;
    let r = get(
        gw.addr,
        "/v1/x",
        &[
            ("X-API-Key", GOOD),
            ("Connection", "x-tollgate-key-id, x-tollgate-plan"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.shown());
    let h = &r.json()["headers"];
    assert_eq!(
        h["x-tollgate-key-id"],
        "acme-prod",
        "{}",
        redact(&h.to_string())
    );
    assert_eq!(h["x-tollgate-plan"], "pro", "{}", redact(&h.to_string()));
}

#[tokio::test]
async fn forward_key_keeps_the_credential() {
    let (gw, _) = setup("", "forward_key = true", "").await;
    let r = get(gw.addr, "/v1/x", &[("X-API-Key", GOOD)]).await;
    assert!(
        r.json()["headers"]["x-api-key"] == GOOD,
        "the key is forwarded as sent"
    );
}

const GUARD: &str = "[limits.failed_auth]\nattempts = 3\nwindow = \"10s\"\nblock_for = \"1s\"";

#[tokio::test]
async fn failed_auth_guard_trips_then_expires() {
    let (gw, _) = setup("", "", GUARD).await;
    for _ in 0..3 {
        assert_401(
            &get(gw.addr, "/v1/x", &[("X-API-Key", "guess")]).await,
            INVALID,
        );
    }
    // Blocked: even the right key is not looked at.
    let r = get(gw.addr, "/v1/x", &[("X-API-Key", GOOD)]).await;
    assert_eq!(r.status, 429, "{}", r.shown());
    assert_eq!(r.json()["error"]["code"], "ip_throttled");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["request_id"], r.header("x-request-id").unwrap());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(gw.addr, "/v1/x", &[("X-API-Key", GOOD)]).await;
    assert_eq!(r.status, 200, "block expired: {}", r.text());
}

#[tokio::test]
async fn scope_denials_do_not_count_as_failed_auth() {
    let (gw, _) = setup("", "", GUARD).await;
    for _ in 0..5 {
        let r = get(gw.addr, "/v1/campaigns/write/1", &[("X-API-Key", READER)]).await;
        assert_eq!(r.status, 403);
        assert_envelope(&r, 403, "permission_denied");
    }
    assert_eq!(
        get(gw.addr, "/v1/x", &[("X-API-Key", READER)]).await.status,
        200
    );
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_peers() {
    // Trusted loopback peer: each XFF client is counted on its own.
    let (gw, _) = setup("trusted_proxies = [\"127.0.0.1/32\"]", "", GUARD).await;
    for _ in 0..3 {
        get(
            gw.addr,
            "/v1/x",
            &[("X-API-Key", "guess"), ("X-Forwarded-For", "203.0.113.1")],
        )
        .await;
    }
    let blocked = get(
        gw.addr,
        "/v1/x",
        &[("X-API-Key", GOOD), ("X-Forwarded-For", "203.0.113.1")],
    )
    .await;
    assert_eq!(blocked.status, 429);
    assert_envelope(&blocked, 429, "ip_throttled");
    assert_retry_after(&blocked);
    let other = get(
        gw.addr,
        "/v1/x",
        &[("X-API-Key", GOOD), ("X-Forwarded-For", "203.0.113.2")],
    )
    .await;
    assert_eq!(
        other.status, 200,
        "another client behind the same proxy is not blocked"
    );
    // A spoofed left-most hop does not move the client: the right-most untrusted hop counts.
    let spoofed = get(
        gw.addr,
        "/v1/x",
        &[
            ("X-API-Key", GOOD),
            ("X-Forwarded-For", "198.51.100.5, 203.0.113.1"),
        ],
    )
    .await;
    assert_eq!(spoofed.status, 429);
    assert_envelope(&spoofed, 429, "ip_throttled");
    assert_retry_after(&spoofed);
    // The upstream sees the chain plus the peer.
    assert_eq!(
        other.json()["headers"]["x-forwarded-for"],
        "203.0.113.2, 127.0.0.1"
    );

    // Untrusted peer: XFF is ignored, the socket peer is the client.
    let (gw, _) = setup("", "", GUARD).await;
    for n in 0..3 {
        let xff = format!("203.0.113.{n}");
        get(
            gw.addr,
            "/v1/x",
            &[("X-API-Key", "guess"), ("X-Forwarded-For", &xff)],
        )
        .await;
    }
    let r = get(
        gw.addr,
        "/v1/x",
        &[("X-API-Key", GOOD), ("X-Forwarded-For", "203.0.113.99")],
    )
    .await;
    assert_eq!(
        r.status, 429,
        "rotating XFF from an untrusted peer does not escape the guard"
    );
    assert_envelope(&r, 429, "ip_throttled");
    assert_retry_after(&r);
}

#[test]
fn failure_messages_mask_test_keys() {
    let shown = redact(&format!(
        "{{\"x-api-key\":\"{GOOD}\",\"q\":\"a=1&api_key={READER}&b=2\"}}"
    ));
    assert!(!shown.contains(GOOD) && !shown.contains(READER));
    assert_eq!(
        shown,
        "{\"x-api-key\":\"tg_***\",\"q\":\"a=1&api_key=tg_***&b=2\"}"
    );
}

/// A real WSGI upstream (Python's `wsgiref`), which reads `X_Tollgate_Key_Id` and
/// `X-Tollgate-Key-Id` as one variable, `HTTP_X_TOLLGATE_KEY_ID`, as CGI, PHP and many
/// frameworks do. Answers with its `HTTP_*` environment as JSON. Killed when dropped.
struct WsgiUpstream {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl WsgiUpstream {
    fn start() -> Self {
        const APP: &str = r#"
import json
from wsgiref.simple_server import make_server, WSGIRequestHandler
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
def app(environ, start_response):
    body = json.dumps({k: v for k, v in environ.items() if k.startswith("HTTP_")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;
        let mut child = std::process::Command::new("python3")
            .args(["-c", APP])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (tests/run.sh installs it)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the WSGI server's port");
        let port: u16 = line.trim().parse().expect("a port");
        Self {
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for WsgiUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Identity, forwarding and credential headers spelt with underscores never reach a WSGI
/// upstream as the values tollgate vouches for: by default every client field with `_` in
/// its name is dropped (as nginx does); with `underscores_in_headers = true` the others pass
/// and those that stand for tollgate's own still go.
#[tokio::test]
async fn identity_headers_cannot_be_spoofed_with_underscores() {
    let wsgi = WsgiUpstream::start();
    let spoofs = [
        ("X-API-Key", GOOD),
        ("X_Tollgate_Key_Id", "admin"),
        ("x_tollgate_plan", "enterprise"),
        ("X_Tollgate_Key_Meta_Customer_Id", "cus_victim"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X_Forwarded_Host", "evil.test"),
        ("X_Request_Id", "forged"),
        ("X_API_Key", "tg_test_forged_0123456789abcdef"),
        ("X_Custom_Field", "kept"),
    ];
    for allowed in [false, true] {
        let text = format!(
            r#"
[[keys]]
id = "acme-prod"
key = "{good}"
plan = "pro"
[[upstreams]]
name = "wsgi"
url = "http://{wsgi}"
[[routes]]
prefix = "/v1/"
upstream = "wsgi"
[[routes]]
prefix = "/public/"
upstream = "wsgi"
auth = false
"#,
            good = digest(GOOD),
            wsgi = wsgi.addr,
        );
        let gw = TestGateway::start(config(
            &format!("underscores_in_headers = {allowed}"),
            &text,
        ))
        .await;
        let reply = get(gw.addr, "/v1/x", &spoofs).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let env = reply.json();
        // Failure messages show the environment with test keys masked.
        let shown = redact(&env.to_string());
        let id = reply.header("x-request-id").unwrap();
        assert_eq!(
            env["HTTP_X_TOLLGATE_KEY_ID"], "acme-prod",
            "allowed={allowed}: {shown}"
        );
        assert_eq!(
            env["HTTP_X_TOLLGATE_PLAN"], "pro",
            "allowed={allowed}: {shown}"
        );
        assert_eq!(
            env["HTTP_X_FORWARDED_FOR"], "127.0.0.1",
            "allowed={allowed}: {shown}"
        );
        assert_eq!(
            env["HTTP_X_FORWARDED_HOST"], "gateway.test",
            "allowed={allowed}: {shown}"
        );
        assert_eq!(env["HTTP_X_REQUEST_ID"], id, "allowed={allowed}: {shown}");
        for absent in ["HTTP_X_API_KEY", "HTTP_X_TOLLGATE_KEY_META_CUSTOMER_ID"] {
            assert!(
                env.get(absent).is_none(),
                "allowed={allowed}: {absent} in {shown}"
            );
        }
        let custom = env.get("HTTP_X_CUSTOM_FIELD");
        if allowed {
            assert_eq!(custom.unwrap(), "kept", "{shown}");
        } else {
            assert!(custom.is_none(), "{shown}");
        }
        // A public route without a key: no identity at all.
        let reply = get(gw.addr, "/public/x", &spoofs[1..]).await;
        let env = reply.json();
        let shown = redact(&env.to_string());
        assert!(env.get("HTTP_X_TOLLGATE_KEY_ID").is_none(), "{shown}");
        assert!(env.get("HTTP_X_TOLLGATE_PLAN").is_none(), "{shown}");
    }
}
