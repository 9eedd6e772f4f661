//! The `tollgate` command line: run the gateway, check a config, hash or generate keys.

// The library forbids unsafe code; the one exception is here, in `heap::trim`.
#![deny(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tollgate::auth::{ApiKey, key};
use tollgate::config::keys_edit::KeysDocument;
use tollgate::config::{Config, units};
use tollgate::observability::logging::{self, LogFormat};
use tollgate::reload::{self, file_watch};
use tollgate::server::workers::Workers;
use tollgate::server::{Server, signals};
use tollgate::stack::Gateway;

/// A rate-limiting reverse proxy / API gateway.
#[derive(Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = "config/tollgate.toml")]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    /// Log filter (e.g. "info", "debug", "tollgate::access=off"); overrides RUST_LOG.
    #[arg(long, global = true, value_parser = logging::parse_filter)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config: exit 0, or print every error with file:line:column and exit 1.
    Check,
    /// Read a key on stdin and print its `sha256:<hex>` digest for the config.
    HashKey,
    /// Print a new random key and its digest.
    GenKey {
        /// Prefix for the key, e.g. "tg_live_".
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Give a key a new secret: print it once, add its digest to the key's entry in the keys
    /// file, and make the old digest expire after the overlap. The file is rewritten
    /// atomically, comments kept; `watch` or SIGHUP applies it.
    RotateKey {
        /// The keys file (or config) holding the key's [[keys]] table.
        #[arg(long)]
        keys_file: PathBuf,
        /// The key's id.
        #[arg(long)]
        id: String,
        /// How long the old key keeps working, e.g. "7d".
        #[arg(long)]
        overlap: String,
        /// Prefix for the new key, e.g. "tg_live_".
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::HashKey) => hash_key(),
        Some(Command::GenKey { prefix }) => gen_key(&prefix),
        Some(Command::RotateKey {
            keys_file,
            id,
            overlap,
            prefix,
        }) => rotate_key(&keys_file, &id, &overlap, &prefix),
        None => {
            if let Err(e) = logging::init(cli.log_format, cli.log_level.as_deref()) {
                eprintln!("tollgate: {e}");
                return ExitCode::from(2);
            }
            // Panics go through the log like everything else (one JSON line, not raw stderr);
            // a panic inside a request is also answered 500 by the server.
            std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panic")));
            run(cli.config)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load_to_serve(path) {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!(
                "{}: ok ({} routes, {} upstreams, {} keys, {} plans)",
                path.display(),
                config.routes.len(),
                config.upstreams.len(),
                config.keys.len(),
                config.plans.len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            let count = error.issues().len().max(1);
            eprintln!(
                "{}: {count} error{}",
                path.display(),
                if count == 1 { "" } else { "s" }
            );
            ExitCode::from(1)
        }
    }
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read stdin: {e}");
        return ExitCode::from(1);
    }
    // One trailing newline (from echo or a terminal) is not part of the key.
    let key = input
        .strip_suffix('\n')
        .map(|k| k.strip_suffix('\r').unwrap_or(k))
        .unwrap_or(&input);
    if key.is_empty() {
        eprintln!("no key on stdin");
        return ExitCode::from(1);
    }
    println!("{}", ApiKey::new(key).digest());
    ExitCode::SUCCESS
}

fn gen_key(prefix: &str) -> ExitCode {
    let key = key::generate(prefix);
    println!("key:  {}", key.expose());
    println!("hash: {}", key.digest());
    ExitCode::SUCCESS
}

fn rotate_key(path: &std::path::Path, id: &str, overlap: &str, prefix: &str) -> ExitCode {
    let overlap = match units::parse_duration(overlap) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("--overlap: {e}");
            return ExitCode::from(2);
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let old_expires_at = now + overlap.as_secs();
    let key = key::generate(prefix);
    // The new key is printed only once it is in the file: a failed write shows no key.
    let rotated = KeysDocument::read(path).and_then(|mut doc| {
        doc.rotate(id, key.digest(), old_expires_at, now)?;
        doc.write()
    });
    if let Err(e) = rotated {
        eprintln!("tollgate rotate-key: {e}");
        return ExitCode::from(1);
    }
    println!("key:  {}", key.expose());
    println!("hash: {}", key.digest());
    println!(
        "the old key of \"{id}\" works until {}",
        units::format_rfc3339(old_expires_at)
    );
    ExitCode::SUCCESS
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load_to_serve(&path) {
        Ok(config) => config,
        Err(error) => {
            for line in error.to_string().lines() {
                tracing::error!(error = line, "invalid config");
            }
            return ExitCode::from(1);
        }
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Refused before anything starts: a state file that cannot be read would otherwise
    // zero every key's month.
    let quota_counts = match config.limits.state_file.as_deref() {
        Some(state) if config.limits.backend == tollgate::config::LimitBackend::Local => {
            match tollgate::limit::state_file::read(state) {
                Ok(counts) => counts,
                Err(error) => {
                    tracing::error!(%error, "cannot start");
                    return ExitCode::from(1);
                }
            }
        }
        _ => Vec::new(),
    };
    // Every worker thread runs a current-thread runtime and serves the connections dealt to
    // it whole (`server::workers`), as nginx's worker processes do: no work-stealing queues,
    // no wake-ups across cores. The main thread is the first worker; it also accepts, reloads
    // and answers the admin listener.
    let total = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = match Workers::start(total) {
        Ok(workers) => Arc::new(workers),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the worker threads");
            return ExitCode::from(1);
        }
    };
    heap::spawn_trimmer();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    let dealer = workers.clone();
    let result = runtime.block_on(async move {
        let hup = signals::catch_sighup()?;
        // The gateway's snapshot keeps the config (a copy held here for the whole run would
        // double the memory of a large key set).
        let gateway = Arc::new(Gateway::new(config));
        gateway.restore_quotas(&quota_counts);
        reload::key_api::install(&gateway, &path);
        // Keys kept in Redis are loaded before the first request is served.
        let _key_sync = reload::key_sync::start(&gateway, reload::key_sync::DEFAULT_RESYNC).await;
        let server = Server::bind(&gateway.snapshot().config, gateway.clone())
            .await?
            .with_workers(dealer);
        let last_save = gateway.clone();
        tokio::spawn(reload::reload_on_sighup(hup, path.clone(), gateway.clone()));
        tokio::spawn(file_watch::reload_on_change(
            path,
            gateway,
            file_watch::WATCH_INTERVAL,
        ));
        let served = server.serve(signals::shutdown_requested()).await;
        last_save.save_quotas();
        served
    });
    // In-flight work past the grace period is dropped, not waited for.
    workers.shutdown();
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            ExitCode::from(1)
        }
    }
}

/// Hands freed heap memory back to the OS.
///
/// glibc's `free` returns memory only from the top of a heap: after a burst (10,000 HTTP/2
/// streams, each a spawned task of a few KiB, plus their buffers) nearly all of it is freed,
/// but a few live allocations above the freed ones pin the top, and the process kept its
/// peak RSS while idle. `malloc_trim(0)` also releases the free pages inside the heaps
/// (`madvise(MADV_DONTNEED)`). `MALLOC_ARENA_MAX` and `MALLOC_TRIM_THRESHOLD_` do not help:
/// measurements in `benches/load/h2_memory.sh`.
mod heap {
    use std::time::Duration;

    /// How often the trimmer looks.
    pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

    /// CPU time (user + system, in the kernel's 100 Hz ticks) below which a `TRIM_INTERVAL`
    /// counts as quiet: 10% of one core. Under load a trim is skipped: it would hand back
    /// pages the next requests fault in again, and it holds each malloc arena's lock while it
    /// walks it (8-21 ms measured under an h2 flood, against 0.3 ms idle).
    const QUIET_TICKS: u64 = TRIM_INTERVAL.as_secs() * 100 / 10;

    /// A thread of its own, never a runtime worker: every `TRIM_INTERVAL` that the process
    /// was quiet, trim. Memory freed by a burst goes back within two intervals of its end.
    pub fn spawn_trimmer() {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                let mut last = cpu_ticks();
                loop {
                    std::thread::sleep(TRIM_INTERVAL);
                    let now = cpu_ticks();
                    let busy = match (last, now) {
                        (Some(last), Some(now)) => now.saturating_sub(last) > QUIET_TICKS,
                        _ => false,
                    };
                    if !busy {
                        let started = std::time::Instant::now();
                        let released = trim();
                        tracing::trace!(took = ?started.elapsed(), released, "heap trimmed");
                    }
                    // The trim's own CPU time is not load.
                    last = cpu_ticks();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the heap trim thread; freed memory stays with the allocator");
        }
    }

    /// This process's user + system CPU time in ticks (`/proc/self/stat` fields 14 and 15).
    fn cpu_ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces and parentheses: count after its ')'.
        let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_ascii_whitespace();
        let utime: u64 = fields.nth(11)?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(utime + stime)
    }

    /// glibc's `malloc_trim(0)`: true when it released memory.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    fn trim() -> bool {
        unsafe extern "C" {
            /// `int malloc_trim(size_t pad)`, glibc >= 2.0 (`<malloc.h>`).
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointer and touches only the allocator's own state,
        // under each arena's lock; glibc documents it MT-Safe, callable from any thread at
        // any time. Rust's System allocator is this same malloc.
        unsafe { malloc_trim(0) != 0 }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn trim() -> bool {
        false
    }
}
