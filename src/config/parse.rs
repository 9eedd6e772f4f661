//! Parsing one TOML file into its file structs, with spans: every syntax error, unknown key
//! and type error at its file, line and column, in the config's own words.
//!
//! The first half of loading (see [`super::validate`] for the second). toml stops at the
//! first syntax error and serde at the first type error; this module goes on past each type
//! error, so that one `tollgate check` lists every mistake of a file.

use std::path::Path;

use toml::de::DeTable;

use super::schema::strip_unknown;
use super::{ConfigIssue, MAX_HEADER_BYTES_CEILING, MAX_WORKERS};

/// A file's text, to turn byte spans into line and column.
pub(super) struct Source<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    /// Lines of the file before `text` (a piece of a large keys file starts at a line start,
    /// so only its lines are shifted, not its columns).
    lines_before: usize,
    /// Where each line starts, found on the first lookup: every key's line is looked up (for
    /// duplicate reports), and counting from the top each time made a million keys take hours.
    line_starts: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> Source<'a> {
    pub(super) fn new(path: &'a Path, text: &'a str) -> Self {
        Self {
            path,
            text,
            lines_before: 0,
            line_starts: std::cell::OnceCell::new(),
        }
    }

    /// A piece of a larger file that starts at a line start, `lines_before` lines into it.
    pub(super) fn piece(path: &'a Path, text: &'a str, lines_before: usize) -> Self {
        Self {
            lines_before,
            ..Self::new(path, text)
        }
    }

    pub(super) fn issue(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
    ) -> ConfigIssue {
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
pub(super) fn parse<T: serde::de::DeserializeOwned>(
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
