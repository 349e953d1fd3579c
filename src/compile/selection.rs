//! What a peer set selects, in canonical form: the identity of a set. Two rules (in any policies,
//! any namespaces) that select the same pods share one set because their selections are equal,
//! and the set's name is a hash of [`PodSelection::encode`], never of a `Debug` string.

use crate::model::{LabelSelector, Labels, Pod, Requirement};
use std::fmt::Write;

/// The namespaces a pod selection looks in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// Every namespace (`namespaceSelector: {}`).
    All,
    /// The namespaces whose labels match (a canonical, non-empty selector).
    Matching(LabelSelector),
    /// One namespace by name: the policy's own, used ONLY when the peer has no namespaceSelector.
    Named(String),
}

/// The pods one peer (or one policy's podSelector) chooses, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodSelection {
    pub namespaces: NamespaceScope,
    /// Canonical; empty selects every pod of those namespaces.
    pub pods: LabelSelector,
}

impl PodSelection {
    /// The selection of a `{namespaceSelector, podSelector}` peer of a policy in
    /// `policy_namespace` (absent selectors as the API defines them).
    pub fn of_peer(
        policy_namespace: &str,
        namespaces: Option<&LabelSelector>,
        pods: Option<&LabelSelector>,
    ) -> PodSelection {
        let namespaces = match namespaces {
            None => NamespaceScope::Named(policy_namespace.to_string()),
            Some(sel) if sel.is_empty() => NamespaceScope::All,
            Some(sel) => NamespaceScope::Matching(sel.canonical()),
        };
        PodSelection {
            namespaces,
            pods: pods.map(LabelSelector::canonical).unwrap_or_default(),
        }
    }

    /// Every pod of the cluster (an egress rule without peers, for its named ports).
    pub fn everything() -> PodSelection {
        PodSelection {
            namespaces: NamespaceScope::All,
            pods: LabelSelector::default(),
        }
    }

    /// Whether `pod` is chosen, given its namespace's labels (`None`: namespace unknown).
    pub fn selects(&self, pod: &Pod, namespace_labels: Option<&Labels>) -> bool {
        self.selects_labels(&pod.namespace, &pod.labels, namespace_labels)
    }

    /// `selects` for a pod given by its namespace and labels.
    pub fn selects_labels(
        &self,
        namespace: &str,
        labels: &Labels,
        namespace_labels: Option<&Labels>,
    ) -> bool {
        let namespace_ok = match &self.namespaces {
            NamespaceScope::All => true,
            NamespaceScope::Matching(sel) => namespace_labels.is_some_and(|l| sel.matches(l)),
            NamespaceScope::Named(name) => namespace == name,
        };
        namespace_ok && self.pods.matches(labels)
    }

    /// Whether the namespace labels going from `old` to `new` can change what this selects.
    pub fn depends_on_namespace_labels(&self, old: Option<&Labels>, new: Option<&Labels>) -> bool {
        match &self.namespaces {
            NamespaceScope::Matching(sel) => {
                old.is_some_and(|l| sel.matches(l)) != new.is_some_and(|l| sel.matches(l))
            }
            NamespaceScope::All | NamespaceScope::Named(_) => false,
        }
    }

    /// The canonical encoding: unambiguous (every string is length-prefixed), independent of
    /// derives and dependency versions, and pinned by a golden test of the set names.
    pub fn encode(&self) -> String {
        let mut out = String::from("pods;ns=");
        match &self.namespaces {
            NamespaceScope::All => out.push_str("all"),
            NamespaceScope::Matching(sel) => {
                out.push_str("sel");
                encode_selector(&mut out, sel);
            }
            NamespaceScope::Named(name) => {
                out.push_str("name");
                put(&mut out, name);
            }
        }
        out.push_str(";pods=");
        encode_selector(&mut out, &self.pods);
        out
    }
}

fn put(out: &mut String, s: &str) {
    let _ = write!(out, "{}:{s}", s.len());
}

fn encode_selector(out: &mut String, sel: &LabelSelector) {
    out.push('{');
    for (k, v) in &sel.match_labels {
        out.push('L');
        put(out, k);
        put(out, v);
    }
    for r in &sel.match_expressions {
        let (tag, key, values) = match r {
            Requirement::In(k, v) => ('I', k, Some(v)),
            Requirement::NotIn(k, v) => ('N', k, Some(v)),
            Requirement::Exists(k) => ('E', k, None),
            Requirement::DoesNotExist(k) => ('D', k, None),
        };
        out.push(tag);
        put(out, key);
        if let Some(values) = values {
            let _ = write!(out, "{};", values.len());
            for v in values {
                put(out, v);
            }
        }
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(labels: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: vec![],
        }
    }

    #[test]
    fn the_policy_namespace_counts_only_without_a_namespace_selector() {
        let teams = sel(&[("team", "a")]);
        let db = sel(&[("app", "db")]);
        assert_eq!(
            PodSelection::of_peer("x", Some(&teams), Some(&db)),
            PodSelection::of_peer("y", Some(&teams), Some(&db)),
        );
        assert_ne!(
            PodSelection::of_peer("x", None, Some(&db)),
            PodSelection::of_peer("y", None, Some(&db)),
        );
        // `{}` and an absent podSelector both mean every pod.
        assert_eq!(
            PodSelection::of_peer("x", None, Some(&LabelSelector::default())),
            PodSelection::of_peer("x", None, None),
        );
        assert_eq!(
            PodSelection::of_peer("x", Some(&LabelSelector::default()), None),
            PodSelection::everything(),
        );
    }

    #[test]
    fn encoding_is_unambiguous() {
        // Without length prefixes these two would both read "a=b=c".
        let one = PodSelection::of_peer("x", None, Some(&sel(&[("a=b", "c")])));
        let two = PodSelection::of_peer("x", None, Some(&sel(&[("a", "b=c")])));
        assert_ne!(one.encode(), two.encode());
        assert_eq!(
            PodSelection::of_peer("ns", None, Some(&sel(&[("app", "db")]))).encode(),
            "pods;ns=name2:ns;pods={L3:app2:db}"
        );
    }
}
