//! Which keys each table of the config may hold, checked before deserializing.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key. Ops fixing a config want every
//! mistake at once, so the parsed document is walked first: every unknown key is reported with
//! its line, then removed, and deserialization goes on to find the remaining errors. The keys
//! a table may hold are read from its file struct (the field names serde's derive hands to the
//! deserializer), so the file structs are the one list; they keep `deny_unknown_fields` as the
//! backstop.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::file::*;

/// Keys allowed at a table path; `None` means any key (a map such as `plans` or `errors.fields`).
/// `keys_file` is the top level of the keys file.
fn allowed(path: &str) -> Option<&'static [&'static str]> {
    Some(match path {
        "" => fields::<FileConfig>(),
        "keys_file" => fields::<KeysFile>(),
        "server" => fields::<ServerFile>(),
        "server.tls" => fields::<TlsFile>(),
        "admin" => fields::<AdminFile>(),
        "errors" => fields::<ErrorsFile>(),
        "auth" => fields::<AuthFile>(),
        "limits" => fields::<LimitsFile>(),
        "limits.ip_throttle" => fields::<IpThrottleFile>(),
        "limits.failed_auth" => fields::<FailedAuthFile>(),
        "redis" => fields::<RedisFile>(),
        "plans.*" => fields::<PlanFile>(),
        "plans.*.routes.*" | "keys[].routes.*" => fields::<RouteBucketFile>(),
        "keys[]" => fields::<KeyFile>(),
        "keys[].key[]" => fields::<ExpiringDigestFile>(),
        "upstreams[]" => fields::<UpstreamFile>(),
        "upstreams[].targets[]" => fields::<WeightedTargetFile>(),
        "upstreams[].health_check" => fields::<HealthCheckFile>(),
        "routes[]" => fields::<RouteFile>(),
        "routes[].respond" => fields::<RespondFile>(),
        _ => return None,
    })
}

/// The keys a file struct takes, in declaration order: the field list serde's derive passes
/// to `deserialize_struct`, caught by a deserializer that stops there.
fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// A deserializer that records the field list of the struct asked of it, and nothing else.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

/// How [`FieldNames`] ends every call: it never produces a value.
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field names read")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        *self.0 = fields;
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The path of a child table: map entries (`plans.<name>`) collapse to `*`.
fn child_path(parent: &str, key: &str) -> String {
    match parent {
        "plans" => "plans.*".to_owned(),
        "plans.*.routes" | "keys[].routes" => format!("{parent}.*"),
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
    if let Some(allowed) = allowed(path) {
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
        "upstreams[].targets[]" => "in a target of [[upstreams]] targets".to_owned(),
        "keys[].key[]" => "in a digest of a [[keys]] key list".to_owned(),
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

    /// One unknown key in every table the file structs define: a table missing from
    /// `allowed` would pass its keys on to serde, which reports only the first.
    #[test]
    fn every_table_of_the_file_structs_is_checked() {
        let tables = [
            "[server]",
            "[server.tls]",
            "[admin]",
            "[errors]",
            "[auth]",
            "[limits]",
            "[limits.ip_throttle]",
            "[limits.failed_auth]",
            "[redis]",
            "[plans.free]",
            "[[keys]]",
            "[[upstreams]]",
            "[[routes]]",
        ];
        let mut text = "bogus = 1\n".to_owned();
        for table in tables {
            text.push_str(&format!("{table}\nbogus = 1\n"));
        }
        text.push_str("respond = { bogus = 1 }\n");
        let mut doc = DeTable::parse(&text).unwrap().into_inner();
        let found = strip_unknown(&mut doc, "");
        assert_eq!(found.len(), tables.len() + 2, "{found:#?}");
        assert!(
            found[14].message.contains("in [routes.respond]"),
            "{found:#?}"
        );

        let mut doc = DeTable::parse("bogus = 1\n[[keys]]\nbogus = 1\n")
            .unwrap()
            .into_inner();
        let found = strip_unknown(&mut doc, "keys_file");
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found[0].message.contains("expected one of: keys"),
            "{found:#?}"
        );

        // A struct serde reads as a map (`#[serde(flatten)]`, say) gives no field list:
        // every key of its table would be refused.
        for path in [
            "",
            "keys_file",
            "server",
            "limits.failed_auth",
            "routes[].respond",
        ] {
            assert!(!allowed(path).unwrap().is_empty(), "{path}");
        }
    }
}
