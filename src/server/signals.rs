//! Process signals: SIGTERM/SIGINT start a graceful shutdown, SIGHUP reloads the config.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;
use crate::stack::Gateway;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_requested() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Reloads `path` into `gateway` on every SIGHUP. An invalid file is logged with every error
/// and the running config stays.
pub async fn reload_on_sighup(path: PathBuf, gateway: Arc<Gateway>) {
    let mut hup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    while hup.recv().await.is_some() {
        reload(&path, &gateway);
    }
}

/// Loads, validates and swaps in the config at `path`.
pub fn reload(path: &std::path::Path, gateway: &Gateway) {
    match Config::load(path) {
        Ok(config) => {
            let old = gateway.snapshot();
            if old.config.server.listen != config.server.listen
                || old.config.admin.listen != config.admin.listen
            {
                tracing::warn!(
                    "listen addresses changed; that takes a restart, the old ones stay bound"
                );
            }
            if old.config.server.tls.is_some() != config.server.tls.is_some() {
                tracing::warn!(
                    "[server.tls] added or removed; turning TLS on or off takes a restart (new certificates apply now)"
                );
            }
            gateway.reload(config);
            tracing::info!(path = %path.display(), "config reloaded");
        }
        Err(error) => {
            gateway.metrics().reload(false);
            for line in error.to_string().lines() {
                tracing::error!(
                    error = line,
                    "config reload rejected; keeping the running config"
                );
            }
        }
    }
}
