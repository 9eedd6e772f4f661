//! The `tollgate` command line: run the gateway, check a config, hash or generate keys.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tollgate::auth::{ApiKey, key};
use tollgate::config::Config;
use tollgate::observability::logging::{self, LogFormat};
use tollgate::reload::{self, file_watch};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::HashKey) => hash_key(),
        Some(Command::GenKey { prefix }) => gen_key(&prefix),
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
    // One worker: tokio's current-thread scheduler, which runs every task on this thread with
    // no work-stealing queues or cross-thread wakeups (less CPU per request than a one-thread
    // multi-thread runtime). Otherwise one worker per core, or `workers` of them.
    let mut runtime = match config.server.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(n);
            runtime
        }
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let hup = signals::catch_sighup()?;
        // The gateway's snapshot keeps the config (a copy held here for the whole run would
        // double the memory of a large key set).
        let gateway = Arc::new(Gateway::new(config));
        let server = Server::bind(&gateway.snapshot().config, gateway.clone()).await?;
        tokio::spawn(reload::reload_on_sighup(hup, path.clone(), gateway.clone()));
        tokio::spawn(file_watch::reload_on_change(
            path,
            gateway,
            file_watch::WATCH_INTERVAL,
        ));
        server.serve(signals::shutdown_requested()).await
    });
    // In-flight work past the grace period is dropped, not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            ExitCode::from(1)
        }
    }
}
