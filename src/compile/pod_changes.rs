//! Which pods of a snapshot differ from those the peer selections know: all of them compared,
//! only those a source names (`PodsChanged`), or none when the list is the very one seen before.

use super::known_pod::KnownPod;
use crate::model::{ClusterSnapshot, Pod};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A pod's key (`namespace/name`), allocated once and shared by every entry that chose the pod.
pub(super) type Key = Arc<str>;

/// How a snapshot's pods relate to those of the previous update.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PodsSeen<'k> {
    /// The very same list: only namespaces are compared.
    Same,
    /// That list with only the pods of these `namespace/name` keys added, changed or removed
    /// (a source's `PodsChanged`): only those are compared.
    Changed(&'k [String]),
    /// Anything: every pod is compared.
    Unknown,
}

/// Whether `pods` is strictly sorted by namespace and name (no key twice).
fn sorted_by_key(pods: &[Pod]) -> bool {
    pods.windows(2).all(|w| w[0].sort_key() < w[1].sort_key())
}

/// The pods of `snapshot` that are new or differ from `known` (by key), and the keys of every
/// pod added, changed or gone (or no longer policy-relevant).
pub(super) fn compare<'s>(
    known: &HashMap<Key, KnownPod>,
    snapshot: &'s ClusterSnapshot,
    pods: PodsSeen,
) -> (HashMap<Key, &'s Pod>, BTreeSet<Key>) {
    let pods = match pods {
        // Found by binary search: only in a list sorted by namespace and name, as the
        // sources that send changed keys promise; otherwise every pod is compared.
        PodsSeen::Changed(_) if !sorted_by_key(&snapshot.pods) => PodsSeen::Unknown,
        other => other,
    };
    let compared: Vec<&Pod> = match pods {
        PodsSeen::Same => vec![],
        PodsSeen::Changed(keys) => keys
            .iter()
            .filter_map(|key| {
                let (namespace, name) = key.split_once('/')?;
                let at = snapshot
                    .pods
                    .binary_search_by(|p| p.sort_key().cmp(&(namespace, name)))
                    .ok()?;
                Some(&snapshot.pods[at])
            })
            .collect(),
        PodsSeen::Unknown => snapshot.pods.iter().collect(),
    };
    // Compare in place: one reusable key buffer, no map of the whole snapshot. A key seen
    // twice keeps its last pod, as a map built from the list would.
    let mut key_buf = String::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(compared.len());
    let mut new_pods: HashMap<Key, &Pod> = HashMap::new();
    let mut known_seen = 0;
    for p in compared.into_iter().filter(|p| p.is_policy_relevant()) {
        key_buf.clear();
        key_buf.push_str(&p.namespace);
        key_buf.push('/');
        key_buf.push_str(&p.name);
        let first = seen.insert((&p.namespace, &p.name));
        match known.get(key_buf.as_str()) {
            Some(old) => {
                known_seen += usize::from(first);
                if old.same_as(p) {
                    if !new_pods.is_empty() {
                        new_pods.remove(key_buf.as_str());
                    }
                } else {
                    new_pods.insert(Key::from(key_buf.as_str()), p);
                }
            }
            None => {
                new_pods.insert(Key::from(key_buf.as_str()), p);
            }
        }
    }
    let mut changed_pods: BTreeSet<Key> = new_pods.keys().cloned().collect();
    // Known pods gone from the snapshot (or no longer policy-relevant).
    let unseen = |key: &str| {
        let (ns, name) = key.split_once('/').expect("a pod key has a slash");
        !seen.contains(&(ns, name))
    };
    match pods {
        PodsSeen::Same => {}
        PodsSeen::Changed(keys) => changed_pods.extend(
            keys.iter()
                .filter(|k| known.contains_key(k.as_str()) && unseen(k))
                .map(|k| Key::from(k.as_str())),
        ),
        PodsSeen::Unknown if known_seen < known.len() => {
            changed_pods.extend(known.keys().filter(|k| unseen(k)).cloned())
        }
        PodsSeen::Unknown => {}
    }
    (new_pods, changed_pods)
}
