//! The store of converted objects the watchers fill and the reconcile loop reads.

use crate::model::{ClusterSnapshot, Namespace, Pod, Policy};
use crate::source::Source;
use crate::source::change_times::ChangeTimes;
use crate::source::convert::{self, InvalidField};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Mutex;
use tokio::sync::Notify;

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::kube_source";

#[derive(Default)]
pub(super) struct Store {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<String, Pod>,
    policies: BTreeMap<String, Policy>,
    /// Objects that failed conversion, by kind and key, with the reason.
    invalid: BTreeMap<(&'static str, String), String>,
    /// This node's pod CIDRs, from its Node object (see `node`).
    node_pod_cidrs: BTreeMap<String, Vec<ipnet::IpNet>>,
    listed: [bool; 3],
    generation: u64,
}

/// The store shared by the watchers and the sync loop.
#[derive(Default)]
pub struct ClusterStore {
    inner: Mutex<Store>,
    changed: Notify,
    change_times: ChangeTimes,
}

impl ClusterStore {
    /// Waits until something changed since the last call (or a change was already pending).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Bumped on every change; `None` until every kind has listed once.
    pub fn generation(&self) -> Option<u64> {
        let s = self.inner.lock().unwrap();
        s.listed.iter().all(|l| *l).then_some(s.generation)
    }

    /// The cluster as last seen, once every kind has listed; `None` before.
    pub fn snapshot(&self) -> Option<(u64, ClusterSnapshot)> {
        let s = self.inner.lock().unwrap();
        if !s.listed.iter().all(|l| *l) {
            return None;
        }
        let mut snapshot = ClusterSnapshot {
            namespaces: s
                .namespaces
                .values()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            pods: s.pods.values().cloned().collect(),
            policies: s.policies.values().cloned().collect(),
            node_pod_cidrs: s.node_pod_cidrs.clone(),
            ..ClusterSnapshot::default()
        };
        snapshot
            .pods
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Some((s.generation, snapshot))
    }

    /// Objects that could not be used, by kind.
    pub fn invalid_counts(&self) -> BTreeMap<&'static str, usize> {
        let s = self.inner.lock().unwrap();
        let mut counts: BTreeMap<&'static str, usize> =
            [("Namespace", 0), ("Pod", 0), ("NetworkPolicy", 0)].into();
        for (kind, _) in s.invalid.keys() {
            *counts.entry(kind).or_default() += 1;
        }
        counts
    }

    /// Records `node`'s pod CIDRs (a change is a change like any other: the loop syncs).
    pub fn set_node_pod_cidrs(&self, node: &str, cidrs: Vec<ipnet::IpNet>) {
        if self.inner.lock().unwrap().node_pod_cidrs.get(node) == Some(&cidrs) {
            return;
        }
        self.update(|s| {
            s.node_pod_cidrs.insert(node.to_string(), cidrs);
        });
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Store)) {
        let mut s = self.inner.lock().unwrap();
        f(&mut s);
        s.generation += 1;
        self.change_times.record(s.generation);
        drop(s);
        // A permit is kept if nobody waits right now, so no change is ever missed.
        self.changed.notify_one();
    }
}

/// What the store needs to know about each watched kind.
pub(super) trait Kind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const NAME: &'static str;
    const INDEX: usize;
    type Model: Clone + Send;
    fn convert(&self) -> Result<Self::Model, InvalidField>;
    fn map(store: &mut Store) -> &mut BTreeMap<String, Self::Model>;
}

impl Kind for core::Namespace {
    const NAME: &'static str = "Namespace";
    const INDEX: usize = 0;
    type Model = Namespace;
    fn convert(&self) -> Result<Namespace, InvalidField> {
        convert::namespace(self)
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Namespace> {
        &mut store.namespaces
    }
}

impl Kind for core::Pod {
    const NAME: &'static str = "Pod";
    const INDEX: usize = 1;
    type Model = Pod;
    fn convert(&self) -> Result<Pod, InvalidField> {
        convert::pod(self)
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Pod> {
        &mut store.pods
    }
}

impl Kind for net::NetworkPolicy {
    const NAME: &'static str = "NetworkPolicy";
    const INDEX: usize = 2;
    type Model = Policy;
    fn convert(&self) -> Result<Policy, InvalidField> {
        convert::policy(self)
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Policy> {
        &mut store.policies
    }
}

pub(super) fn key_of<K: Kind>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// Converts an object, recording or clearing its invalid state. An invalid object is left out;
/// everything else keeps being enforced.
pub(super) fn convert_recorded<K: Kind>(store: &mut Store, obj: &K) -> Option<(String, K::Model)> {
    let key = key_of(obj);
    match obj.convert() {
        Ok(model) => {
            store.invalid.remove(&(K::NAME, key.clone()));
            Some((key, model))
        }
        Err(e) => {
            tracing::error!(target: LOG_TARGET,
                kind = K::NAME,
                object = key,
                "ignoring an invalid object: {e}"
            );
            store.invalid.insert((K::NAME, key), e.to_string());
            None
        }
    }
}

/// Applies one watcher event to the store. A (re-)list is buffered in `relist` and swapped in
/// whole at `InitDone`; returns true then.
pub(super) fn apply_event<K: Kind>(
    store: &ClusterStore,
    relist: &mut Option<BTreeMap<String, K::Model>>,
    event: Event<K>,
) -> bool {
    match event {
        Event::Init => {
            *relist = Some(BTreeMap::new());
            // The relist re-reports every invalid object still there.
            store
                .inner
                .lock()
                .unwrap()
                .invalid
                .retain(|(kind, _), _| *kind != K::NAME);
        }
        Event::InitApply(obj) => {
            let mut s = store.inner.lock().unwrap();
            if let (Some(buffer), Some((key, model))) =
                (relist.as_mut(), convert_recorded(&mut s, &obj))
            {
                buffer.insert(key, model);
            }
        }
        Event::InitDone => {
            let listed = relist.take().unwrap_or_default();
            // The first list is worth a line; later ones (410, a kind that may not be watched)
            // are routine, and changes of readability are logged by `Health`.
            if store.inner.lock().unwrap().listed[K::INDEX] {
                tracing::debug!(target: LOG_TARGET, kind = K::NAME, objects = listed.len(), "listed");
            } else {
                tracing::info!(target: LOG_TARGET, kind = K::NAME, objects = listed.len(), "listed");
            }
            store.update(|s| {
                *K::map(s) = listed;
                s.listed[K::INDEX] = true;
            });
            return true;
        }
        Event::Apply(obj) => store.update(|s| {
            let key = key_of(&obj);
            match convert_recorded(s, &obj) {
                Some((key, model)) => {
                    K::map(s).insert(key, model);
                }
                None => {
                    K::map(s).remove(&key);
                }
            }
        }),
        Event::Delete(obj) => store.update(|s| {
            let key = key_of(&obj);
            K::map(s).remove(&key);
            s.invalid.remove(&(K::NAME, key));
        }),
    }
    false
}

impl Source for ClusterStore {
    fn generation(&self) -> Option<u64> {
        ClusterStore::generation(self)
    }

    async fn changed(&self) {
        ClusterStore::changed(self).await
    }

    fn snapshot(&self) -> anyhow::Result<Option<(u64, ClusterSnapshot)>> {
        Ok(ClusterStore::snapshot(self))
    }

    fn waiting_for(&self) -> &'static str {
        "waiting for the first list of namespaces, pods and network policies"
    }

    fn change_seen(&self, generation: u64) -> Option<std::time::Instant> {
        self.change_times.take_through(generation)
    }
}
