//! The one peer-selection implementation: the sets that pod selections, ipBlocks and named ports
//! stand for, kept between compiles so that a change to one pod or one namespace's labels costs
//! work in proportion to the change rather than to the cluster.
//!
//! Entries are keyed by what they select ([`PodSelection`], canonical), so every rule of every
//! policy with the same selection shares one entry and one set. `update()` diffs the new snapshot
//! against the one the entries are up to date with and re-judges only changed pods, and the pods
//! of namespaces whose labels changed; a new entry looks only at the pods of the namespaces it
//! can select. Entries no compile asked for since the previous
//! `evict_unused()` are dropped. A property test checks that a long-lived index fed random
//! changes always gives what a fresh one gives.

use super::ir::{MAX_SET_MEMBERS, Members, SetMember};
use super::known_pod::{KnownPod, pairs_of};
use super::names;
use super::pod_changes::{self, Key, PodsSeen};
use super::selection::{NamespaceScope, PodSelection};
use crate::model::{ClusterSnapshot, Family, Labels, PerFamily, Pod, Protocol, cidr};
use foldhash::{HashMap, HashMapExt, HashSet};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// A set to program: its name and members.
#[derive(Debug, Clone)]
pub struct SetRef {
    pub name: String,
    pub members: Members,
}

/// The ipBlocks of one rule as written: `(cidr, except)` pairs.
pub type Blocks = Vec<(IpNet, Vec<IpNet>)>;

#[derive(Default)]
pub struct Selections {
    /// What the entries looked at of the policy-relevant pods of the snapshot they match, by key.
    pods: HashMap<Key, KnownPod>,
    /// The label maps of `pods`, each distinct one once (replicas share theirs).
    labels: HashSet<Arc<Labels>>,
    /// The keys of `pods` by namespace: a new entry looks only in the namespaces it can select.
    pods_by_namespace: HashMap<String, HashSet<Key>>,
    namespaces: HashMap<String, Labels>,
    /// Relevant pods by address (addresses may be shared for a moment, e.g. during IP reuse).
    /// A list, not a set: almost always one key, and a `BTreeSet` node costs ~200 bytes each
    /// (4 MB at 10,000 dual-stack pods).
    owners: HashMap<IpAddr, Vec<Key>>,
    entries: HashMap<PodSelection, Entry>,
    blocks: HashMap<Blocks, PerFamily<Result<Option<SetRef>, usize>>>,
    /// Blocks asked for since the last eviction (entries carry their own flag).
    used_blocks: HashSet<Blocks>,
}

/// The pods one selection chooses, their addresses, and the named ports resolved on them.
struct Entry {
    selection: PodSelection,
    names: PerFamily<String>,
    pods: BTreeSet<Key>,
    members: PerFamily<Members>,
    /// By (port name, protocol); kept up to date by `update` like the members.
    named: HashMap<(String, Protocol), PerFamily<SetRef>>,
    /// Asked for since the last `evict_unused()`.
    used: bool,
}

/// The (address, protocol, port) pairs a named port resolves to on one pod.
pub fn named_pairs<'p>(
    pod: &'p Pod,
    port_name: &'p str,
    protocol: Protocol,
) -> impl Iterator<Item = SetMember> + 'p {
    pairs_of(&pod.ips, &pod.ports, port_name, protocol)
}

fn split_by_family(members: impl IntoIterator<Item = SetMember>) -> PerFamily<Members> {
    let mut out: PerFamily<BTreeSet<SetMember>> = PerFamily::default();
    for m in members {
        let family = match &m {
            SetMember::Ip(ip) | SetMember::IpPort(ip, ..) => Family::of(ip),
            SetMember::Net(net) => Family::of_net(net),
        };
        out[family].insert(m);
    }
    out.map(|_, set| Arc::new(set))
}

impl Selections {
    /// Brings every entry up to date with `snapshot`; `pods` says how its pods relate to those
    /// of the previous update.
    pub fn update(&mut self, snapshot: &ClusterSnapshot, pods: PodsSeen) {
        let (new_pods, changed_pods) = pod_changes::compare(&self.pods, snapshot, pods);
        let mut known_namespaces = 0;
        let mut changed_namespaces: BTreeSet<String> = BTreeSet::new();
        for (name, ns) in &snapshot.namespaces {
            match self.namespaces.get(name.as_str()) {
                Some(labels) => {
                    known_namespaces += 1;
                    if *labels != ns.labels {
                        changed_namespaces.insert(name.clone());
                    }
                }
                None => {
                    changed_namespaces.insert(name.clone());
                }
            }
        }
        if known_namespaces < self.namespaces.len() {
            changed_namespaces.extend(
                self.namespaces
                    .keys()
                    .filter(|k| !snapshot.namespaces.contains_key(*k))
                    .cloned(),
            );
        }
        if changed_pods.is_empty() && changed_namespaces.is_empty() {
            return;
        }
        // Label maps no known pod has any more (since the previous change).
        self.labels.retain(|labels| Arc::strong_count(labels) > 1);
        let mut old_namespaces: HashMap<String, Labels> = HashMap::new();
        for name in &changed_namespaces {
            let old = match snapshot.namespaces.get(name) {
                Some(ns) => self.namespaces.insert(name.clone(), ns.labels.clone()),
                None => self.namespaces.remove(name),
            };
            if let Some(old) = old {
                old_namespaces.insert(name.clone(), old);
            }
        }

        // Apply only what changed; keep the old versions of changed pods for their addresses.
        let mut old_changed: HashMap<Key, KnownPod> = HashMap::new();
        for key in &changed_pods {
            let old = match new_pods.get(&**key) {
                Some(p) => {
                    if !self.pods.contains_key(&**key) {
                        self.pods_by_namespace
                            .entry(p.namespace.clone())
                            .or_default()
                            .insert(key.clone());
                    }
                    let known = KnownPod::new(p, &mut self.labels);
                    self.pods.insert(key.clone(), known)
                }
                None => {
                    let old = self.pods.remove(&**key);
                    if let Some(old) = &old
                        && let Some(keys) = self.pods_by_namespace.get_mut(&old.namespace)
                    {
                        keys.remove(&**key);
                        if keys.is_empty() {
                            self.pods_by_namespace.remove(&old.namespace);
                        }
                    }
                    old
                }
            };
            if let Some(old) = old {
                for ip in &old.ips {
                    if let Some(owners) = self.owners.get_mut(ip) {
                        owners.retain(|owner| owner != key);
                        if owners.is_empty() {
                            self.owners.remove(ip);
                        }
                    }
                }
                old_changed.insert(key.clone(), old);
            }
            if let Some(p) = new_pods.get(&**key) {
                for ip in &p.ips {
                    let owners = self.owners.entry(*ip).or_default();
                    if !owners.contains(key) {
                        owners.push(key.clone());
                    }
                }
            }
        }
        // A pod's addresses before this update.
        let old_ips = |key: &str| -> Vec<IpAddr> {
            match old_changed.get(key) {
                Some(p) => p.ips.clone(),
                None if changed_pods.contains(key) => vec![],
                None => self
                    .pods
                    .get(key)
                    .map(|p| p.ips.clone())
                    .unwrap_or_default(),
            }
        };

        // The pods (before or after) of each relabelled namespace, found once for all entries.
        let mut pods_by_changed_namespace: HashMap<&str, Vec<&Key>> = HashMap::new();
        if !changed_namespaces.is_empty() {
            for (key, pod) in old_changed.iter().chain(self.pods.iter()) {
                if changed_namespaces.contains(&pod.namespace) {
                    pods_by_changed_namespace
                        .entry(pod.namespace.as_str())
                        .or_default()
                        .push(key);
                }
            }
        }

        for entry in self.entries.values_mut() {
            let mut judge: BTreeSet<&Key> = changed_pods.iter().collect();
            for ns in &changed_namespaces {
                if entry
                    .selection
                    .depends_on_namespace_labels(old_namespaces.get(ns), self.namespaces.get(ns))
                {
                    judge.extend(
                        pods_by_changed_namespace
                            .get(ns.as_str())
                            .into_iter()
                            .flatten(),
                    );
                }
            }
            let mut touched_ips: BTreeSet<IpAddr> = BTreeSet::new();
            // Chosen pods, before or after, that changed in any way (addresses, ports).
            let mut touched: Vec<(&Key, bool, bool)> = Vec::new();
            for key in judge {
                let was = entry.pods.contains(&**key);
                let now = self.pods.get(&**key).is_some_and(|p| {
                    p.selected_by(&entry.selection, self.namespaces.get(&p.namespace))
                });
                if was || now {
                    touched.push((key, was, now));
                }
                if was {
                    touched_ips.extend(old_ips(key));
                }
                if now {
                    touched_ips.extend(self.pods[&**key].ips.iter().copied());
                }
                match (was, now) {
                    (true, false) => {
                        entry.pods.remove(&**key);
                    }
                    (false, true) => {
                        entry.pods.insert(key.clone());
                    }
                    _ => {}
                }
            }
            if touched.is_empty() {
                continue;
            }
            // Named-port resolutions: re-judge only the (address, port) pairs the touched pods
            // had or have; a pair stays while any chosen pod still provides it.
            for ((port_name, protocol), sets) in entry.named.iter_mut() {
                let mut pairs: BTreeSet<SetMember> = BTreeSet::new();
                for (key, was, now) in &touched {
                    if *was {
                        let old = old_changed.get(&***key).or_else(|| self.pods.get(&***key));
                        pairs.extend(
                            old.into_iter()
                                .flat_map(|p| p.named_pairs(port_name, *protocol)),
                        );
                    }
                    if *now {
                        pairs.extend(self.pods[&***key].named_pairs(port_name, *protocol));
                    }
                }
                for pair in pairs {
                    let SetMember::IpPort(ip, _, port) = pair else {
                        continue;
                    };
                    let provided = self.owners.get(&ip).is_some_and(|owners| {
                        owners.iter().any(|o| {
                            entry.pods.contains(&**o)
                                && self.pods[&**o].ports.iter().any(|cp| {
                                    cp.name.as_deref() == Some(port_name.as_str())
                                        && cp.protocol == *protocol
                                        && cp.port == port
                                })
                        })
                    });
                    set_presence(&mut sets[Family::of(&ip)].members, pair, provided);
                }
            }
            for ip in touched_ips {
                let chosen = self
                    .owners
                    .get(&ip)
                    .is_some_and(|owners| owners.iter().any(|o| entry.pods.contains(&**o)));
                set_presence(
                    &mut entry.members[Family::of(&ip)],
                    SetMember::Ip(ip),
                    chosen,
                );
            }
        }
    }

    fn entry(&mut self, selection: &PodSelection) -> &mut Entry {
        if !self.entries.contains_key(selection) {
            let mut pods = BTreeSet::new();
            let mut members = Vec::new();
            let candidates: Box<dyn Iterator<Item = &Key>> = match &selection.namespaces {
                NamespaceScope::Named(name) => {
                    Box::new(self.pods_by_namespace.get(name).into_iter().flatten())
                }
                NamespaceScope::Matching(sel) => Box::new(
                    self.pods_by_namespace
                        .iter()
                        .filter(|(ns, _)| self.namespaces.get(*ns).is_some_and(|l| sel.matches(l)))
                        .flat_map(|(_, keys)| keys),
                ),
                NamespaceScope::All => Box::new(self.pods.keys()),
            };
            for key in candidates {
                let pod = &self.pods[&**key];
                if pod.selected_by(selection, self.namespaces.get(&pod.namespace)) {
                    pods.insert(key.clone());
                    members.extend(pod.ips.iter().map(|ip| SetMember::Ip(*ip)));
                }
            }
            let entry = Entry {
                selection: selection.clone(),
                names: PerFamily::from_fn(|f| names::pod_set(f, selection)),
                pods,
                members: split_by_family(members),
                named: HashMap::new(),
                used: true,
            };
            self.entries.insert(selection.clone(), entry);
        }
        let entry = self.entries.get_mut(selection).expect("just made sure");
        entry.used = true;
        entry
    }

    /// The `hash:ip` set of the pods `selection` chooses.
    pub fn pod_set(&mut self, selection: &PodSelection, family: Family) -> SetRef {
        let entry = self.entry(selection);
        SetRef {
            name: entry.names[family].clone(),
            members: entry.members[family].clone(),
        }
    }

    /// The `hash:ip,port` set of (address, port) of every pod `selection` chooses that has the
    /// named port with that protocol.
    pub fn named_port_set(
        &mut self,
        selection: &PodSelection,
        port_name: &str,
        protocol: Protocol,
        family: Family,
    ) -> SetRef {
        self.entry(selection);
        let entry = self
            .entries
            .get_mut(selection)
            .expect("just made sure it exists");
        let pods = &self.pods;
        entry
            .named
            .entry((port_name.to_string(), protocol))
            .or_insert_with(|| {
                let members = split_by_family(
                    entry
                        .pods
                        .iter()
                        .flat_map(|key| pods[&**key].named_pairs(port_name, protocol)),
                );
                PerFamily::from_fn(|f| SetRef {
                    name: names::named_port_set(f, selection, port_name, protocol),
                    members: members[f].clone(),
                })
            })[family]
            .clone()
    }

    /// The `hash:net` set of the prefixes `blocks` stand for in `family`: `Ok(None)` when they
    /// hold none of that family, `Err(count)` when they need more than `MAX_SET_MEMBERS`.
    pub fn block_set(&mut self, blocks: &Blocks, family: Family) -> Result<Option<SetRef>, usize> {
        if !self.used_blocks.contains(blocks) {
            self.used_blocks.insert(blocks.clone());
        }
        self.blocks.entry(blocks.clone()).or_insert_with(|| {
            PerFamily::from_fn(|f| {
                let prefixes = canonical_prefixes(blocks, f)?;
                Ok((!prefixes.is_empty()).then(|| SetRef {
                    name: names::block_set(f, &prefixes),
                    members: Arc::new(prefixes.into_iter().map(SetMember::Net).collect()),
                }))
            })
        })[family]
            .clone()
    }

    /// Forgets entries that no compile since the last call used.
    pub fn evict_unused(&mut self) {
        self.entries
            .retain(|_, entry| std::mem::take(&mut entry.used));
        let used = std::mem::take(&mut self.used_blocks);
        self.blocks.retain(|k, _| used.contains(k));
    }
}

/// The selections the two families' chain builds share while they run at once (each asks for the
/// sets its rules match; an entry serves both families, so whichever asks first computes it).
#[derive(Clone, Copy)]
pub struct SharedSelections<'s>(pub &'s Mutex<Selections>);

impl SharedSelections<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Selections> {
        // A panic in the other build ends the compile anyway (the scope re-raises it).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pod_set(&self, selection: &PodSelection, family: Family) -> SetRef {
        self.lock().pod_set(selection, family)
    }

    pub fn named_port_set(
        &self,
        selection: &PodSelection,
        port_name: &str,
        protocol: Protocol,
        family: Family,
    ) -> SetRef {
        self.lock()
            .named_port_set(selection, port_name, protocol, family)
    }

    pub fn block_set(&self, blocks: &Blocks, family: Family) -> Result<Option<SetRef>, usize> {
        self.lock().block_set(blocks, family)
    }
}

/// The addresses `blocks` cover in `family` as the fewest prefixes, sorted: one form for every way
/// of writing the same addresses, which names the set.
fn canonical_prefixes(blocks: &Blocks, family: Family) -> Result<Vec<IpNet>, usize> {
    let pairs = blocks
        .iter()
        .map(|(cidr, except)| (cidr, except.as_slice()));
    let prefixes = cidr::block_prefixes(pairs, family, MAX_SET_MEMBERS)?;
    // hash:net cannot hold a /0, which aggregating the two halves of a whole space gives back.
    let mut out: Vec<IpNet> = IpNet::aggregate(&prefixes)
        .into_iter()
        .flat_map(cidr::ipset_storable)
        .collect();
    out.sort();
    Ok(out)
}

fn set_presence(set: &mut Members, member: SetMember, present: bool) {
    if present != set.contains(&member) {
        let set = Arc::make_mut(set);
        if present {
            set.insert(member);
        } else {
            set.remove(&member);
        }
    }
}
