//! The manifests source: a directory of Kubernetes YAML/JSON files → one `ClusterSnapshot`.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read, in name order;
//! multi-document files and `kind: List` are supported. Namespace, Pod and NetworkPolicy objects
//! are used; other kinds are skipped. Any malformed file fails the whole load, so a half-read
//! directory never reaches the kernel.

use crate::convert;
use crate::model::ClusterSnapshot;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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

/// The manifest files of `dir`, sorted by name.
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
        // Editors' and tools' hidden temporaries (".foo.yaml.swp", ".#foo.yaml") are not manifests.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if wanted && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub fn load_dir(dir: &Path) -> Result<ClusterSnapshot, LoadError> {
    let mut loader = Loader::default();
    for file in manifest_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::File {
            file: file.clone(),
            source,
        })?;
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
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let at = Location {
                file: file.to_path_buf(),
                document: index + 1,
                item: None,
                object: None,
            };
            let value =
                serde_json::Value::deserialize(document).map_err(|e| LoadError::Document {
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
            (_, "List") | (_, "NamespaceList") | (_, "PodList") | (_, "NetworkPolicyList") => {
                let items = match value.get("items") {
                    None | Some(serde_json::Value::Null) => return Ok(()),
                    Some(serde_json::Value::Array(items)) => items.clone(),
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
            (_, "Namespace" | "Pod" | "NetworkPolicy") => Err(fail(
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
}
