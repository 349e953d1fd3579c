//! The YAML/JSON parsing of manifest files: strict (no duplicate keys, bounded nesting), then
//! typed and converted object by object.

use super::read::{LoadError, Location, MAX_DEPTH};
use crate::model::{ClusterPolicy, ClusterSnapshot, Namespace, NodeInfo, Pod, Policy};
use crate::source::convert::{self, cluster_policy_api as cnp};
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::manifests";

/// One object of a manifest, converted.
pub(super) enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Policy(Policy),
    Node(String, Vec<IpNet>, NodeInfo),
    ClusterPolicy(ClusterPolicy),
}

/// What a run of documents gave: the objects converted before the first error (in order), that
/// error, and how many documents were read.
#[derive(Default)]
pub(super) struct Parsed {
    pub(super) objects: Vec<(Location, Object)>,
    pub(super) error: Option<LoadError>,
    pub(super) documents: usize,
}

/// Parses the documents of `text` (all of `file`, or a run of its whole documents), numbered
/// from 1, stopping at the first error.
pub(super) fn parse_text(file: &Path, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    if let Some(line) = flow_nesting_beyond(text, MAX_DEPTH) {
        parsed.error = Some(LoadError::Unusable {
            file: file.to_path_buf(),
            why: format!(
                "collections nested more than {MAX_DEPTH} levels deep (line {line}); not parsed"
            ),
        });
        return parsed;
    }
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        parsed.documents = index + 1;
        let at = Location {
            file: file.to_path_buf(),
            document: index + 1,
            item: None,
            object: None,
        };
        let value = match (StrictValue { depth: 0 }).deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                parsed.error = Some(LoadError::Document {
                    at,
                    message: format!("not valid YAML/JSON: {e}"),
                });
                return parsed;
            }
        };
        if let Err(e) = convert_value(value, at, &mut parsed.objects) {
            parsed.error = Some(e);
            return parsed;
        }
    }
    parsed
}

#[derive(Default)]
pub(super) struct Loader {
    snapshot: ClusterSnapshot,
    /// Where each object was first defined, to report duplicates.
    seen: BTreeMap<(String, String), Location>,
}

impl Loader {
    /// Adds one file's parsed objects in order; its error, if any, after them (so that an
    /// object defined twice before it is reported as such, as a sequential read would).
    pub(super) fn add(&mut self, parsed: Parsed) -> Result<(), LoadError> {
        for (at, object) in parsed.objects {
            match object {
                Object::Namespace(ns) => {
                    self.remember("Namespace", &ns.name, &at)?;
                    self.snapshot.namespaces.insert(ns.name.clone(), ns);
                }
                Object::Pod(pod) => {
                    self.remember("Pod", &pod.key(), &at)?;
                    self.snapshot.pods_mut().push(pod);
                }
                Object::Policy(pol) => {
                    self.remember("NetworkPolicy", &pol.key(), &at)?;
                    self.snapshot.policies.push(pol);
                }
                Object::Node(name, cidrs, info) => {
                    self.remember("Node", &name, &at)?;
                    self.snapshot.node_pod_cidrs.insert(name.clone(), cidrs);
                    self.snapshot.nodes.insert(name, info);
                }
                Object::ClusterPolicy(cnp) => {
                    self.remember(cnp::KIND, &cnp.name, &at)?;
                    convert::warn_domain_names_once(&cnp);
                    self.snapshot.cluster_policies.push(cnp);
                }
            }
        }
        match parsed.error {
            Some(e) => Err(e),
            None => Ok(()),
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

    pub(super) fn finish(mut self) -> ClusterSnapshot {
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

/// Converts one document's value (an object or a List of them) into `out`, stopping at the
/// first error.
fn convert_value(
    value: serde_json::Value,
    at: Location,
    out: &mut Vec<(Location, Object)>,
) -> Result<(), LoadError> {
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
    let object = match (api_version.as_str(), kind.as_str()) {
        (_, "") => return Err(fail(&at, "has no kind".into())),
        (_, "List")
        | (_, "NamespaceList")
        | (_, "PodList")
        | (_, "NetworkPolicyList")
        | (_, "NodeList")
        | (_, "ClusterNetworkPolicyList") => {
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
                convert_value(item, item_at, out)?;
            }
            return Ok(());
        }
        ("v1", "Namespace") => {
            let ns: core::Namespace = typed(value, &at)?;
            Object::Namespace(convert::namespace(&ns).map_err(|e| fail(&at, e.to_string()))?)
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed(value, &at)?;
            Object::Pod(convert::pod(&pod).map_err(|e| fail(&at, e.to_string()))?)
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let pol: net::NetworkPolicy = typed(value, &at)?;
            Object::Policy(convert::policy(&pol).map_err(|e| fail(&at, e.to_string()))?)
        }
        ("v1", "Node") => {
            let node: core::Node = typed(value, &at)?;
            let (name, cidrs) = convert::pod_cidrs(&node).map_err(|e| fail(&at, e))?;
            let info = convert::node_info(&node).map_err(|e| fail(&at, e.to_string()))?;
            Object::Node(name, cidrs, info)
        }
        (cnp::API_VERSION, cnp::KIND) => {
            let policy: convert::ClusterNetworkPolicy = typed(value, &at)?;
            Object::ClusterPolicy(
                convert::cluster_policy(&policy).map_err(|e| fail(&at, e.to_string()))?,
            )
        }
        (_, "Namespace" | "Pod" | "NetworkPolicy" | "Node" | cnp::KIND) => {
            return Err(fail(
                &at,
                format!("unsupported apiVersion {api_version:?} for {kind}"),
            ));
        }
        _ => {
            tracing::debug!(target: LOG_TARGET, %at, kind, "skipping object of a kind the agent does not use");
            return Ok(());
        }
    };
    out.push((at, object));
    Ok(())
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
pub(super) fn flow_nesting_beyond(text: &str, max: usize) -> Option<usize> {
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
