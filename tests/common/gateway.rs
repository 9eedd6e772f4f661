//! The gateway under test: configs on loopback port 0, the real server started in this
//! process, and what its admin listener reports.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::{Config, Gateway, Handler, Server};

use super::client::get;
use super::upstream::echo_upstream;

/// A config whose listeners are on loopback port 0, with `server_extra` lines added to
/// `[server]` and `rest` appended.
pub fn config(server_extra: &str, rest: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n{rest}"
    );
    Config::from_text(Path::new("test.toml"), &text)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"))
}

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl TestGateway {
    /// Starts the real gateway pipeline.
    pub async fn start(config: Config) -> Self {
        let gateway = Arc::new(Gateway::new(config.clone()));
        Self::start_with(config, gateway.clone(), gateway).await
    }

    /// Starts the server with a custom handler (`gateway` is kept for reloads).
    pub async fn start_with<H: Handler>(
        config: Config,
        gateway: Arc<Gateway>,
        handler: Arc<H>,
    ) -> Self {
        let server = Server::bind(&config, handler).await.expect("bind");
        Self::serve(server, gateway)
    }

    /// Serves `server` (`gateway` is kept for reloads).
    pub fn serve<H: Handler>(server: Server<H>, gateway: Arc<Gateway>) -> Self {
        let addr = server.local_addrs()[0];
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin,
            gateway,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Triggers a graceful shutdown and returns the serve task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shutdown once")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A gateway with one upstream `up` at `url` (plus `upstream_extra` lines) behind a public
/// catch-all route, and `server_extra` lines in `[server]`.
pub async fn proxy_gateway(url: &str, upstream_extra: &str, server_extra: &str) -> TestGateway {
    TestGateway::start(config(
        server_extra,
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"{url}\"\n{upstream_extra}\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    ))
    .await
}

/// A [`proxy_gateway`] (with `server_extra` in `[server]`) to a new
/// [`echo_upstream`]; returns both.
pub async fn echo_gateway(server_extra: &str) -> (TestGateway, SocketAddr) {
    let up = echo_upstream().await;
    let gw = proxy_gateway(&format!("http://{up}"), "", server_extra).await;
    (gw, up)
}

/// Two public fixed-response routes: `/status` (GET only, `up` as text/plain) and `/fixed/`
/// (201 `made`).
pub const FIXED_ROUTES: &str = r#"
[[routes]]
prefix = "/status"
auth = false
methods = ["GET"]
respond = { status = 200, body = "up", content_type = "text/plain" }

[[routes]]
prefix = "/fixed/"
auth = false
respond = { status = 201, body = "made" }
"#;

/// A config with [`FIXED_ROUTES`] whose errors are in `style` with an extra `powered_by`
/// field (see [`assert_styled_error`](super::assert::assert_styled_error)).
pub fn styled_config(style: &str, server_extra: &str) -> Config {
    config(
        server_extra,
        &format!(
            "[errors]\nstyle = \"{style}\"\nfields = {{ powered_by = \"Acme\" }}\n{FIXED_ROUTES}"
        ),
    )
}

/// The `sha256:` digest of `key`, as it is written in config.
pub fn digest(key: &str) -> String {
    tollgate::auth::ApiKey::new(key).digest().to_string()
}

/// The value of `series` (written exactly as exposed, labels included: `name{label="v"}`) in
/// a Prometheus text scrape, or `None` when it is not there.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .map(|(_, value)| value.parse().expect("numeric value"))
}

/// The value of one series on `admin`'s `/metrics` (see [`metric_in`]), or 0 when it is not
/// there.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = get(admin, "/metrics", &[]).await.text();
    metric_in(&text, series).unwrap_or(0.0)
}
