//! Peer selections remembered between compiles, so that a change to one pod or one namespace's
//! labels costs work in proportion to the change rather than to the cluster.
//!
//! Each peer definition (a policy namespace plus a peer list) keeps the pods it chose and its set
//! members for both families. `update()` diffs the new snapshot against the one the entries are
//! up to date with and re-judges only changed pods, and the pods of namespaces whose labels
//! changed. Definitions no compile uses any more are dropped. The result must always equal a
//! from-scratch `compile()`; a property test checks that over random changes.

use crate::cidr;
use crate::model::{ClusterSnapshot, LabelSelector, Labels, Peer, Pod, Protocol};
use crate::state::{Family, MAX_SET_MEMBERS, Members, SetMember};
use ipnet::IpNet;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A pod's key (`namespace/name`), allocated once and shared by every entry that chose the pod.
type Key = Arc<str>;

#[derive(Default)]
pub struct PeerCache {
    /// Policy-relevant pods of the snapshot the entries match, by key.
    pods: HashMap<Key, Pod>,
    namespaces: HashMap<String, Labels>,
    /// Relevant pods by address (addresses may be shared for a moment, e.g. during IP reuse).
    owners: HashMap<IpAddr, BTreeSet<Key>>,
    entries: HashMap<String, Entry>,
    used: HashSet<String>,
}

/// Who a peer definition selects. `all` stands for "every pod" (an egress rule without peers).
struct Entry {
    namespace: String,
    selectors: Vec<(Option<LabelSelector>, Option<LabelSelector>)>,
    all: bool,
    blocks: [BTreeSet<SetMember>; 2],
    /// Per family, how many prefixes the ipBlocks needed when that was more than
    /// `MAX_SET_MEMBERS` (their `blocks` are then left empty and the rule fails closed).
    too_many_blocks: [Option<usize>; 2],
    pods: BTreeSet<Key>,
    members: [Members; 2],
    /// Egress named ports resolved on the chosen pods, by (name, protocol); kept up to date by
    /// `update` like the members.
    named: HashMap<(String, Protocol), [Members; 2]>,
}

/// The (address, protocol, port) pairs a named port resolves to on one pod.
fn named_pairs<'p>(
    pod: &'p Pod,
    port_name: &'p str,
    protocol: Protocol,
) -> impl Iterator<Item = SetMember> + 'p {
    pod.ports
        .iter()
        .filter(move |cp| cp.name.as_deref() == Some(port_name) && cp.protocol == protocol)
        .flat_map(move |cp| {
            pod.ips
                .iter()
                .map(move |ip| SetMember::IpPort(*ip, protocol, cp.port))
        })
}

fn index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Entry {
    fn selects(&self, pod: &Pod, namespaces: &HashMap<String, Labels>) -> bool {
        self.all
            || self.selectors.iter().any(|(ns, pods)| {
                let namespace_ok = match ns {
                    None => pod.namespace == self.namespace,
                    Some(sel) => namespaces
                        .get(&pod.namespace)
                        .is_some_and(|l| sel.matches(l)),
                };
                namespace_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            })
    }

    /// Whether a change of `namespace`'s labels from `old` to `new` can change this entry.
    fn depends_on_namespace(&self, old: Option<&Labels>, new: Option<&Labels>) -> bool {
        self.selectors.iter().any(|(ns, _)| match ns {
            None => false,
            Some(sel) => old.is_some_and(|l| sel.matches(l)) != new.is_some_and(|l| sel.matches(l)),
        })
    }
}

impl PeerCache {
    /// Brings every entry up to date with `snapshot`.
    pub fn update(&mut self, snapshot: &ClusterSnapshot) {
        let new_pods: HashMap<String, &Pod> = snapshot
            .pods
            .iter()
            .filter(|p| p.is_policy_relevant())
            .map(|p| (p.key(), p))
            .collect();
        let mut changed_pods: BTreeSet<Key> = new_pods
            .iter()
            .filter(|(k, p)| self.pods.get(k.as_str()) != Some(**p))
            .map(|(k, _)| Key::from(k.as_str()))
            .collect();
        changed_pods.extend(
            self.pods
                .keys()
                .filter(|k| !new_pods.contains_key(&***k))
                .cloned(),
        );
        let new_namespaces: HashMap<String, Labels> = snapshot
            .namespaces
            .values()
            .map(|n| (n.name.clone(), n.labels.clone()))
            .collect();
        let mut changed_namespaces: BTreeSet<String> = new_namespaces
            .iter()
            .filter(|(k, l)| self.namespaces.get(*k) != Some(*l))
            .map(|(k, _)| k.clone())
            .collect();
        changed_namespaces.extend(
            self.namespaces
                .keys()
                .filter(|k| !new_namespaces.contains_key(*k))
                .cloned(),
        );
        if changed_pods.is_empty() && changed_namespaces.is_empty() {
            return;
        }

        // Apply only what changed; keep the old versions of changed pods for their addresses.
        let old_namespaces = std::mem::replace(&mut self.namespaces, new_namespaces);
        let mut old_changed: HashMap<Key, Pod> = HashMap::new();
        for key in &changed_pods {
            let old = match new_pods.get(&**key) {
                Some(p) => self.pods.insert(key.clone(), (*p).clone()),
                None => self.pods.remove(&**key),
            };
            if let Some(old) = old {
                for ip in &old.ips {
                    if let Some(owners) = self.owners.get_mut(ip) {
                        owners.remove(&**key);
                        if owners.is_empty() {
                            self.owners.remove(ip);
                        }
                    }
                }
                old_changed.insert(key.clone(), old);
            }
            if let Some(p) = new_pods.get(&**key) {
                for ip in &p.ips {
                    self.owners.entry(*ip).or_default().insert(key.clone());
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

        for entry in self.entries.values_mut() {
            let mut judge: BTreeSet<&Key> = changed_pods.iter().collect();
            for ns in &changed_namespaces {
                if entry.depends_on_namespace(old_namespaces.get(ns), self.namespaces.get(ns)) {
                    judge.extend(
                        old_changed
                            .iter()
                            .chain(self.pods.iter())
                            .filter(|(_, p)| &p.namespace == ns)
                            .map(|(k, _)| k),
                    );
                }
            }
            let mut touched_ips: BTreeSet<IpAddr> = BTreeSet::new();
            // Chosen pods, before or after, that changed in any way (addresses, ports).
            let mut touched: Vec<(&Key, bool, bool)> = Vec::new();
            for key in judge {
                let was = entry.pods.contains(&**key);
                let now = self
                    .pods
                    .get(&**key)
                    .is_some_and(|p| entry.selects(p, &self.namespaces));
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
                                .flat_map(|p| named_pairs(p, port_name, *protocol)),
                        );
                    }
                    if *now {
                        pairs.extend(named_pairs(&self.pods[&***key], port_name, *protocol));
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
                    let set = &mut sets[index(Family::of(&ip))];
                    if provided != set.contains(&pair) {
                        let set = Arc::make_mut(set);
                        if provided {
                            set.insert(pair);
                        } else {
                            set.remove(&pair);
                        }
                    }
                }
            }
            for ip in touched_ips {
                let member = SetMember::Net(IpNet::from(ip));
                let f = index(Family::of(&ip));
                let chosen = self
                    .owners
                    .get(&ip)
                    .is_some_and(|owners| owners.iter().any(|o| entry.pods.contains(&**o)));
                let present = chosen || entry.blocks[f].contains(&member);
                let set = &mut entry.members[f];
                if present != set.contains(&member) {
                    let set = Arc::make_mut(set);
                    if present {
                        set.insert(member);
                    } else {
                        set.remove(&member);
                    }
                }
            }
        }
    }

    fn entry(&mut self, definition: &str, namespace: &str, peers: Option<&[Peer]>) -> &mut Entry {
        self.used.insert(definition.to_string());
        if !self.entries.contains_key(definition) {
            let mut entry = Entry {
                namespace: namespace.to_string(),
                selectors: vec![],
                all: peers.is_none(),
                blocks: [BTreeSet::new(), BTreeSet::new()],
                too_many_blocks: [None, None],
                pods: BTreeSet::new(),
                members: [Members::default(), Members::default()],
                named: HashMap::new(),
            };
            for peer in peers.into_iter().flatten() {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        entry.selectors.push((namespaces.clone(), pods.clone()))
                    }
                    Peer::IpBlock { .. } => {}
                }
            }
            for family in Family::ALL {
                let blocks = peers.into_iter().flatten().filter_map(|peer| match peer {
                    Peer::IpBlock { cidr, except } => Some((cidr, except.as_slice())),
                    Peer::Pods { .. } => None,
                });
                match cidr::block_prefixes(blocks, family, MAX_SET_MEMBERS) {
                    Ok(prefixes) => {
                        entry.blocks[index(family)] =
                            prefixes.into_iter().map(SetMember::Net).collect()
                    }
                    Err(count) => entry.too_many_blocks[index(family)] = Some(count),
                }
            }
            let mut members = entry.blocks.clone();
            for (key, pod) in &self.pods {
                if entry.selects(pod, &self.namespaces) {
                    entry.pods.insert(key.clone());
                    for ip in &pod.ips {
                        members[index(Family::of(ip))].insert(SetMember::Net(IpNet::from(*ip)));
                    }
                }
            }
            let [v4, v6] = members;
            entry.members = [Arc::new(v4), Arc::new(v6)];
            self.entries.insert(definition.to_string(), entry);
        }
        self.entries.get_mut(definition).unwrap()
    }

    /// The members of the peer set for `peers` (pod addresses and ipBlock prefixes), or how many
    /// prefixes the ipBlocks alone need when that is more than `MAX_SET_MEMBERS`.
    pub fn peer_members(
        &mut self,
        definition: &str,
        namespace: &str,
        peers: &[Peer],
        family: Family,
    ) -> Result<Members, usize> {
        let entry = self.entry(definition, namespace, Some(peers));
        match entry.too_many_blocks[index(family)] {
            Some(count) => Err(count),
            None => Ok(entry.members[index(family)].clone()),
        }
    }

    /// How many of the set's entries (for `family`) come from ipBlocks, for a definition
    /// `peer_members` has seen.
    pub fn block_entries(&self, definition: &str, family: Family) -> usize {
        self.entries
            .get(definition)
            .map_or(0, |e| e.blocks[index(family)].len())
    }

    /// (address, port) of every chosen pod (every pod, when `peers` is `None`) that has the named
    /// port with that protocol.
    pub fn named_port_members(
        &mut self,
        definition: &str,
        namespace: &str,
        peers: Option<&[Peer]>,
        port_name: &str,
        protocol: Protocol,
        family: Family,
    ) -> Members {
        self.entry(definition, namespace, peers);
        let entry = self
            .entries
            .get_mut(definition)
            .expect("just made sure it exists");
        let pods = &self.pods;
        entry
            .named
            .entry((port_name.to_string(), protocol))
            .or_insert_with(|| {
                let mut members = [BTreeSet::new(), BTreeSet::new()];
                for key in &entry.pods {
                    for pair in named_pairs(&pods[&**key], port_name, protocol) {
                        if let SetMember::IpPort(ip, ..) = &pair {
                            members[index(Family::of(ip))].insert(pair);
                        }
                    }
                }
                let [v4, v6] = members;
                [Arc::new(v4), Arc::new(v6)]
            })[index(family)]
        .clone()
    }

    /// Forgets definitions that no compile since the last call used.
    pub fn evict_unused(&mut self) {
        let used = std::mem::take(&mut self.used);
        self.entries.retain(|k, _| used.contains(k));
    }
}
