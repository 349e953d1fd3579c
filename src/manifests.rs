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

use crate::convert;
use crate::model::ClusterSnapshot;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The default for `--max-manifest-bytes`: well above any realistic policy file (a ConfigMap
/// holds at most 1 MiB), while parsing one this large stays within the DaemonSet's memory limit.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The deepest nesting of mappings and sequences accepted. Kubernetes objects need about 10.
pub const MAX_DEPTH: usize = 64;

static MAX_FILE_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_FILE_BYTES);

/// Sets the largest manifest file loaded (`--max-manifest-bytes`), for the whole process: the CLI
/// sets it once at start.
pub fn set_max_file_bytes(bytes: u64) {
    MAX_FILE_BYTES.store(bytes, Ordering::Relaxed);
}

fn max_file_bytes() -> u64 {
    MAX_FILE_BYTES.load(Ordering::Relaxed)
}

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
fn read_manifest(file: &Path, limit: u64) -> Result<String, LoadError> {
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

pub fn load_dir(dir: &Path) -> Result<ClusterSnapshot, LoadError> {
    load_dir_with_limit(dir, max_file_bytes())
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

#[derive(Default)]
struct Loader {
    snapshot: ClusterSnapshot,
    /// Where each object was first defined, to report duplicates.
    seen: BTreeMap<(String, String), Location>,
}

impl Loader {
    fn add_file(&mut self, file: &Path, text: &str) -> Result<(), LoadError> {
        if let Some(line) = flow_nesting_beyond(text, MAX_DEPTH) {
            return Err(LoadError::Unusable {
                file: file.to_path_buf(),
                why: format!(
                    "collections nested more than {MAX_DEPTH} levels deep (line {line}); not parsed"
                ),
            });
        }
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let at = Location {
                file: file.to_path_buf(),
                document: index + 1,
                item: None,
                object: None,
            };
            let value = StrictValue { depth: 0 }
                .deserialize(document)
                .map_err(|e| LoadError::Document {
                    at: at.clone(),
                    message: format!("not valid YAML/JSON: {e}"),
                })?;
            self.add_value(value, at)?;
        }
        Ok(())
    }

    fn add_value(&mut self, value: serde_json::Value, at: Location) -> Result<(), LoadError> {
        let fail = |at: &Location, message: String| LoadError::Document {
            at: at.clone(),
            message,
        };
        match &value {
            serde_json::Value::Null => return Ok(()), // empty document, e.g. a trailing `---`
            serde_json::Value::Object(_) => {}
            _ => {
                return Err(fail(
                    &at,
                    "expected a Kubernetes object (a mapping with kind)".into(),
                ));
            }
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let mut at = at;
        at.object = Some(describe(&kind, &value));
        match (api_version.as_str(), kind.as_str()) {
            (_, "") => Err(fail(&at, "has no kind".into())),
            (_, "List")
            | (_, "NamespaceList")
            | (_, "PodList")
            | (_, "NetworkPolicyList")
            | (_, "NodeList") => {
                let mut value = value;
                let items = match value.get_mut("items").map(serde_json::Value::take) {
                    None | Some(serde_json::Value::Null) => return Ok(()),
                    Some(serde_json::Value::Array(items)) => items,
                    Some(_) => return Err(fail(&at, "items must be a list".into())),
                };
                let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
                for (i, mut item) in items.into_iter().enumerate() {
                    // Typed lists may leave kind out of their items.
                    if let (Some(k), Some(obj)) = (item_kind, item.as_object_mut()) {
                        obj.entry("kind").or_insert_with(|| k.into());
                        obj.entry("apiVersion")
                            .or_insert_with(|| api_version.clone().into());
                    }
                    let item_at = Location {
                        item: Some(i),
                        object: None,
                        ..at.clone()
                    };
                    self.add_value(item, item_at)?;
                }
                Ok(())
            }
            ("v1", "Namespace") => {
                let ns: core::Namespace = typed(value, &at)?;
                let ns = convert::namespace(&ns).map_err(|e| fail(&at, e.to_string()))?;
                self.remember("Namespace", &ns.name, &at)?;
                self.snapshot.namespaces.insert(ns.name.clone(), ns);
                Ok(())
            }
            ("v1", "Pod") => {
                let pod: core::Pod = typed(value, &at)?;
                let pod = convert::pod(&pod).map_err(|e| fail(&at, e.to_string()))?;
                self.remember("Pod", &pod.key(), &at)?;
                self.snapshot.pods.push(pod);
                Ok(())
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                let pol: net::NetworkPolicy = typed(value, &at)?;
                let pol = convert::policy(&pol).map_err(|e| fail(&at, e.to_string()))?;
                self.remember("NetworkPolicy", &pol.key(), &at)?;
                self.snapshot.policies.push(pol);
                Ok(())
            }
            ("v1", "Node") => {
                let node: core::Node = typed(value, &at)?;
                let (name, cidrs) =
                    crate::node_source::pod_cidrs(&node).map_err(|e| fail(&at, e))?;
                self.remember("Node", &name, &at)?;
                self.snapshot.node_pod_cidrs.insert(name, cidrs);
                Ok(())
            }
            (_, "Namespace" | "Pod" | "NetworkPolicy" | "Node") => Err(fail(
                &at,
                format!("unsupported apiVersion {api_version:?} for {kind}"),
            )),
            _ => {
                tracing::debug!(%at, kind, "skipping object of a kind the agent does not use");
                Ok(())
            }
        }
    }

    fn remember(&mut self, kind: &str, key: &str, at: &Location) -> Result<(), LoadError> {
        if let Some(first) = self
            .seen
            .insert((kind.to_string(), key.to_string()), at.clone())
        {
            return Err(LoadError::Document {
                at: at.clone(),
                message: format!("{kind} {key} is defined twice (first at {first})"),
            });
        }
        Ok(())
    }

    fn finish(mut self) -> ClusterSnapshot {
        // The API server would not accept objects in a namespace that does not exist; for a
        // directory of manifests we assume the namespace, with the labels the server would set.
        let used: Vec<String> = self
            .snapshot
            .pods
            .iter()
            .map(|p| p.namespace.clone())
            .chain(self.snapshot.policies.iter().map(|p| p.namespace.clone()))
            .collect();
        for name in used {
            self.snapshot
                .namespaces
                .entry(name.clone())
                .or_insert_with(|| convert::implicit_namespace(&name, Default::default()));
        }
        self.snapshot
    }
}

/// Builds a `serde_json::Value` like its own `Deserialize`, but refuses a mapping key given twice
/// (kubectl does: sigs.k8s.io/yaml for YAML, sigs.k8s.io/json's DisallowDuplicateFields for
/// JSON) instead of letting the last one win, and nesting deeper than `MAX_DEPTH`.
struct StrictValue {
    depth: usize,
}

impl StrictValue {
    fn nested<E: serde::de::Error>(&self) -> Result<StrictValue, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "collections nested more than {MAX_DEPTH} levels deep"
            )));
        }
        Ok(StrictValue {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = serde_json::Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.nested()?)? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate mapping key {key:?}"
                )));
            }
            let value = map.next_value_seed(self.nested()?)?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// The line where flow collections (`[…]`, `{…}`, JSON) first nest deeper than `max`, if they
/// do. A linear scan run before the YAML parser, whose scanner costs O(tokens × flow depth) and
/// reads a whole document before its own recursion limit applies (600 KB of `[` took 88 s).
/// Brackets count only where YAML starts a node: not inside quoted, plain or block scalars or
/// comments. Block collections need no check: their depth costs indentation, bounded by the
/// file size limit, and the parser's recursion limit stops them.
fn flow_nesting_beyond(text: &str, max: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut line = 1usize;
    // At a position where a node may start (so `[`, `{`, a quote or `|` means something).
    let mut node_start = true;
    // Inside a block scalar (`|`, `>`) introduced on a line indented this much.
    let mut block_scalar: Option<usize> = None;
    let mut line_indent = 0usize;
    let mut at_line_start = true;
    let mut i = 0;
    let space_or_end =
        |j: usize| j >= bytes.len() || matches!(bytes[j], b' ' | b'\t' | b'\r' | b'\n');
    while i < bytes.len() {
        let c = bytes[i];
        if at_line_start {
            let indent = bytes[i..].iter().take_while(|b| **b == b' ').count();
            let rest = &bytes[i + indent..];
            let blank = rest.first().is_none_or(|b| matches!(b, b'\n' | b'\r'));
            if let Some(parent) = block_scalar {
                if blank || indent > parent {
                    // A line of the block scalar's text: skip it whole.
                    let end = rest
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(bytes.len(), |p| i + indent + p + 1);
                    line += 1;
                    i = end;
                    continue;
                }
                block_scalar = None;
            }
            line_indent = indent;
            at_line_start = false;
            if depth == 0 {
                node_start = true;
            }
            i += indent;
            continue;
        }
        match c {
            b'\n' => {
                line += 1;
                at_line_start = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {}
            b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => {
                // A comment, to the end of the line.
                i = bytes[i..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |p| i + p);
                continue;
            }
            b'[' | b'{' if node_start || depth > 0 => {
                depth += 1;
                if depth > max {
                    return Some(line);
                }
                node_start = true;
            }
            b']' | b'}' if depth > 0 => {
                depth -= 1;
                node_start = false;
            }
            b',' if depth > 0 => node_start = true,
            b':' if depth > 0 || space_or_end(i + 1) => node_start = true,
            b'-' | b'?' if node_start && space_or_end(i + 1) => {}
            b'-' if node_start
                && depth == 0
                && bytes[i..].starts_with(b"---")
                && space_or_end(i + 3) =>
            {
                i += 3;
                continue;
            }
            b'"' | b'\'' if node_start => {
                // A quoted scalar, possibly over several lines.
                let mut j = i + 1;
                while j < bytes.len() {
                    match bytes[j] {
                        b'\\' if c == b'"' => j += 1,
                        b'\'' if c == b'\'' && bytes.get(j + 1) == Some(&b'\'') => j += 1,
                        b'\n' => line += 1,
                        q if q == c => break,
                        _ => {}
                    }
                    j += 1;
                }
                i = j + 1;
                node_start = false;
                continue;
            }
            b'|' | b'>' if node_start && depth == 0 => {
                block_scalar = Some(line_indent);
                i = bytes[i..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |p| i + p);
                continue;
            }
            b'&' | b'!' if node_start => {
                // An anchor or a tag: the node follows it.
                i = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b' ' | b'\t' | b'\n'))
                    .map_or(bytes.len(), |p| i + p);
                continue;
            }
            _ => node_start = false,
        }
        i += 1;
    }
    None
}

fn describe(kind: &str, value: &serde_json::Value) -> String {
    let meta = value.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(|v| v.as_str());
    match (field("namespace"), field("name")) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => kind.to_string(),
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    at: &Location,
) -> Result<T, LoadError> {
    serde_json::from_value(value).map_err(|e| LoadError::Document {
        at: at.clone(),
        message: format!(
            "does not match the {} schema: {e}",
            std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("object")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p =
                std::env::temp_dir().join(format!("kni-manifests-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::File::create(self.0.join(name))
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_multi_document_lists_and_json_and_skips_other_kinds() {
        let d = TempDir::new("multi");
        d.write(
            "a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a, namespace: x}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: p, namespace: y}\n  spec: {podSelector: {}}\n",
        );
        d.write(
            "b.json",
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"b","namespace":"x"}}"#,
        );
        d.write("notes.txt", "not a manifest");
        d.write(".a.yaml.swp", "garbage: [");
        let s = load_dir(&d.0).unwrap();
        assert_eq!(s.pods.len(), 2);
        assert_eq!(s.policies.len(), 1);
        assert_eq!(s.namespaces["x"].labels["ns"], "x");
        // Namespace y is implied by the policy, with the label the API server sets.
        assert_eq!(s.namespaces["y"].labels[convert::NAMESPACE_NAME_LABEL], "y");
    }

    #[test]
    fn errors_name_the_file_and_document() {
        let d = TempDir::new("bad");
        d.write(
            "ok.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        );
        d.write(
            "pol.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 70}]}]}\n",
        );
        let err = load_dir(&d.0).unwrap_err().to_string();
        assert!(
            err.contains("pol.yaml document 2 (NetworkPolicy x/bad)"),
            "{err}"
        );
        assert!(
            err.contains("spec.ingress[0].ports[0].endPort: 70 is below port 80"),
            "{err}"
        );

        let d = TempDir::new("syntax");
        d.write("s.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n");
        let err = load_dir(&d.0).unwrap_err().to_string();
        assert!(
            err.contains("s.yaml document 1") && err.contains("not valid YAML"),
            "{err}"
        );

        let d = TempDir::new("schema");
        d.write(
            "s.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: 7}\n",
        );
        let err = load_dir(&d.0).unwrap_err().to_string();
        assert!(
            err.contains("s.yaml document 1 (Pod a)") && err.contains("schema"),
            "{err}"
        );

        let d = TempDir::new("dup");
        d.write("a.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n");
        let err = load_dir(&d.0).unwrap_err().to_string();
        assert!(err.contains("defined twice"), "{err}");

        let err = load_dir(Path::new("/nonexistent/kni"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read manifests directory"), "{err}");
    }

    const POD_X_A: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n";

    /// A ConfigMap volume as the kubelet writes it: `name -> ..data/name`, `..data -> ..<ts>`, and
    /// an update swaps `..data` atomically.
    #[test]
    fn reads_a_configmap_volume_once_and_follows_its_updates() {
        use std::os::unix::fs::symlink;
        let d = TempDir::new("configmap");
        let publish = |ts: &str, text: &str| {
            std::fs::create_dir(d.0.join(ts)).unwrap();
            std::fs::write(d.0.join(ts).join("pods.yaml"), text).unwrap();
            symlink(ts, d.0.join("..data_tmp")).unwrap();
            std::fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).unwrap();
        };
        publish("..2026_11_23_10_00_00.1", POD_X_A);
        symlink("..data/pods.yaml", d.0.join("pods.yaml")).unwrap();
        let s = load_dir(&d.0).unwrap();
        assert_eq!(s.pods.len(), 1, "read once, not also through ..data");
        publish(
            "..2026_11_23_10_05_00.2",
            &format!(
                "{POD_X_A}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: x}}\n"
            ),
        );
        std::fs::remove_dir_all(d.0.join("..2026_11_23_10_00_00.1")).unwrap();
        assert_eq!(load_dir(&d.0).unwrap().pods.len(), 2);
    }

    /// Runs `f` on a thread and fails the test if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("blocked")
    }

    #[test]
    fn an_entry_that_cannot_be_read_fails_the_load() {
        let d = TempDir::new("dangling");
        d.write("a.yaml", POD_X_A);
        std::os::unix::fs::symlink("..data/gone.yaml", d.0.join("gone.yaml")).unwrap();
        // Not manifests: ignored even when dangling.
        std::os::unix::fs::symlink("nowhere", d.0.join("notes.txt")).unwrap();
        std::os::unix::fs::symlink("nowhere", d.0.join("..data")).unwrap();
        let err = load_dir(&d.0).unwrap_err().to_string();
        assert!(
            err.contains("gone.yaml") && err.contains("No such file"),
            "{err}"
        );

        let d = TempDir::new("fifo");
        d.write("a.yaml", POD_X_A);
        let fifo = d.0.join("pipe.yaml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let dir = d.0.clone();
        let err = within_10s(move || load_dir(&dir).unwrap_err().to_string());
        assert!(err.contains("pipe.yaml") && err.contains("FIFO"), "{err}");
        // Even when handed the FIFO directly, reading does not block.
        let err = within_10s(move || read_manifest(&fifo, 100).unwrap_err().to_string());
        assert!(err.contains("FIFO"), "{err}");
    }

    #[test]
    fn duplicate_keys_are_rejected_with_file_document_and_key() {
        let dup = |text: &str| load_text("d.yaml", text).unwrap_err().to_string();
        let err = dup(&format!(
            "{POD_X_A}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {{podSelector: {{}}}}\nspec: {{podSelector: {{}}, ingress: [{{}}]}}\n"
        ));
        assert!(
            err.contains("d.yaml document 2") && err.contains("duplicate mapping key \"spec\""),
            "{err}"
        );
        let err = dup("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: x, app: y}}\n");
        assert!(err.contains("duplicate mapping key \"app\""), "{err}");
        // JSON, as sigs.k8s.io/json's strict decoding reports duplicate fields.
        let err = dup(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","name":"b"}}"#);
        assert!(err.contains("duplicate mapping key \"name\""), "{err}");
        // The same key in different mappings is fine.
        assert!(
            load_text(
                "ok.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {name: a}}\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn deep_nesting_is_rejected_quickly() {
        let started = std::time::Instant::now();
        for deep in [
            format!("{}{}", "[".repeat(300_000), "]".repeat(300_000)),
            format!("{}1{}", r#"{"a":"#.repeat(120_000), "}".repeat(120_000)),
            format!("items: {}{}", "[\n".repeat(100_000), "]".repeat(100_000)),
            format!(
                "kind: List\nitems:\n- a: {}1{}",
                "{b: ".repeat(65),
                "}".repeat(65)
            ),
        ] {
            let err = load_text("deep.json", &deep).unwrap_err().to_string();
            assert!(
                err.contains("deep.json") && err.contains("nested more than 64 levels"),
                "{err}"
            );
        }
        // Block nesting is not the scanner's problem but still bounded.
        let mut block = String::new();
        for level in 0..70 {
            block.push_str(&format!("{}k:\n", " ".repeat(level)));
        }
        let err = load_text("block.yaml", &block).unwrap_err().to_string();
        assert!(err.contains("nested more than 64 levels"), "{err}");
        // A regression guard, far above the milliseconds this takes (88 s before).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn brackets_outside_flow_collections_do_not_count_as_nesting() {
        let many = "[{".repeat(100);
        let text = format!(
            "apiVersion: v1 # {many}\nkind: Pod\nmetadata:\n  name: a\n  annotations:\n    plain: x{many}\n    double: \"{many}\\\" {many}\"\n    single: '{many}'' {many}'\n    block: |\n      {many}\n      {many}\n    folded: >-\n      {many}\nflow: {{k: \"{many}\", j: [a, '{many}']}}\n"
        );
        assert_eq!(flow_nesting_beyond(&text, MAX_DEPTH), None);
        if let Err(e) = load_text("brackets.yaml", &text) {
            panic!("{e}\n{text}");
        }
        assert_eq!(flow_nesting_beyond("a: [[[[]]]]\n", 3), Some(1));
        assert_eq!(
            flow_nesting_beyond("a:\n- |\n  x\n- [[\n  [[]]]]\n", 3),
            Some(5)
        );
        assert_eq!(flow_nesting_beyond("--- [[[[]]]]\n", 3), Some(1));
    }

    #[test]
    fn file_size_is_capped_and_large_valid_files_load() {
        let d = TempDir::new("size");
        let pods: Vec<String> = (0..5000)
            .map(|i| format!("- {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: x}}, status: {{podIP: 10.0.{}.{}}}}}", i / 250, i % 250 + 1))
            .collect();
        let list = format!("apiVersion: v1\nkind: List\nitems:\n{}\n", pods.join("\n"));
        d.write("big.yaml", &list);
        let size = list.len() as u64;
        assert_eq!(load_dir_with_limit(&d.0, size).unwrap().pods.len(), 5000);
        let err = load_dir_with_limit(&d.0, size - 1).unwrap_err().to_string();
        assert!(
            err.contains("big.yaml")
                && err.contains(&format!("over the limit of {} bytes", size - 1)),
            "{err}"
        );
        // A 200 GB sparse file is refused without being read.
        let huge = std::fs::File::create(d.0.join("huge.json")).unwrap();
        huge.set_len(200 << 30).unwrap();
        let err = within_10s({
            let dir = d.0.clone();
            move || load_dir(&dir).unwrap_err().to_string()
        });
        assert!(
            err.contains("huge.json") && err.contains("16777216 bytes"),
            "{err}"
        );
    }
}
