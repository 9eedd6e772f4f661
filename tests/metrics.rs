//! Prometheus metrics over the wire (SPEC.md, Observability): a known sequence of requests,
//! then `/metrics` on the admin listener, parsed and checked series by series.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use tollgate::auth::ApiKey;

const KEY: &str = "tg_test_metrics_0123456789abcdefghij";

/// Parses the text format into `name{labels}` -> value (labels as written).
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse().expect("numeric value"))
        })
        .collect()
}

async fn scrape(admin: SocketAddr) -> (Reply, HashMap<String, f64>) {
    let reply = get(admin, "/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    let parsed = parse_metrics(&reply.text());
    (reply, parsed)
}

fn value(metrics: &HashMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in {:#?}", metrics.keys()))
}

async fn gateway() -> TestGateway {
    let up = echo_upstream().await;
    let dead = refusing_addr();
    let text = format!(
        r#"
[plans.tight]
requests_per_minute = 1
[[keys]]
id = "acme"
key = "{key}"
plan = "tight"
[[upstreams]]
name = "echo"
url = "http://{up}"
[[upstreams]]
name = "dead"
url = "http://{dead}"
[[routes]]
prefix = "/v1/"
upstream = "echo"
[[routes]]
prefix = "/dead/"
upstream = "dead"
auth = false
"#,
        key = ApiKey::new(KEY).digest(),
    );
    TestGateway::start(config("", &text)).await
}

#[tokio::test]
async fn a_known_sequence_of_requests_shows_up_in_the_counters() {
    let gw = gateway().await;
    let key = [("X-API-Key", KEY)];
    assert_eq!(get(gw.addr, "/v1/a", &key).await.status, 200);
    let r = get(gw.addr, "/nowhere", &[]).await;
    assert_eq!(r.status, 404);
    assert_envelope(&r, 404, "not_found");
    let r = get(gw.addr, "/v1/a", &[]).await;
    assert_eq!(r.status, 401);
    assert_envelope(&r, 401, "authentication_error");
    let r = get(gw.addr, "/v1/a", &key).await;
    assert_eq!(r.status, 429);
    assert_envelope(&r, 429, "rate_limited");
    assert_retry_after(&r);
    let r = get(gw.addr, "/dead/x", &[]).await;
    assert_eq!(r.status, 502);
    assert_envelope(&r, 502, "bad_gateway");

    let (reply, m) = scrape(gw.admin).await;
    assert!(
        reply
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/openmetrics-text")),
        "{:?}",
        reply.headers
    );
    let requests = |route: &str, status: &str, plan: &str| {
        value(
            &m,
            &format!(
                "tollgate_requests_total{{route=\"{route}\",status=\"{status}\",plan=\"{plan}\"}}"
            ),
        )
    };
    assert_eq!(requests("/v1/", "2xx", "tight"), 1.0);
    assert_eq!(requests("none", "4xx", "none"), 1.0);
    assert_eq!(requests("/v1/", "4xx", "none"), 1.0, "the 401");
    assert_eq!(requests("/v1/", "4xx", "tight"), 1.0, "the 429");
    assert_eq!(requests("/dead/", "5xx", "none"), 1.0);
    let total: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tollgate_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 5.0);

    let decision = |d: &str, plan: &str| {
        value(
            &m,
            &format!(
                "tollgate_rate_limit_decisions_total{{decision=\"{d}\",plan=\"{plan}\",route=\"/v1/\"}}"
            ),
        )
    };
    assert_eq!(decision("allowed", "tight"), 1.0);
    assert_eq!(decision("limited", "tight"), 1.0);

    assert_eq!(
        value(
            &m,
            "tollgate_upstream_failures_total{upstream=\"dead\",kind=\"connect_refused\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "tollgate_upstream_duration_seconds_count{upstream=\"echo\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "tollgate_upstream_duration_seconds_count{upstream=\"dead\"}"
        ),
        1.0
    );
    assert_eq!(value(&m, "tollgate_request_duration_seconds_count"), 5.0);
    assert_eq!(
        value(&m, "tollgate_request_duration_seconds_bucket{le=\"+Inf\"}"),
        5.0
    );
    assert_eq!(value(&m, "tollgate_requests_in_flight"), 0.0);
    assert_eq!(
        value(&m, "tollgate_config_reloads_total{result=\"ok\"}"),
        0.0
    );
    assert_eq!(
        value(&m, "tollgate_config_reloads_total{result=\"failed\"}"),
        0.0
    );
    for kind in ["timeout", "io", "readonly", "moved", "tls", "auth", "other"] {
        let series = format!("tollgate_limiter_backend_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(value(&m, &series), 0.0, "{series}");
    }
    let info: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("tollgate_config_info{hash=\""))
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(*info[0].1, 1.0);
    assert_eq!(
        info[0].0.len(),
        "tollgate_config_info{hash=\"\"}".len() + 64
    );
}

#[tokio::test]
async fn heads_the_parser_refuses_are_counted_as_requests() {
    let gw = gateway().await;
    // Two different Content-Lengths: hyper refuses the head itself, and the transport writes
    // tollgate's 400 in place of hyper's.
    let r = send_raw(
        gw.addr,
        b"GET /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    .await;
    assert_envelope(&r, 400, "bad_request");
    // More header fields than the parser holds: its 431.
    let mut head = b"GET /v1/a HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..120 {
        head.extend_from_slice(format!("X-F{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let r = send_raw(gw.addr, &head).await;
    assert_envelope(&r, 431, "headers_too_large");

    let (_, m) = scrape(gw.admin).await;
    assert_eq!(
        value(
            &m,
            "tollgate_requests_total{route=\"none\",status=\"4xx\",plan=\"none\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn an_upstream_502_page_is_counted_by_status() {
    let up = upstream(|_req| async {
        http::Response::builder()
            .status(502)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"boom",
            )))
            .unwrap()
    })
    .await;
    let gw = TestGateway::start(config(
        "",
        &format!(
            "[[upstreams]]\nname = \"bad\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"bad\"\nauth = false\n"
        ),
    ))
    .await;
    let r = get(gw.addr, "/x", &[]).await;
    assert_eq!(r.status, 502);
    // Normalized (`normalize_upstream_5xx` is on by default): tollgate's envelope, not "boom".
    assert_envelope(&r, 502, "bad_gateway");
    let (_, m) = scrape(gw.admin).await;
    assert_eq!(
        value(
            &m,
            "tollgate_upstream_failures_total{upstream=\"bad\",kind=\"status_502\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "tollgate_requests_total{route=\"/\",status=\"5xx\",plan=\"none\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn reloads_are_counted_and_the_config_hash_follows_the_file() {
    let gw = gateway().await;
    let (_, before) = scrape(gw.admin).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    // A config a reload takes: the running one's listeners, and a route.
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    tollgate::reload::reload(&path, &gw.gateway);
    std::fs::write(&path, "[server]\nlisten = 5\n").unwrap();
    tollgate::reload::reload(&path, &gw.gateway);
    let (_, after) = scrape(gw.admin).await;
    assert_eq!(
        value(&after, "tollgate_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value(&after, "tollgate_config_reloads_total{result=\"failed\"}"),
        1.0
    );
    let hash = |m: &HashMap<String, f64>| {
        let hashes: Vec<String> = m
            .keys()
            .filter(|k| k.starts_with("tollgate_config_info{"))
            .cloned()
            .collect();
        assert_eq!(hashes.len(), 1, "{hashes:?}");
        hashes[0].clone()
    };
    assert_ne!(hash(&before), hash(&after));
}

/// Every `tollgate_*` metric name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("tollgate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_queries_exists() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/grafana-dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "tollgate");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    queried.extend(metric_names(&dashboard["templating"].to_string()));
    for title in [
        "429s by plan",
        "Upstream errors by kind",
        "Request latency p50 / p99",
        "Upstream targets in rotation",
    ] {
        assert!(panels.iter().any(|p| p["title"] == title), "{title}");
    }

    // Traffic that creates every labelled series (a success, a 429, an upstream failure).
    let gw = gateway().await;
    let key = [("X-API-Key", KEY)];
    get(gw.addr, "/v1/a", &key).await;
    get(gw.addr, "/v1/a", &key).await;
    get(gw.addr, "/dead/x", &[]).await;
    let (_, exposed) = scrape(gw.admin).await;
    let exposed: Vec<String> = exposed.keys().flat_map(|k| metric_names(k)).collect();
    assert!(queried.len() >= 9, "{queried:?}");
    for name in &queried {
        assert!(
            exposed.contains(name),
            "the dashboard queries {name}, which /metrics does not expose: {exposed:?}"
        );
    }
}
