//! The load comparison's Pingora gateway (`benches/load/compare.sh`): the same work as the
//! tollgate, nginx and HAProxy configs beside it.
//!
//! - `X-API-Key` looked up in a key map (`keys.haproxy.map`: `<key> <key id>` per line);
//!   missing or unknown: `401`.
//! - A per-key limit of `--limit` requests per minute (pingora-limits' `Rate`, a count-min
//!   estimate over fixed one-minute windows counted from the start, so at each window's start
//!   every key's count is back to zero); over it: `429`. Both answers keep the connection alive.
//! - `X-API-Key` removed, `X-Key-Id` set, proxied with keep-alive to `--upstream`; paths under
//!   `/slow2/` go to `--upstream2` instead (the two-segment upstream of the latency row).
//! - `--threads` worker threads (1 for the pinned table), no access log.
//!
//! Usage: `pingora-gateway --listen 127.0.0.1:8083 --upstream 127.0.0.1:3000
//!         --upstream2 127.0.0.1:3001 --keys keys.haproxy.map --limit 60000000 --threads 1`

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora_limits::rate::Rate;

struct Gateway {
    keys: HashMap<Vec<u8>, String>,
    limit: isize,
    rate: Rate,
    upstream: String,
    upstream2: String,
}

impl Gateway {
    /// An empty-bodied answer that keeps the connection alive (Pingora's `respond_error`
    /// closes it, which nginx and HAProxy don't do on 401 and 429).
    async fn answer(session: &mut Session, status: u16) -> Result<bool> {
        let mut header = ResponseHeader::build(status, Some(1))?;
        header.insert_header("Content-Length", "0")?;
        session.write_response_header(Box::new(header), true).await?;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// The key id of the request, once authenticated.
    type CTX = Option<String>;

    fn new_ctx(&self) -> Self::CTX {
        None
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let id = session
            .req_header()
            .headers
            .get("x-api-key")
            .and_then(|key| self.keys.get(key.as_bytes()));
        let Some(id) = id else {
            return Self::answer(session, 401).await;
        };
        if self.rate.observe(id, 1) > self.limit {
            return Self::answer(session, 429).await;
        }
        *ctx = Some(id.clone());
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        let addr = if session.req_header().uri.path().starts_with("/slow2/") {
            &self.upstream2
        } else {
            &self.upstream
        };
        Ok(Box::new(HttpPeer::new(addr.as_str(), false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        upstream_request.remove_header("x-api-key");
        if let Some(id) = ctx.take() {
            upstream_request.insert_header("x-key-id", id)?;
        }
        Ok(())
    }
}

fn main() {
    let mut args: HashMap<String, String> = HashMap::new();
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let name = flag.strip_prefix("--").unwrap_or_else(|| panic!("unexpected argument {flag}"));
        let value = argv.next().unwrap_or_else(|| panic!("--{name} needs a value"));
        args.insert(name.to_string(), value);
    }
    let arg = |name: &str, default: &str| args.get(name).cloned().unwrap_or_else(|| default.to_string());

    let keys_file = arg("keys", "keys.haproxy.map");
    let text = std::fs::read_to_string(&keys_file).unwrap_or_else(|e| panic!("{keys_file}: {e}"));
    let keys: HashMap<Vec<u8>, String> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(key, id)| (key.as_bytes().to_vec(), id.trim().to_string()))
        .collect();
    assert!(!keys.is_empty(), "{keys_file}: no keys");

    let mut conf = ServerConf::new().expect("default server conf");
    conf.threads = arg("threads", "1").parse().expect("--threads");
    conf.pid_file = arg("pid-file", "pingora-gateway.pid");
    conf.upgrade_sock = arg("upgrade-sock", "pingora-gateway.sock");
    // compare.sh stops it with SIGTERM: no grace period to sit through.
    conf.grace_period_seconds = Some(0);
    conf.graceful_shutdown_timeout_seconds = Some(1);
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let gateway = Gateway {
        keys,
        limit: arg("limit", "60000000").parse().expect("--limit"),
        // One-minute windows, as the others' per-minute limits; 4 x 4096 counters for 1000 keys.
        rate: Rate::new_with_estimator_config(Duration::from_secs(60), 4, 4096),
        upstream: arg("upstream", "127.0.0.1:3000"),
        upstream2: arg("upstream2", "127.0.0.1:3001"),
    };
    let mut service = http_proxy_service(&server.configuration, gateway);
    service.add_tcp(&arg("listen", "127.0.0.1:8083"));
    server.add_service(service);
    server.run_forever();
}
