//! `limits.state_file`: the local backend's monthly quota counts, kept across restarts.
//!
//! Written whole every [`STATE_FILE_INTERVAL`](crate::config::STATE_FILE_INTERVAL) (the
//! server's housekeeping tick) and at shutdown, to a temporary file beside it that is then
//! renamed over it: a reader (the next start) sees the old file or the new one, never half of
//! one. A kill between writes loses at most the requests counted since the last one. Read
//! once at start: a missing file is an empty one (the first start); a file that cannot be
//! read or understood is refused, with its path and the reason, and the gateway does not
//! start: zeroing every customer's month silently would hand out quota that was used.
//!
//! ```json
//! {"version":1,"quotas":{"acme-prod":{"month":"2026-12","used":41250}}}
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::quota::MonthIndex;

/// The format version written.
const VERSION: u32 = 1;

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
#[error("limits.state_file {}: {reason}", path.display())]
pub struct StateFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    quotas: BTreeMap<String, QuotaEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    /// `YYYY-MM`, UTC.
    month: String,
    used: u64,
}

/// (key id, month, used) of every count in the file at `path`; none if there is no file.
pub fn read(path: &Path) -> Result<Vec<(String, MonthIndex, u64)>, StateFileError> {
    let refused = |reason: String| StateFileError {
        path: path.to_owned(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(refused(format!("cannot be read ({e})"))),
    };
    let file: StateFile = serde_json::from_str(&text)
        .map_err(|e| refused(format!("is not a tollgate state file ({e})")))?;
    if file.version != VERSION {
        return Err(refused(format!(
            "has version {}, this tollgate reads version {VERSION}",
            file.version
        )));
    }
    file.quotas
        .into_iter()
        .map(|(id, entry)| {
            let month = parse_month(&entry.month).ok_or_else(|| {
                refused(format!(
                    "key \"{id}\": month \"{}\" is not YYYY-MM",
                    entry.month
                ))
            })?;
            Ok((id, month, entry.used))
        })
        .collect()
}

/// Writes `entries` (key id, month, used) to `path` through a temporary file and a rename.
pub fn write(path: &Path, entries: &[(Arc<str>, MonthIndex, u64)]) -> std::io::Result<()> {
    let file = StateFile {
        version: VERSION,
        quotas: entries
            .iter()
            .map(|(id, month, used)| {
                (
                    id.to_string(),
                    QuotaEntry {
                        month: format_month(*month),
                        used: *used,
                    },
                )
            })
            .collect(),
    };
    let mut temp_name = path.file_name().unwrap_or_default().to_owned();
    temp_name.push(".tmp");
    let temp = path.with_file_name(temp_name);
    let mut out = std::fs::File::create(&temp)?;
    out.write_all(&serde_json::to_vec(&file).map_err(std::io::Error::other)?)?;
    // On disk before the rename makes it the file: a crash leaves the old one or this one.
    out.sync_all()?;
    drop(out);
    std::fs::rename(&temp, path)
}

fn format_month(month: MonthIndex) -> String {
    format!("{:04}-{:02}", month / 12, month % 12 + 1)
}

fn parse_month(text: &str) -> Option<MonthIndex> {
    let (year, month) = text.split_once('-')?;
    let (year, month): (u32, u32) = (year.parse().ok()?, month.parse().ok()?);
    (year.to_string().len() == 4 && (1..=12).contains(&month)).then(|| year * 12 + month - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn counts_round_trip_and_a_missing_file_is_empty() {
        let path = dir().join("state.json");
        let _ = std::fs::remove_file(&path);
        assert!(read(&path).unwrap().is_empty());
        let december = 2026 * 12 + 11;
        write(&path, &[(Arc::from("acme"), december, 41_250)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            r#"{"version":1,"quotas":{"acme":{"month":"2026-12","used":41250}}}"#
        );
        assert_eq!(
            read(&path).unwrap(),
            vec![("acme".to_owned(), december, 41_250)]
        );
        assert!(
            !path.with_file_name("state.json.tmp").exists(),
            "renamed away"
        );
    }

    #[test]
    fn a_corrupt_file_is_refused_with_its_path_and_reason() {
        let path = dir().join("corrupt.json");
        for (text, reason) in [
            (
                "{\"version\":1,\"quotas\":{\"a\":{\"month\":\"2026-12\",\"used\":",
                "is not a tollgate state file",
            ),
            ("{\"version\":2,\"quotas\":{}}", "has version 2"),
            (
                "{\"version\":1,\"quotas\":{\"a\":{\"month\":\"2026-13\",\"used\":1}}}",
                "key \"a\": month \"2026-13\" is not YYYY-MM",
            ),
            ("", "is not a tollgate state file"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read(&path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("limits.state_file {}: ", path.display())),
                "{e}"
            );
            assert!(e.contains(reason), "{e}");
        }
    }
}
