//! Which keys each table of the config may hold, checked before deserializing.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key. Ops fixing a config want every
//! mistake at once, so the parsed document is walked first: every unknown key is reported with
//! its line, then removed, and deserialization goes on to find the remaining errors. The file
//! structs keep `deny_unknown_fields` as the backstop; a test proves the two lists agree.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Keys allowed at a table path; `None` means any key (a map such as `plans` or `errors.fields`).
fn allowed(path: &str) -> Option<&'static [&'static str]> {
    Some(match path {
        "" => &[
            "server",
            "admin",
            "errors",
            "auth",
            "limits",
            "plans",
            "keys",
            "upstreams",
            "routes",
        ],
        "server" => &[
            "listen",
            "workers",
            "watch",
            "header_read_timeout",
            "body_read_timeout",
            "idle_timeout",
            "max_header_bytes",
            "max_body_bytes",
            "max_connections",
            "shutdown_grace",
            "trusted_proxies",
            "underscores_in_headers",
            "tls",
        ],
        "server.tls" => &["cert", "key"],
        "admin" => &["listen"],
        "errors" => &["style", "normalize_upstream_5xx", "fields"],
        "auth" => &[
            "header",
            "bearer",
            "query_param",
            "forward_key",
            "keys_file",
        ],
        "limits" => &[
            "backend",
            "redis_url",
            "backend_timeout",
            "on_backend_error",
            "headers",
            "mode",
            "ip_throttle",
            "failed_auth",
        ],
        "limits.ip_throttle" => &["rejections", "window", "block_for"],
        "limits.failed_auth" => &["attempts", "window", "block_for"],
        "plans.*" => &[
            "requests_per_minute",
            "burst",
            "requests_per_hour",
            "requests_per_day",
        ],
        "keys[]" => &[
            "id",
            "key",
            "plan",
            "scopes",
            "requests_per_minute",
            "disabled",
        ],
        "upstreams[]" => &[
            "name",
            "url",
            "connect_timeout",
            "timeout",
            "max_inflight",
            "maintenance",
            "retry_after",
            "ca_file",
        ],
        "routes[]" => &[
            "prefix",
            "upstream",
            "scopes",
            "methods",
            "auth",
            "strip_prefix",
            "respond",
        ],
        "routes[].respond" => &["status", "body", "content_type"],
        _ => return None,
    })
}

/// The path of a child table: map entries (`plans.<name>`) collapse to `*`.
fn child_path(parent: &str, key: &str) -> String {
    match parent {
        "plans" => "plans.*".to_owned(),
        "" => key.to_owned(),
        _ => format!("{parent}.{key}"),
    }
}

/// One key that the schema does not know.
#[derive(Debug)]
pub struct UnknownKey {
    /// Byte range of the key in the file.
    pub span: std::ops::Range<usize>,
    /// Human message, with the table and the keys it may hold.
    pub message: String,
}

/// Removes every unknown key from `table` (recursively) and returns them.
/// `root` is `""` for the main config; the keys file passes `"keys_file"`.
pub fn strip_unknown(table: &mut DeTable<'_>, root: &str) -> Vec<UnknownKey> {
    let mut found = Vec::new();
    walk(table, root, &mut found);
    found.sort_by_key(|u| u.span.start);
    found
}

fn walk(table: &mut DeTable<'_>, path: &str, found: &mut Vec<UnknownKey>) {
    let allowed = if path == "keys_file" {
        Some(&["keys"][..])
    } else {
        allowed(path)
    };
    if let Some(allowed) = allowed {
        let unknown: Vec<_> = table
            .keys()
            .filter(|key| !allowed.contains(&key.get_ref().as_ref()))
            .cloned()
            .collect();
        for key in unknown {
            found.push(UnknownKey {
                span: key.span(),
                message: unknown_message(key.get_ref(), path, allowed),
            });
            table.remove(&key);
        }
    }
    let base = if path == "keys_file" { "" } else { path };
    for (key, value) in table.iter_mut() {
        let child = child_path(base, key.get_ref());
        visit(value, &child, found);
    }
}

fn visit(value: &mut Spanned<DeValue<'_>>, path: &str, found: &mut Vec<UnknownKey>) {
    match value.get_mut() {
        DeValue::Table(t) => {
            // Free-form maps (errors.fields) have no schema below them.
            if path == "errors.fields" {
                return;
            }
            walk(t, path, found);
        }
        DeValue::Array(items) => {
            let item_path = format!("{path}[]");
            for item in items.iter_mut() {
                if let DeValue::Table(t) = item.get_mut() {
                    walk(t, &item_path, found);
                }
            }
        }
        _ => {}
    }
}

fn unknown_message(key: &str, path: &str, allowed: &[&str]) -> String {
    let table = match path {
        "" => "at the top level".to_owned(),
        "keys_file" => "at the top level of the keys file (it holds only [[keys]])".to_owned(),
        "plans.*" => "in a [plans.<name>] table".to_owned(),
        p if p.ends_with("[]") => format!("in [[{}]]", p.trim_end_matches("[]")),
        p => format!("in [{}]", p.replace("[]", "")),
    };
    let suggestion = allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| format!(" (did you mean `{a}`?)"))
        .unwrap_or_default();
    format!(
        "unknown key `{key}` {table}{suggestion}; expected one of: {}",
        allowed.join(", ")
    )
}

/// Levenshtein distance, for "did you mean" hints on typos.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys() {
        let msg = unknown_message("listne", "server", allowed("server").unwrap());
        assert!(msg.contains("did you mean `listen`"), "{msg}");
        let msg = unknown_message("zzzzzz", "server", allowed("server").unwrap());
        assert!(!msg.contains("did you mean"), "{msg}");
    }

    #[test]
    fn finds_every_unknown_key() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\nlistn = 1\n[[routes]]\nprefix = \"/\"\nbogus = true\n[plans.free]\nrequests_per_minute = 1\nrpm = 2\n[errors.fields]\nanything = 1\n";
        let mut doc = DeTable::parse(text).unwrap().into_inner();
        let found = strip_unknown(&mut doc, "");
        let msgs: Vec<_> = found.iter().map(|u| u.message.as_str()).collect();
        assert_eq!(found.len(), 3, "{msgs:?}");
        assert!(msgs[0].contains("`listn` in [server]"));
        assert!(msgs[1].contains("`bogus` in [[routes]]"));
        assert!(msgs[2].contains("`rpm` in a [plans.<name>] table"));
    }
}
