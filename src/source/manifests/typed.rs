//! The fast route from YAML to the objects we use: a Namespace, Pod, NetworkPolicy or Node whose
//! `apiVersion` and `kind` come before its other fields (as kubectl and most tools write them)
//! is deserialized into its k8s-openapi type straight from the YAML events, through the checks
//! of [`Strict`], without building a `serde_json::Value` of it first (that step was a third of
//! the load of a large file). Anything else in a document (other kinds, fields before `kind`) is
//! read into a `Value` and converted as before (`parse::convert_value`).
//!
//! Any error ends this route for the whole text: the caller parses it again the general way,
//! which reports the error with its usual wording and location. So this route only has to be
//! right on valid input, and must refuse whatever the general route refuses.

use super::parse::{Object, Parsed, StrictValue, convert_value, flow_nesting_beyond, parse_text};
use super::read::{Location, MAX_DEPTH};
use super::strict::Strict;
use crate::source::convert;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, IntoDeserializer, MapAccess,
    SeqAccess, Visitor,
};
use std::fmt;
use std::path::Path;

/// Parses the documents of `text` as `parse::parse_text` does (same objects, same errors): this
/// route first, the general one if this one gives up.
pub(super) fn parse(file: &Path, text: &str) -> Parsed {
    // Deep flow nesting is refused before any YAML parser sees it (see `flow_nesting_beyond`).
    if flow_nesting_beyond(text, MAX_DEPTH).is_some() {
        return parse_text(file, text);
    }
    parse_typed(file, text).unwrap_or_else(|| parse_text(file, text))
}

/// The documents of `text` converted, or `None` if anything in it is not valid (then the general
/// route gives the error).
pub(super) fn parse_typed(file: &Path, text: &str) -> Option<Parsed> {
    let mut parsed = Parsed::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        parsed.documents = index + 1;
        let mut ctx = Context {
            file,
            document: index + 1,
            out: &mut parsed.objects,
        };
        let seed = ObjectSeed {
            ctx: &mut ctx,
            item: None,
            defaults: None,
            depth: 0,
        };
        let root = Strict {
            inner: document,
            depth: 0,
        };
        if seed.deserialize(root).is_err() {
            return None;
        }
    }
    Some(parsed)
}

struct Context<'a> {
    file: &'a Path,
    document: usize,
    out: &'a mut Vec<(Location, Object)>,
}

impl Context<'_> {
    fn at(&self, item: Option<usize>, object: Option<String>) -> Location {
        Location {
            file: self.file.to_path_buf(),
            document: self.document,
            item,
            object,
        }
    }
}

/// One object (a document, or an item of a List) at `depth`; `defaults` are the kind and
/// apiVersion a typed List gives items that leave them out.
struct ObjectSeed<'c, 'a> {
    ctx: &'c mut Context<'a>,
    item: Option<usize>,
    defaults: Option<(&'c str, &'c str)>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object (a mapping with kind)")
    }

    /// An empty document, e.g. after a trailing `---`.
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<String> = None;
        let mut fields = serde_json::Map::new();
        let mut only_type_fields = true;
        let mut listed = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "apiVersion" || key == "kind" {
                let value = map.next_value_seed(StrictValue::at(self.depth + 1))?;
                let text = value.as_str().map(str::to_string);
                if key == "kind" {
                    kind = text;
                } else {
                    api_version = text;
                }
                fields.insert(key, value);
                continue;
            }
            if only_type_fields {
                if let Some(list_kind) = kind.as_deref().filter(|k| is_list(k)) {
                    // A list's own kind (an item's default is never a list): its items, each
                    // an object; its other fields (metadata) are read for the checks only.
                    if key == "items" {
                        let item_kind = list_kind.strip_suffix("List").filter(|k| !k.is_empty());
                        let api = api_version.as_deref().unwrap_or_default();
                        map.next_value_seed(ItemsSeed {
                            ctx: &mut *self.ctx,
                            defaults: item_kind.map(|k| (k, api)),
                            depth: self.depth + 1,
                        })?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                    listed = true;
                    continue;
                }
                let (default_kind, default_api) = self.defaults.unzip();
                let api = api_version.as_deref().or(default_api);
                if let (Some(api), Some(kind)) = (api, kind.as_deref().or(default_kind))
                    && fast_kind(api, kind)
                {
                    let replay = Replay {
                        prefix: [("apiVersion", api.to_string()), ("kind", kind.to_string())]
                            .into_iter(),
                        prefix_value: None,
                        key: Some(key),
                        map,
                    };
                    let (object, meta) = typed_object(api, kind, replay)?;
                    let at = self.ctx.at(self.item, Some(describe(kind, &meta)));
                    self.ctx.out.push((at, object));
                    return Ok(());
                }
                only_type_fields = false;
            }
            let value = map.next_value_seed(StrictValue::at(self.depth + 1))?;
            fields.insert(key, value);
        }
        if listed {
            return Ok(());
        }
        // The general route, for this object only.
        if let Some((default_kind, default_api)) = self.defaults {
            fields.entry("kind").or_insert_with(|| default_kind.into());
            fields
                .entry("apiVersion")
                .or_insert_with(|| default_api.into());
        }
        let at = self.ctx.at(self.item, None);
        convert_value(serde_json::Value::Object(fields), at, self.ctx.out)
            .map_err(|e| de::Error::custom(e.to_string()))
    }
}

/// The kinds this route deserializes itself (the arms of `parse::convert_value` it mirrors).
fn fast_kind(api_version: &str, kind: &str) -> bool {
    matches!(
        (api_version, kind),
        ("v1", "Namespace" | "Pod" | "Node") | ("networking.k8s.io/v1", "NetworkPolicy")
    )
}

fn is_list(kind: &str) -> bool {
    matches!(
        kind,
        "List" | "NamespaceList" | "PodList" | "NetworkPolicyList" | "NodeList"
    )
}

fn typed_object<'de, A: MapAccess<'de>>(
    api_version: &str,
    kind: &str,
    replay: Replay<A>,
) -> Result<(Object, ObjectMeta), A::Error> {
    let invalid = |e: String| de::Error::custom(e);
    let d = ReplayDeserializer(replay);
    Ok(match (api_version, kind) {
        ("v1", "Namespace") => {
            let ns = core::Namespace::deserialize(d)?;
            let object = convert::namespace(&ns).map_err(|e| invalid(e.to_string()))?;
            (Object::Namespace(object), ns.metadata)
        }
        ("v1", "Pod") => {
            let pod = core::Pod::deserialize(d)?;
            let object = convert::pod(&pod).map_err(|e| invalid(e.to_string()))?;
            (Object::Pod(object), pod.metadata)
        }
        ("v1", "Node") => {
            let node = core::Node::deserialize(d)?;
            let (name, cidrs) = convert::pod_cidrs(&node).map_err(invalid)?;
            (Object::Node(name, cidrs), node.metadata)
        }
        _ => {
            let policy = net::NetworkPolicy::deserialize(d)?;
            let object = convert::policy(&policy).map_err(|e| invalid(e.to_string()))?;
            (Object::Policy(object), policy.metadata)
        }
    })
}

/// As `parse::describe` names an object.
fn describe(kind: &str, meta: &ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => kind.to_string(),
    }
}

/// The items of a List, each an object.
struct ItemsSeed<'c, 'a> {
    ctx: &'c mut Context<'a>,
    defaults: Option<(&'c str, &'c str)>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of objects")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            let seed = ObjectSeed {
                ctx: &mut *self.ctx,
                item: Some(index),
                defaults: self.defaults,
                depth: self.depth + 1,
            };
            if seq.next_element_seed(seed)?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }
}

/// The fields of an object whose `apiVersion`, `kind` and first other key were already read:
/// those three first, then the rest of `map`.
struct Replay<A> {
    prefix: std::array::IntoIter<(&'static str, String), 2>,
    prefix_value: Option<String>,
    /// The first other key; its value is still in `map`.
    key: Option<String>,
    map: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        if let Some((key, value)) = self.prefix.next() {
            self.prefix_value = Some(value);
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
        if let Some(key) = self.key.take() {
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
        self.map.next_key_seed(seed)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        match self.prefix_value.take() {
            Some(value) => seed.deserialize(value.into_deserializer()),
            None => self.map.next_value_seed(seed),
        }
    }
}

struct ReplayDeserializer<A>(Replay<A>);

impl<'de, A: MapAccess<'de>> Deserializer<'de> for ReplayDeserializer<A> {
    type Error = A::Error;
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(self.0)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}
