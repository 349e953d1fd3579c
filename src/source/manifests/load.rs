//! A directory, or one file's text, → one `ClusterSnapshot`.

use super::parse::Loader;
use super::read::{DEFAULT_MAX_FILE_BYTES, LoadError, manifest_files, read_manifest};
use crate::model::ClusterSnapshot;
use std::path::Path;

/// Loads `dir` with files of at most `DEFAULT_MAX_FILE_BYTES`.
pub fn load_dir(dir: &Path) -> Result<ClusterSnapshot, LoadError> {
    load_dir_with_limit(dir, DEFAULT_MAX_FILE_BYTES)
}

/// `load_dir` with files of at most `max_file_bytes` bytes.
pub fn load_dir_with_limit(dir: &Path, max_file_bytes: u64) -> Result<ClusterSnapshot, LoadError> {
    let mut loader = Loader::default();
    for file in manifest_files(dir)? {
        let text = read_manifest(&file, max_file_bytes)?;
        loader.add_file(&file, &text)?;
    }
    Ok(loader.finish())
}

/// Loads one file's text (as if it were the only file of a directory named by `name`).
pub fn load_text(name: &str, text: &str) -> Result<ClusterSnapshot, LoadError> {
    let mut loader = Loader::default();
    loader.add_file(Path::new(name), text)?;
    Ok(loader.finish())
}
