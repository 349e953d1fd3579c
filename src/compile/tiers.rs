//! ClusterNetworkPolicy tiers in the pod chains: which cluster policies apply to a local pod, the
//! chain of one cluster policy, and the layout of a pod chain with tiers.
//!
//! Per direction, a pod chain with tiers reads:
//!
//! ```text
//! clear ALLOW|TIER
//! [self address]           set TIER            (self traffic skips the Admin tier, like a Pass)
//! [TIER clear]             -j KNI-CNPx-<admin> (by priority, then name)
//! [ALLOW]                  RETURN              (an Admin Accept ends the direction)
//! clear ALLOW|TIER
//! NetworkPolicy stage: -j KNI-POLx-…, [ALLOW] RETURN, deny      (if any NetworkPolicy selects)
//! or: [self address] RETURN, [TIER clear] -j KNI-CNPx-<baseline>  (falls off: allowed)
//! ```
//!
//! A cluster policy chain has one rule per (rule × port × peer set), each only while no rule of
//! the tier decided (`TIER` clear): Accept sets `TIER|ALLOW`, Pass sets `TIER`, Deny denies on
//! the spot (the pod chains' deny pair, which the deny action turns into one DROP). Chains RETURN
//! rather than ACCEPT, so an egress Accept still meets the destination's ingress on a same-node
//! flow.

use super::ir::{
    FailedClosed, IpSet, MAX_SET_MEMBERS, Match, Rule, RuleOrigin, SetDirection, SetKind, Target,
};
use super::peers::{Blocks, SetRef, SharedSelections};
use super::rules::Direction;
use super::selection::{NamespaceScope, PodSelection};
use crate::model::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, ClusterRuleAction, ClusterSnapshot,
    ClusterSubject, Family, LabelSelector, Pod, Protocol, Tier,
};
use ipnet::IpNet;
use std::net::IpAddr;

/// The cluster policies that apply to one local pod in one direction, in evaluation order.
#[derive(Default)]
pub(super) struct PodTiers<'a> {
    pub admin: Vec<&'a ClusterPolicy>,
    pub baseline: Vec<&'a ClusterPolicy>,
}

impl PodTiers<'_> {
    pub(super) fn is_empty(&self) -> bool {
        self.admin.is_empty() && self.baseline.is_empty()
    }
}

/// The cluster policies in evaluation order: by priority, ties by name.
pub(super) fn ordered(snapshot: &ClusterSnapshot) -> Vec<&ClusterPolicy> {
    let mut policies: Vec<&ClusterPolicy> = snapshot.cluster_policies.iter().collect();
    policies.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    policies
}

fn namespace_scope(selector: &LabelSelector) -> NamespaceScope {
    if selector.is_empty() {
        NamespaceScope::All
    } else {
        NamespaceScope::Matching(selector.canonical())
    }
}

/// The pods a subject (or a `namespaces`/`pods` peer) stands for, as the selection NetworkPolicy
/// peers use: a `namespaces` peer is the same set as a namespaceSelector-only peer.
pub(super) fn subject_selection(subject: &ClusterSubject) -> PodSelection {
    match subject {
        ClusterSubject::Namespaces(namespaces) => PodSelection {
            namespaces: namespace_scope(namespaces),
            pods: LabelSelector::default(),
        },
        ClusterSubject::Pods { namespaces, pods } => PodSelection {
            namespaces: namespace_scope(namespaces),
            pods: pods.canonical(),
        },
    }
}

/// The cluster policies with rules for `direction` whose subject is `pod` (a policy-relevant
/// pod: hostNetwork pods are never subjects), in evaluation order per tier.
pub(super) fn pod_tiers<'a>(
    ordered: &[&'a ClusterPolicy],
    snapshot: &ClusterSnapshot,
    pod: &Pod,
    direction: Direction,
) -> PodTiers<'a> {
    let mut tiers = PodTiers::default();
    if ordered.is_empty() {
        return tiers;
    }
    let namespace_labels = snapshot.namespaces.get(&pod.namespace).map(|n| &n.labels);
    for policy in ordered {
        let rules = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        if rules.is_empty() || !subject_selection(&policy.subject).selects(pod, namespace_labels) {
            continue;
        }
        match policy.tier {
            Tier::Admin => tiers.admin.push(policy),
            Tier::Baseline => tiers.baseline.push(policy),
        }
    }
    tiers
}

/// The rules of a pod chain with tiers (see the module documentation). `admin`, `baseline`: the
/// jumps to the cluster policy chains in order; `network_policies`: the jumps to the
/// NetworkPolicy chains, `None` when none selects the pod for this direction.
pub(super) fn pod_chain(
    ips: &[IpAddr],
    direction: Direction,
    admin: Vec<Rule>,
    network_policies: Option<Vec<Rule>>,
    baseline: Vec<Rule>,
) -> Vec<Rule> {
    // A pod reaching its own address is not subject to cluster policies.
    let own = |ip: &IpAddr| match direction {
        Direction::Ingress => Match::Source(IpNet::from(*ip)),
        Direction::Egress => Match::Destination(IpNet::from(*ip)),
    };
    let undecided = |mut jump: Rule| {
        jump.matches.insert(0, Match::TierUndecided);
        jump
    };
    let mut rules = vec![Rule::new(vec![], Target::ClearMarks)];
    if !admin.is_empty() {
        for ip in ips {
            rules.push(Rule::new(
                vec![own(ip)],
                Target::SetTierMark { accept: false },
            ));
        }
        rules.extend(admin.into_iter().map(undecided));
        rules.push(Rule::new(vec![Match::AllowMarkSet], Target::Return));
        if network_policies.is_none() && baseline.is_empty() {
            return rules;
        }
        rules.push(Rule::new(vec![], Target::ClearMarks));
    }
    if let Some(jumps) = network_policies {
        rules.extend(jumps);
        rules.push(Rule::new(vec![Match::AllowMarkSet], Target::Return));
        rules.extend(deny(vec![]));
    } else if !baseline.is_empty() {
        for ip in ips {
            rules.push(Rule::new(vec![own(ip)], Target::Return));
        }
        rules.extend(baseline.into_iter().map(undecided));
    }
    rules
}

/// The deny pair for a packet matching `matches`: a TCP reset for TCP, ICMP unreachable for the
/// rest (`enforcement::apply_deny_action` turns both into one DROP by default). No reset rule
/// when `matches` pin another protocol.
fn deny(matches: Vec<Match>) -> Vec<Rule> {
    let protocol = matches.iter().find_map(|m| match m {
        Match::Protocol(p) => Some(*p),
        _ => None,
    });
    let mut out = Vec::new();
    match protocol {
        Some(Protocol::Tcp) => out.push(Rule::new(matches.clone(), Target::RejectWithTcpReset)),
        Some(_) => {}
        None => {
            let mut tcp = matches.clone();
            tcp.push(Match::Protocol(Protocol::Tcp));
            out.push(Rule::new(tcp, Target::RejectWithTcpReset));
        }
    }
    out.push(Rule::new(matches, Target::Reject));
    out
}

/// A cluster policy's chain for one direction, with the sets its rules match.
pub(super) struct PolicyChain {
    pub rules: Vec<Rule>,
    pub origins: Vec<RuleOrigin>,
    pub sets: Vec<(String, IpSet)>,
    pub failed_closed: Vec<FailedClosed>,
}

pub(super) fn policy_chain(
    snapshot: &ClusterSnapshot,
    selections: SharedSelections<'_>,
    family: Family,
    policy: &ClusterPolicy,
    direction: Direction,
) -> PolicyChain {
    let mut chain = PolicyChain {
        rules: vec![],
        origins: vec![],
        sets: vec![],
        failed_closed: vec![],
    };
    let rules = match direction {
        Direction::Ingress => &policy.ingress,
        Direction::Egress => &policy.egress,
    };
    for (index, rule) in rules.iter().enumerate() {
        let mut builder = RuleBuilder {
            snapshot,
            selections,
            family,
            direction,
            sets: &mut chain.sets,
        };
        let peers = match builder.peers(rule) {
            Ok(peers) => Some(peers),
            Err(reason) => {
                chain.failed_closed.push(FailedClosed {
                    policy: policy.name.clone(),
                    direction: direction.name(),
                    rule: index,
                    reason: if rule.action == ClusterRuleAction::Deny {
                        format!("{reason}; the Deny applies to every peer instead")
                    } else {
                        reason
                    },
                });
                // A Deny too large to program denies every peer (closed); Accept and Pass
                // rules are left out.
                (rule.action == ClusterRuleAction::Deny).then(|| vec![(None, None)])
            }
        };
        let Some(peers) = peers else { continue };
        let ports = builder.ports(rule);
        for (port_matches, port) in &ports {
            for (peer_match, peer_indices) in &peers {
                let mut matches = vec![Match::TierUndecided];
                matches.extend(peer_match.iter().cloned());
                matches.extend(port_matches.iter().cloned());
                let origin = RuleOrigin {
                    rule: index,
                    peers: peer_indices.clone(),
                    port: *port,
                };
                let kernel_rules = match rule.action {
                    ClusterRuleAction::Accept => {
                        vec![Rule::new(matches, Target::SetTierMark { accept: true })]
                    }
                    ClusterRuleAction::Pass => {
                        vec![Rule::new(matches, Target::SetTierMark { accept: false })]
                    }
                    ClusterRuleAction::Deny => deny(matches),
                };
                for r in kernel_rules {
                    chain.rules.push(r.commented(comment(policy, index, rule)));
                    chain.origins.push(origin.clone());
                }
            }
        }
    }
    chain
}

fn comment(policy: &ClusterPolicy, index: usize, rule: &ClusterRule) -> String {
    format!(
        "cnp {} {} rule {index} {}",
        policy.tier.as_str(),
        policy.name,
        rule.action.as_str()
    )
}

/// One peer alternative of a rule: the match (`None`: any peer) and the peers it stands for.
type PeerAlternative = (Option<Match>, Option<Vec<usize>>);

struct RuleBuilder<'b> {
    snapshot: &'b ClusterSnapshot,
    selections: SharedSelections<'b>,
    family: Family,
    direction: Direction,
    sets: &'b mut Vec<(String, IpSet)>,
}

impl RuleBuilder<'_> {
    fn side(&self) -> SetDirection {
        match self.direction {
            Direction::Ingress => SetDirection::Src,
            Direction::Egress => SetDirection::Dst,
        }
    }

    fn add_set(&mut self, set: SetRef, kind: SetKind, direction: SetDirection) -> Match {
        let m = Match::Set {
            name: set.name.clone(),
            direction,
        };
        self.sets.push((
            set.name,
            IpSet {
                kind,
                family: self.family,
                members: set.members,
            },
        ));
        m
    }

    /// One alternative per distinct pod selection, one for all networks and nodes together (a
    /// `hash:net` set, shared with NetworkPolicy ipBlocks of the same prefixes). Peers that match
    /// nothing in this family (domainNames, networks of the other family) give none.
    fn peers(&mut self, rule: &ClusterRule) -> Result<Vec<PeerAlternative>, String> {
        let mut out: Vec<PeerAlternative> = Vec::new();
        let mut selections: Vec<PodSelection> = Vec::new();
        let mut blocks: Blocks = Vec::new();
        let mut block_peers = Vec::new();
        for (index, peer) in rule.peers.iter().enumerate() {
            let selection = match peer {
                ClusterPeer::Namespaces(namespaces) => PodSelection {
                    namespaces: namespace_scope(namespaces),
                    pods: LabelSelector::default(),
                },
                ClusterPeer::Pods { namespaces, pods } => PodSelection {
                    namespaces: namespace_scope(namespaces),
                    pods: pods.canonical(),
                },
                ClusterPeer::Networks(networks) => {
                    blocks.extend(networks.iter().map(|n| (*n, vec![])));
                    block_peers.push(index);
                    continue;
                }
                ClusterPeer::Nodes(selector) => {
                    let addresses = self
                        .snapshot
                        .nodes
                        .values()
                        .filter(|node| selector.matches(&node.labels))
                        .flat_map(|node| &node.addresses);
                    blocks.extend(addresses.map(|ip| (IpNet::from(*ip), vec![])));
                    block_peers.push(index);
                    continue;
                }
                // Matches nothing: enforcing names needs the DNS replies held (see the docs).
                ClusterPeer::DomainNames(_) => continue,
            };
            if let Some(k) = selections.iter().position(|s| *s == selection) {
                if let (_, Some(indices)) = &mut out[k] {
                    indices.push(index);
                }
                continue;
            }
            let set = self.selections.pod_set(&selection, self.family);
            if set.members.len() > MAX_SET_MEMBERS {
                return Err(format!(
                    "its peers need a set of more than {MAX_SET_MEMBERS} {} entries",
                    self.family
                ));
            }
            let side = self.side();
            let m = self.add_set(set, SetKind::HashIp, side);
            selections.push(selection);
            out.push((Some(m), Some(vec![index])));
        }
        if !blocks.is_empty() {
            let set = self
                .selections
                .block_set(&blocks, self.family)
                .map_err(|count| {
                    format!(
                        "its {} networks need a set of more than {MAX_SET_MEMBERS} entries ({count} or more)",
                        self.family
                    )
                })?;
            if let Some(set) = set {
                let side = self.side();
                let m = self.add_set(set, SetKind::HashNet, side);
                out.push((Some(m), Some(block_peers)));
            }
        }
        Ok(out)
    }

    /// The port alternatives (matches, port index); `None` ports: one alternative, any packet.
    /// A named port is resolved on the destination pod: one `hash:ip,port` set per protocol that
    /// some pod declares the name with (number and protocol both match).
    fn ports(&mut self, rule: &ClusterRule) -> Vec<(Vec<Match>, Option<usize>)> {
        let Some(ports) = &rule.ports else {
            return vec![(vec![], None)];
        };
        let mut out = Vec::new();
        for (index, port) in ports.iter().enumerate() {
            match port {
                ClusterPort::Protocol { protocol, ports } => {
                    let mut matches = vec![Match::Protocol(*protocol)];
                    if let Some((first, last)) = ports {
                        matches.push(Match::DestinationPorts {
                            first: *first,
                            last: *last,
                        });
                    }
                    out.push((matches, Some(index)));
                }
                ClusterPort::Named(name) => {
                    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                        let set = self.selections.named_port_set(
                            &PodSelection::everything(),
                            name,
                            protocol,
                            self.family,
                        );
                        if set.members.is_empty() {
                            continue;
                        }
                        let m = self.add_set(set, SetKind::HashIpPort, SetDirection::DstDstPort);
                        out.push((vec![Match::Protocol(protocol), m], Some(index)));
                    }
                }
            }
        }
        out
    }
}
