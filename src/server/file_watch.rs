//! `server.watch`: reload when the config file or the keys file changes.
//!
//! Polls both files' modification time and length every [`WATCH_INTERVAL`] (no inotify
//! dependency; one `stat` per file per second is nothing). A change runs the same reload as
//! SIGHUP: parse and validate here, off the request path, then swap. Whether to watch is read
//! from the running config at every tick, so a reload can turn it on or off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::server::signals;
use crate::stack::Gateway;

/// How often the files are checked.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies a file's version: modification time and length (`None`: unreadable).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(path: &Path, gateway: &Gateway) -> (Stamp, Stamp) {
    let keys_file = gateway.snapshot().config.auth.keys_file.clone();
    (stamp(path), keys_file.as_deref().and_then(stamp))
}

/// Reloads `path` into `gateway` whenever it or its keys file changes, while the running
/// config has `server.watch = true`. Checks every `every`; never returns.
pub async fn reload_on_change(path: PathBuf, gateway: Arc<Gateway>, every: Duration) {
    let mut seen = stamps(&path, &gateway);
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = stamps(&path, &gateway);
        if now == seen {
            continue;
        }
        seen = now;
        if !gateway.snapshot().config.server.watch {
            continue;
        }
        tracing::info!(path = %path.display(), "config or keys file changed; reloading");
        signals::reload_in_background(&path, &gateway).await;
        // The reload may have named a different keys file.
        seen = stamps(&path, &gateway);
    }
}
