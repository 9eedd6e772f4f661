//! Editing a keys file in place: `tollgate rotate-key` and the admin key API change one
//! `[[keys]]` table and write the file back with every comment, blank line and the order of
//! everything else as the operator left them (`toml_edit`), atomically (a temp file in the
//! same directory, fsynced, then renamed over the old one), so a watcher or SIGHUP applies
//! the whole change or none of it.
//!
//! Only the text is edited here; the result is validated like any keys file by the caller
//! before it is written (see [`super::Config::load_to_serve`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

use super::KeyDigest;
use super::units::format_rfc3339;

/// Why a keys file could not be edited.
#[derive(Debug, thiserror::Error)]
pub enum KeysEditError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path}: not a TOML file: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names a line, never a value).
        message: String,
    },
    /// No `[[keys]]` table has this id.
    #[error("no key with id \"{0}\"")]
    NoSuchKey(String),
    /// A `[[keys]]` table with this id exists already.
    #[error("a key with id \"{0}\" exists already")]
    DuplicateId(String),
    /// The key's `key` is neither a digest nor a list of them.
    #[error("key \"{0}\": `key` is not a digest or a list of digests")]
    Malformed(String),
}

/// A keys file (or a config holding `[[keys]]`) being edited.
#[derive(Debug)]
pub struct KeysDocument {
    path: PathBuf,
    doc: DocumentMut,
}

/// A new `[[keys]]` table.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// `id`.
    pub id: String,
    /// `key`: the one digest.
    pub digest: Option<KeyDigest>,
    /// `plan`.
    pub plan: String,
    /// `scopes`.
    pub scopes: Vec<String>,
    /// `metadata`.
    pub metadata: Vec<(String, String)>,
    /// `expires_at`, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// `requests_per_minute`.
    pub requests_per_minute: Option<u32>,
    /// `created_at`, seconds since the Unix epoch.
    pub created_at: Option<u64>,
}

impl KeysDocument {
    /// Reads and parses `path`. A missing file is an empty document (the first key written
    /// creates it).
    pub fn read(path: &Path) -> Result<Self, KeysEditError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(KeysEditError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(path, &text)
    }

    /// Parses `text` as the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, KeysEditError> {
        let doc = text
            .parse::<DocumentMut>()
            .map_err(|e| KeysEditError::Syntax {
                path: path.to_owned(),
                // toml_edit's message quotes the offending line, which may hold a key.
                message: e.message().to_owned(),
            })?;
        Ok(Self {
            path: path.to_owned(),
            doc,
        })
    }

    /// The edited text.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }

    /// The ids of every `[[keys]]` table, in file order.
    pub fn ids(&self) -> Vec<String> {
        self.keys()
            .map(|k| k.iter().filter_map(id_of).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn keys(&self) -> Option<&ArrayOfTables> {
        self.doc.get("keys")?.as_array_of_tables()
    }

    /// The `[[keys]]` table of `id`.
    pub fn key_mut(&mut self, id: &str) -> Result<&mut Table, KeysEditError> {
        self.doc
            .get_mut("keys")
            .and_then(Item::as_array_of_tables_mut)
            .and_then(|keys| keys.iter_mut().find(|k| id_of(k) == Some(id)))
            .ok_or_else(|| KeysEditError::NoSuchKey(id.to_owned()))
    }

    /// Appends a `[[keys]]` table (at the end of the file).
    pub fn add(&mut self, key: &NewKey) -> Result<(), KeysEditError> {
        if self.ids().contains(&key.id) {
            return Err(KeysEditError::DuplicateId(key.id.clone()));
        }
        let mut table = Table::new();
        table["id"] = toml_edit::value(key.id.as_str());
        if let Some(digest) = key.digest {
            table["key"] = toml_edit::value(digest.to_string());
        }
        table["plan"] = toml_edit::value(key.plan.as_str());
        if !key.scopes.is_empty() {
            table["scopes"] = toml_edit::value(key.scopes.iter().collect::<Array>());
        }
        if let Some(rpm) = key.requests_per_minute {
            table["requests_per_minute"] = toml_edit::value(i64::from(rpm));
        }
        if let Some(at) = key.expires_at {
            table["expires_at"] = toml_edit::value(format_rfc3339(at));
        }
        if !key.metadata.is_empty() {
            table["metadata"] = toml_edit::value(metadata_table(&key.metadata));
        }
        if let Some(at) = key.created_at {
            table["created_at"] = toml_edit::value(format_rfc3339(at));
        }
        // A blank line before the table, as a person writes them.
        table.decor_mut().set_prefix("\n");
        let keys = self
            .doc
            .entry("keys")
            .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
        let Some(keys) = keys.as_array_of_tables_mut() else {
            return Err(KeysEditError::Malformed(key.id.clone()));
        };
        keys.push(table);
        Ok(())
    }

    /// Sets `field` of key `id` to `value`, or removes it (`None`). A value replaced keeps
    /// the spacing and comment around the old one.
    pub fn set_field(
        &mut self,
        id: &str,
        field: &str,
        value: Option<Value>,
    ) -> Result<(), KeysEditError> {
        let table = self.key_mut(id)?;
        match value {
            None => {
                table.remove(field);
            }
            Some(mut value) => {
                if let Some(old) = table.get(field).and_then(Item::as_value) {
                    *value.decor_mut() = old.decor().clone();
                }
                table[field] = Item::Value(value);
            }
        }
        Ok(())
    }

    /// Removes the `[[keys]]` table of `id`.
    pub fn remove(&mut self, id: &str) -> Result<(), KeysEditError> {
        let keys = self
            .doc
            .get_mut("keys")
            .and_then(Item::as_array_of_tables_mut)
            .ok_or_else(|| KeysEditError::NoSuchKey(id.to_owned()))?;
        let before = keys.len();
        keys.retain(|k| id_of(k) != Some(id));
        if keys.len() == before {
            return Err(KeysEditError::NoSuchKey(id.to_owned()));
        }
        Ok(())
    }

    /// Rotation: `new` becomes the key's first digest, and every digest it had stops
    /// working at `old_expires_at` (one that expires sooner keeps its own expiry; one already
    /// past `now` is dropped from the list). Whatever else the table holds is kept.
    pub fn rotate(
        &mut self,
        id: &str,
        new: KeyDigest,
        old_expires_at: u64,
        now: u64,
    ) -> Result<(), KeysEditError> {
        let table = self.key_mut(id)?;
        let mut digests: Vec<(String, Option<u64>)> = Vec::new();
        match table.get("key").and_then(Item::as_value) {
            Some(Value::String(s)) => digests.push((s.value().clone(), None)),
            Some(Value::Array(list)) => {
                for entry in list.iter() {
                    match entry {
                        Value::String(s) => digests.push((s.value().clone(), None)),
                        Value::InlineTable(t) => {
                            let Some(digest) = t.get("digest").and_then(Value::as_str) else {
                                return Err(KeysEditError::Malformed(id.to_owned()));
                            };
                            let expires = t
                                .get("expires_at")
                                .and_then(Value::as_str)
                                .and_then(|e| super::units::parse_rfc3339(e).ok());
                            digests.push((digest.to_owned(), expires));
                        }
                        _ => return Err(KeysEditError::Malformed(id.to_owned())),
                    }
                }
            }
            _ => return Err(KeysEditError::Malformed(id.to_owned())),
        }
        let mut list = Array::new();
        list.push(new.to_string());
        for (digest, expires) in digests {
            let expires = expires.map_or(old_expires_at, |e| e.min(old_expires_at));
            if expires <= now {
                continue;
            }
            let mut entry = InlineTable::new();
            entry.insert("digest", digest.into());
            entry.insert("expires_at", format_rfc3339(expires).into());
            list.push(entry);
        }
        let decor = table
            .get("key")
            .and_then(Item::as_value)
            .map(|v| v.decor().clone());
        let mut value = Value::Array(list);
        if let Some(decor) = decor {
            *value.decor_mut() = decor;
        }
        table["key"] = Item::Value(value);
        Ok(())
    }

    /// Writes the edited text back to the file atomically ([`write_atomic`]).
    pub fn write(&self) -> Result<(), KeysEditError> {
        write_atomic(&self.path, self.text().as_bytes()).map_err(|source| KeysEditError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The `id` of a `[[keys]]` table.
fn id_of(table: &Table) -> Option<&str> {
    table.get("id")?.as_str().map(str::trim)
}

/// `{ name = "value", ... }`.
pub fn metadata_table(metadata: &[(String, String)]) -> InlineTable {
    let mut table = InlineTable::new();
    for (name, value) in metadata {
        table.insert(name, value.as_str().into());
    }
    table
}

/// The environment variable of the test failpoint that ends the process between the temp
/// write and the rename (`TOLLGATE_FAILPOINT=keys-write-before-rename`), to show that a write
/// cut there leaves the old file whole.
pub const FAILPOINT_ENV: &str = "TOLLGATE_FAILPOINT";

/// Replaces `path` with `contents` all at once: the bytes go to a temp file beside it (same
/// file system, so the rename is atomic), which is fsynced, given the old file's permissions
/// (a keys file is often 0600) and renamed over it; then the directory is fsynced, so the
/// rename survives a power cut. A reader sees the old file or the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keys".to_owned());
    let temp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(contents)?;
        if let Ok(meta) = std::fs::metadata(path) {
            file.set_permissions(meta.permissions())?;
        }
        file.sync_all()?;
        drop(file);
        if std::env::var(FAILPOINT_ENV).as_deref() == Ok("keys-write-before-rename") {
            // A crash here, as a test provokes it: the temp file is written, the old file
            // untouched.
            std::process::abort();
        }
        std::fs::rename(&temp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> KeyDigest {
        KeyDigest::from_bytes([n; 32])
    }

    const FILE: &str = "# keys of acme\n\n[[keys]]\nid = \"acme\"   # the customer\nkey = \"sha256:0101010101010101010101010101010101010101010101010101010101010101\"  # since 2026\nplan = \"pro\"\n\n# another\n[[keys]]\nid = \"b\"\nkey = \"sha256:0202020202020202020202020202020202020202020202020202020202020202\"\nplan = \"free\"\n";

    #[test]
    fn rotation_changes_only_the_key_line() {
        let mut doc = KeysDocument::parse(Path::new("k.toml"), FILE).unwrap();
        doc.rotate("acme", digest(3), 1_799_971_200, 1_000).unwrap();
        let expected = FILE.replace(
            "key = \"sha256:0101010101010101010101010101010101010101010101010101010101010101\"",
            "key = [\"sha256:0303030303030303030303030303030303030303030303030303030303030303\", { digest = \"sha256:0101010101010101010101010101010101010101010101010101010101010101\", expires_at = \"2027-01-15T00:00:00Z\" }]",
        );
        assert_eq!(doc.text(), expected);
        // Rotating again: the oldest keeps its sooner expiry, the middle one gets the new one;
        // a digest already expired is dropped.
        doc.rotate("acme", digest(4), 1_900_000_000, 1_000).unwrap();
        let text = doc.text();
        assert!(text.contains("key = [\"sha256:0404"), "{text}");
        assert!(text.contains("{ digest = \"sha256:0303030303030303030303030303030303030303030303030303030303030303\", expires_at = \"2030-03-17T17:46:40Z\" }"), "{text}");
        assert!(text.contains("{ digest = \"sha256:0101010101010101010101010101010101010101010101010101010101010101\", expires_at = \"2027-01-15T00:00:00Z\" }"), "{text}");
        doc.rotate("acme", digest(5), 1_900_000_000, 1_800_000_000)
            .unwrap();
        assert!(
            !doc.text().contains("sha256:0101"),
            "expired digest dropped"
        );
        assert!(matches!(
            doc.rotate("nobody", digest(6), 1, 0),
            Err(KeysEditError::NoSuchKey(_))
        ));
    }

    #[test]
    fn add_and_remove_keep_the_rest() {
        let mut doc = KeysDocument::parse(Path::new("k.toml"), FILE).unwrap();
        doc.add(&NewKey {
            id: "c".into(),
            digest: Some(digest(7)),
            plan: "pro".into(),
            scopes: vec!["a:read".into()],
            metadata: vec![("customer_id".into(), "cus_1".into())],
            expires_at: Some(1_799_971_200),
            requests_per_minute: Some(5),
            created_at: Some(1_767_225_600),
        })
        .unwrap();
        let text = doc.text();
        assert!(text.starts_with(FILE), "{text}");
        assert!(text.ends_with("\n[[keys]]\nid = \"c\"\nkey = \"sha256:0707070707070707070707070707070707070707070707070707070707070707\"\nplan = \"pro\"\nscopes = [\"a:read\"]\nrequests_per_minute = 5\nexpires_at = \"2027-01-15T00:00:00Z\"\nmetadata = { customer_id = \"cus_1\" }\ncreated_at = \"2026-01-01T00:00:00Z\"\n"), "{text}");
        assert!(matches!(
            doc.add(&NewKey {
                id: "b".into(),
                ..Default::default()
            }),
            Err(KeysEditError::DuplicateId(_))
        ));
        doc.remove("b").unwrap();
        assert_eq!(doc.ids(), ["acme", "c"]);
        assert!(doc.text().contains("# keys of acme"));
        assert!(matches!(doc.remove("b"), Err(KeysEditError::NoSuchKey(_))));
        doc.set_field("acme", "plan", Some("free".into())).unwrap();
        doc.set_field("acme", "disabled", Some(true.into()))
            .unwrap();
        doc.set_field("c", "metadata", None).unwrap();
        let text = doc.text();
        assert!(
            text.contains("plan = \"free\"\n\n# another")
                || text.contains("plan = \"free\"\ndisabled = true\n"),
            "{text}"
        );
        assert!(!text.contains("cus_1"), "{text}");
        // An empty (or missing) file takes a first key.
        let mut empty = KeysDocument::parse(Path::new("k.toml"), "").unwrap();
        empty
            .add(&NewKey {
                id: "a".into(),
                digest: Some(digest(1)),
                plan: "free".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(empty.ids(), ["a"]);
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temp file left");
        // A write that cannot complete (its directory is gone) leaves nothing behind.
        assert!(write_atomic(&dir.path().join("nowhere/keys.toml"), b"x").is_err());
    }
}
