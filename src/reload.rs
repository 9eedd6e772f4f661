//! Reloading the config into a running [`Gateway`]: on SIGHUP ([`reload_on_sighup`]),
//! with `server.watch` when the config or keys file changes ([`file_watch`]), after a write
//! through the admin key API ([`key_api`]), and as the keys kept in Redis change
//! ([`key_sync`], `auth.store = "redis"`). Above the
//! stack: it swaps the gateway's snapshot, so nothing below imports it.

pub mod file_watch;
pub mod key_api;
pub mod key_sync;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::Signal;

use crate::config::Config;
use crate::stack::Gateway;

/// Reloads `path` into `gateway` on every SIGHUP caught by `hup` (one that came before this
/// started is handled at once). A file [`reload`] refuses is logged and the running config
/// stays.
pub async fn reload_on_sighup(mut hup: Signal, path: PathBuf, gateway: Arc<Gateway>) {
    while hup.recv().await.is_some() {
        reload_in_background(&path, &gateway).await;
    }
}

/// [`reload`] on the blocking pool: reading and validating a large config (up to 256 MiB,
/// a million keys) takes seconds, which on a runtime worker would stall every request it
/// serves (all of them with `server.workers = 1`). Reloads run one at a time.
pub async fn reload_in_background(path: &std::path::Path, gateway: &Arc<Gateway>) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (path, gateway) = (path.to_owned(), gateway.clone());
    let done = tokio::task::spawn_blocking(move || {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        reload(&path, &gateway);
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "config reload failed unexpectedly; the running config stays");
    }
}

/// The settings that differ between `old` and `new` and are read only when the process or its
/// listeners start, so a reload cannot apply them.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.server, &new.server);
    [
        // A reload that turned it off (an empty file reads as `watch = false`) would stop the
        // watcher that is to pick up the fixed file.
        ("server.watch", a.watch != b.watch),
        ("server.listen", a.listen != b.listen),
        ("admin.listen", old.admin.listen != new.admin.listen),
        ("server.workers", a.workers != b.workers),
        (
            "server.header_read_timeout",
            a.header_read_timeout != b.header_read_timeout,
        ),
        ("server.idle_timeout", a.idle_timeout != b.idle_timeout),
        (
            // The request-body side applies at once; the bound on writes to a client that
            // stopped reading is the listener's.
            "server.body_read_timeout (for response writes)",
            a.body_read_timeout != b.body_read_timeout,
        ),
        (
            "server.max_header_bytes",
            a.max_header_bytes != b.max_header_bytes,
        ),
        (
            "server.max_connections",
            a.max_connections != b.max_connections,
        ),
        (
            "server.shutdown_grace",
            a.shutdown_grace != b.shutdown_grace,
        ),
        // The Redis key store is followed by a task started with the process.
        ("auth.store", old.auth.store != new.auth.store),
        // New certificates are served to new connections; TLS itself is on or off per listener.
        ("server.tls (on or off)", a.tls.is_some() != b.tls.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Loads, validates and swaps in the config at `path`, all of it or none of it. The running
/// config stays, and the attempt is logged with why and counted as a `failed` reload, when
/// the file is invalid, has no routes (see [`Config::load_to_serve`]: a file cut short), or
/// changes a setting that takes a restart ([`restart_only_changes`]). Applying the rest of
/// such a file would leave the gateway running neither the old file nor the new one; nginx
/// rolls back a reload it cannot complete, and Envoy rejects a config update it cannot apply,
/// in the same way.
pub fn reload(path: &std::path::Path, gateway: &Gateway) {
    let config = match Config::load_to_serve(path) {
        Ok(config) => config,
        Err(error) => {
            gateway.metrics().reload(false);
            for line in error.to_string().lines() {
                tracing::error!(
                    error = line,
                    "config reload rejected; keeping the running config"
                );
            }
            return;
        }
    };
    let stay = restart_only_changes(&gateway.snapshot().config, &config);
    if !stay.is_empty() {
        gateway.metrics().reload(false);
        tracing::error!(
            path = %path.display(),
            settings = stay.join(", "),
            "config reload rejected: these settings take a restart, and a reload applies all of the file or none of it; keeping the running config (restart to apply the file)"
        );
        return;
    }
    gateway.reload(config);
    tracing::info!(path = %path.display(), "config reloaded");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(server: &str) -> Config {
        let text = format!("[server]\nlisten = \"127.0.0.1:8080\"\n{server}");
        Config::from_text(std::path::Path::new("t.toml"), &text).expect("valid")
    }

    #[test]
    fn a_reload_names_the_settings_it_cannot_apply() {
        let old = config("idle_timeout = \"60s\"\nmax_body_bytes = \"1MiB\"");
        let same = config("idle_timeout = \"60s\"\nmax_body_bytes = \"2MiB\"");
        assert!(
            restart_only_changes(&old, &same).is_empty(),
            "max_body_bytes applies at once"
        );
        let new = config(
            "idle_timeout = \"5s\"\nmax_connections = 10\nworkers = 3\nmax_body_bytes = \"1MiB\"\nwatch = true",
        );
        assert_eq!(
            restart_only_changes(&old, &new),
            [
                "server.watch",
                "server.workers",
                "server.idle_timeout",
                "server.max_connections"
            ]
        );
    }
}
