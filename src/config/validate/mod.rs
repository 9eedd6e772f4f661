//! Second stage of config loading: file structs -> [`Config`], every mistake collected.
//!
//! Each check that fails records a [`ConfigIssue`] at the offending value and substitutes a
//! default so validation can go on; the caller gets all issues, sorted by file and line.
//! [`load`] runs the stages in order; the [`Validator`] checks one section per file:
//! [`server`] (`[server]`, `[admin]`, `[errors]`), [`limits`] (`[limits]`), [`keys`]
//! (`[auth]`, `[plans]`, `[[keys]]` and the keys file) and [`routes`] (`[[upstreams]]`,
//! `[[routes]]`).

mod costs;
mod keys;
mod limits;
mod redis;
mod routes;
mod server;
mod targets;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::file::*;
use super::parse::{Source, parse};
use super::units::{parse_duration, parse_size};
use super::*;
pub(super) use costs::warnings;
pub use keys::check_metadata;
use keys::{KeySeen, keys_by_piece};

/// Loads the main config text and, if it names one, the keys file (through `read`).
pub(super) fn load(
    path: &Path,
    text: &str,
    read: impl Fn(&Path) -> Result<String, ConfigError>,
) -> Result<Config, ConfigError> {
    let src = Source::new(path, text);
    let mut issues = Vec::new();
    let Some(file) = parse::<FileConfig>(&src, "", &mut issues) else {
        return Err(invalid(issues, path));
    };
    let mut v = Validator {
        src: &src,
        issues: &mut issues,
        keys_file_span: None,
    };
    let mut config = v.config(
        file.server,
        file.admin,
        file.errors,
        file.auth,
        file.limits,
        file.redis,
    );
    config.plans = v.plans(&file.plans);
    config.upstreams = v.upstreams(&file.upstreams);
    config.routes = v.routes(&file.routes, &config.upstreams);

    let mut keys = Vec::new();
    let mut seen = KeySeen::default();
    v.keys(&file.keys, &config.plans, &mut seen, &mut keys);

    // Every (route, plan) pair has its own request counters, allocated up front.
    let pairs = (config.routes.len() + 1) * (config.plans.len() + 1);
    if pairs > MAX_ROUTE_PLAN_PAIRS {
        // At the last route or plan written, whichever comes later: one of those pushed it over.
        let last_route = file.routes.last().map(|r| r.prefix.span());
        let last_plan = file
            .plans
            .values()
            .map(|p| p.span())
            .max_by_key(|s| s.start);
        let at = last_route
            .into_iter()
            .chain(last_plan)
            .max_by_key(|s| s.start);
        v.error(
            at.unwrap_or(0..0),
            format!(
                "{} routes and {} plans are too many: per-route, per-plan metrics need (routes + 1) x (plans + 1) = {pairs} series sets, at most {MAX_ROUTE_PLAN_PAIRS}",
                config.routes.len(),
                config.plans.len()
            ),
        );
    }

    let keys_file_text;
    if let Some(keys_path) = config.auth.keys_file.clone() {
        match read(&keys_path) {
            Ok(text) => {
                keys_file_text = text;
                let ksrc = Source::new(&keys_path, &keys_file_text);
                if !keys_by_piece(&ksrc, &config.plans, &mut seen, &mut keys, v.issues)
                    && let Some(kf) = parse::<KeysFile>(&ksrc, "keys_file", v.issues)
                {
                    let mut kv = Validator {
                        src: &ksrc,
                        issues: v.issues,
                        keys_file_span: None,
                    };
                    kv.keys(&kf.keys, &config.plans, &mut seen, &mut keys);
                }
            }
            Err(e) => {
                let span = v.keys_file_span.clone().unwrap_or(0..0);
                let why = match e {
                    ConfigError::Read { path, source } => format!("{}: {source}", path.display()),
                    other => other.to_string(),
                };
                let issue = src.issue(span, format!("cannot read auth.keys_file {why}"));
                v.issues.push(issue);
            }
        }
    }
    config.keys = keys;
    v.costs(&file.plans, &file.keys, &file.routes, &config);

    if issues.is_empty() {
        Ok(config)
    } else {
        Err(invalid(issues, path))
    }
}

/// The issues in reading order: the main file's first, then the keys file's, each by line
/// and column.
fn invalid(mut issues: Vec<ConfigIssue>, main: &Path) -> ConfigError {
    issues.sort_by(|a, b| {
        (a.file != main, &a.file, a.line, a.column).cmp(&(
            b.file != main,
            &b.file,
            b.line,
            b.column,
        ))
    });
    issues.dedup();
    ConfigError::Invalid(issues)
}

/// The issue for a config with no routes (see `Config::load_to_serve`), at the end of the
/// file: where routes would go, and where a file cut short ends.
pub(super) fn no_routes(path: &Path, text: &str) -> ConfigIssue {
    Source::new(path, text).issue(
        text.len()..text.len(),
        "no [[routes]]: every request would be answered 404 not_found. tollgate does not start with such a config, and a reload keeps the running one; if this file should have routes, it ends early (cut short, or read while it was being written)",
    )
}

/// Most (routes + 1) x (plans + 1): each pair holds five request counters (16 bytes each,
/// allocated when the config loads), so this bounds that table at 16 MB.
const MAX_ROUTE_PLAN_PAIRS: usize = 200_000;

/// Validates file structs into config types, recording each mistake in `issues`.
struct Validator<'s, 'i> {
    src: &'s Source<'s>,
    issues: &'i mut Vec<ConfigIssue>,
    /// Where `auth.keys_file` was set, for a "cannot read" message.
    keys_file_span: Option<std::ops::Range<usize>>,
}

impl Validator<'_, '_> {
    fn error(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let issue = self.src.issue(span, message);
        self.issues.push(issue);
    }

    fn duration(&mut self, value: &Option<SpannedStr>, default: Duration, name: &str) -> Duration {
        let Some(value) = value else { return default };
        match parse_duration(value.get_ref()) {
            Ok(d)
                if d.is_zero()
                    && name != "server.shutdown_grace"
                    && name != "auth.expiry_warning" =>
            {
                self.error(value.span(), format!("{name} must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(value.span(), format!("{name}: {e}"));
                default
            }
        }
    }

    fn size(&mut self, value: &Option<Spanned<SizeFile>>, default: u64, name: &str) -> u64 {
        let Some(value) = value else { return default };
        let parsed = match value.get_ref() {
            SizeFile::Bytes(n) if *n > 0 => Ok(*n as u64),
            SizeFile::Bytes(_) => Err("must be greater than zero".to_owned()),
            SizeFile::Text(t) => parse_size(t).and_then(|n| {
                if n == 0 {
                    Err("must be greater than zero".to_owned())
                } else {
                    Ok(n)
                }
            }),
        };
        parsed.unwrap_or_else(|e| {
            self.error(value.span(), format!("{name}: {e}"));
            default
        })
    }

    /// A size no larger than `max` (which `check` names in `max`'s largest whole unit).
    fn size_at_most(
        &mut self,
        value: &Option<Spanned<SizeFile>>,
        default: u64,
        max: u64,
        name: &str,
    ) -> u64 {
        let size = self.size(value, default, name);
        match value {
            Some(value) if size > max => {
                self.error(value.span(), format!("{name}: at most {} MiB", max >> 20));
                default
            }
            _ => size,
        }
    }

    fn positive(&mut self, value: &Spanned<i64>, name: &str) -> Option<NonZeroU32> {
        match u32::try_from(*value.get_ref())
            .ok()
            .and_then(NonZeroU32::new)
        {
            Some(n) => Some(n),
            None => {
                self.error(
                    value.span(),
                    format!(
                        "{name} must be a whole number from 1 to {}, got {}",
                        u32::MAX,
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn positive_or(
        &mut self,
        value: &Option<Spanned<i64>>,
        default: u32,
        name: &str,
    ) -> NonZeroU32 {
        let default = NonZeroU32::new(default).expect("defaults are non-zero");
        value
            .as_ref()
            .and_then(|v| self.positive(v, name))
            .unwrap_or(default)
    }

    fn socket_addr(
        &mut self,
        value: &str,
        span: std::ops::Range<usize>,
        name: &str,
    ) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    span,
                    format!("{name}: \"{value}\" is not an address like \"0.0.0.0:8080\" or \"[::1]:8080\""),
                );
                None
            }
        }
    }

    fn enumeration<T: Copy>(
        &mut self,
        value: &Option<SpannedStr>,
        choices: &[(&str, T)],
        default: T,
        name: &str,
    ) -> T {
        let Some(value) = value else { return default };
        if let Some((_, t)) = choices.iter().find(|(s, _)| *s == value.get_ref()) {
            return *t;
        }
        let names: Vec<String> = choices.iter().map(|(s, _)| format!("\"{s}\"")).collect();
        self.error(
            value.span(),
            format!(
                "{name} must be one of {}, got \"{}\"",
                names.join(", "),
                value.get_ref()
            ),
        );
        default
    }

    fn existing_file(&mut self, value: &SpannedStr, name: &str) -> PathBuf {
        let path = PathBuf::from(value.get_ref());
        if !path.is_file() {
            self.error(
                value.span(),
                format!("{name}: file \"{}\" does not exist", path.display()),
            );
        }
        path
    }

    fn scopes(&mut self, scopes: &[SpannedStr]) -> Vec<String> {
        scopes
            .iter()
            .filter_map(|s| {
                let text = s.get_ref().trim();
                if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    self.error(s.span(), "a scope must be non-empty and hold no spaces");
                    None
                } else {
                    Some(text.to_owned())
                }
            })
            .collect()
    }

    fn config(
        &mut self,
        server: ServerFile,
        admin: AdminFile,
        errors: ErrorsFile,
        auth: AuthFile,
        limits: LimitsFile,
        redis: Option<Spanned<RedisFile>>,
    ) -> Config {
        let listen_span = server.listen.as_ref().map_or(0..0, |l| l.span());
        let admin_span = admin.listen.as_ref().map(|l| l.span());
        let server = self.server(server);
        let admin = self.admin(admin);
        self.listen_overlaps(&server.listen, listen_span, admin.listen, admin_span);
        Config {
            server,
            admin,
            errors: self.errors(errors),
            auth: self.auth(auth),
            redis: self.redis(redis, limits.redis_url.as_ref()),
            limits: self.limits(limits),
            plans: BTreeMap::new(),
            keys: Vec::new(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            source_hash: String::new(),
        }
    }
}

/// `[A-Za-z0-9._:-]{1,max}`: ids that are safe in logs, metrics labels and headers.
/// Whether `s` may be a key id: 1-128 of `[A-Za-z0-9._:-]` (also the admin API's check).
pub fn valid_key_id(s: &str) -> bool {
    valid_identifier(s, 128)
}

fn valid_identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}
