//! Chain and rule building for one node and one family: all NetworkPolicy semantics, no I/O.
//!
//! Layout (per family, filter table):
//! - `FORWARD`, `INPUT` and `OUTPUT` each jump first thing to a dispatch chain of ours.
//! - A dispatch chain lets replies of allowed flows through, then sends traffic from each
//!   egress-isolated local pod to that pod's egress chain and traffic to each ingress-isolated local
//!   pod to its ingress chain. A same-node flow passes both. Pod→node traffic (INPUT) meets the
//!   pod's egress chain only; traffic the node itself sends (OUTPUT from a local address) is allowed.
//! - A pod chain clears our mark bit, jumps to the chain of every policy that selects the pod for
//!   that direction, returns if one of them set the mark, and rejects otherwise.
//! - A policy chain sets the mark for every packet one of its rules allows. Peers are sets, one
//!   per distinct selection (see [`super::peers`]): a rule with N peers has N rules per port, each
//!   matching one peer's set, so no set is ever made for a particular combination of peers.
//!
//! Our chains only ever RETURN or REJECT, never ACCEPT, so the rules of kube-proxy, the CNI and the
//! host firewall after our jump still run.

use super::ir::{
    DesiredState, FailedClosed, Hook, IpSet, MAX_NAMESPACE_BLOCK_ENTRIES, MAX_SET_MEMBERS, Match,
    Members, Rule, SetDirection, SetKind, SetMember, Target,
};
use super::names;
use super::peers::{self, Blocks, Selections, SetRef};
use super::selection::PodSelection;
use crate::model::{ClusterSnapshot, Family, Peer, Pod, Policy, PolicyRule, PortRef, Protocol};
use ipnet::IpNet;
use std::collections::{BTreeSet, HashMap};
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

    /// Which address of the packet a peer set matches.
    fn peer_side(self) -> SetDirection {
        match self {
            Direction::Ingress => SetDirection::Src,
            Direction::Egress => SetDirection::Dst,
        }
    }
}

/// The desired state of `family` on `node`; `selections` must be up to date with `snapshot`.
pub(super) fn build(
    snapshot: &ClusterSnapshot,
    node: &str,
    family: Family,
    selections: &mut Selections,
) -> DesiredState {
    ChainBuilder {
        snapshot,
        family,
        selections,
        state: DesiredState::default(),
        block_entries_by_namespace: HashMap::new(),
    }
    .run(node)
}

struct ChainBuilder<'a> {
    snapshot: &'a ClusterSnapshot,
    family: Family,
    selections: &'a mut Selections,
    state: DesiredState,
    /// Per namespace: the ipBlock sets its policies use so far and their entries in all.
    block_entries_by_namespace: HashMap<String, (usize, BTreeSet<String>)>,
}

/// One local pod's isolation: the policies that select it, per direction.
struct LocalPod<'a> {
    pod: &'a Pod,
    ips: Vec<IpAddr>,
    ingress: Vec<&'a Policy>,
    egress: Vec<&'a Policy>,
}

/// The sets and rules of one policy rule, kept apart until the whole rule is known to fit.
#[derive(Default)]
struct RuleParts {
    sets: Vec<(String, IpSet)>,
    rules: Vec<Rule>,
    /// ipBlock entries to charge to the policy's namespace: (set name, entries).
    block_charge: Option<(String, usize)>,
}

impl<'a> ChainBuilder<'a> {
    fn run(mut self, node: &str) -> DesiredState {
        let mut policies: Vec<&Policy> = self.snapshot.policies.iter().collect();
        policies.sort_by_key(|p| p.key());

        let mut local: Vec<LocalPod> = self
            .snapshot
            .pods
            .iter()
            .filter(|p| p.is_policy_relevant() && p.node_name.as_deref() == Some(node))
            .map(|pod| LocalPod {
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
            match self.rule(policy, direction, rule, local) {
                Ok(parts) => {
                    if let Some((set, entries)) = parts.block_charge {
                        let used = self
                            .block_entries_by_namespace
                            .entry(policy.namespace.clone())
                            .or_default();
                        if used.1.insert(set) {
                            used.0 += entries;
                        }
                    }
                    self.state.sets.extend(parts.sets);
                    out.extend(parts.rules);
                }
                Err(reason) => self.state.failed_closed.push(FailedClosed {
                    policy: policy.key(),
                    direction: direction.name(),
                    rule: index,
                    reason,
                }),
            }
        }
        out
    }

    /// The rules (and their sets) for one policy rule, or why it cannot be programmed (then it
    /// fails closed: it allows nothing).
    fn rule(
        &mut self,
        policy: &Policy,
        direction: Direction,
        rule: &PolicyRule,
        local: &[LocalPod<'a>],
    ) -> Result<RuleParts, String> {
        let mut parts = RuleParts::default();
        // `None`: any peer. Otherwise one match per distinct peer set.
        let mut peer_matches: Option<Vec<Match>> = None;
        let mut pod_selections: Vec<PodSelection> = Vec::new();
        if let Some(peers) = &rule.peers {
            let mut matches = Vec::new();
            let mut blocks: Blocks = Vec::new();
            for peer in peers {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        let selection = PodSelection::of_peer(
                            &policy.namespace,
                            namespaces.as_ref(),
                            pods.as_ref(),
                        );
                        if pod_selections.contains(&selection) {
                            continue;
                        }
                        let set = self.selections.pod_set(&selection, self.family);
                        self.check_size(&set.members, "peers")?;
                        matches.push(self.add_set(
                            &mut parts,
                            set,
                            SetKind::HashIp,
                            direction.peer_side(),
                        ));
                        pod_selections.push(selection);
                    }
                    Peer::IpBlock { cidr, except } => blocks.push((*cidr, except.clone())),
                }
            }
            if !blocks.is_empty() {
                let set = self.selections.block_set(&blocks, self.family).map_err(|count| {
                    format!(
                        "its {} ipBlocks need a set of more than {MAX_SET_MEMBERS} entries ({count} or more)",
                        self.family
                    )
                })?;
                if let Some(set) = set {
                    self.check_block_budget(policy, &set)?;
                    parts.block_charge = Some((set.name.clone(), set.members.len()));
                    matches.push(self.add_set(
                        &mut parts,
                        set,
                        SetKind::HashNet,
                        direction.peer_side(),
                    ));
                }
            }
            peer_matches = Some(matches);
        }
        let peer_alternatives: Vec<Option<Match>> = match &peer_matches {
            None => vec![None],
            Some(matches) => matches.iter().cloned().map(Some).collect(),
        };
        let Some(ports) = &rule.ports else {
            for peer in &peer_alternatives {
                parts.rules.push(Rule::new(
                    peer.iter().cloned().collect(),
                    Target::SetAllowMark,
                ));
            }
            return Ok(parts);
        };
        for spec in ports {
            let port_matches: Vec<Match> = match &spec.port {
                None => vec![Match::Protocol(spec.protocol)],
                Some(PortRef::Range { first, last }) => vec![
                    Match::Protocol(spec.protocol),
                    Match::DestinationPorts {
                        first: *first,
                        last: *last,
                    },
                ],
                Some(PortRef::Named(port_name)) => {
                    self.named_port_rules(
                        &mut parts,
                        policy,
                        direction,
                        rule,
                        &pod_selections,
                        &peer_alternatives,
                        port_name,
                        spec.protocol,
                        local,
                    )?;
                    continue;
                }
            };
            for peer in &peer_alternatives {
                let mut matches: Vec<Match> = peer.iter().cloned().collect();
                matches.extend(port_matches.iter().cloned());
                parts.rules.push(Rule::new(matches, Target::SetAllowMark));
            }
        }
        Ok(parts)
    }

    /// Rules for a named port. Ingress: resolved on the destination, the local pods the policy
    /// selects, and combined with each peer. Egress: resolved on each peer selection's pods (every
    /// pod when the rule has no peers; never on ipBlocks), which is the peer match itself.
    #[allow(clippy::too_many_arguments)]
    fn named_port_rules(
        &mut self,
        parts: &mut RuleParts,
        policy: &Policy,
        direction: Direction,
        rule: &PolicyRule,
        pod_selections: &[PodSelection],
        peer_alternatives: &[Option<Match>],
        port_name: &str,
        protocol: Protocol,
        local: &[LocalPod<'a>],
    ) -> Result<(), String> {
        let what = format!("its named port {port_name:?}");
        match direction {
            Direction::Ingress => {
                let selected =
                    PodSelection::of_peer(&policy.namespace, None, Some(&policy.pod_selector));
                let members = local
                    .iter()
                    .filter(|lp| policy.selects(lp.pod))
                    .flat_map(|lp| peers::named_pairs(lp.pod, port_name, protocol))
                    .filter(
                        |m| matches!(m, SetMember::IpPort(ip, ..) if Family::of(ip) == self.family),
                    )
                    .collect::<BTreeSet<_>>();
                let set = SetRef {
                    name: names::local_named_port_set(self.family, &selected, port_name, protocol),
                    members: Members::new(members),
                };
                self.check_size(&set.members, &what)?;
                let named = self.add_set(parts, set, SetKind::HashIpPort, SetDirection::DstDstPort);
                for peer in peer_alternatives {
                    let mut matches: Vec<Match> = peer.iter().cloned().collect();
                    matches.push(named.clone());
                    parts.rules.push(Rule::new(matches, Target::SetAllowMark));
                }
            }
            Direction::Egress => {
                let everything = [PodSelection::everything()];
                let selections = match rule.peers {
                    None => &everything[..],
                    Some(_) => pod_selections,
                };
                for selection in selections {
                    let set =
                        self.selections
                            .named_port_set(selection, port_name, protocol, self.family);
                    self.check_size(&set.members, &what)?;
                    let named =
                        self.add_set(parts, set, SetKind::HashIpPort, SetDirection::DstDstPort);
                    parts
                        .rules
                        .push(Rule::new(vec![named], Target::SetAllowMark));
                }
            }
        }
        Ok(())
    }

    /// Records `set` for the rule and returns the match on it.
    fn add_set(
        &self,
        parts: &mut RuleParts,
        set: SetRef,
        kind: SetKind,
        direction: SetDirection,
    ) -> Match {
        let m = Match::Set {
            name: set.name.clone(),
            direction,
        };
        parts.sets.push((
            set.name,
            IpSet {
                kind,
                family: self.family,
                members: set.members,
            },
        ));
        m
    }

    fn check_size(&self, members: &Members, what: &str) -> Result<(), String> {
        if members.len() > MAX_SET_MEMBERS {
            return Err(format!(
                "{what} need a set of more than {MAX_SET_MEMBERS} {} entries ({})",
                self.family,
                members.len()
            ));
        }
        Ok(())
    }

    /// One tenant must not add up, over many policies, what one set may not hold: the distinct
    /// ipBlock sets of a namespace's policies share one budget.
    fn check_block_budget(&self, policy: &Policy, set: &SetRef) -> Result<(), String> {
        let (used, sets) = self
            .block_entries_by_namespace
            .get(&policy.namespace)
            .map(|(u, s)| (*u, Some(s)))
            .unwrap_or((0, None));
        let entries = set.members.len();
        if sets.is_some_and(|s| s.contains(&set.name))
            || used + entries <= MAX_NAMESPACE_BLOCK_ENTRIES
        {
            return Ok(());
        }
        Err(format!(
            "the ipBlocks of namespace {}'s policies need more than {MAX_NAMESPACE_BLOCK_ENTRIES} {} set entries in all ({used} before this rule, {entries} for it)",
            policy.namespace, self.family
        ))
    }
}
