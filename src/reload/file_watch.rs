//! `server.watch`: reload when the config file or the keys file changes.
//!
//! Polls both files' modification time and length every [`WATCH_INTERVAL`] (no inotify
//! dependency; one `stat` per file per second is nothing). A change runs the same reload as
//! SIGHUP: parse and validate here, off the request path, then swap, or refuse the file and
//! keep watching. `server.watch` takes a restart (a reload that changes it is refused), so a
//! file cut short can never turn the watcher off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::reload;
use crate::stack::Gateway;

/// How often the files are checked.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies a file's version: modification time and length (`None`: unreadable).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn keys_file(gateway: &Gateway) -> Option<PathBuf> {
    gateway.snapshot().config.auth.keys_file.clone()
}

/// Reloads `path` into `gateway` whenever it or its keys file changes, while the running
/// config has `server.watch = true`. Checks every `every`; never returns.
pub async fn reload_on_change(path: PathBuf, gateway: Arc<Gateway>, every: Duration) {
    let mut keys = keys_file(&gateway);
    let stamps = |keys: &Option<PathBuf>| (stamp(&path), keys.as_deref().and_then(stamp));
    let mut seen = stamps(&keys);
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = stamps(&keys);
        if now == seen {
            continue;
        }
        seen = now;
        if !gateway.snapshot().config.server.watch {
            continue;
        }
        tracing::info!(path = %path.display(), "config or keys file changed; reloading");
        reload::reload_in_background(&path, &gateway).await;
        // `seen` stays what was stamped before the reload: a file written while the reload
        // read it (a truncated file filled in, say) differs at the next tick and is read
        // again. Only a keys file the reload newly named is stamped afresh.
        let named = keys_file(&gateway);
        if named != keys {
            keys = named;
            seen.1 = keys.as_deref().and_then(stamp);
        }
    }
}
