//! A directory, or one file's text, → one `ClusterSnapshot`.

use super::parallel::parse_files;
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
    // Read the files, then parse them all at once, spread over threads; objects are added in
    // file and document order. A file that cannot be read is reported after the errors of the
    // files before it, as reading and parsing them one by one would.
    let mut files = Vec::new();
    let mut unreadable = None;
    for file in manifest_files(dir)? {
        match read_manifest(&file, max_file_bytes) {
            Ok(text) => files.push((file, text)),
            Err(e) => {
                unreadable = Some(e);
                break;
            }
        }
    }
    let mut loader = Loader::default();
    for parsed in parse_files(&files) {
        loader.add(parsed)?;
    }
    if let Some(e) = unreadable {
        return Err(e);
    }
    let snapshot = loader.finish();
    drop(files);
    release_free_memory();
    Ok(snapshot)
}

/// Hands the memory parsing freed back to the system. The parsing threads each had their own
/// malloc arena; what they freed (the text's events, the typed objects) stays in those arenas,
/// where the compile that follows on another thread cannot reuse it, and would count in the
/// agent's peak resident memory on top of the compile's.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Loads one file's text (as if it were the only file of a directory named by `name`).
pub fn load_text(name: &str, text: &str) -> Result<ClusterSnapshot, LoadError> {
    let mut loader = Loader::default();
    for parsed in parse_files(&[(name.into(), text.to_string())]) {
        loader.add(parsed)?;
    }
    Ok(loader.finish())
}
