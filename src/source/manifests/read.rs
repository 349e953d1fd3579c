//! Finding and reading the manifest files of a directory, within the size limit.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The default for `--max-manifest-bytes`: well above any realistic policy file (a ConfigMap
/// holds at most 1 MiB), while parsing one this large stays within the DaemonSet's memory limit.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The deepest nesting of mappings and sequences accepted. Kubernetes objects need about 10.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read manifests directory {dir}: {source}")]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {file}: {source}")]
    File {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {file}: {why}")]
    Unusable { file: PathBuf, why: String },
    #[error("{at}: {message}")]
    Document { at: Location, message: String },
}

/// Where an object came from: file, 1-based document number, and `items[i]` inside a List.
#[derive(Debug, Clone)]
pub struct Location {
    pub file: PathBuf,
    pub document: usize,
    pub item: Option<usize>,
    pub object: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)?;
        if let Some(i) = self.item {
            write!(f, " items[{i}]")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        Ok(())
    }
}

/// The manifest files of `dir`, sorted by name. An entry that looks like a manifest but cannot be
/// one (a dangling symlink, a FIFO, a socket, a device) is an error, so the caller keeps the last
/// good state instead of enforcing the directory without it.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Directory {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| LoadError::Directory {
            dir: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let wanted = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        // Editors' hidden temporaries (".foo.yaml.swp", ".#foo.yaml") and a ConfigMap volume's
        // "..data" and "..<timestamp>" entries, whose files the top-level symlinks lead to.
        let hidden = entry.file_name().as_encoded_bytes().starts_with(b".");
        if !wanted || hidden {
            continue;
        }
        // Follows symlinks: ConfigMap files are `name -> ..data/name`.
        let kind = std::fs::metadata(&path)
            .map_err(|source| LoadError::File {
                file: path.clone(),
                source,
            })?
            .file_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(LoadError::Unusable {
                file: path,
                why: format!("not a regular file but {}", describe_file_type(kind)),
            });
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

fn describe_file_type(kind: std::fs::FileType) -> &'static str {
    if kind.is_fifo() {
        "a FIFO (not opened: reading it could block)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// Reads a manifest file of at most `limit` bytes. Opened non-blocking and checked
/// again after opening, so a FIFO swapped in after the listing cannot hang the agent.
pub(super) fn read_manifest(file: &Path, limit: u64) -> Result<String, LoadError> {
    let io_error = |source| LoadError::File {
        file: file.to_path_buf(),
        source,
    };
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(file)
        .map_err(io_error)?;
    let meta = handle.metadata().map_err(io_error)?;
    if !meta.is_file() {
        return Err(LoadError::Unusable {
            file: file.to_path_buf(),
            why: format!(
                "not a regular file but {}",
                describe_file_type(meta.file_type())
            ),
        });
    }
    let too_big = |size: u64| LoadError::Unusable {
        file: file.to_path_buf(),
        why: format!(
            "{size} bytes is over the limit of {limit} bytes per manifest file (--max-manifest-bytes)"
        ),
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // A file growing while we read is still cut off at the limit.
    handle
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| LoadError::Unusable {
        file: file.to_path_buf(),
        why: format!("not UTF-8 text: {e}"),
    })
}
