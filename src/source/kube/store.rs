//! The store of converted objects the watchers fill and the reconcile loop reads.

use crate::model::{
    ClusterPeer, ClusterPolicy, ClusterSnapshot, Namespace, NodeInfo, Pod, PodsChanged, Policy,
};
use crate::source::Source;
use crate::source::change_times::ChangeTimes;
use crate::source::convert::{self, ClusterNetworkPolicy, InvalidField};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::{Notify, watch};

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::kube_source";

#[derive(Default)]
pub(super) struct Store {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<String, Pod>,
    /// `pods` as the snapshots hand them out, sorted by namespace and name, shared until a pod
    /// changes: a change of any other kind copies no pod, and the compiler sees the same list
    /// and skips comparing pods. A single pod's change edits it in place (`Kind::put`; no copy
    /// once the previous snapshot is dropped); any other mutable access to `pods`
    /// (`Kind::map`) clears it, to be rebuilt by the next snapshot.
    pods_list: Option<Arc<Vec<Pod>>>,
    /// The list the last snapshot handed out, and the keys `Kind::put` edited in `pods_list`
    /// since: the next snapshot tells the compiler which pods to compare (`PodsChanged`).
    /// Holding it weakly also makes the first edit after a snapshot move the list to a new
    /// address (`Arc::make_mut`), so the compiler never mistakes it for the one it saw.
    pods_handed_out: Weak<Vec<Pod>>,
    pods_edited: BTreeSet<String>,
    policies: BTreeMap<String, Policy>,
    /// Objects that failed conversion, by kind and key, with the reason.
    invalid: BTreeMap<(&'static str, String), String>,
    /// This node's pod CIDRs, from its Node object (see `node`).
    node_pod_cidrs: BTreeMap<String, Vec<ipnet::IpNet>>,
    /// Empty while the API does not serve them (see `cluster_policy`).
    cluster_policies: BTreeMap<String, ClusterPolicy>,
    /// Every Node, watched only while some ClusterNetworkPolicy has a `nodes` peer (see
    /// `node_addresses`); empty otherwise.
    nodes: BTreeMap<String, NodeInfo>,
    /// Per kind (`Kind::INDEX`): listed since it has been watched. ClusterNetworkPolicy counts as
    /// listed when the API does not serve it; Nodes are waited for only while needed.
    listed: [bool; KINDS],
    /// Per kind: a list or watch failed since it started being watched.
    failed: [bool; KINDS],
    generation: u64,
}

/// Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy, Node.
const KINDS: usize = 5;
const NODE_INDEX: usize = 4;

impl Store {
    /// Whether the first snapshot may be handed out: every kind listed, and Nodes too while some
    /// policy needs them, unless their watch failed (then the policies are enforced without node
    /// addresses and readiness says why, rather than holding up every other change).
    fn complete(&self) -> bool {
        self.listed[..NODE_INDEX].iter().all(|l| *l)
            && (self.listed[NODE_INDEX]
                || self.failed[NODE_INDEX]
                || !nodes_needed(&self.cluster_policies))
    }
}

/// Whether some ClusterNetworkPolicy selects nodes, so every Node's labels and addresses are
/// needed.
fn nodes_needed(policies: &BTreeMap<String, ClusterPolicy>) -> bool {
    policies.values().any(|p| {
        p.egress
            .iter()
            .flat_map(|r| &r.peers)
            .any(|peer| matches!(peer, ClusterPeer::Nodes(_)))
    })
}

/// The store shared by the watchers and the sync loop.
pub struct ClusterStore {
    inner: Mutex<Store>,
    changed: Notify,
    /// Whether some ClusterNetworkPolicy has a `nodes` peer, for the Node watch to follow.
    nodes_needed: watch::Sender<bool>,
    change_times: ChangeTimes,
}

impl Default for ClusterStore {
    fn default() -> ClusterStore {
        ClusterStore {
            inner: Mutex::default(),
            changed: Notify::new(),
            nodes_needed: watch::Sender::new(false),
            change_times: ChangeTimes::default(),
        }
    }
}

impl ClusterStore {
    /// Waits until something changed since the last call (or a change was already pending).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Bumped on every change; `None` until every kind has listed once.
    pub fn generation(&self) -> Option<u64> {
        let s = self.inner.lock().unwrap();
        s.complete().then_some(s.generation)
    }

    /// The cluster as last seen, once every kind has listed; `None` before.
    pub fn snapshot(&self) -> Option<(u64, ClusterSnapshot)> {
        let mut guard = self.inner.lock().unwrap();
        let s = &mut *guard;
        if !s.complete() {
            return None;
        }
        let rebuilt = s.pods_list.is_none();
        let pods = s.pods_list.get_or_insert_with(|| {
            let mut pods: Vec<Pod> = s.pods.values().cloned().collect();
            pods.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
            Arc::new(pods)
        });
        let edited = std::mem::take(&mut s.pods_edited);
        let pods_changed = match rebuilt {
            true => PodsChanged::default(),
            false => PodsChanged {
                since: s.pods_handed_out.clone(),
                to: Arc::downgrade(pods),
                keys: edited.into_iter().collect(),
            },
        };
        s.pods_handed_out = Arc::downgrade(pods);
        let snapshot = ClusterSnapshot {
            namespaces: s
                .namespaces
                .values()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            pods: Arc::clone(pods),
            pods_changed,
            policies: s.policies.values().cloned().collect(),
            node_pod_cidrs: s.node_pod_cidrs.clone(),
            cluster_policies: s.cluster_policies.values().cloned().collect(),
            nodes: s.nodes.clone(),
        };
        Some((s.generation, snapshot))
    }

    /// Objects that could not be used, by kind.
    pub fn invalid_counts(&self) -> BTreeMap<&'static str, usize> {
        let s = self.inner.lock().unwrap();
        let mut counts: BTreeMap<&'static str, usize> = [
            ("Namespace", 0),
            ("Pod", 0),
            ("NetworkPolicy", 0),
            ("ClusterNetworkPolicy", 0),
            ("Node", 0),
        ]
        .into();
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

    /// Valid ClusterNetworkPolicies per tier (for `kni_cluster_network_policies`).
    pub fn cluster_policies_per_tier(&self) -> BTreeMap<&'static str, usize> {
        let s = self.inner.lock().unwrap();
        let mut counts: BTreeMap<&'static str, usize> = [("Admin", 0), ("Baseline", 0)].into();
        for p in s.cluster_policies.values() {
            *counts.entry(p.tier.as_str()).or_default() += 1;
        }
        counts
    }

    /// Follows whether every Node's labels and addresses are needed.
    pub(super) fn nodes_needed(&self) -> watch::Receiver<bool> {
        self.nodes_needed.subscribe()
    }

    /// `K` is not (or no longer) served or watched: none of its objects, none invalid; `listed`
    /// says whether the first snapshot may go without it.
    pub(super) fn clear_kind<K: Kind>(&self, listed: bool) {
        self.update(|s| {
            K::map(s).clear();
            s.invalid.retain(|(kind, _), _| *kind != K::NAME);
            s.listed[K::INDEX] = listed;
            s.failed[K::INDEX] = false;
        });
    }

    /// A list or watch of `K` failed.
    pub(super) fn kind_failed<K: Kind>(&self) {
        if !self.inner.lock().unwrap().failed[K::INDEX] {
            self.update(|s| s.failed[K::INDEX] = true);
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Store)) {
        let mut s = self.inner.lock().unwrap();
        f(&mut s);
        s.generation += 1;
        let needed = nodes_needed(&s.cluster_policies);
        self.change_times.record(s.generation);
        drop(s);
        self.nodes_needed.send_if_modified(|n| {
            let changed = *n != needed;
            *n = needed;
            changed
        });
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
    type Model: Clone + Send + PartialEq;
    fn convert(&self) -> Result<Self::Model, InvalidField>;
    fn objects(store: &Store) -> &BTreeMap<String, Self::Model>;
    /// The only way objects of this kind change, besides `put`.
    fn map(store: &mut Store) -> &mut BTreeMap<String, Self::Model>;
    /// Sets (`Some`) or removes (`None`) one object.
    fn put(store: &mut Store, key: String, model: Option<Self::Model>) {
        match model {
            Some(model) => {
                Self::map(store).insert(key, model);
            }
            None => {
                Self::map(store).remove(&key);
            }
        }
    }
}

impl Kind for core::Namespace {
    const NAME: &'static str = "Namespace";
    const INDEX: usize = 0;
    type Model = Namespace;
    fn convert(&self) -> Result<Namespace, InvalidField> {
        convert::namespace(self)
    }
    fn objects(store: &Store) -> &BTreeMap<String, Namespace> {
        &store.namespaces
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
    fn objects(store: &Store) -> &BTreeMap<String, Pod> {
        &store.pods
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Pod> {
        store.pods_list = None;
        &mut store.pods
    }
    fn put(store: &mut Store, key: String, model: Option<Pod>) {
        let old = match &model {
            Some(pod) => store.pods.insert(key, pod.clone()),
            None => store.pods.remove(&key),
        };
        // Neither before nor now: nothing changed.
        let Some(at) = model.as_ref().or(old.as_ref()) else {
            return;
        };
        let Some(list) = &mut store.pods_list else {
            return;
        };
        store.pods_edited.insert(at.key());
        let list = Arc::make_mut(list);
        let found = list.binary_search_by(|p| p.sort_key().cmp(&at.sort_key()));
        match (found, model) {
            (Ok(i), Some(pod)) => list[i] = pod,
            (Err(i), Some(pod)) => list.insert(i, pod),
            (Ok(i), None) => {
                list.remove(i);
            }
            (Err(_), None) => {}
        }
    }
}

impl Kind for net::NetworkPolicy {
    const NAME: &'static str = "NetworkPolicy";
    const INDEX: usize = 2;
    type Model = Policy;
    fn convert(&self) -> Result<Policy, InvalidField> {
        convert::policy(self)
    }
    fn objects(store: &Store) -> &BTreeMap<String, Policy> {
        &store.policies
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Policy> {
        &mut store.policies
    }
}

impl Kind for ClusterNetworkPolicy {
    const NAME: &'static str = "ClusterNetworkPolicy";
    const INDEX: usize = 3;
    type Model = ClusterPolicy;
    fn convert(&self) -> Result<ClusterPolicy, InvalidField> {
        let policy = convert::cluster_policy(self)?;
        convert::warn_domain_names_once(&policy);
        Ok(policy)
    }
    fn objects(store: &Store) -> &BTreeMap<String, ClusterPolicy> {
        &store.cluster_policies
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, ClusterPolicy> {
        &mut store.cluster_policies
    }
}

impl Kind for core::Node {
    const NAME: &'static str = "Node";
    const INDEX: usize = NODE_INDEX;
    type Model = NodeInfo;
    fn convert(&self) -> Result<NodeInfo, InvalidField> {
        convert::node_info(self)
    }
    fn objects(store: &Store) -> &BTreeMap<String, NodeInfo> {
        &store.nodes
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, NodeInfo> {
        &mut store.nodes
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
                // A pod's status moving on without changing what we use of it changes nothing
                // (and keeps the shared pod list).
                Some((key, model)) if K::objects(s).get(&key) == Some(&model) => {}
                Some((key, model)) => K::put(s, key, Some(model)),
                None => K::put(s, key, None),
            }
        }),
        Event::Delete(obj) => store.update(|s| {
            let key = key_of(&obj);
            s.invalid.remove(&(K::NAME, key.clone()));
            K::put(s, key, None);
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
        "waiting for the first list of namespaces, pods, network policies and cluster network policies (and nodes, when a cluster network policy selects nodes)"
    }

    fn change_seen(&self, generation: u64) -> Option<std::time::Instant> {
        self.change_times.take_through(generation)
    }
}
