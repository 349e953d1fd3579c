//! `compile(snapshot, node, family) → DesiredState`: all NetworkPolicy semantics, no I/O.
//!
//! Layout (per family, filter table):
//! - `FORWARD`, `INPUT` and `OUTPUT` each jump first thing to a dispatch chain of ours.
//! - A dispatch chain lets replies of allowed flows through, then sends traffic from each
//!   egress-isolated local pod to that pod's egress chain and traffic to each ingress-isolated local
//!   pod to its ingress chain. A same-node flow passes both. Pod→node traffic (INPUT) meets the
//!   pod's egress chain only; traffic the node itself sends (OUTPUT from a local address) is allowed.
//! - A pod chain clears our mark bit, jumps to the chain of every policy that selects the pod for
//!   that direction, returns if one of them set the mark, and rejects otherwise.
//! - A policy chain sets the mark for every packet one of its rules allows. Peers are ipsets.
//!
//! Our chains only ever RETURN or REJECT, never ACCEPT, so the rules of kube-proxy, the CNI and the
//! host firewall after our jump still run.

use crate::cidr;
use crate::model::{ClusterSnapshot, Peer, Pod, Policy, PortRef, Protocol};
use crate::names;
use crate::peer_cache::PeerCache;
use crate::state::{
    DesiredState, FailedClosed, Family, Hook, IpSet, MAX_NAMESPACE_BLOCK_ENTRIES, MAX_SET_MEMBERS,
    Match, Members, Rule, SetDirection, SetKind, SetMember, Target,
};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// ICMPv6 neighbour discovery (router solicitation/advertisement, neighbour
/// solicitation/advertisement, redirect): link-local plumbing between a pod and its node that
/// policy must not break.
const NEIGHBOUR_DISCOVERY_TYPES: [u8; 5] = [133, 134, 135, 136, 137];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn is_ingress(self) -> bool {
        self == Direction::Ingress
    }

    fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// What a peer set stands for: selectors without a namespace selector are relative to the
/// policy's namespace.
fn peer_definition(policy: &Policy, peers: &[Peer]) -> String {
    format!("{}\0{peers:?}", policy.namespace)
}

/// The definition of "every pod" (an egress rule with named ports and no peers).
const ALL_PODS: &str = "\0all";

pub fn compile(snapshot: &ClusterSnapshot, node: &str, family: Family) -> DesiredState {
    compile_inner(snapshot, node, family, None)
}

/// `compile()`, with peer selections kept in `cache` across calls. The cache must have been
/// brought up to date with `snapshot` (`PeerCache::update`) first. Gives exactly what `compile()`
/// gives.
pub fn compile_cached(
    snapshot: &ClusterSnapshot,
    node: &str,
    family: Family,
    cache: &mut PeerCache,
) -> DesiredState {
    compile_inner(snapshot, node, family, Some(cache))
}

fn compile_inner(
    snapshot: &ClusterSnapshot,
    node: &str,
    family: Family,
    cache: Option<&mut PeerCache>,
) -> DesiredState {
    let relevant_pods: Vec<&Pod> = snapshot
        .pods
        .iter()
        .filter(|p| p.is_policy_relevant())
        .collect();
    let mut pods_by_namespace: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in &relevant_pods {
        pods_by_namespace
            .entry(pod.namespace.as_str())
            .or_default()
            .push(pod);
    }
    Compiler {
        snapshot,
        family,
        relevant_pods,
        pods_by_namespace,
        cache,
        state: DesiredState::default(),
        block_entries_by_namespace: BTreeMap::new(),
    }
    .run(node)
}

struct Compiler<'a> {
    snapshot: &'a ClusterSnapshot,
    family: Family,
    /// Pods that can be subjects or peers (not hostNetwork, not finished, with an address).
    relevant_pods: Vec<&'a Pod>,
    pods_by_namespace: BTreeMap<&'a str, Vec<&'a Pod>>,
    cache: Option<&'a mut PeerCache>,
    state: DesiredState,
    /// ipBlock entries of the sets made so far, by the namespace of the policies that use them.
    block_entries_by_namespace: BTreeMap<String, usize>,
}

/// One local pod's isolation: the policies that select it, per direction.
struct LocalPod<'a> {
    pod: &'a Pod,
    ips: Vec<IpAddr>,
    ingress: Vec<&'a Policy>,
    egress: Vec<&'a Policy>,
}

impl<'a> Compiler<'a> {
    fn run(mut self, node: &str) -> DesiredState {
        let mut policies: Vec<&Policy> = self.snapshot.policies.iter().collect();
        policies.sort_by_key(|p| p.key());

        let mut local: Vec<LocalPod> = self
            .relevant_pods
            .iter()
            .filter(|p| p.node_name.as_deref() == Some(node))
            .map(|&pod| LocalPod {
                pod,
                ips: self.family_ips(pod),
                ingress: policies
                    .iter()
                    .copied()
                    .filter(|pol| pol.isolates_ingress && pol.selects(pod))
                    .collect(),
                egress: policies
                    .iter()
                    .copied()
                    .filter(|pol| pol.isolates_egress && pol.selects(pod))
                    .collect(),
            })
            .filter(|lp| !lp.ips.is_empty())
            .collect();
        local.sort_by_key(|lp| lp.pod.key());

        let mut ingress_dispatch = Vec::new();
        let mut egress_dispatch = Vec::new();
        for lp in &local {
            for (direction, selecting) in [
                (Direction::Ingress, &lp.ingress),
                (Direction::Egress, &lp.egress),
            ] {
                if selecting.is_empty() {
                    continue;
                }
                let chain = names::pod_chain(direction.is_ingress(), &lp.pod.key());
                self.pod_chain(&chain, direction, selecting, &local);
                let comment = format!("{} {}", lp.pod.key(), direction.name());
                for ip in &lp.ips {
                    let host = IpNet::from(*ip);
                    let (m, out) = match direction {
                        Direction::Ingress => (Match::Destination(host), &mut ingress_dispatch),
                        Direction::Egress => (Match::Source(host), &mut egress_dispatch),
                    };
                    out.push(
                        Rule::new(vec![m], Target::Jump(chain.clone())).commented(comment.clone()),
                    );
                }
            }
        }

        let established = Rule::new(vec![Match::EstablishedOrRelated], Target::Return);
        let clear_mark = Rule::new(vec![], Target::ClearAllowMark);
        let neighbour_discovery: Vec<Rule> = match self.family {
            Family::V4 => vec![],
            Family::V6 => NEIGHBOUR_DISCOVERY_TYPES
                .iter()
                .map(|t| Rule::new(vec![Match::Icmp6Type(*t)], Target::Return))
                .collect(),
        };

        let mut forward = vec![established.clone()];
        forward.extend(egress_dispatch.iter().cloned());
        forward.extend(ingress_dispatch.iter().cloned());
        forward.push(clear_mark.clone());

        let mut input = vec![established.clone()];
        input.extend(neighbour_discovery.iter().cloned());
        input.extend(egress_dispatch.iter().cloned());
        input.push(clear_mark.clone());

        let mut output = vec![established];
        output.extend(neighbour_discovery);
        // The node may always reach its pods (kubelet probes); only traffic that merely leaves
        // through OUTPUT with a pod's source address (e.g. IPVS-forwarded) is judged.
        output.push(Rule::new(vec![Match::SourceIsLocal], Target::Return));
        output.extend(egress_dispatch);
        output.extend(ingress_dispatch);
        output.push(clear_mark);

        for (builtin, chain, rules) in [
            ("FORWARD", names::FORWARD_CHAIN, forward),
            ("INPUT", names::INPUT_CHAIN, input),
            ("OUTPUT", names::OUTPUT_CHAIN, output),
        ] {
            self.state.chains.insert(chain.to_string(), rules);
            self.state.hooks.push(Hook {
                builtin,
                target: chain.to_string(),
            });
        }
        self.state
    }

    fn family_ips(&self, pod: &Pod) -> Vec<IpAddr> {
        pod.ips
            .iter()
            .copied()
            .filter(|ip| Family::of(ip) == self.family)
            .collect()
    }

    fn pod_chain(
        &mut self,
        chain: &str,
        direction: Direction,
        selecting: &[&'a Policy],
        local: &[LocalPod<'a>],
    ) {
        let mut rules = vec![Rule::new(vec![], Target::ClearAllowMark)];
        for policy in selecting {
            let policy_chain = names::policy_chain(direction.is_ingress(), &policy.key());
            if !self.state.chains.contains_key(&policy_chain) {
                let body = self.policy_chain(policy, direction, local);
                self.state.chains.insert(policy_chain.clone(), body);
            }
            rules.push(
                Rule::new(vec![], Target::Jump(policy_chain)).commented(format!(
                    "policy {} {}",
                    policy.key(),
                    direction.name()
                )),
            );
        }
        rules.push(Rule::new(vec![Match::AllowMarkSet], Target::Return));
        rules.push(Rule::new(
            vec![Match::Protocol(Protocol::Tcp)],
            Target::RejectWithTcpReset,
        ));
        rules.push(Rule::new(vec![], Target::Reject));
        self.state.chains.insert(chain.to_string(), rules);
    }

    fn policy_chain(
        &mut self,
        policy: &Policy,
        direction: Direction,
        local: &[LocalPod<'a>],
    ) -> Vec<Rule> {
        let rules = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        let mut out = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            let peer_set = match rule
                .peers
                .as_ref()
                .map(|peers| self.peer_set(policy, peers))
            {
                Some(Err(too_many)) => {
                    self.fail_closed(policy, direction, index, too_many);
                    continue;
                }
                Some(Ok(name)) => Some(name),
                None => None,
            };
            let peer_match = peer_set.map(|name| Match::Set {
                name,
                direction: match direction {
                    Direction::Ingress => SetDirection::Src,
                    Direction::Egress => SetDirection::Dst,
                },
            });
            let Some(ports) = &rule.ports else {
                out.push(Rule::new(
                    peer_match.into_iter().collect(),
                    Target::SetAllowMark,
                ));
                continue;
            };
            for (port_index, spec) in ports.iter().enumerate() {
                let mut matches: Vec<Match> = Vec::new();
                match &spec.port {
                    None => {
                        matches.extend(peer_match.clone());
                        matches.push(Match::Protocol(spec.protocol));
                    }
                    Some(PortRef::Range { first, last }) => {
                        matches.extend(peer_match.clone());
                        matches.push(Match::Protocol(spec.protocol));
                        matches.push(Match::DestinationPorts {
                            first: *first,
                            last: *last,
                        });
                    }
                    Some(PortRef::Named(port_name)) => {
                        let definition = format!(
                            "{}\0{}\0{index}\0{port_index}",
                            policy.key(),
                            direction.name()
                        );
                        let set = names::named_port_set(self.family, &definition);
                        let members = match direction {
                            // Resolved on the destination: the local pods this policy selects.
                            Direction::Ingress => {
                                matches.extend(peer_match.clone());
                                let selected =
                                    local.iter().map(|lp| lp.pod).filter(|p| policy.selects(p));
                                Members::new(self.named_port_members(
                                    selected,
                                    port_name,
                                    spec.protocol,
                                ))
                            }
                            // Resolved on each destination peer pod; never on ipBlocks.
                            Direction::Egress if self.cache.is_some() => {
                                let definition = match &rule.peers {
                                    None => ALL_PODS.to_string(),
                                    Some(peers) => peer_definition(policy, peers),
                                };
                                let family = self.family;
                                let cache = self.cache.as_deref_mut().unwrap();
                                cache.named_port_members(
                                    &definition,
                                    &policy.namespace,
                                    rule.peers.as_deref(),
                                    port_name,
                                    spec.protocol,
                                    family,
                                )
                            }
                            Direction::Egress => {
                                let peers: Vec<&Pod> = match &rule.peers {
                                    None => self.relevant_pods.clone(),
                                    Some(peers) => self.peer_pods(policy, peers),
                                };
                                Members::new(self.named_port_members(
                                    peers.into_iter(),
                                    port_name,
                                    spec.protocol,
                                ))
                            }
                        };
                        if members.len() > MAX_SET_MEMBERS {
                            let reason = format!(
                                "its named port {port_name:?} resolves to more than {MAX_SET_MEMBERS} {} entries ({})",
                                self.family,
                                members.len()
                            );
                            self.fail_closed(policy, direction, index, reason);
                            continue;
                        }
                        self.state.sets.insert(
                            set.clone(),
                            IpSet {
                                kind: SetKind::HashIpPort,
                                family: self.family,
                                members,
                            },
                        );
                        matches.push(Match::Set {
                            name: set,
                            direction: SetDirection::DstDstPort,
                        });
                    }
                }
                out.push(Rule::new(matches, Target::SetAllowMark));
            }
        }
        out
    }

    fn named_port_members<'p>(
        &self,
        pods: impl Iterator<Item = &'p Pod>,
        port_name: &str,
        protocol: Protocol,
    ) -> BTreeSet<SetMember> {
        let mut members = BTreeSet::new();
        for pod in pods {
            for cp in &pod.ports {
                if cp.name.as_deref() == Some(port_name) && cp.protocol == protocol {
                    for ip in self.family_ips(pod) {
                        members.insert(SetMember::IpPort(ip, protocol, cp.port));
                    }
                }
            }
        }
        members
    }

    /// Pods (any node) that the pod/namespace selectors of `peers` choose. Namespace selectors are
    /// judged once per namespace, then only that namespace's pods are looked at.
    fn peer_pods(&self, policy: &Policy, peers: &[Peer]) -> Vec<&'a Pod> {
        let mut chosen: Vec<&'a Pod> = Vec::new();
        for peer in peers {
            let Peer::Pods { namespaces, pods } = peer else {
                continue;
            };
            let namespace_names: Vec<&str> = match namespaces {
                None => vec![policy.namespace.as_str()],
                Some(selector) => self
                    .snapshot
                    .namespaces
                    .values()
                    .filter(|ns| selector.matches(&ns.labels))
                    .map(|ns| ns.name.as_str())
                    .collect(),
            };
            for name in namespace_names {
                let in_namespace = self
                    .pods_by_namespace
                    .get(name)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                chosen.extend(
                    in_namespace
                        .iter()
                        .copied()
                        .filter(|pod| pods.as_ref().is_none_or(|s| s.matches(&pod.labels))),
                );
            }
        }
        // A pod chosen by several peers counts once.
        chosen.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        chosen.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
        chosen
    }

    /// Creates (or reuses) the set holding every address `peers` allows, and returns its name; or,
    /// when that would be more than [`MAX_SET_MEMBERS`] addresses and prefixes, how many (at least).
    fn peer_set(&mut self, policy: &Policy, peers: &[Peer]) -> Result<String, String> {
        let definition = peer_definition(policy, peers);
        let name = names::peer_set(self.family, &definition);
        if self.state.sets.contains_key(&name) {
            return Ok(name);
        }
        let too_many = |count: usize| {
            format!(
                "its {} peers need a set of more than {MAX_SET_MEMBERS} entries ({count} or more)",
                self.family
            )
        };
        let (members, block_entries) = match self.cache.as_deref_mut() {
            Some(cache) => {
                let members = cache
                    .peer_members(&definition, &policy.namespace, peers, self.family)
                    .map_err(too_many)?;
                (members, cache.block_entries(&definition, self.family))
            }
            None => {
                let blocks = peers.iter().filter_map(|peer| match peer {
                    Peer::IpBlock { cidr, except } => Some((cidr, except.as_slice())),
                    Peer::Pods { .. } => None,
                });
                let mut members: BTreeSet<SetMember> =
                    cidr::block_prefixes(blocks, self.family, MAX_SET_MEMBERS)
                        .map_err(too_many)?
                        .into_iter()
                        .map(SetMember::Net)
                        .collect();
                let block_entries = members.len();
                for pod in self.peer_pods(policy, peers) {
                    for ip in self.family_ips(pod) {
                        members.insert(SetMember::Net(IpNet::from(ip)));
                    }
                }
                (members.into(), block_entries)
            }
        };
        if members.len() > MAX_SET_MEMBERS {
            return Err(too_many(members.len()));
        }
        // One tenant must not add up, over many policies, what one set may not hold: the ipBlock
        // entries of a namespace's policies share one budget (policies in name order).
        let used = self
            .block_entries_by_namespace
            .entry(policy.namespace.clone())
            .or_default();
        if *used + block_entries > MAX_NAMESPACE_BLOCK_ENTRIES {
            return Err(format!(
                "the ipBlocks of namespace {}'s policies need more than {MAX_NAMESPACE_BLOCK_ENTRIES} {} set entries in all ({} before this rule, {block_entries} for it)",
                policy.namespace, self.family, *used
            ));
        }
        *used += block_entries;
        self.state.sets.insert(
            name.clone(),
            IpSet {
                kind: SetKind::HashNet,
                family: self.family,
                members,
            },
        );
        Ok(name)
    }

    /// Leaves a rule out (it allows nothing) because it cannot be programmed, and says why.
    fn fail_closed(&mut self, policy: &Policy, direction: Direction, rule: usize, reason: String) {
        self.state.failed_closed.push(FailedClosed {
            policy: policy.key(),
            direction: direction.name(),
            rule,
            reason,
        });
    }
}
