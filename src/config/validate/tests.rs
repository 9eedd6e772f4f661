//! The validator's tests: one TOML snippet per mistake, and loading as a whole.

use std::sync::Arc;

use super::keys::{KEYS_PER_PIECE, piece_starts};
use super::server::addresses_overlap;
use super::*;

fn issues(text: &str) -> Vec<ConfigIssue> {
    match load(Path::new("t.toml"), text, |p| {
        Err(ConfigError::Read {
            path: p.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }) {
        Ok(_) => Vec::new(),
        Err(e) => e.issues().to_vec(),
    }
}

/// One snippet per kind of mistake: (TOML, expected line, fragment of the message).
const MISTAKES: &[(&str, usize, &str)] = &[
    (
        "[server]\nlisen = \"x\"",
        2,
        "unknown key `lisen` in [server] (did you mean `listen`?)",
    ),
    ("bogus = 1", 1, "unknown key `bogus` at the top level"),
    (
        "[[routes]]\nprefix = \"/\"\nrespond = { status = 200, colour = 1 }",
        3,
        "unknown key `colour` in [routes.respond]",
    ),
    (
        "[server]\nlisten = \"nowhere\"",
        2,
        "server.listen: \"nowhere\" is not an address",
    ),
    (
        "[server]\nlisten = [\"0.0.0.0:8080\", \"127.0.0.1:8080\"]",
        2,
        "server.listen: 0.0.0.0:8080 and 127.0.0.1:8080 overlap",
    ),
    (
        "[server]\nlisten = \"127.0.0.1:9901\"",
        2,
        "admin.listen 127.0.0.1:9901 overlaps server.listen 127.0.0.1:9901",
    ),
    (
        "[server]\nlisten = \"[::1]:8080\"\n[admin]\nlisten = \"[::]:8080\"",
        4,
        "admin.listen [::]:8080 overlaps server.listen [::1]:8080",
    ),
    ("[server]\nheader_read_timeout = \"10\"", 2, "has no unit"),
    (
        "[server]\nidle_timeout = \"soon\"",
        2,
        "invalid duration \"soon\"",
    ),
    (
        "[server]\nbody_read_timeout = \"0s\"",
        2,
        "must be greater than zero",
    ),
    (
        "[server]\nmax_body_bytes = \"10 parsecs\"",
        2,
        "invalid size unit",
    ),
    (
        "[server]\nmax_header_bytes = 0",
        2,
        "must be greater than zero",
    ),
    (
        "[server]\nmax_connections = 0",
        2,
        "server.max_connections must be a whole number from 1",
    ),
    (
        "[server]\ntrusted_proxies = [\"10.0.0.0/40\"]",
        2,
        "is not a CIDR",
    ),
    (
        "[server.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"",
        2,
        "server.tls.cert: file",
    ),
    ("[admin]\nlisten = \"9901\"", 2, "admin.listen"),
    (
        "[errors]\nstyle = \"fancy\"",
        2,
        "errors.style must be one of",
    ),
    (
        "[errors]\nfields = { code = 1 }",
        2,
        "\"code\" is a field tollgate writes itself",
    ),
    (
        "[errors]\nfields = { x = nan }",
        2,
        "errors.fields.x: NaN has no JSON form",
    ),
    (
        "[auth]\nheader = \"bad header\"",
        2,
        "not a valid header name",
    ),
    ("[auth]\nquery_param = \"a b\"", 2, "auth.query_param"),
    (
        "[auth]\nkeys_file = \"/nonexistent/keys.toml\"",
        2,
        "cannot read auth.keys_file",
    ),
    (
        "[limits]\nbackend = \"memcached\"",
        2,
        "limits.backend must be one of",
    ),
    ("[limits]\nredis_url = \"http://x\"", 2, "limits.redis_url"),
    (
        "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\nauth = false\nscopes = [\"admin\"]",
        5,
        "scopes need a key, so a public route (auth = false) cannot require them",
    ),
    (
        "[limits]\nredis_url = \"redis://a:1\"\n[redis]\nurl = \"rediss://b:1\"",
        2,
        "limits.redis_url: the [redis] section also names the connection",
    ),
    (
        "[limits]\nredis_url = \"redis://[::1\"",
        2,
        "limits.redis_url: not a usable Redis URL",
    ),
    (
        "[server]\nidle_timeout = \"300000000000y\"",
        2,
        "is too long; the most is 365d",
    ),
    (
        "[server]\nmax_header_bytes = \"1GiB\"",
        2,
        "server.max_header_bytes: at most 8 MiB",
    ),
    (
        "[limits]\non_backend_error = \"panic\"",
        2,
        "limits.on_backend_error",
    ),
    ("[limits]\nheaders = \"all\"", 2, "limits.headers"),
    ("[limits]\nmode = \"yolo\"", 2, "limits.mode"),
    (
        "[limits.ip_throttle]\nrejections = 0",
        2,
        "limits.ip_throttle.rejections must be",
    ),
    (
        "[limits.failed_auth]\nwindow = \"x\"",
        2,
        "limits.failed_auth.window: invalid duration",
    ),
    (
        "[plans.free]\nrequests_per_minute = 0",
        2,
        "plans.free.requests_per_minute must be a whole number from 1",
    ),
    (
        "[plans.gold]\nrequests_per_minute = 10\nburst = -1",
        3,
        "plans.gold.burst",
    ),
    (
        "[plans.\"bad name\"]\nrequests_per_minute = 10",
        1,
        "plan name \"bad name\"",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"gold\"",
        4,
        "plan \"gold\" is not defined",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"tg_live_plaintext\"\nplan = \"free\"",
        3,
        "not the key itself",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"sha256:abc\"\nplan = \"free\"",
        3,
        "64 hex characters",
    ),
    (
        "[[keys]]\nid = \"a b\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"",
        2,
        "key id may only hold",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\n[[keys]]\nid = \"a\"\nkey = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nplan = \"free\"",
        6,
        "duplicate key id \"a\" (first defined at t.toml:2)",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\n[[keys]]\nid = \"b\"\nkey = \"sha256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\"\nplan = \"free\"",
        7,
        "same digest as the key at t.toml:2",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = [\"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", { digest = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\" }]",
        4,
        "same digest as the key at t.toml:2",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = []",
        4,
        "the key list is empty",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = [\"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", { digest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", expires_at = \"2027-01-15\" }]",
        4,
        "key \"a\": digest expires_at: invalid time \"2027-01-15\"",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = [{ digest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", expire = \"2027-01-15T00:00:00Z\" }]",
        4,
        "unknown key `expire` in a digest of a [[keys]] key list",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\nexpires_at = \"tomorrow\"",
        6,
        "key \"a\": expires_at: invalid time \"tomorrow\"",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmetadata = { Customer = \"x\" }",
        5,
        "metadata name \"Customer\" may only hold a-z, 0-9",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmetadata = { note = \"caf\u{e9}\" }",
        5,
        "metadata \"note\" may only hold printable ASCII",
    ),
    (
        "[[keys]]\nid = \"a\"\nplan = \"free\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmetadata = { a = \"1\", b = \"2\", c = \"3\", d = \"4\", e = \"5\", f = \"6\", g = \"7\", h = \"8\", i = \"9\", j = \"10\", k = \"11\", l = \"12\", m = \"13\", n = \"14\", o = \"15\", p = \"16\", q = \"17\" }",
        5,
        "metadata has 17 entries; at most 16",
    ),
    (
        "[admin]\ntoken = \"my-admin-token\"",
        2,
        "admin.token: token must be a digest",
    ),
    (
        "[auth]\nstore = \"s3\"",
        2,
        "auth.store must be one of \"file\", \"redis\"",
    ),
    (
        "[auth]\nexpiry_warning = \"a fortnight\"",
        2,
        "auth.expiry_warning: invalid duration",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\nrequests_per_minute = 0",
        5,
        "requests_per_minute must be a whole number from 1",
    ),
    (
        "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\nscopes = [\"a b\"]",
        5,
        "a scope must be non-empty",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"ftp://x\"",
        3,
        "must be an http:// or https:// URL",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"not a url\"",
        3,
        "must be an http:// or https:// URL",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[[upstreams]]\nname = \"u\"\nurl = \"http://b\"",
        5,
        "duplicate upstream name \"u\"",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nmax_inflight = 0",
        4,
        "max_inflight must be",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nca_file = \"/nonexistent/ca.pem\"",
        4,
        "ca_file: file",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\ntargets = [\"http://b\"]",
        3,
        "upstream \"u\": set either url or targets, not both",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\ntargets = [\"http://b\"]",
        4,
        "upstream \"u\": set either url or targets, not both",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nmax_inflight = 3",
        2,
        "upstream \"u\" needs a url or targets",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = [\n  \"http://a:1\",\n  \"ftp://b\",\n]",
        5,
        "url \"ftp://b\" must be an http:// or https:// URL",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = [\n  \"http://a:1\",\n  { url = \"https://b:1\" },\n]",
        5,
        "every target must have the same scheme; \"https://b:1\" is not http://",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = [\n  \"http://a:1/v1\",\n  \"http://b:1/v2\",\n]",
        5,
        "every target must have the same base path",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = [\n  \"http://a:1\",\n  { url = \"http://b:1\", weight = 0 },\n]",
        5,
        "target weight must be a whole number from 1",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = [\"http://a:1\", { url = \"http://b:1\", wieght = 2 }]",
        3,
        "unknown key `wieght` in a target of [[upstreams]] targets (did you mean `weight`?)",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = []",
        3,
        "targets must name at least one target",
    ),
    (
        "[[upstreams]]\nname = \"u\"\ntargets = [\"http://a:1\", \"http://a:1\"]",
        3,
        "target \"http://a:1\" is listed twice",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nbalance = \"random\"",
        4,
        "balance must be one of \"round_robin\", \"least_inflight\"",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\neject_after = -1",
        4,
        "upstream \"u\": eject_after must be a whole number from 0 to 1000, got -1",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"/h\"\nhealthy_after = 0",
        6,
        "upstream \"u\": health_check.healthy_after must be a whole number from 1 to 100, got 0",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"/h\"\nunhealthy_after = 0",
        6,
        "health_check.unhealthy_after must be a whole number from 1 to 100, got 0",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"/h\"\nexpect = \"2xx\"",
        6,
        "health_check.expect: \"2xx\" is not a status range; write \"200-399\"",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"/h\"\nexpect = \"399-200\"",
        6,
        "is not a status range",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"healthz\"",
        5,
        "health_check.path: \"healthz\" must be a path starting with '/'",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"/h\"\ninterval = \"0s\"",
        6,
        "health_check.interval must be greater than zero",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[upstreams.health_check]\npath = \"/h\"\nhealthy_afer = 2",
        6,
        "did you mean `healthy_after`?",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\ndns_refresh = \"soon\"",
        4,
        "upstream \"u\": dns_refresh:",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nmax_ejected_percent = 101",
        4,
        "max_ejected_percent must be a whole number from 0 to 100, got 101",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\neject_for = \"0s\"",
        4,
        "eject_for must be greater than zero",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nretries = 4",
        4,
        "upstream \"u\": retries must be a whole number from 0 to 3, got 4",
    ),
    (
        "[[routes]]\nprefix = \"/\"\nupstream = \"core\"",
        3,
        "upstream \"core\" is not defined",
    ),
    (
        "[[routes]]\nprefix = \"v1\"\nrespond = { status = 200 }",
        2,
        "must start with '/'",
    ),
    (
        "[[routes]]\nprefix = \"/\"",
        2,
        "needs an upstream or a respond",
    ),
    (
        "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\n[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }",
        5,
        "duplicate route prefix",
    ),
    (
        "[[routes]]\nprefix = \"/\"\nrespond = { status = 99 }",
        3,
        "respond.status must be 200-599",
    ),
    (
        "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\nmethods = [\"get\"]",
        4,
        "is not an HTTP method",
    ),
    (
        "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\nmethods = []",
        2,
        "methods is empty",
    ),
    (
        "[server]\nworkers = \"two\"",
        2,
        "invalid type: string \"two\"",
    ),
    (
        "[plans.free]\nrequests_per_minute = 1.5",
        2,
        "`requests_per_minute`: invalid type: floating point `1.5`, expected a whole number",
    ),
    ("[server\nlisten = 1", 1, ""),
    (
        "[server]\nworkers = 100000",
        2,
        "server.workers must be at most 1024",
    ),
    (
        "[plans.x]\nrequests_per_minute = 1\nburst = 400000000",
        3,
        "plans.x.burst = 400000000 takes more than 365 days to refill",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:99999\"",
        3,
        "a port from 1 to 65535",
    ),
    (
        "[[upstreams]]\nname = \"u\"\nurl = \"http://[::1]:0\"",
        3,
        "a port from 1 to 65535",
    ),
    (
        "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 2\nlisten = \"127.0.0.1:2\"",
        4,
        "duplicate key `listen` (first defined at t.toml:2:1)",
    ),
    (
        "[server]\nworkers = 1\n[admin]\n[ server ] # again\nworkers = 2",
        4,
        "duplicate table `server` (first defined at t.toml:1:1)",
    ),
    (
        "[plans.free]\nrequests_per_minute = 99999999999999999999",
        2,
        "`requests_per_minute`: 99999999999999999999 is too large; a whole number from 1 to 4294967295",
    ),
    (
        "[server]\nworkers = -1",
        2,
        "`workers`: -1 is too small; a whole number from 0 to 1024",
    ),
    (
        "[[routes]]\nprefix = \"/café/\"\nrespond = { status = 200 }",
        2,
        "route prefix \"/café/\" would match no request: it holds 'é', and clients send non-ASCII characters percent-encoded (a request path is ASCII); write it percent-encoded: \"/caf%C3%A9/\"",
    ),
    (
        "[[routes]]\nprefix = \"/a<b>/\"\nrespond = { status = 200 }",
        2,
        "it holds '<', and requests with it unencoded in the path are refused (400); write it percent-encoded: \"/a%3Cb%3E/\"",
    ),
];

#[test]
fn spans_become_lines_and_columns() {
    let text = "a = 1\nbé = \"x\"\n\nlast";
    let src = Source::new(Path::new("t.toml"), text);
    let at = |offset: usize| {
        let issue = src.issue(offset..offset, "");
        (issue.line, issue.column)
    };
    assert_eq!(at(0), (1, 1));
    assert_eq!(at(4), (1, 5));
    assert_eq!(at(6), (2, 1), "just after a newline");
    // Columns count characters: `é` is two bytes.
    assert_eq!(at(text.find('=').unwrap()), (1, 3));
    assert_eq!(at(text.rfind('=').unwrap()), (2, 4));
    assert_eq!(at(text.find("\n\n").unwrap() + 1), (3, 1), "an empty line");
    assert_eq!(
        at(text.len()),
        (4, 5),
        "the end of a last line without a newline"
    );
    assert_eq!(at(text.len() + 10), (4, 5), "past the end is clamped");
}

#[test]
fn ports_are_checked_but_ipv6_hosts_without_one_pass() {
    for url in [
        "http://[::1]",
        "http://[::1]:8080",
        "https://api",
        "http://a:65535",
    ] {
        let text = format!("[[upstreams]]\nname = \"u\"\nurl = \"{url}\"");
        assert!(issues(&text).is_empty(), "{url}: {:?}", issues(&text));
    }
}

#[test]
fn a_keys_file_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("keys.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let text = format!("[auth]\nkeys_file = \"{}\"", fifo.display());
    // The real reader: opening a FIFO with no writer would block forever.
    let found = match load(Path::new("t.toml"), &text, read) {
        Ok(_) => Vec::new(),
        Err(e) => e.issues().to_vec(),
    };
    assert!(
        found
            .iter()
            .any(|i| i.line == 2 && i.message.contains("not a regular file")),
        "{found:#?}"
    );
}

#[test]
fn too_many_routes_times_plans_is_refused() {
    let mut text = String::new();
    for n in 0..200 {
        text.push_str(&format!("[plans.p{n}]\nrequests_per_minute = 1\n"));
    }
    for n in 0..1000 {
        text.push_str(&format!(
            "[[routes]]\nprefix = \"/r{n}/\"\nrespond = {{ status = 200 }}\n"
        ));
    }
    let found = issues(&text);
    assert!(
        found.iter().any(
            |i| i.message.contains("1000 routes and 203 plans are too many")
                // At the last route's prefix: 400 lines of plans, then 3 per route.
                && (i.line, i.column) == (400 + 999 * 3 + 2, 10)
        ),
        "{found:#?}"
    );
}

#[test]
fn every_mistake_is_reported_at_its_line() {
    for (text, line, fragment) in MISTAKES {
        let found = issues(text);
        assert!(
            found
                .iter()
                .any(|i| i.line == *line && i.message.contains(fragment)),
            "expected line {line} with {fragment:?} for:\n{text}\ngot: {found:#?}"
        );
    }
}

#[test]
fn listeners_overlap_on_one_port_of_one_family() {
    let overlap = |a: &str, b: &str| addresses_overlap(a.parse().unwrap(), b.parse().unwrap());
    // IPv6 listeners are bound IPv6-only: the two wildcards share a port.
    assert!(!overlap("0.0.0.0:8080", "[::]:8080"));
    assert!(overlap("0.0.0.0:8080", "127.0.0.1:8080"));
    assert!(overlap("[::]:8080", "[::1]:8080"));
    assert!(overlap("127.0.0.1:8080", "127.0.0.1:8080"));
    assert!(overlap("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"));
    assert!(!overlap("127.0.0.1:8080", "127.0.0.2:8080"));
    assert!(!overlap("127.0.0.1:8080", "127.0.0.1:8081"));
    assert!(!overlap("127.0.0.1:0", "127.0.0.1:0"));
    assert!(issues("[server]\nlisten = [\"0.0.0.0:8080\", \"[::]:8080\"]").is_empty());
}

#[test]
fn values_of_the_wrong_type_are_explained_in_the_configs_terms() {
    for (text, fragment) in [
        (
            "[server]\nlisten = 8080",
            "`listen` must be an address like \"0.0.0.0:8080\", or a list of them",
        ),
        (
            "[server]\nmax_body_bytes = 1.5",
            "`max_body_bytes` must be a size: a whole number of bytes, or a string like \"16KiB\"",
        ),
        (
            "[server]\nidle_timeout = 60",
            "`idle_timeout`: invalid type: integer `60`, expected a string; a duration is a string with a unit, like \"30s\"",
        ),
    ] {
        let found = issues(text);
        assert!(
            found.len() == 1 && found[0].line == 2 && found[0].message.contains(fragment),
            "{text}: {found:#?}"
        );
    }
}

#[test]
fn a_duplicate_names_the_key_and_where_it_was_first_defined() {
    for (text, expected) in [
        // The same name in another table earlier is not the first definition.
        (
            "[admin]\nlisten = \"127.0.0.1:1\"\n[server]\nlisten = \"127.0.0.1:2\"\nlisten = \"127.0.0.1:3\"",
            (5, "duplicate key `listen` (first defined at t.toml:4:1)"),
        ),
        // In an array of tables: the item's own key, not the previous item's.
        (
            "[[routes]]\nprefix = \"/a\"\n[[routes]]\nprefix = \"/b\"\nprefix = \"/c\"",
            (5, "duplicate key `prefix` (first defined at t.toml:4:1)"),
        ),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 200, status = 201 }",
            (3, "duplicate key `status` (first defined at t.toml:3:13)"),
        ),
        (
            "[server]\n\"workers\" = 1\nworkers = 2",
            (3, "duplicate key `workers` (first defined at t.toml:2:1)"),
        ),
    ] {
        let found = issues(text);
        assert!(
            found.len() == 1
                && found[0].line == expected.0
                && found[0].message.starts_with(expected.1),
            "{text}: {found:#?}"
        );
    }
}

#[test]
fn integers_out_of_range_say_so_with_the_range() {
    for (text, expected) in [
        (
            "[plans.free]\nrequests_per_minute = -99999999999999999999",
            "`requests_per_minute`: -99999999999999999999 is too small; a whole number from 1 to 4294967295",
        ),
        (
            "[server]\nworkers = 99999999999999999999",
            "`workers`: 99999999999999999999 is too large; a whole number from 0 to 1024",
        ),
        (
            "[server]\nmax_body_bytes = 99999999999999999999",
            "`max_body_bytes`: 99999999999999999999 is too large; a whole number from 1 to 9223372036854775807",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 99999999999999999999 }",
            "`status`: 99999999999999999999 is too large; a whole number from 200 to 599",
        ),
        (
            "[errors]\nfields = { n = 99999999999999999999 }",
            "99999999999999999999 is too large; a whole number from -9223372036854775808 to 9223372036854775807",
        ),
    ] {
        let found = issues(text);
        assert!(
            found.iter().any(|i| i.line == 2 || i.line == 3)
                && found.iter().any(|i| i.message.ends_with(expected)),
            "{text}: {found:#?}"
        );
    }
}

/// A keys file with `n` keys, `key-0`... on plan `free`, digests from their number;
/// `edit` may rewrite key `i`'s lines.
fn keys_file_text(n: usize, edit: impl Fn(usize, String) -> String) -> String {
    (0..n)
        .map(|i| {
            let key = format!(
                "[[keys]]\nid = \"key-{i}\"\nkey = \"sha256:{i:064x}\"\nplan = \"free\"\n\n"
            );
            edit(i, key)
        })
        .collect()
}

fn load_with_keys_file(keys_text: &str) -> Result<Config, ConfigError> {
    let keys_text = keys_text.to_owned();
    load(
        Path::new("main.toml"),
        "[auth]\nkeys_file = \"keys.toml\"\n",
        move |_| Ok(keys_text.clone()),
    )
}

#[test]
fn a_keys_file_is_split_before_every_nth_header_line() {
    let text = "# keys\n[[keys]]\na = 1\n[[keys]]\n  [[keys]]  \r\n[[keys]] # c\n[[keys]]\n";
    // Headers on lines 1, 3, 4 and 6 (0-based, at bytes 7, 22, 31 and 58); `[[keys]] # c`
    // is not a split point.
    assert_eq!(piece_starts(text, 2), vec![(0, 0), (31, 4)]);
    assert_eq!(
        piece_starts(text, 1),
        vec![(0, 0), (22, 3), (31, 4), (58, 6)]
    );
    assert_eq!(piece_starts(text, 9), vec![(0, 0)]);
}

#[test]
fn a_keys_file_read_in_pieces_gives_every_key_in_order_and_errors_at_their_lines() {
    let text = keys_file_text(10, |_, k| k);
    let config = load_with_keys_file(&text).unwrap();
    let ids: Vec<String> = config.keys.iter().map(|k| k.id.0.to_string()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("key-{i}")).collect();
    assert_eq!(ids, expected);
    // Read in pieces indeed, not by the whole-file fallback.
    let mut keys = Vec::new();
    let read = keys_by_piece(
        &Source::new(Path::new("keys.toml"), &text),
        &config.plans,
        &mut KeySeen::default(),
        &mut keys,
        &mut Vec::new(),
    );
    assert!(read && keys.len() == 10);

    // Validation errors in the second and fourth pieces, and a duplicate across pieces:
    // each at its line of the whole file (5 lines per key).
    let text = keys_file_text(10, |i, k| match i {
        4 => k.replace("\"free\"", "\"gold\""),
        9 => k.replace("key-9", "key-1"),
        _ => k,
    });
    let found = match load_with_keys_file(&text) {
        Err(e) => e.issues().to_vec(),
        Ok(_) => panic!("invalid"),
    };
    let lines: Vec<(usize, usize)> = found.iter().map(|i| (i.line, i.column)).collect();
    assert_eq!(lines, vec![(24, 8), (47, 6)], "{found:#?}");
    assert!(found[0].message.contains("plan \"gold\" is not defined"));
    assert!(
        found[1]
            .message
            .contains("duplicate key id \"key-1\" (first defined at keys.toml:7)"),
        "{}",
        found[1].message
    );
}

#[test]
fn a_keys_file_split_inside_a_string_is_read_whole() {
    // Key 5's id is a multi-line string holding a `[[keys]]` line: the split there cuts
    // the string, that piece does not parse, and the whole file is parsed instead (what
    // the first piece added is taken back). The one error is the id's, as one parse
    // reports it.
    let text = keys_file_text(8, |i, k| {
        if i == 5 {
            k.replace("\"key-5\"", "\"\"\"key\n[[keys]]\n\"\"\"")
        } else {
            k
        }
    });
    // Key 5 starts on line 25 (0-based); its string's `[[keys]]` line is the seventh header.
    assert_eq!(
        piece_starts(&text, KEYS_PER_PIECE)[2].1,
        27,
        "the split is in the string"
    );
    let plans = load_with_keys_file("").unwrap().plans;
    let (mut keys, mut issues) = (Vec::new(), Vec::new());
    let src = Source::new(Path::new("keys.toml"), &text);
    assert!(!keys_by_piece(
        &src,
        &plans,
        &mut KeySeen::default(),
        &mut keys,
        &mut issues
    ));
    assert!(
        keys.is_empty() && issues.is_empty(),
        "nothing kept from the pieces"
    );
    let found = match load_with_keys_file(&text) {
        Err(e) => e.issues().to_vec(),
        Ok(_) => panic!("invalid"),
    };
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!((found[0].line, found[0].column), (27, 6), "{found:#?}");
    assert!(
        found[0].message.contains("key id may only hold"),
        "{found:#?}"
    );
}

#[test]
fn a_field_missing_from_another_key_is_reported_beside_a_type_error() {
    // Key 1's id is taken out for its type error, and serde then misses it: not news.
    // Key 2 lacks an id of its own: that is reported.
    let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let text = format!(
        "[[keys]]\nid = 5\nkey = \"{d}\"\nplan = \"free\"\n\
         [[keys]]\nkey = \"{d}\"\nplan = \"free\"\n"
    );
    let found = issues(&text);
    let lines: Vec<(usize, &str)> = found.iter().map(|i| (i.line, &*i.message)).collect();
    assert_eq!(
        lines,
        vec![
            (2, "`id`: invalid type: integer `5`, expected a string"),
            (5, "missing field `id`")
        ]
    );
}

#[test]
fn a_type_error_in_one_key_leaves_the_other_keys_checked() {
    let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let text = format!(
        "[[keys]]\nid = 5\nkey = \"{d}\"\nplan = \"free\"\n\
         [[keys]]\nid = \"second\"\nkey = \"{d}\"\nplan = \"gold\"\n"
    );
    let found = issues(&text);
    let at = |line: usize, fragment: &str| {
        found
            .iter()
            .any(|i| i.line == line && i.message.contains(fragment))
    };
    assert!(at(2, "invalid type: integer `5`"), "{found:#?}");
    assert!(at(8, "plan \"gold\" is not defined"), "{found:#?}");
    assert_eq!(found.len(), 2, "{found:#?}");
}

#[test]
fn plaintext_keys_are_never_echoed() {
    let found = issues("[[keys]]\nid = \"a\"\nkey = \"tg_live_TOPSECRET\"\nplan = \"free\"");
    assert_eq!(found.len(), 1);
    assert!(
        !found[0].message.contains("TOPSECRET"),
        "{}",
        found[0].message
    );
}

#[test]
fn every_type_error_is_reported_not_just_the_first() {
    let text = "[server]\nworkers = \"two\"\n\
                [[upstreams]]\nname = 5\nurl = \"http://127.0.0.1:1\"\nmax_inflight = \"many\"\n\
                [[routes]]\nprefix = \"/\"\nupstream = \"u\"\nmethods = \"GET\"\n\
                [limits.ip_throttle]\nrejections = true\n";
    let found = issues(text);
    let lines: Vec<usize> = found.iter().map(|i| i.line).collect();
    // Line 9 is the route's own mistake: no upstream is named "u".
    assert_eq!(lines, [2, 4, 6, 9, 10, 12], "{found:#?}");

    // A table with a bad value goes, its neighbours stay: the route to the good upstream
    // is not reported.
    let text = "[[upstreams]]\nname = \"good\"\nurl = \"http://127.0.0.1:1\"\n\
                [[upstreams]]\nname = 5\nurl = \"http://127.0.0.1:2\"\n\
                [[routes]]\nprefix = \"/\"\nupstream = \"good\"\n";
    let found = issues(text);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].line, 5);
    assert!(
        found.iter().all(|i| !i.message.contains("missing field")),
        "a taken-out value is not reported again as missing: {found:#?}"
    );
}

#[test]
fn redis_passwords_are_never_echoed() {
    for url in [
        "rediss://:hunter2@[::1",
        "redis://:hunter2@[::1",
        "http://:hunter2@r",
    ] {
        let found = issues(&format!("[limits]\nredis_url = \"{url}\""));
        assert_eq!(found.len(), 1, "{url}: {found:#?}");
        assert!(
            !found[0].message.contains("hunter2"),
            "{}",
            found[0].message
        );
    }
}

#[test]
fn every_error_of_a_file_at_once() {
    let text = "[server]\nlisne = 1\nidle_timeout = \"x\"\n[errors]\nstyle = \"y\"\nbogus = 2\n";
    let found = issues(text);
    let lines: Vec<usize> = found.iter().map(|i| i.line).collect();
    assert_eq!(lines, vec![2, 3, 5, 6], "{found:#?}");
    assert!(found.iter().all(|i| i.file == Path::new("t.toml")));
}

#[test]
fn columns_point_at_the_value() {
    let found = issues("[server]\nidle_timeout   = \"x\"");
    assert_eq!((found[0].line, found[0].column), (2, 18));
}

/// A config that sets every key loads: the schema walk (which takes its lists from the file
/// structs), the `deny_unknown_fields` file structs and validation agree on each.
#[test]
fn the_schema_and_the_file_structs_agree() {
    let dir = std::env::temp_dir().join(format!("tollgate-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = dir.join("cert.pem");
    std::fs::write(&cert_pem, generated.cert.pem()).unwrap();
    let key_pem = dir.join("key.pem");
    std::fs::write(&key_pem, generated.signing_key.serialize_pem()).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nid = \"k2\"\nkey = \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\nplan = \"free\"\n",
    )
    .unwrap();
    let (cert_pem, key_pem) = (cert_pem.display(), key_pem.display());
    let pem = &cert_pem;
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
workers = 1
watch = true
header_read_timeout = "1s"
body_read_timeout = "1s"
idle_timeout = "1s"
max_header_bytes = 8192
max_body_bytes = "1MiB"
max_connections = 5
shutdown_grace = "0s"
trusted_proxies = ["10.0.0.0/8", "::1"]
[server.tls]
cert = "{cert_pem}"
key = "{key_pem}"
[admin]
listen = "127.0.0.1:0"
[errors]
style = "simple"
normalize_upstream_5xx = false
fields = {{ powered_by = "Acme", version = 2, nested = {{ a = [1, 2] }}, since = 1979-05-27T07:32:00Z, ratio = 0.5 }}
[auth]
header = "X-Key"
bearer = false
query_param = "api_key"
forward_key = true
keys_file = "{keys}"
[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:6380"
backend_timeout = "5ms"
on_backend_error = "deny"
headers = "both"
mode = "shadow"
[limits.ip_throttle]
rejections = 3
window = "10s"
block_for = "1m"
[limits.failed_auth]
attempts = 4
window = "10s"
block_for = "2m"
[plans.gold]
requests_per_minute = 100
burst = 200
requests_per_hour = 1000
requests_per_day = 10000
[[keys]]
id = "k1"
key = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
plan = "gold"
scopes = ["a:read"]
requests_per_minute = 50
disabled = true
[[upstreams]]
name = "core"
url = "https://core.internal:8443/base"
connect_timeout = "1s"
timeout = "2s"
max_inflight = 10
maintenance = true
retry_after = "5s"
ca_file = "{pem}"
[[routes]]
prefix = "/v1/"
upstream = "core"
scopes = ["a:read"]
methods = ["GET", "POST"]
strip_prefix = true
[[routes]]
prefix = "/ok"
respond = {{ status = 204, body = "", content_type = "text/plain" }}
auth = false
"#,
        keys = keys.display()
    );
    let config = load(Path::new("full.toml"), &text, |p| {
        std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.keys.len(),
        2,
        "keys from the config and the keys file"
    );
    assert_eq!(config.errors.fields["nested"]["a"][1], 2);
    // A date-time is its RFC 3339 text, not toml's private wrapper object.
    assert_eq!(config.errors.fields["since"], "1979-05-27T07:32:00Z");
    assert_eq!(config.errors.fields["ratio"], 0.5);
    assert_eq!(config.limits.failed_auth.count.get(), 4);
    assert_eq!(config.plans[&PlanName(Arc::from("gold"))].burst.get(), 200);
    assert_eq!(config.upstreams[0].url.path(), "/base");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keys_file_errors_name_the_keys_file_and_duplicates_span_both_files() {
    let dir = std::env::temp_dir().join(format!("tollgate-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nid = \"main\"\nkey = \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\nplan = \"free\"\nextra = 1\n",
    )
    .unwrap();
    let text = format!(
        "[auth]\nkeys_file = \"{}\"\n[[keys]]\nid = \"main\"\nkey = \"sha256:2222222222222222222222222222222222222222222222222222222222222222\"\nplan = \"free\"\n",
        keys.display()
    );
    let err = load(Path::new("main.toml"), &text, |p| {
        std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })
    })
    .unwrap_err();
    let issues = err.issues();
    assert!(
        issues.iter().any(|i| i.file == keys
            && i.line == 5
            && i.message.contains("unknown key `extra` in [[keys]]")),
        "{issues:#?}"
    );
    assert!(
        issues.iter().any(|i| i.file == keys
            && i.line == 2
            && i.message
                .contains("duplicate key id \"main\" (first defined at main.toml:4)")),
        "{issues:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.routes.is_empty());
    assert!(config.keys.iter().all(|k| k.id.0.as_ref() != ""));
}

#[test]
fn targets_keep_their_weights_and_url_is_one_target() {
    let text = "[[upstreams]]\nname = \"many\"\nbalance = \"least_inflight\"\n\
                targets = [\"http://10.0.0.1:3000/api\", { url = \"http://10.0.0.2:3000/api/\", weight = 2 }]\n\
                [[upstreams]]\nname = \"one\"\nurl = \"http://10.0.0.3:3000\"\n\
                [[routes]]\nprefix = \"/\"\nupstream = \"many\"\n";
    let config =
        load(Path::new("t.toml"), text, |_| unreachable!()).unwrap_or_else(|e| panic!("{e}"));
    let many = &config.upstreams[0];
    assert_eq!(many.balance, Balance::LeastInflight);
    assert_eq!(many.url, "http://10.0.0.1:3000/api");
    let targets: Vec<_> = many
        .targets
        .iter()
        .map(|t| (t.url.to_string(), t.weight.get()))
        .collect();
    assert_eq!(
        targets,
        [
            ("http://10.0.0.1:3000/api".to_owned(), 1),
            ("http://10.0.0.2:3000/api/".to_owned(), 2)
        ]
    );
    let one = &config.upstreams[1];
    assert_eq!(one.balance, Balance::RoundRobin);
    assert_eq!(one.targets.len(), 1);
    assert_eq!(one.targets[0].url, "http://10.0.0.3:3000");
    assert_eq!(one.targets[0].weight.get(), 1);
}

#[test]
fn key_lifecycle_fields_are_read() {
    let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    let text = format!(
        "[auth]\nexpiry_warning = \"7d\"\nstore = \"redis\"\nkeys_cache_file = \"/tmp/k.json\"\n\
         [admin]\ntoken = \"{}\"\n\
         [[keys]]\nid = \"a\"\nplan = \"free\"\n\
         key = [\"{}\", {{ digest = \"{}\", expires_at = \"2027-01-15T00:00:00Z\" }}]\n\
         expires_at = \"2027-06-30T00:00:00Z\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n\
         metadata = {{ customer_id = \"cus_123\", tier = \"gold\" }}\n",
        d(9),
        d(1),
        d(2)
    );
    let config = load(Path::new("t.toml"), &text, read).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.auth.expiry_warning, Duration::from_secs(7 * 86_400));
    assert_eq!(config.auth.store, KeyStoreKind::Redis);
    assert_eq!(
        config.auth.keys_cache_file,
        Some(PathBuf::from("/tmp/k.json"))
    );
    assert_eq!(config.admin.token.unwrap().to_string(), d(9));
    let key = &config.keys[0];
    assert_eq!(key.digests.len(), 2);
    assert_eq!(key.digests[0].expires_at, None);
    assert_eq!(key.digests[1].expires_at, Some(1_799_971_200));
    assert_eq!(key.expires_at, Some(1_814_313_600));
    assert_eq!(key.created_at, Some(1_767_225_600));
    assert_eq!(key.expiry_of(&key.digests[0]), Some(1_814_313_600));
    assert_eq!(key.expiry_of(&key.digests[1]), Some(1_799_971_200));
    assert_eq!(
        key.metadata,
        [
            ("customer_id".to_owned(), "cus_123".to_owned()),
            ("tier".to_owned(), "gold".to_owned())
        ]
    );
    // Defaults.
    let plain = load(Path::new("t.toml"), "", read).unwrap();
    assert_eq!(plain.auth.expiry_warning, DEFAULT_EXPIRY_WARNING);
    assert_eq!(plain.auth.store, KeyStoreKind::File);
    assert_eq!(plain.admin.token, None);
}
