//! The manifests source: a directory of Kubernetes YAML/JSON files → one `ClusterSnapshot`.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read, in name order;
//! multi-document files and `kind: List` are supported. Namespace, Pod and NetworkPolicy objects
//! are used; other kinds are skipped. Any malformed file fails the whole load, so a half-read
//! directory never reaches the kernel. So does an entry that cannot be read (a dangling symlink,
//! a FIFO, a file without permission): silently skipping it would drop its policies.
//!
//! Entries whose names start with a dot are not read: editors' temporaries, and the `..data` /
//! `..2026_…` entries of a ConfigMap volume, whose files are reached through the top-level
//! symlinks (`name -> ..data/name`), so each is read once.
//!
//! Input is bounded: files larger than `--max-manifest-bytes` and flow collections nested deeper
//! than `MAX_DEPTH` are refused before parsing (the YAML scanner's work grows with the product of
//! tokens and flow depth), and a mapping key given twice is an error, as kubectl makes it.
//!
//! Large files are parsed on several threads, in runs of whole documents (cut only where a line
//! starts with `---`); the result, errors included, is the sequential parse's (`parse_files`).

mod load;
mod parallel;
mod parse;
mod poll;
mod read;

pub use load::{load_dir, load_dir_with_limit, load_text};
pub use poll::DirSource;
pub use read::{DEFAULT_MAX_FILE_BYTES, LoadError, Location, MAX_DEPTH, manifest_files};

#[cfg(test)]
mod tests;
