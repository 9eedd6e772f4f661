//! Process signals: SIGTERM/SIGINT start a graceful shutdown; SIGHUP is caught here and
//! handed to [`crate::reload`] (above the server), which reloads the config.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_requested() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Takes over SIGHUP (whose default action ends the process). Call before the listeners are
/// bound: a SIGHUP from then on waits for [`reload_on_sighup`] instead of killing the gateway.
pub fn catch_sighup() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}
