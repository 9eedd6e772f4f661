//! Reading a config or keys file from disk: regular files only (a FIFO or a device would hang
//! `check` and every reload), at most [`MAX_FILE_BYTES`], and UTF-8 text, with a clear error
//! for a file that is none of these.

use std::path::Path;

use super::ConfigError;

/// The largest config or keys file read, 256 MiB: about a million keys. A path that points
/// somewhere else by mistake (a log, say) gets an error instead of filling memory.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The text of the config or keys file at `path`.
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    let failed = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    // Opening a FIFO blocks until a writer comes, and a device may never end: `check` and
    // every reload would hang. Only a regular file can be read again on reload anyway.
    let meta = std::fs::metadata(path).map_err(failed)?;
    if !meta.is_file() {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not a regular file ({}); config is read from regular files only",
                file_kind(&meta.file_type())
            ),
        )));
    }
    let bytes = read_bounded(path, MAX_FILE_BYTES).map_err(failed)?;
    text(bytes).map_err(|why| failed(std::io::Error::new(std::io::ErrorKind::InvalidData, why)))
}

/// What a path that is not a regular file is, in words.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// The file at `path`, if it is at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {} MiB a config file may be", max >> 20),
        )
    };
    let file = std::fs::File::open(path)?;
    // A regular file's size is known up front; one that grows while it is read stops at the
    // bound.
    if file.metadata()?.len() > max {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// A file's bytes as config text, or what they are instead, with the byte offset where that
/// shows: a UTF-16 or UTF-32 file (saved so by some Windows editors), or binary data (a NUL
/// byte, or bytes that are not UTF-8). A leading UTF-8 byte order mark is dropped.
fn text(mut bytes: Vec<u8>) -> Result<String, String> {
    const SAVE_AS: &str = "a config is UTF-8 text; save it as UTF-8";
    let bom = match bytes.as_slice() {
        [0xFF, 0xFE, 0, 0, ..] | [0, 0, 0xFE, 0xFF, ..] => Some("UTF-32"),
        [0xFF, 0xFE, ..] | [0xFE, 0xFF, ..] => Some("UTF-16"),
        _ => None,
    };
    if let Some(encoding) = bom {
        return Err(format!(
            "the file is {encoding} (it starts with a {encoding} byte order mark, bytes 0-1); {SAVE_AS}"
        ));
    }
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        bytes.drain(..3);
    }
    // TOML allows no NUL anywhere, and UTF-16 text without a byte order mark has one in
    // every other byte of its ASCII characters.
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        let head = &bytes[..bytes.len().min(64)];
        let nuls_at = |parity: usize| {
            head.iter()
                .skip(parity)
                .step_by(2)
                .filter(|&&b| b == 0)
                .count()
        };
        let half = head.len() / 2;
        let looks_utf16 = half >= 2 && nuls_at(0).max(nuls_at(1)) >= half * 3 / 4;
        return Err(if looks_utf16 {
            format!(
                "the file looks like UTF-16 without a byte order mark (a NUL byte at byte offset {at}); {SAVE_AS}"
            )
        } else {
            format!("the file is binary, not text: a NUL byte at byte offset {at}; {SAVE_AS}")
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        format!(
            "not UTF-8: byte 0x{:02X} at byte offset {at} (line {line}) is not part of a UTF-8 character; the file is binary or in another encoding (Latin-1, UTF-16...); {SAVE_AS}",
            bytes[at]
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn files_past_the_bound_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        // Sparse: no disk used, and refused from its size before any of it is read.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("cannot read config") && err.contains("larger than the 256 MiB"),
            "{err}"
        );

        std::fs::write(&path, "x".repeat(1024)).unwrap();
        assert_eq!(
            read_bounded(&path, 1024).unwrap().len(),
            1024,
            "at the bound"
        );
        assert!(read_bounded(&path, 1023).is_err());
        // A device has no size to check: it is read up to the bound and no further.
        let err = read_bounded(Path::new("/dev/zero"), 4096).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn a_path_that_is_not_a_regular_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("tollgate.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        // Opening a FIFO with no writer blocks: were it opened, this test would hang.
        for (path, kind) in [
            (fifo.as_path(), "(a FIFO)"),
            (dir.path(), "(a directory)"),
            (Path::new("/dev/zero"), "(a device)"),
        ] {
            let err = Config::load(path).unwrap_err().to_string();
            assert!(
                err.contains("cannot read config: not a regular file") && err.contains(kind),
                "{err}"
            );
        }
    }

    /// Each file's bytes, and what the error must say about them.
    const NOT_TEXT: &[(&[u8], &str)] = &[
        (
            b"\xff\xfe[\0s\0]\0",
            "the file is UTF-16 (it starts with a UTF-16 byte order mark, bytes 0-1)",
        ),
        (b"\xfe\xff\0[\0s\0]", "the file is UTF-16"),
        (b"\xff\xfe\0\0[\0\0\0", "the file is UTF-32"),
        (
            b"[\0s\0e\0r\0v\0e\0r\0]\0\n\0",
            "looks like UTF-16 without a byte order mark (a NUL byte at byte offset 1)",
        ),
        (
            b"[server]\nworkers = 1\n\x7fELF\x02\x01\x01\0\0\0",
            "the file is binary, not text: a NUL byte at byte offset 28",
        ),
        (
            b"[server]\n# caf\xe9\n",
            "not UTF-8: byte 0xE9 at byte offset 14 (line 2)",
        ),
    ];

    #[test]
    fn a_file_that_is_not_utf8_text_says_what_it_is_and_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        for (bytes, expected) in NOT_TEXT {
            std::fs::write(&path, bytes).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains("save it as UTF-8"),
                "{bytes:?}: {err}"
            );
        }
        // A UTF-8 byte order mark is UTF-8: dropped, and the text read.
        std::fs::write(&path, b"\xef\xbb\xbf[server]\nworkers = 2\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().server.workers, 2);
    }
}
