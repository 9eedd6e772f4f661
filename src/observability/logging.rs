//! Log setup: to stderr, human on a terminal and JSON otherwise, unless forced.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Human,
}

/// Checks a `--log-level` filter (the command line refuses one that does not parse, instead
/// of the filter library's fallback to errors only, which would lose the access log).
pub fn parse_filter(level: &str) -> Result<String, String> {
    match EnvFilter::try_new(level) {
        Ok(_) => Ok(level.to_owned()),
        Err(e) => Err(format!("not a log filter: {e}")),
    }
}

/// Installs the global subscriber. `level` (from `--log-level`) wins over `RUST_LOG`;
/// the default is `info`. A `RUST_LOG` that does not parse is an error, not errors-only logs.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = match (level, std::env::var("RUST_LOG")) {
        (Some(level), _) => EnvFilter::try_new(level).map_err(|e| format!("--log-level: {e}"))?,
        (None, Ok(env)) if !env.is_empty() => EnvFilter::try_new(&env)
            .map_err(|e| format!("RUST_LOG is not a log filter ({e}); unset it or fix it"))?,
        _ => EnvFilter::new("info"),
    };
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
    Ok(())
}
