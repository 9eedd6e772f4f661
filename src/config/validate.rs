//! Second stage of config loading: file structs -> [`Config`], every mistake collected.
//!
//! Each check that fails records a [`ConfigIssue`] at the offending value and substitutes a
//! default so validation can go on; the caller gets all issues, sorted by file and line.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use ipnet::IpNet;
use toml::Spanned;
use toml::de::DeTable;

use super::file::*;
use super::schema::strip_unknown;
use super::units::{parse_duration, parse_size};
use super::*;

/// Error body keys that `errors.fields` may not overwrite.
const RESERVED_ERROR_FIELDS: [&str; 6] = [
    "success",
    "error",
    "request_id",
    "timestamp",
    "detail",
    "code",
];

/// A file's text, to turn byte spans into line and column.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Lines of the file before `text` (a piece of a large keys file starts at a line start,
    /// so only its lines are shifted, not its columns).
    lines_before: usize,
    /// Where each line starts, found on the first lookup: every key's line is looked up (for
    /// duplicate reports), and counting from the top each time made a million keys take hours.
    line_starts: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> Source<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        Self {
            path,
            text,
            lines_before: 0,
            line_starts: std::cell::OnceCell::new(),
        }
    }

    fn issue(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigIssue {
        let start = span.start.min(self.text.len());
        let starts = self.line_starts.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        // The last line starting at or before `start`.
        let index = starts.partition_point(|&s| s <= start) - 1;
        let line = self.lines_before + index + 1;
        let line_start = starts[index];
        let column = self.text[line_start..start].chars().count() + 1;
        ConfigIssue {
            file: self.path.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// Type errors reported from one file before giving up on the rest.
const MAX_TYPE_ERRORS: usize = 50;

/// Parses one TOML file into `T`, reporting syntax errors, every unknown key, and every type
/// error. `root` names the schema (`""` for the main config, `"keys_file"`). serde stops at
/// the first type error, so each one's value is taken out of the document and the rest is
/// deserialized again, then checked like any file (the issues already make it invalid, so the
/// values taken out are never used).
fn parse<T: serde::de::DeserializeOwned>(
    src: &Source<'_>,
    root: &str,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    let mut doc = match DeTable::parse(src.text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = match e.message().trim() {
                "duplicate key" => duplicate_key(src, &span),
                other => other.to_owned(),
            };
            issues.push(src.issue(span, message));
            return None;
        }
    };
    for unknown in strip_unknown(doc.get_mut(), root) {
        issues.push(src.issue(unknown.span, unknown.message));
    }
    // The first try takes the document itself: a copy would double the peak memory of a
    // large keys file. Only a document with a type error is parsed again, to take values out.
    let mut error = match T::deserialize(toml::de::Deserializer::from(doc)) {
        Ok(v) => return Some(v),
        Err(e) => e,
    };
    let mut doc = DeTable::parse(src.text).expect("it parsed a moment ago");
    let _ = strip_unknown(doc.get_mut(), root);
    // Keys taken out for a type error: serde then misses them ("missing field" at the table
    // they were taken from), which is not news to report. The same field missing from
    // another table is.
    let mut taken: Vec<Taken> = Vec::new();
    let mut reported = 0;
    loop {
        let message = error.message().trim();
        let span = error.span().unwrap_or(0..0);
        let consequence = taken
            .iter()
            .any(|t| t.from == span && message == format!("missing field `{}`", t.key));
        let doc_span = doc.span();
        let took = take_value_at(doc.get_mut(), doc_span, &span);
        if !consequence {
            let key = took.as_ref().map(|t| t.key.as_str());
            issues.push(src.issue(span.clone(), explain(message, key)));
            reported += 1;
        }
        match took {
            Some(took) if reported < MAX_TYPE_ERRORS => taken.push(took),
            _ => return None,
        }
        error = match T::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
    }
}

/// toml's "duplicate key", with the key and where it was first defined. toml knows that
/// place but does not say it; the recovered document (which keeps the first definition) has
/// it: the nearest key of that name before the duplicate, which is the one in the same table
/// unless a nested table in between has a key of the same name.
fn duplicate_key(src: &Source<'_>, span: &std::ops::Range<usize>) -> String {
    let raw = src.text.get(span.clone()).unwrap_or("").trim();
    let name = raw.trim_matches(|c| c == '"' || c == '\'');
    let line_start = src.text[..span.start.min(src.text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let header = src.text[line_start..].trim_start().starts_with('[');
    let what = if header { "table" } else { "key" };
    let mut first: Option<std::ops::Range<usize>> = None;
    if header {
        // The recovered document holds the table under its second header: find the first
        // header line of the same name instead.
        let normal = |line: &str| -> String {
            let line = line.split('#').next().unwrap_or("");
            line.chars().filter(|c| !c.is_whitespace()).collect()
        };
        let end = src.text[line_start..]
            .find('\n')
            .map_or(src.text.len(), |i| line_start + i);
        let wanted = normal(&src.text[line_start..end]);
        let mut offset = 0;
        for line in src.text[..line_start].split_inclusive('\n') {
            if normal(line) == wanted {
                let column = line.len() - line.trim_start().len();
                first = Some(offset + column..offset + column);
                break;
            }
            offset += line.len();
        }
    } else {
        let (doc, _) = DeTable::parse_recoverable(src.text);
        nearest_key_before(doc.get_ref(), name, span.start, &mut first);
    }
    match first {
        Some(at) => {
            let at = src.issue(at, "");
            format!(
                "duplicate {what} `{name}` (first defined at {}:{}:{}); a {what} may be defined once",
                at.file.display(),
                at.line,
                at.column
            )
        }
        None => format!("duplicate {what} `{name}`; a {what} may be defined once"),
    }
}

/// The span of the last key named `name` that starts before `before`, anywhere in `table`.
fn nearest_key_before(
    table: &DeTable<'_>,
    name: &str,
    before: usize,
    found: &mut Option<std::ops::Range<usize>>,
) {
    for (key, value) in table.iter() {
        let span = key.span();
        if key.get_ref() == name
            && span.start < before
            && found.as_ref().is_none_or(|f| f.start < span.start)
        {
            *found = Some(span);
        }
        nearest_in_value(value.get_ref(), name, before, found);
    }
}

fn nearest_in_value(
    value: &toml::de::DeValue<'_>,
    name: &str,
    before: usize,
    found: &mut Option<std::ops::Range<usize>>,
) {
    match value {
        toml::de::DeValue::Table(t) => nearest_key_before(t, name, before, found),
        toml::de::DeValue::Array(items) => {
            for item in items.iter() {
                nearest_in_value(item.get_ref(), name, before, found);
            }
        }
        _ => {}
    }
}

/// The issue for a config with no routes (see `Config::load_to_serve`), at the end of the
/// file: where routes would go, and where a file cut short ends.
pub(super) fn no_routes(path: &Path, text: &str) -> ConfigIssue {
    Source::new(path, text).issue(
        text.len()..text.len(),
        "no [[routes]]: every request would be answered 404 not_found. tollgate does not start with such a config, and a reload keeps the running one; if this file should have routes, it ends early (cut short, or read while it was being written)",
    )
}

/// `[[keys]]` items per piece of a large keys file (a handful in unit tests, so that they
/// cross pieces).
#[cfg(not(test))]
const KEYS_PER_PIECE: usize = 4096;
#[cfg(test)]
const KEYS_PER_PIECE: usize = 3;

/// Loads a large keys file piece by piece: split before every [`KEYS_PER_PIECE`]th line that
/// is exactly `[[keys]]`, each piece parsed and validated on its own and dropped. toml's
/// parser holds the whole document's tokens and tree at once, about 3 KB per key (a
/// 200,000-key file peaked at 637 MB, and the freed memory stayed with the process); a piece
/// holds a few MB. Returns `false`, with nothing added, for a file of one piece, or when any
/// piece does not parse cleanly (a split inside a multi-line string or array, say): then the
/// caller parses the whole file, whose errors are the ones to report. A piece that parses is
/// exactly what that stretch of the whole file means, so a file whose every piece parses
/// gives the same keys, and the same validation messages at the same lines, as one parse.
fn keys_by_piece(
    src: &Source<'_>,
    plans: &BTreeMap<PlanName, Plan>,
    seen: &mut KeySeen,
    keys: &mut Vec<KeyConfig>,
    issues: &mut Vec<ConfigIssue>,
) -> bool {
    let starts = piece_starts(src.text, KEYS_PER_PIECE);
    if starts.len() < 2 {
        return false;
    }
    let (seen_before, keys_before, issues_before) = (seen.clone(), keys.len(), issues.len());
    let ends = starts.iter().skip(1).map(|&(byte, _)| byte);
    for (&(start, lines_before), end) in starts.iter().zip(ends.chain([src.text.len()])) {
        let piece = Source {
            lines_before,
            ..Source::new(src.path, &src.text[start..end])
        };
        let mut problems = Vec::new();
        let Some(file) =
            parse::<KeysFile>(&piece, "keys_file", &mut problems).filter(|_| problems.is_empty())
        else {
            *seen = seen_before;
            keys.truncate(keys_before);
            issues.truncate(issues_before);
            return false;
        };
        let mut v = Validator {
            src: &piece,
            issues,
            keys_file_span: None,
        };
        v.keys(&file.keys, plans, seen, keys);
    }
    true
}

/// Where each piece of a keys file starts: (byte offset, lines before it). The first piece
/// starts at 0; each next one at the line of every `per_piece`th `[[keys]]` header after the
/// first.
fn piece_starts(text: &str, per_piece: usize) -> Vec<(usize, usize)> {
    let mut starts = vec![(0, 0)];
    let mut headers = 0;
    let mut offset = 0;
    for (line, content) in text.split_inclusive('\n').enumerate() {
        if content.trim() == "[[keys]]" {
            if headers > 0 && headers % per_piece == 0 {
                starts.push((offset, line));
            }
            headers += 1;
        }
        offset += content.len();
    }
    starts
}

/// Settings whose value is a duration string.
const DURATION_KEYS: [&str; 10] = [
    "header_read_timeout",
    "body_read_timeout",
    "idle_timeout",
    "shutdown_grace",
    "backend_timeout",
    "window",
    "block_for",
    "connect_timeout",
    "timeout",
    "retry_after",
];

/// serde's message for a value of the wrong type, said in the config's terms where serde's
/// words name our types ("untagged enum OneOrMany") or miss the way to write it. `key` is the
/// setting the value was under.
fn explain(message: &str, key: Option<&str>) -> String {
    if let Some(explained) = out_of_range(message, key) {
        return explained;
    }
    match key {
        Some(key) if message.contains("untagged enum OneOrMany") => {
            format!("`{key}` must be an address like \"0.0.0.0:8080\", or a list of them")
        }
        Some(key) if message.contains("untagged enum SizeFile") => format!(
            "`{key}` must be a size: a whole number of bytes, or a string like \"16KiB\" or \"10MiB\""
        ),
        Some(key) if DURATION_KEYS.contains(&key) && message.starts_with("invalid type") => {
            format!(
                "`{key}`: {message}; a duration is a string with a unit, like \"30s\" or \"250ms\""
            )
        }
        // serde names Rust's integer types: say what is meant, and name the key.
        Some(key) if message.starts_with("invalid type") => {
            let message = ["i64", "u64", "u32", "u16", "usize"]
                .iter()
                .find_map(|ty| message.strip_suffix(&format!("expected {ty}")))
                .map_or_else(
                    || message.to_owned(),
                    |head| format!("{head}expected a whole number"),
                );
            format!("`{key}`: {message}")
        }
        _ => message.to_owned(),
    }
}

/// The whole numbers each integer setting takes (after validation; serde's types are wider).
fn integer_range(key: &str) -> Option<(i128, i128)> {
    Some(match key {
        "requests_per_minute"
        | "burst"
        | "requests_per_hour"
        | "requests_per_day"
        | "max_connections"
        | "max_inflight"
        | "rejections"
        | "attempts" => (1, u32::MAX.into()),
        "workers" => (0, MAX_WORKERS as i128),
        "status" => (200, 599),
        "max_header_bytes" => (1, MAX_HEADER_BYTES_CEILING.into()),
        "max_body_bytes" => (1, i64::MAX.into()),
        _ => return None,
    })
}

/// serde's words for an integer its type cannot hold: "invalid type: integer `N` as i128"
/// (past what TOML's 64 bits hold) or "invalid value: integer `N`, expected usize" (say, a
/// negative `workers`), said as "too large" or "too small" with the range the setting takes.
fn out_of_range(message: &str, key: Option<&str>) -> Option<String> {
    let rest = message
        .strip_prefix("invalid type: integer `")
        .filter(|r| r.contains("` as i128"))
        .or_else(|| message.strip_prefix("invalid value: integer `"))?;
    let number = &rest[..rest.find('`')?];
    let size = if number.starts_with('-') {
        "too small"
    } else {
        "too large"
    };
    let (low, high) = key
        .and_then(integer_range)
        .unwrap_or((i64::MIN.into(), i64::MAX.into()));
    let range = format!("a whole number from {low} to {high}");
    Some(match (key, number.parse::<i128>()) {
        (Some(key), Ok(n)) if (low..=high).contains(&n) => {
            format!("`{key}`: {number} is not a valid value; {range}")
        }
        (Some(key), _) => format!("`{key}`: {number} is {size}; {range}"),
        (None, _) => format!("{number} is {size}; {range}"),
    })
}

/// A value taken out of a document: the key it was under, and the span of the table it was
/// taken from (where serde reports the field as missing next time).
struct Taken {
    key: String,
    from: std::ops::Range<usize>,
}

/// Removes the innermost value of `table` (spanning `table_span`) whose span holds `span`;
/// `None` when nothing holds it. Every table is searched, since a table opened by a
/// `[header]` spans only its header. Within an array of tables it looks inside the items; a
/// bad plain array item takes its whole array out.
fn take_value_at(
    table: &mut DeTable<'_>,
    table_span: std::ops::Range<usize>,
    span: &std::ops::Range<usize>,
) -> Option<Taken> {
    let holds = |outer: std::ops::Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let keys: Vec<_> = table.keys().cloned().collect();
    for key in keys {
        let value = table.get_mut(&key).expect("listed above");
        let value_span = value.span();
        let inner = match value.get_mut() {
            toml::de::DeValue::Table(t) => take_value_at(t, value_span.clone(), span),
            toml::de::DeValue::Array(items) => {
                let inner = items.iter_mut().find_map(|item| {
                    let item_span = item.span();
                    match item.get_mut() {
                        toml::de::DeValue::Table(t) => take_value_at(t, item_span, span),
                        _ => None,
                    }
                });
                // serde's "missing field" points at the `[[keys]]` item itself: that item
                // goes, not the whole array, so the other items are still checked.
                let item = || {
                    items.iter().position(|item| {
                        matches!(item.get_ref(), toml::de::DeValue::Table(_)) && holds(item.span())
                    })
                };
                match (inner, item()) {
                    (Some(inner), _) => Some(inner),
                    (None, Some(i)) => {
                        // (`DeArray` has no `remove`; its array-of-tables flag only matters
                        // while parsing.)
                        let all = std::mem::replace(items, toml::de::DeArray::new());
                        *items = all
                            .into_iter()
                            .enumerate()
                            .filter_map(|(j, item)| (j != i).then_some(item))
                            .collect();
                        Some(Taken {
                            key: key.get_ref().to_string(),
                            from: table_span.clone(),
                        })
                    }
                    (None, None) => None,
                }
            }
            _ => None,
        };
        if inner.is_some() {
            return inner;
        }
        if holds(value_span) {
            table.remove(&key);
            return Some(Taken {
                key: key.get_ref().to_string(),
                from: table_span,
            });
        }
    }
    None
}

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
    let mut config = v.config(file.server, file.admin, file.errors, file.auth, file.limits);
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

/// Most tokio worker threads `server.workers` may ask for.
const MAX_WORKERS: usize = 1024;

/// Most (routes + 1) x (plans + 1): each pair holds five request counters (16 bytes each,
/// allocated when the config loads), so this bounds that table at 16 MB.
const MAX_ROUTE_PLAN_PAIRS: usize = 200_000;

/// Whether `authority`'s port, if it has one, is a usable TCP port (the http crate accepts
/// any digits, and a port it cannot read would silently become 80 or 443).
fn valid_port(authority: &http::uri::Authority) -> bool {
    match authority.as_str().rsplit_once(':') {
        // `[::1]` has colons but no port.
        Some((_, port)) if !port.contains(']') => port.parse::<u16>().is_ok_and(|p| p != 0),
        _ => true,
    }
}

/// A TOML value as JSON for `errors.fields`. A date-time becomes its RFC 3339 text (serde
/// would write toml's private wrapper object); JSON has no NaN or infinity, so those are
/// refused rather than turned into `null`.
fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as Json;
    Ok(match value {
        toml::Value::String(s) => Json::String(s.clone()),
        toml::Value::Integer(i) => Json::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{f} has no JSON form; use a finite number or a string"))?,
        toml::Value::Boolean(b) => Json::Bool(*b),
        toml::Value::Datetime(d) => Json::String(d.to_string()),
        toml::Value::Array(items) => {
            Json::Array(items.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(table) => Json::Object(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// Whether two listening addresses cannot both be bound (see `Validator::listen_overlaps`).
/// Port 0 (any free port) never overlaps.
fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let ip = |s: SocketAddr| match s.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let (x, y) = (ip(a), ip(b));
    a.port() == b.port()
        && a.port() != 0
        && x.is_ipv4() == y.is_ipv4()
        && (x == y || x.is_unspecified() || y.is_unspecified())
}

/// Ids and digests already defined, across the config and the keys file.
#[derive(Default, Clone)]
struct KeySeen {
    ids: HashMap<String, String>,
    digests: HashMap<KeyDigest, String>,
}

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
            Ok(d) if d.is_zero() && name != "server.shutdown_grace" => {
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

    fn config(
        &mut self,
        server: ServerFile,
        admin: AdminFile,
        errors: ErrorsFile,
        auth: AuthFile,
        limits: LimitsFile,
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
            limits: self.limits(limits),
            plans: BTreeMap::new(),
            keys: Vec::new(),
            upstreams: Vec::new(),
            routes: Vec::new(),
            source_hash: String::new(),
        }
    }

    fn server(&mut self, s: ServerFile) -> ServerConfig {
        let listen = match &s.listen {
            None => vec![DEFAULT_LISTEN.parse().expect("valid default")],
            Some(spanned) => {
                let addrs: Vec<String> = match spanned.get_ref() {
                    OneOrMany::One(a) => vec![a.clone()],
                    OneOrMany::Many(list) => list.clone(),
                };
                if addrs.is_empty() {
                    self.error(
                        spanned.span(),
                        "server.listen must name at least one address",
                    );
                }
                addrs
                    .iter()
                    .filter_map(|a| self.socket_addr(a, spanned.span(), "server.listen"))
                    .collect()
            }
        };
        let trusted_proxies = s
            .trusted_proxies
            .iter()
            .flatten()
            .filter_map(|cidr| {
                let text = cidr.get_ref().trim();
                let parsed = text
                    .parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
                match parsed {
                    Ok(net) => Some(net),
                    Err(_) => {
                        self.error(
                            cidr.span(),
                            format!("server.trusted_proxies: \"{text}\" is not a CIDR like \"10.0.0.0/8\" or an IP address"),
                        );
                        None
                    }
                }
            })
            .collect();
        let tls = s.tls.as_ref().and_then(|t| {
            let issues = self.issues.len();
            let cert = self.existing_file(&t.cert, "server.tls.cert");
            let key = self.existing_file(&t.key, "server.tls.key");
            if self.issues.len() > issues {
                return None;
            }
            match super::tls::server_config(&cert, &key) {
                Ok(server_config) => Some(TlsConfig {
                    cert,
                    key,
                    server_config,
                }),
                Err(error) => {
                    self.error(t.cert.span(), format!("server.tls: {error}"));
                    None
                }
            }
        });
        ServerConfig {
            listen,
            workers: match s.workers {
                Some(w) if *w.get_ref() > MAX_WORKERS => {
                    self.error(
                        w.span(),
                        format!(
                            "server.workers must be at most {MAX_WORKERS} (0 = one per core), got {}",
                            w.get_ref()
                        ),
                    );
                    0
                }
                Some(w) => *w.get_ref(),
                None => 0,
            },
            watch: s.watch.unwrap_or(false),
            header_read_timeout: self.duration(
                &s.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
                "server.header_read_timeout",
            ),
            body_read_timeout: self.duration(
                &s.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
                "server.body_read_timeout",
            ),
            idle_timeout: self.duration(
                &s.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
                "server.idle_timeout",
            ),
            max_header_bytes: self.size_at_most(
                &s.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
                MAX_HEADER_BYTES_CEILING,
                "server.max_header_bytes",
            ),
            max_body_bytes: self.size(
                &s.max_body_bytes,
                DEFAULT_MAX_BODY_BYTES,
                "server.max_body_bytes",
            ),
            max_connections: self.positive_or(
                &s.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                "server.max_connections",
            ),
            shutdown_grace: self.duration(
                &s.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
                "server.shutdown_grace",
            ),
            trusted_proxies,
            underscores_in_headers: s.underscores_in_headers.unwrap_or(false),
            tls,
        }
    }

    /// Addresses that could not all be bound: the same port on the same address, or on an
    /// address and the wildcard of its family (IPv6 listeners are IPv6-only, so `[::]` and
    /// `0.0.0.0` do not overlap). Found here, `check` does not pass a config that cannot start.
    fn listen_overlaps(
        &mut self,
        listen: &[SocketAddr],
        listen_span: std::ops::Range<usize>,
        admin: SocketAddr,
        admin_span: Option<std::ops::Range<usize>>,
    ) {
        for (i, &a) in listen.iter().enumerate() {
            if let Some(&b) = listen[..i].iter().find(|&&b| addresses_overlap(a, b)) {
                self.error(
                    listen_span.clone(),
                    format!("server.listen: {b} and {a} overlap (the same port on the same address, or on an address and its wildcard); only one can be bound"),
                );
            }
            if addresses_overlap(a, admin) {
                self.error(
                    admin_span.clone().unwrap_or(listen_span.clone()),
                    format!("admin.listen {admin} overlaps server.listen {a}: they need different ports or addresses"),
                );
            }
        }
    }

    fn admin(&mut self, a: AdminFile) -> AdminConfig {
        let default = DEFAULT_ADMIN_LISTEN.parse().expect("valid default");
        let listen = a
            .listen
            .as_ref()
            .and_then(|l| self.socket_addr(l.get_ref(), l.span(), "admin.listen"))
            .unwrap_or(default);
        AdminConfig { listen }
    }

    fn errors(&mut self, e: ErrorsFile) -> ErrorsConfig {
        let style = self.enumeration(
            &e.style,
            &[
                ("envelope", ErrorStyle::Envelope),
                ("detail", ErrorStyle::Detail),
                ("simple", ErrorStyle::Simple),
            ],
            ErrorStyle::Envelope,
            "errors.style",
        );
        let mut fields = serde_json::Map::new();
        if let Some(spanned) = &e.fields {
            for (name, value) in spanned.get_ref() {
                if RESERVED_ERROR_FIELDS.contains(&name.as_str()) {
                    self.error(
                        spanned.span(),
                        format!("errors.fields: \"{name}\" is a field tollgate writes itself; choose another name"),
                    );
                    continue;
                }
                match toml_to_json(value) {
                    Ok(json) => {
                        fields.insert(name.clone(), json);
                    }
                    Err(err) => self.error(spanned.span(), format!("errors.fields.{name}: {err}")),
                }
            }
        }
        ErrorsConfig {
            style,
            normalize_upstream_5xx: e.normalize_upstream_5xx.unwrap_or(true),
            fields,
        }
    }

    fn auth(&mut self, a: AuthFile) -> AuthConfig {
        let header = match &a.header {
            None => HeaderName::from_static(DEFAULT_AUTH_HEADER),
            Some(h) => HeaderName::from_bytes(h.get_ref().trim().as_bytes()).unwrap_or_else(|_| {
                self.error(
                    h.span(),
                    format!(
                        "auth.header: \"{}\" is not a valid header name",
                        h.get_ref()
                    ),
                );
                HeaderName::from_static(DEFAULT_AUTH_HEADER)
            }),
        };
        let query_param = a.query_param.as_ref().and_then(|q| {
            let q_text = q.get_ref().trim();
            if q_text.is_empty() {
                None
            } else if !q_text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                self.error(
                    q.span(),
                    "auth.query_param may only hold ASCII letters, digits, '_', '-' and '.'",
                );
                None
            } else {
                Some(q_text.to_owned())
            }
        });
        let keys_file = a.keys_file.as_ref().and_then(|k| {
            self.keys_file_span = Some(k.span());
            let path = k.get_ref().trim();
            (!path.is_empty()).then(|| PathBuf::from(path))
        });
        AuthConfig {
            header,
            bearer: a.bearer.unwrap_or(true),
            query_param,
            forward_key: a.forward_key.unwrap_or(false),
            keys_file,
        }
    }

    fn tripwire(
        &mut self,
        count: &Option<Spanned<i64>>,
        window: &Option<SpannedStr>,
        block_for: &Option<SpannedStr>,
        defaults: (u32, Duration, Duration),
        (table, count_name): (&str, &str),
    ) -> Tripwire {
        Tripwire {
            count: self.positive_or(count, defaults.0, &format!("{table}.{count_name}")),
            window: self.duration(window, defaults.1, &format!("{table}.window")),
            block_for: self.duration(block_for, defaults.2, &format!("{table}.block_for")),
        }
    }

    fn limits(&mut self, l: LimitsFile) -> LimitsConfig {
        let redis_url = match &l.redis_url {
            None => DEFAULT_REDIS_URL.to_owned(),
            Some(u) => {
                let text = u.get_ref().trim();
                // Parsed as the client will parse it, so `check` catches what would otherwise
                // fail on the first request. The URL is not echoed: it may hold a password.
                let problem = if text.starts_with("rediss://") {
                    Some("TLS to Redis (rediss://) is not built in; use redis:// (through a TLS tunnel such as stunnel if the link needs one)".to_owned())
                } else if !["redis://", "unix://", "redis+unix://"]
                    .iter()
                    .any(|p| text.starts_with(p) && text.len() > p.len())
                {
                    Some("not a URL like \"redis://127.0.0.1:6379\"".to_owned())
                } else {
                    redis::IntoConnectionInfo::into_connection_info(text)
                        .err()
                        .map(|e| {
                            format!(
                                "not a usable Redis URL ({})",
                                e.detail().unwrap_or(e.category())
                            )
                        })
                };
                if let Some(problem) = problem {
                    self.error(u.span(), format!("limits.redis_url: {problem}"));
                }
                text.to_owned()
            }
        };
        let ip_throttle = l.ip_throttle.as_ref().map(|t| {
            self.tripwire(
                &t.rejections,
                &t.window,
                &t.block_for,
                (
                    DEFAULT_IP_THROTTLE_REJECTIONS,
                    DEFAULT_IP_THROTTLE_WINDOW,
                    DEFAULT_IP_THROTTLE_BLOCK,
                ),
                ("limits.ip_throttle", "rejections"),
            )
        });
        let failed_auth = l.failed_auth.as_ref().map(|t| {
            self.tripwire(
                &t.attempts,
                &t.window,
                &t.block_for,
                (
                    DEFAULT_FAILED_AUTH_ATTEMPTS,
                    DEFAULT_FAILED_AUTH_WINDOW,
                    DEFAULT_FAILED_AUTH_BLOCK,
                ),
                ("limits.failed_auth", "attempts"),
            )
        });
        let nz = |n| NonZeroU32::new(n).expect("defaults are non-zero");
        LimitsConfig {
            backend: self.enumeration(
                &l.backend,
                &[
                    ("local", LimitBackend::Local),
                    ("redis", LimitBackend::Redis),
                ],
                LimitBackend::Local,
                "limits.backend",
            ),
            redis_url,
            backend_timeout: self.duration(
                &l.backend_timeout,
                DEFAULT_BACKEND_TIMEOUT,
                "limits.backend_timeout",
            ),
            on_backend_error: self.enumeration(
                &l.on_backend_error,
                &[
                    ("local", BackendErrorPolicy::Local),
                    ("allow", BackendErrorPolicy::Allow),
                    ("deny", BackendErrorPolicy::Deny),
                ],
                BackendErrorPolicy::Local,
                "limits.on_backend_error",
            ),
            headers: self.enumeration(
                &l.headers,
                &[
                    ("x-ratelimit", RateLimitHeaders::XRateLimit),
                    ("ietf", RateLimitHeaders::Ietf),
                    ("both", RateLimitHeaders::Both),
                ],
                RateLimitHeaders::XRateLimit,
                "limits.headers",
            ),
            mode: self.enumeration(
                &l.mode,
                &[
                    ("enforce", LimitMode::Enforce),
                    ("shadow", LimitMode::Shadow),
                ],
                LimitMode::Enforce,
                "limits.mode",
            ),
            ip_throttle: ip_throttle.unwrap_or(Tripwire {
                count: nz(DEFAULT_IP_THROTTLE_REJECTIONS),
                window: DEFAULT_IP_THROTTLE_WINDOW,
                block_for: DEFAULT_IP_THROTTLE_BLOCK,
            }),
            failed_auth: failed_auth.unwrap_or(Tripwire {
                count: nz(DEFAULT_FAILED_AUTH_ATTEMPTS),
                window: DEFAULT_FAILED_AUTH_WINDOW,
                block_for: DEFAULT_FAILED_AUTH_BLOCK,
            }),
        }
    }

    fn plans(&mut self, plans: &BTreeMap<String, Spanned<PlanFile>>) -> BTreeMap<PlanName, Plan> {
        let mut out = BTreeMap::new();
        for (name, rpm) in BUILTIN_PLANS {
            let rpm = NonZeroU32::new(rpm).expect("built-in plans are non-zero");
            out.insert(
                PlanName(Arc::from(name)),
                Plan {
                    requests_per_minute: rpm,
                    burst: rpm,
                    requests_per_hour: None,
                    requests_per_day: None,
                },
            );
        }
        for (name, plan) in plans {
            if !valid_identifier(name, 64) {
                self.error(
                    plan.span(),
                    format!("plan name \"{name}\" may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-64 characters)"),
                );
            }
            let p = plan.get_ref();
            let field = |f: &str| format!("plans.{name}.{f}");
            let rpm = self.positive(&p.requests_per_minute, &field("requests_per_minute"));
            let burst = p
                .burst
                .as_ref()
                .and_then(|b| self.positive(b, &field("burst")));
            let per_hour = p
                .requests_per_hour
                .as_ref()
                .and_then(|b| self.positive(b, &field("requests_per_hour")));
            let per_day = p
                .requests_per_day
                .as_ref()
                .and_then(|b| self.positive(b, &field("requests_per_day")));
            // governor works in u64 nanoseconds: a bucket that takes centuries to refill
            // overflows its arithmetic. A year is more than any plan needs.
            if let (Some(rpm), Some(b), Some(spanned)) = (rpm, burst, p.burst.as_ref()) {
                let max = u64::from(rpm.get()) * (super::units::MAX_DURATION.as_secs() / 60);
                if u64::from(b.get()) > max {
                    self.error(
                        spanned.span(),
                        format!(
                            "{} = {b} takes more than 365 days to refill at requests_per_minute = {rpm}; at most {max}",
                            field("burst")
                        ),
                    );
                }
            }
            if let Some(rpm) = rpm {
                out.insert(
                    PlanName(Arc::from(name.as_str())),
                    Plan {
                        requests_per_minute: rpm,
                        burst: burst.unwrap_or(rpm),
                        requests_per_hour: per_hour,
                        requests_per_day: per_day,
                    },
                );
            }
        }
        out
    }

    fn keys(
        &mut self,
        keys: &[KeyFile],
        plans: &BTreeMap<PlanName, Plan>,
        seen: &mut KeySeen,
        out: &mut Vec<KeyConfig>,
    ) {
        for k in keys {
            let id = k.id.get_ref().trim();
            if !valid_identifier(id, 128) {
                self.error(
                    k.id.span(),
                    "key id may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-128 characters)",
                );
            }
            let here = format!(
                "{}:{}",
                self.src.path.display(),
                self.src.issue(k.id.span(), "").line
            );
            if let Some(first) = seen.ids.insert(id.to_owned(), here.clone()) {
                self.error(
                    k.id.span(),
                    format!("duplicate key id \"{id}\" (first defined at {first})"),
                );
            }
            // The message never repeats the value: it may be a plaintext key pasted by mistake.
            let digest = match KeyDigest::parse(k.key.get_ref().trim()) {
                Ok(d) => {
                    if let Some(first) = seen.digests.insert(d, here) {
                        self.error(
                            k.key.span(),
                            format!("key \"{id}\" has the same digest as the key at {first}; each key must be distinct"),
                        );
                    }
                    Some(d)
                }
                Err(e) => {
                    self.error(k.key.span(), format!("key \"{id}\": {e}"));
                    None
                }
            };
            let plan = PlanName(Arc::from(k.plan.get_ref().trim()));
            if !plans.contains_key(&plan) {
                let known: Vec<&str> = plans.keys().map(|p| &*p.0).collect();
                self.error(
                    k.plan.span(),
                    format!(
                        "key \"{id}\": plan \"{plan}\" is not defined; defined plans: {}",
                        known.join(", ")
                    ),
                );
            }
            let rpm = k
                .requests_per_minute
                .as_ref()
                .and_then(|r| self.positive(r, &format!("key \"{id}\": requests_per_minute")));
            let scopes = self.scopes(&k.scopes);
            if let Some(digest) = digest {
                out.push(KeyConfig {
                    id: KeyId(Arc::from(id)),
                    digest,
                    plan,
                    scopes,
                    requests_per_minute: rpm,
                    disabled: k.disabled,
                });
            }
        }
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

    fn upstreams(&mut self, upstreams: &[UpstreamFile]) -> Vec<UpstreamConfig> {
        let mut names: HashMap<&str, ()> = HashMap::new();
        let mut out = Vec::new();
        for u in upstreams {
            let name = u.name.get_ref().trim();
            if !valid_identifier(name, 64) {
                self.error(
                    u.name.span(),
                    "upstream name may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-64 characters)",
                );
            }
            if names.insert(name, ()).is_some() {
                self.error(u.name.span(), format!("duplicate upstream name \"{name}\""));
            }
            let url = match u.url.get_ref().trim().parse::<Uri>() {
                Ok(url)
                    if matches!(url.scheme_str(), Some("http" | "https"))
                        && url
                            .authority()
                            .is_some_and(|a| !a.host().is_empty() && valid_port(a))
                        && url.query().is_none() =>
                {
                    Some(url)
                }
                _ => {
                    self.error(
                        u.url.span(),
                        format!(
                            "upstream \"{name}\": url \"{}\" must be an http:// or https:// URL with a host (and a port from 1 to 65535, if any), like \"http://127.0.0.1:3000\"",
                            u.url.get_ref()
                        ),
                    );
                    None
                }
            };
            let field = |f: &str| format!("upstream \"{name}\": {f}");
            let cfg = UpstreamConfig {
                name: name.to_owned(),
                url: url.unwrap_or_else(|| Uri::from_static("http://invalid.invalid")),
                connect_timeout: self.duration(
                    &u.connect_timeout,
                    DEFAULT_CONNECT_TIMEOUT,
                    &field("connect_timeout"),
                ),
                timeout: self.duration(&u.timeout, DEFAULT_UPSTREAM_TIMEOUT, &field("timeout")),
                max_inflight: self.positive_or(
                    &u.max_inflight,
                    DEFAULT_MAX_INFLIGHT,
                    &field("max_inflight"),
                ),
                maintenance: u.maintenance,
                retry_after: self.duration(
                    &u.retry_after,
                    DEFAULT_RETRY_AFTER,
                    &field("retry_after"),
                ),
                ca_file: u
                    .ca_file
                    .as_ref()
                    .map(|c| self.existing_file(c, &field("ca_file"))),
            };
            out.push(cfg);
        }
        out
    }

    fn routes(&mut self, routes: &[RouteFile], upstreams: &[UpstreamConfig]) -> Vec<RouteConfig> {
        let mut prefixes: HashMap<&str, ()> = HashMap::new();
        let mut out = Vec::new();
        for r in routes {
            let prefix = r.prefix.get_ref().as_str();
            if !prefix.starts_with('/')
                || prefix
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
            {
                self.error(r.prefix.span(), format!("route prefix \"{prefix}\" must start with '/' and hold no spaces, '?' or '#'"));
            } else if let Some((c, encoded)) = unmatchable(prefix) {
                let why = if c.is_ascii() {
                    "requests with it unencoded in the path are refused (400)"
                } else {
                    "clients send non-ASCII characters percent-encoded (a request path is ASCII)"
                };
                self.error(
                    r.prefix.span(),
                    format!("route prefix \"{prefix}\" would match no request: it holds '{c}', and {why}; write it percent-encoded: \"{encoded}\""),
                );
            }
            if prefixes.insert(prefix, ()).is_some() {
                self.error(
                    r.prefix.span(),
                    format!("duplicate route prefix \"{prefix}\""),
                );
            }
            let target = match (&r.upstream, &r.respond) {
                (Some(_), Some(respond)) => {
                    self.error(
                        respond.span(),
                        format!("route \"{prefix}\": set either upstream or respond, not both"),
                    );
                    None
                }
                (None, None) => {
                    self.error(
                        r.prefix.span(),
                        format!("route \"{prefix}\" needs an upstream or a respond"),
                    );
                    None
                }
                (Some(up), None) => {
                    let wanted = up.get_ref().trim();
                    match upstreams.iter().position(|u| u.name == wanted) {
                        Some(i) => Some(RouteTarget::Upstream(i)),
                        None => {
                            let known: Vec<&str> =
                                upstreams.iter().map(|u| u.name.as_str()).collect();
                            self.error(
                                up.span(),
                                format!(
                                    "route \"{prefix}\": upstream \"{wanted}\" is not defined; defined upstreams: {}",
                                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                                ),
                            );
                            None
                        }
                    }
                }
                (None, Some(respond)) => self.respond(respond, prefix).map(RouteTarget::Respond),
            };
            let methods = r.methods.as_ref().map(|methods| {
                let mut parsed = Vec::new();
                for m in methods {
                    let text = m.get_ref().trim();
                    match Method::from_bytes(text.as_bytes()) {
                        Ok(method) if text.bytes().all(|b| b.is_ascii_uppercase()) => parsed.push(method),
                        _ => self.error(m.span(), format!("route \"{prefix}\": \"{text}\" is not an HTTP method like \"GET\" (upper case)")),
                    }
                }
                if parsed.is_empty() && methods.is_empty() {
                    self.error(r.prefix.span(), format!("route \"{prefix}\": methods is empty, so nothing could match; remove it to allow every method"));
                }
                parsed
            });
            let scopes = self.scopes(&r.scopes);
            if r.auth == Some(false)
                && let Some(first) = r.scopes.first()
            {
                // A client could skip them by sending no key at all.
                self.error(
                    first.span(),
                    format!("route \"{prefix}\": scopes need a key, so a public route (auth = false) cannot require them; remove auth = false or the scopes"),
                );
            }
            if let Some(target) = target {
                out.push(RouteConfig {
                    prefix: prefix.to_owned(),
                    target,
                    scopes,
                    methods,
                    auth: r.auth.unwrap_or(true),
                    strip_prefix: r.strip_prefix,
                });
            }
        }
        out
    }

    fn respond(&mut self, respond: &Spanned<RespondFile>, prefix: &str) -> Option<FixedResponse> {
        let r = respond.get_ref();
        let status = u16::try_from(*r.status.get_ref())
            .ok()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok());
        let Some(status) = status else {
            self.error(
                r.status.span(),
                format!(
                    "route \"{prefix}\": respond.status must be 200-599, got {}",
                    r.status.get_ref()
                ),
            );
            return None;
        };
        let content_type = r
            .content_type
            .as_deref()
            .unwrap_or(DEFAULT_RESPOND_CONTENT_TYPE);
        let Ok(content_type) = HeaderValue::from_str(content_type) else {
            self.error(
                respond.span(),
                format!("route \"{prefix}\": respond.content_type is not a valid header value"),
            );
            return None;
        };
        Some(FixedResponse {
            status,
            body: bytes::Bytes::from(r.body.clone()),
            content_type,
        })
    }
}

/// When a route prefix holds characters no request path holds as they are, the first of
/// them and the prefix with each percent-encoded (upper-case hex, RFC 3986's normal form):
/// non-ASCII characters, which clients percent-encode, and `<`, `>` and `` ` ``, which the
/// request parser refuses unencoded.
fn unmatchable(prefix: &str) -> Option<(char, String)> {
    use std::fmt::Write;
    let never = |c: char| !c.is_ascii() || matches!(c, '<' | '>' | '`');
    let first = prefix.chars().find(|&c| never(c))?;
    let mut encoded = String::with_capacity(prefix.len() * 3);
    for c in prefix.chars() {
        if never(c) {
            for b in c.encode_utf8(&mut [0; 4]).bytes() {
                let _ = write!(encoded, "%{b:02X}");
            }
        } else {
            encoded.push(c);
        }
    }
    Some((first, encoded))
}

/// `[A-Za-z0-9._:-]{1,max}`: ids that are safe in logs, metrics labels and headers.
fn valid_identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(text: &str) -> Vec<ConfigIssue> {
        match load(Path::new("t.toml"), text, |p| {
            Err(ConfigError::Read {
                path: p.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }) {
            Ok(_) => Vec::new(),
            Err(e) => e.issues().to_vec(),
        }
    }

    /// One snippet per kind of mistake: (TOML, expected line, fragment of the message).
    const MISTAKES: &[(&str, usize, &str)] = &[
        (
            "[server]\nlisen = \"x\"",
            2,
            "unknown key `lisen` in [server] (did you mean `listen`?)",
        ),
        ("bogus = 1", 1, "unknown key `bogus` at the top level"),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 200, colour = 1 }",
            3,
            "unknown key `colour` in [routes.respond]",
        ),
        (
            "[server]\nlisten = \"nowhere\"",
            2,
            "server.listen: \"nowhere\" is not an address",
        ),
        (
            "[server]\nlisten = [\"0.0.0.0:8080\", \"127.0.0.1:8080\"]",
            2,
            "server.listen: 0.0.0.0:8080 and 127.0.0.1:8080 overlap",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:9901\"",
            2,
            "admin.listen 127.0.0.1:9901 overlaps server.listen 127.0.0.1:9901",
        ),
        (
            "[server]\nlisten = \"[::1]:8080\"\n[admin]\nlisten = \"[::]:8080\"",
            4,
            "admin.listen [::]:8080 overlaps server.listen [::1]:8080",
        ),
        ("[server]\nheader_read_timeout = \"10\"", 2, "has no unit"),
        (
            "[server]\nidle_timeout = \"soon\"",
            2,
            "invalid duration \"soon\"",
        ),
        (
            "[server]\nbody_read_timeout = \"0s\"",
            2,
            "must be greater than zero",
        ),
        (
            "[server]\nmax_body_bytes = \"10 parsecs\"",
            2,
            "invalid size unit",
        ),
        (
            "[server]\nmax_header_bytes = 0",
            2,
            "must be greater than zero",
        ),
        (
            "[server]\nmax_connections = 0",
            2,
            "server.max_connections must be a whole number from 1",
        ),
        (
            "[server]\ntrusted_proxies = [\"10.0.0.0/40\"]",
            2,
            "is not a CIDR",
        ),
        (
            "[server.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"",
            2,
            "server.tls.cert: file",
        ),
        ("[admin]\nlisten = \"9901\"", 2, "admin.listen"),
        (
            "[errors]\nstyle = \"fancy\"",
            2,
            "errors.style must be one of",
        ),
        (
            "[errors]\nfields = { code = 1 }",
            2,
            "\"code\" is a field tollgate writes itself",
        ),
        (
            "[errors]\nfields = { x = nan }",
            2,
            "errors.fields.x: NaN has no JSON form",
        ),
        (
            "[auth]\nheader = \"bad header\"",
            2,
            "not a valid header name",
        ),
        ("[auth]\nquery_param = \"a b\"", 2, "auth.query_param"),
        (
            "[auth]\nkeys_file = \"/nonexistent/keys.toml\"",
            2,
            "cannot read auth.keys_file",
        ),
        (
            "[limits]\nbackend = \"memcached\"",
            2,
            "limits.backend must be one of",
        ),
        ("[limits]\nredis_url = \"http://x\"", 2, "limits.redis_url"),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\nauth = false\nscopes = [\"admin\"]",
            5,
            "scopes need a key, so a public route (auth = false) cannot require them",
        ),
        (
            "[limits]\nredis_url = \"rediss://:hunter2@r:6380\"",
            2,
            "TLS to Redis (rediss://) is not built in",
        ),
        (
            "[limits]\nredis_url = \"redis://[::1\"",
            2,
            "limits.redis_url: not a usable Redis URL",
        ),
        (
            "[server]\nidle_timeout = \"300000000000y\"",
            2,
            "is too long; the most is 365d",
        ),
        (
            "[server]\nmax_header_bytes = \"1GiB\"",
            2,
            "server.max_header_bytes: at most 8 MiB",
        ),
        (
            "[limits]\non_backend_error = \"panic\"",
            2,
            "limits.on_backend_error",
        ),
        ("[limits]\nheaders = \"all\"", 2, "limits.headers"),
        ("[limits]\nmode = \"yolo\"", 2, "limits.mode"),
        (
            "[limits.ip_throttle]\nrejections = 0",
            2,
            "limits.ip_throttle.rejections must be",
        ),
        (
            "[limits.failed_auth]\nwindow = \"x\"",
            2,
            "limits.failed_auth.window: invalid duration",
        ),
        (
            "[plans.free]\nrequests_per_minute = 0",
            2,
            "plans.free.requests_per_minute must be a whole number from 1",
        ),
        (
            "[plans.gold]\nrequests_per_minute = 10\nburst = -1",
            3,
            "plans.gold.burst",
        ),
        (
            "[plans.\"bad name\"]\nrequests_per_minute = 10",
            1,
            "plan name \"bad name\"",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"gold\"",
            4,
            "plan \"gold\" is not defined",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"tg_live_plaintext\"\nplan = \"free\"",
            3,
            "not the key itself",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"sha256:abc\"\nplan = \"free\"",
            3,
            "64 hex characters",
        ),
        (
            "[[keys]]\nid = \"a b\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"",
            2,
            "key id may only hold",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\n[[keys]]\nid = \"a\"\nkey = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nplan = \"free\"",
            6,
            "duplicate key id \"a\" (first defined at t.toml:2)",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\n[[keys]]\nid = \"b\"\nkey = \"sha256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\"\nplan = \"free\"",
            7,
            "same digest as the key at t.toml:2",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\nrequests_per_minute = 0",
            5,
            "requests_per_minute must be a whole number from 1",
        ),
        (
            "[[keys]]\nid = \"a\"\nkey = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nplan = \"free\"\nscopes = [\"a b\"]",
            5,
            "a scope must be non-empty",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"ftp://x\"",
            3,
            "must be an http:// or https:// URL",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"not a url\"",
            3,
            "must be an http:// or https:// URL",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\n[[upstreams]]\nname = \"u\"\nurl = \"http://b\"",
            5,
            "duplicate upstream name \"u\"",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nmax_inflight = 0",
            4,
            "max_inflight must be",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"http://a\"\nca_file = \"/nonexistent/ca.pem\"",
            4,
            "ca_file: file",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nupstream = \"core\"",
            3,
            "upstream \"core\" is not defined",
        ),
        (
            "[[routes]]\nprefix = \"v1\"\nrespond = { status = 200 }",
            2,
            "must start with '/'",
        ),
        (
            "[[routes]]\nprefix = \"/\"",
            2,
            "needs an upstream or a respond",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\n[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }",
            5,
            "duplicate route prefix",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 99 }",
            3,
            "respond.status must be 200-599",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\nmethods = [\"get\"]",
            4,
            "is not an HTTP method",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nrespond = { status = 200 }\nmethods = []",
            2,
            "methods is empty",
        ),
        (
            "[server]\nworkers = \"two\"",
            2,
            "invalid type: string \"two\"",
        ),
        (
            "[plans.free]\nrequests_per_minute = 1.5",
            2,
            "`requests_per_minute`: invalid type: floating point `1.5`, expected a whole number",
        ),
        ("[server\nlisten = 1", 1, ""),
        (
            "[server]\nworkers = 100000",
            2,
            "server.workers must be at most 1024",
        ),
        (
            "[plans.x]\nrequests_per_minute = 1\nburst = 400000000",
            3,
            "plans.x.burst = 400000000 takes more than 365 days to refill",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:99999\"",
            3,
            "a port from 1 to 65535",
        ),
        (
            "[[upstreams]]\nname = \"u\"\nurl = \"http://[::1]:0\"",
            3,
            "a port from 1 to 65535",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 2\nlisten = \"127.0.0.1:2\"",
            4,
            "duplicate key `listen` (first defined at t.toml:2:1)",
        ),
        (
            "[server]\nworkers = 1\n[admin]\n[ server ] # again\nworkers = 2",
            4,
            "duplicate table `server` (first defined at t.toml:1:1)",
        ),
        (
            "[plans.free]\nrequests_per_minute = 99999999999999999999",
            2,
            "`requests_per_minute`: 99999999999999999999 is too large; a whole number from 1 to 4294967295",
        ),
        (
            "[server]\nworkers = -1",
            2,
            "`workers`: -1 is too small; a whole number from 0 to 1024",
        ),
        (
            "[[routes]]\nprefix = \"/café/\"\nrespond = { status = 200 }",
            2,
            "route prefix \"/café/\" would match no request: it holds 'é', and clients send non-ASCII characters percent-encoded (a request path is ASCII); write it percent-encoded: \"/caf%C3%A9/\"",
        ),
        (
            "[[routes]]\nprefix = \"/a<b>/\"\nrespond = { status = 200 }",
            2,
            "it holds '<', and requests with it unencoded in the path are refused (400); write it percent-encoded: \"/a%3Cb%3E/\"",
        ),
    ];

    #[test]
    fn spans_become_lines_and_columns() {
        let text = "a = 1\nbé = \"x\"\n\nlast";
        let src = Source::new(Path::new("t.toml"), text);
        let at = |offset: usize| {
            let issue = src.issue(offset..offset, "");
            (issue.line, issue.column)
        };
        assert_eq!(at(0), (1, 1));
        assert_eq!(at(4), (1, 5));
        assert_eq!(at(6), (2, 1), "just after a newline");
        // Columns count characters: `é` is two bytes.
        assert_eq!(at(text.find('=').unwrap()), (1, 3));
        assert_eq!(at(text.rfind('=').unwrap()), (2, 4));
        assert_eq!(at(text.find("\n\n").unwrap() + 1), (3, 1), "an empty line");
        assert_eq!(
            at(text.len()),
            (4, 5),
            "the end of a last line without a newline"
        );
        assert_eq!(at(text.len() + 10), (4, 5), "past the end is clamped");
    }

    #[test]
    fn ports_are_checked_but_ipv6_hosts_without_one_pass() {
        for url in [
            "http://[::1]",
            "http://[::1]:8080",
            "https://api",
            "http://a:65535",
        ] {
            let text = format!("[[upstreams]]\nname = \"u\"\nurl = \"{url}\"");
            assert!(issues(&text).is_empty(), "{url}: {:?}", issues(&text));
        }
    }

    #[test]
    fn a_keys_file_that_is_not_a_regular_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("keys.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let text = format!("[auth]\nkeys_file = \"{}\"", fifo.display());
        // The real reader: opening a FIFO with no writer would block forever.
        let found = match load(Path::new("t.toml"), &text, read) {
            Ok(_) => Vec::new(),
            Err(e) => e.issues().to_vec(),
        };
        assert!(
            found
                .iter()
                .any(|i| i.line == 2 && i.message.contains("not a regular file")),
            "{found:#?}"
        );
    }

    #[test]
    fn too_many_routes_times_plans_is_refused() {
        let mut text = String::new();
        for n in 0..200 {
            text.push_str(&format!("[plans.p{n}]\nrequests_per_minute = 1\n"));
        }
        for n in 0..1000 {
            text.push_str(&format!(
                "[[routes]]\nprefix = \"/r{n}/\"\nrespond = {{ status = 200 }}\n"
            ));
        }
        let found = issues(&text);
        assert!(
            found.iter().any(
                |i| i.message.contains("1000 routes and 203 plans are too many")
                    // At the last route's prefix: 400 lines of plans, then 3 per route.
                    && (i.line, i.column) == (400 + 999 * 3 + 2, 10)
            ),
            "{found:#?}"
        );
    }

    #[test]
    fn every_mistake_is_reported_at_its_line() {
        for (text, line, fragment) in MISTAKES {
            let found = issues(text);
            assert!(
                found
                    .iter()
                    .any(|i| i.line == *line && i.message.contains(fragment)),
                "expected line {line} with {fragment:?} for:\n{text}\ngot: {found:#?}"
            );
        }
    }

    #[test]
    fn listeners_overlap_on_one_port_of_one_family() {
        let overlap = |a: &str, b: &str| addresses_overlap(a.parse().unwrap(), b.parse().unwrap());
        // IPv6 listeners are bound IPv6-only: the two wildcards share a port.
        assert!(!overlap("0.0.0.0:8080", "[::]:8080"));
        assert!(overlap("0.0.0.0:8080", "127.0.0.1:8080"));
        assert!(overlap("[::]:8080", "[::1]:8080"));
        assert!(overlap("127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(overlap("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"));
        assert!(!overlap("127.0.0.1:8080", "127.0.0.2:8080"));
        assert!(!overlap("127.0.0.1:8080", "127.0.0.1:8081"));
        assert!(!overlap("127.0.0.1:0", "127.0.0.1:0"));
        assert!(issues("[server]\nlisten = [\"0.0.0.0:8080\", \"[::]:8080\"]").is_empty());
    }

    #[test]
    fn values_of_the_wrong_type_are_explained_in_the_configs_terms() {
        for (text, fragment) in [
            (
                "[server]\nlisten = 8080",
                "`listen` must be an address like \"0.0.0.0:8080\", or a list of them",
            ),
            (
                "[server]\nmax_body_bytes = 1.5",
                "`max_body_bytes` must be a size: a whole number of bytes, or a string like \"16KiB\"",
            ),
            (
                "[server]\nidle_timeout = 60",
                "`idle_timeout`: invalid type: integer `60`, expected a string; a duration is a string with a unit, like \"30s\"",
            ),
        ] {
            let found = issues(text);
            assert!(
                found.len() == 1 && found[0].line == 2 && found[0].message.contains(fragment),
                "{text}: {found:#?}"
            );
        }
    }

    #[test]
    fn a_duplicate_names_the_key_and_where_it_was_first_defined() {
        for (text, expected) in [
            // The same name in another table earlier is not the first definition.
            (
                "[admin]\nlisten = \"127.0.0.1:1\"\n[server]\nlisten = \"127.0.0.1:2\"\nlisten = \"127.0.0.1:3\"",
                (5, "duplicate key `listen` (first defined at t.toml:4:1)"),
            ),
            // In an array of tables: the item's own key, not the previous item's.
            (
                "[[routes]]\nprefix = \"/a\"\n[[routes]]\nprefix = \"/b\"\nprefix = \"/c\"",
                (5, "duplicate key `prefix` (first defined at t.toml:4:1)"),
            ),
            (
                "[[routes]]\nprefix = \"/\"\nrespond = { status = 200, status = 201 }",
                (3, "duplicate key `status` (first defined at t.toml:3:13)"),
            ),
            (
                "[server]\n\"workers\" = 1\nworkers = 2",
                (3, "duplicate key `workers` (first defined at t.toml:2:1)"),
            ),
        ] {
            let found = issues(text);
            assert!(
                found.len() == 1
                    && found[0].line == expected.0
                    && found[0].message.starts_with(expected.1),
                "{text}: {found:#?}"
            );
        }
    }

    #[test]
    fn integers_out_of_range_say_so_with_the_range() {
        for (text, expected) in [
            (
                "[plans.free]\nrequests_per_minute = -99999999999999999999",
                "`requests_per_minute`: -99999999999999999999 is too small; a whole number from 1 to 4294967295",
            ),
            (
                "[server]\nworkers = 99999999999999999999",
                "`workers`: 99999999999999999999 is too large; a whole number from 0 to 1024",
            ),
            (
                "[server]\nmax_body_bytes = 99999999999999999999",
                "`max_body_bytes`: 99999999999999999999 is too large; a whole number from 1 to 9223372036854775807",
            ),
            (
                "[[routes]]\nprefix = \"/\"\nrespond = { status = 99999999999999999999 }",
                "`status`: 99999999999999999999 is too large; a whole number from 200 to 599",
            ),
            (
                "[errors]\nfields = { n = 99999999999999999999 }",
                "99999999999999999999 is too large; a whole number from -9223372036854775808 to 9223372036854775807",
            ),
        ] {
            let found = issues(text);
            assert!(
                found.iter().any(|i| i.line == 2 || i.line == 3)
                    && found.iter().any(|i| i.message.ends_with(expected)),
                "{text}: {found:#?}"
            );
        }
    }

    /// A keys file with `n` keys, `key-0`... on plan `free`, digests from their number;
    /// `edit` may rewrite key `i`'s lines.
    fn keys_file_text(n: usize, edit: impl Fn(usize, String) -> String) -> String {
        (0..n)
            .map(|i| {
                let key = format!(
                    "[[keys]]\nid = \"key-{i}\"\nkey = \"sha256:{i:064x}\"\nplan = \"free\"\n\n"
                );
                edit(i, key)
            })
            .collect()
    }

    fn load_with_keys_file(keys_text: &str) -> Result<Config, ConfigError> {
        let keys_text = keys_text.to_owned();
        load(
            Path::new("main.toml"),
            "[auth]\nkeys_file = \"keys.toml\"\n",
            move |_| Ok(keys_text.clone()),
        )
    }

    #[test]
    fn a_keys_file_is_split_before_every_nth_header_line() {
        let text = "# keys\n[[keys]]\na = 1\n[[keys]]\n  [[keys]]  \r\n[[keys]] # c\n[[keys]]\n";
        // Headers on lines 1, 3, 4 and 6 (0-based, at bytes 7, 22, 31 and 58); `[[keys]] # c`
        // is not a split point.
        assert_eq!(piece_starts(text, 2), vec![(0, 0), (31, 4)]);
        assert_eq!(
            piece_starts(text, 1),
            vec![(0, 0), (22, 3), (31, 4), (58, 6)]
        );
        assert_eq!(piece_starts(text, 9), vec![(0, 0)]);
    }

    #[test]
    fn a_keys_file_read_in_pieces_gives_every_key_in_order_and_errors_at_their_lines() {
        let text = keys_file_text(10, |_, k| k);
        let config = load_with_keys_file(&text).unwrap();
        let ids: Vec<String> = config.keys.iter().map(|k| k.id.0.to_string()).collect();
        let expected: Vec<String> = (0..10).map(|i| format!("key-{i}")).collect();
        assert_eq!(ids, expected);
        // Read in pieces indeed, not by the whole-file fallback.
        let mut keys = Vec::new();
        let read = keys_by_piece(
            &Source::new(Path::new("keys.toml"), &text),
            &config.plans,
            &mut KeySeen::default(),
            &mut keys,
            &mut Vec::new(),
        );
        assert!(read && keys.len() == 10);

        // Validation errors in the second and fourth pieces, and a duplicate across pieces:
        // each at its line of the whole file (5 lines per key).
        let text = keys_file_text(10, |i, k| match i {
            4 => k.replace("\"free\"", "\"gold\""),
            9 => k.replace("key-9", "key-1"),
            _ => k,
        });
        let found = match load_with_keys_file(&text) {
            Err(e) => e.issues().to_vec(),
            Ok(_) => panic!("invalid"),
        };
        let lines: Vec<(usize, usize)> = found.iter().map(|i| (i.line, i.column)).collect();
        assert_eq!(lines, vec![(24, 8), (47, 6)], "{found:#?}");
        assert!(found[0].message.contains("plan \"gold\" is not defined"));
        assert!(
            found[1]
                .message
                .contains("duplicate key id \"key-1\" (first defined at keys.toml:7)"),
            "{}",
            found[1].message
        );
    }

    #[test]
    fn a_keys_file_split_inside_a_string_is_read_whole() {
        // Key 5's id is a multi-line string holding a `[[keys]]` line: the split there cuts
        // the string, that piece does not parse, and the whole file is parsed instead (what
        // the first piece added is taken back). The one error is the id's, as one parse
        // reports it.
        let text = keys_file_text(8, |i, k| {
            if i == 5 {
                k.replace("\"key-5\"", "\"\"\"key\n[[keys]]\n\"\"\"")
            } else {
                k
            }
        });
        // Key 5 starts on line 25 (0-based); its string's `[[keys]]` line is the seventh header.
        assert_eq!(
            piece_starts(&text, KEYS_PER_PIECE)[2].1,
            27,
            "the split is in the string"
        );
        let plans = load_with_keys_file("").unwrap().plans;
        let (mut keys, mut issues) = (Vec::new(), Vec::new());
        let src = Source::new(Path::new("keys.toml"), &text);
        assert!(!keys_by_piece(
            &src,
            &plans,
            &mut KeySeen::default(),
            &mut keys,
            &mut issues
        ));
        assert!(
            keys.is_empty() && issues.is_empty(),
            "nothing kept from the pieces"
        );
        let found = match load_with_keys_file(&text) {
            Err(e) => e.issues().to_vec(),
            Ok(_) => panic!("invalid"),
        };
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!((found[0].line, found[0].column), (27, 6), "{found:#?}");
        assert!(
            found[0].message.contains("key id may only hold"),
            "{found:#?}"
        );
    }

    #[test]
    fn a_field_missing_from_another_key_is_reported_beside_a_type_error() {
        // Key 1's id is taken out for its type error, and serde then misses it: not news.
        // Key 2 lacks an id of its own: that is reported.
        let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!(
            "[[keys]]\nid = 5\nkey = \"{d}\"\nplan = \"free\"\n\
             [[keys]]\nkey = \"{d}\"\nplan = \"free\"\n"
        );
        let found = issues(&text);
        let lines: Vec<(usize, &str)> = found.iter().map(|i| (i.line, &*i.message)).collect();
        assert_eq!(
            lines,
            vec![
                (2, "`id`: invalid type: integer `5`, expected a string"),
                (5, "missing field `id`")
            ]
        );
    }

    #[test]
    fn a_type_error_in_one_key_leaves_the_other_keys_checked() {
        let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!(
            "[[keys]]\nid = 5\nkey = \"{d}\"\nplan = \"free\"\n\
             [[keys]]\nid = \"second\"\nkey = \"{d}\"\nplan = \"gold\"\n"
        );
        let found = issues(&text);
        let at = |line: usize, fragment: &str| {
            found
                .iter()
                .any(|i| i.line == line && i.message.contains(fragment))
        };
        assert!(at(2, "invalid type: integer `5`"), "{found:#?}");
        assert!(at(8, "plan \"gold\" is not defined"), "{found:#?}");
        assert_eq!(found.len(), 2, "{found:#?}");
    }

    #[test]
    fn plaintext_keys_are_never_echoed() {
        let found = issues("[[keys]]\nid = \"a\"\nkey = \"tg_live_TOPSECRET\"\nplan = \"free\"");
        assert_eq!(found.len(), 1);
        assert!(
            !found[0].message.contains("TOPSECRET"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn every_type_error_is_reported_not_just_the_first() {
        let text = "[server]\nworkers = \"two\"\n\
                    [[upstreams]]\nname = 5\nurl = \"http://127.0.0.1:1\"\nmax_inflight = \"many\"\n\
                    [[routes]]\nprefix = \"/\"\nupstream = \"u\"\nmethods = \"GET\"\n\
                    [limits.ip_throttle]\nrejections = true\n";
        let found = issues(text);
        let lines: Vec<usize> = found.iter().map(|i| i.line).collect();
        // Line 9 is the route's own mistake: no upstream is named "u".
        assert_eq!(lines, [2, 4, 6, 9, 10, 12], "{found:#?}");

        // A table with a bad value goes, its neighbours stay: the route to the good upstream
        // is not reported.
        let text = "[[upstreams]]\nname = \"good\"\nurl = \"http://127.0.0.1:1\"\n\
                    [[upstreams]]\nname = 5\nurl = \"http://127.0.0.1:2\"\n\
                    [[routes]]\nprefix = \"/\"\nupstream = \"good\"\n";
        let found = issues(text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].line, 5);
        assert!(
            found.iter().all(|i| !i.message.contains("missing field")),
            "a taken-out value is not reported again as missing: {found:#?}"
        );
    }

    #[test]
    fn redis_passwords_are_never_echoed() {
        for url in [
            "rediss://:hunter2@r:6380",
            "redis://:hunter2@[::1",
            "http://:hunter2@r",
        ] {
            let found = issues(&format!("[limits]\nredis_url = \"{url}\""));
            assert_eq!(found.len(), 1, "{url}: {found:#?}");
            assert!(
                !found[0].message.contains("hunter2"),
                "{}",
                found[0].message
            );
        }
    }

    #[test]
    fn every_error_of_a_file_at_once() {
        let text =
            "[server]\nlisne = 1\nidle_timeout = \"x\"\n[errors]\nstyle = \"y\"\nbogus = 2\n";
        let found = issues(text);
        let lines: Vec<usize> = found.iter().map(|i| i.line).collect();
        assert_eq!(lines, vec![2, 3, 5, 6], "{found:#?}");
        assert!(found.iter().all(|i| i.file == Path::new("t.toml")));
    }

    #[test]
    fn columns_point_at_the_value() {
        let found = issues("[server]\nidle_timeout   = \"x\"");
        assert_eq!((found[0].line, found[0].column), (2, 18));
    }

    /// Every key the schema walk allows deserializes (file structs are `deny_unknown_fields`,
    /// so a key missing from either list fails here).
    #[test]
    fn the_schema_and_the_file_structs_agree() {
        let dir = std::env::temp_dir().join(format!("tollgate-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert_pem = dir.join("cert.pem");
        std::fs::write(&cert_pem, generated.cert.pem()).unwrap();
        let key_pem = dir.join("key.pem");
        std::fs::write(&key_pem, generated.signing_key.serialize_pem()).unwrap();
        let keys = dir.join("keys.toml");
        std::fs::write(
            &keys,
            "[[keys]]\nid = \"k2\"\nkey = \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\nplan = \"free\"\n",
        )
        .unwrap();
        let (cert_pem, key_pem) = (cert_pem.display(), key_pem.display());
        let pem = &cert_pem;
        let text = format!(
            r#"
[server]
listen = ["127.0.0.1:0"]
workers = 1
watch = true
header_read_timeout = "1s"
body_read_timeout = "1s"
idle_timeout = "1s"
max_header_bytes = 8192
max_body_bytes = "1MiB"
max_connections = 5
shutdown_grace = "0s"
trusted_proxies = ["10.0.0.0/8", "::1"]
[server.tls]
cert = "{cert_pem}"
key = "{key_pem}"
[admin]
listen = "127.0.0.1:0"
[errors]
style = "simple"
normalize_upstream_5xx = false
fields = {{ powered_by = "Acme", version = 2, nested = {{ a = [1, 2] }}, since = 1979-05-27T07:32:00Z, ratio = 0.5 }}
[auth]
header = "X-Key"
bearer = false
query_param = "api_key"
forward_key = true
keys_file = "{keys}"
[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:6380"
backend_timeout = "5ms"
on_backend_error = "deny"
headers = "both"
mode = "shadow"
[limits.ip_throttle]
rejections = 3
window = "10s"
block_for = "1m"
[limits.failed_auth]
attempts = 4
window = "10s"
block_for = "2m"
[plans.gold]
requests_per_minute = 100
burst = 200
requests_per_hour = 1000
requests_per_day = 10000
[[keys]]
id = "k1"
key = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
plan = "gold"
scopes = ["a:read"]
requests_per_minute = 50
disabled = true
[[upstreams]]
name = "core"
url = "https://core.internal:8443/base"
connect_timeout = "1s"
timeout = "2s"
max_inflight = 10
maintenance = true
retry_after = "5s"
ca_file = "{pem}"
[[routes]]
prefix = "/v1/"
upstream = "core"
scopes = ["a:read"]
methods = ["GET", "POST"]
strip_prefix = true
[[routes]]
prefix = "/ok"
respond = {{ status = 204, body = "", content_type = "text/plain" }}
auth = false
"#,
            keys = keys.display()
        );
        let config = load(Path::new("full.toml"), &text, |p| {
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.keys.len(),
            2,
            "keys from the config and the keys file"
        );
        assert_eq!(config.errors.fields["nested"]["a"][1], 2);
        // A date-time is its RFC 3339 text, not toml's private wrapper object.
        assert_eq!(config.errors.fields["since"], "1979-05-27T07:32:00Z");
        assert_eq!(config.errors.fields["ratio"], 0.5);
        assert_eq!(config.limits.failed_auth.count.get(), 4);
        assert_eq!(config.plans[&PlanName(Arc::from("gold"))].burst.get(), 200);
        assert_eq!(config.upstreams[0].url.path(), "/base");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_file_errors_name_the_keys_file_and_duplicates_span_both_files() {
        let dir = std::env::temp_dir().join(format!("tollgate-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys.toml");
        std::fs::write(
            &keys,
            "[[keys]]\nid = \"main\"\nkey = \"sha256:1111111111111111111111111111111111111111111111111111111111111111\"\nplan = \"free\"\nextra = 1\n",
        )
        .unwrap();
        let text = format!(
            "[auth]\nkeys_file = \"{}\"\n[[keys]]\nid = \"main\"\nkey = \"sha256:2222222222222222222222222222222222222222222222222222222222222222\"\nplan = \"free\"\n",
            keys.display()
        );
        let err = load(Path::new("main.toml"), &text, |p| {
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })
        })
        .unwrap_err();
        let issues = err.issues();
        assert!(
            issues.iter().any(|i| i.file == keys
                && i.line == 5
                && i.message.contains("unknown key `extra` in [[keys]]")),
            "{issues:#?}"
        );
        assert!(
            issues.iter().any(|i| i.file == keys
                && i.line == 2
                && i.message
                    .contains("duplicate key id \"main\" (first defined at main.toml:4)")),
            "{issues:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.routes.is_empty());
        assert!(config.keys.iter().all(|k| k.id.0.as_ref() != ""));
    }
}
