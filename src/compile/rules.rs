//! One policy rule → the rules of a policy chain and the sets they match. Peers are sets, one
//! per distinct selection (see [`super::peers`]): a rule with N peers has N rules per port, each
//! matching one peer's set, so no set is ever made for a particular combination of peers.

use super::ir::{
    IpSet, MAX_NAMESPACE_BLOCK_ENTRIES, MAX_SET_MEMBERS, Match, Members, Rule, RuleOrigin,
    SetDirection, SetKind, SetMember, Target,
};
use super::names;
use super::peers::{self, Blocks, SetRef, SharedSelections};
use super::selection::PodSelection;
use crate::model::{Family, Peer, Pod, Policy, PolicyRule, PortRef, Protocol};
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub(super) fn is_ingress(self) -> bool {
        self == Direction::Ingress
    }

    pub(super) fn name(self) -> &'static str {
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

/// The sets and rules of one policy rule, kept apart until the whole rule is known to fit.
#[derive(Default)]
pub(super) struct RuleParts {
    pub sets: Vec<(String, IpSet)>,
    pub rules: Vec<Rule>,
    /// Per rule: which peers and port it stands for (`rule` is filled in by the caller).
    pub origins: Vec<RuleOrigin>,
    /// ipBlock entries to charge to the policy's namespace: (set name, entries).
    pub block_charge: Option<(String, usize)>,
}

pub(super) struct RuleBuilder<'s> {
    pub family: Family,
    pub selections: SharedSelections<'s>,
    /// Per namespace: the ipBlock sets its policies use so far and their entries in all.
    pub block_entries_by_namespace: &'s HashMap<String, (usize, BTreeSet<String>)>,
}

impl RuleBuilder<'_> {
    /// The rules (and their sets) for one policy rule, or why it cannot be programmed (then it
    /// fails closed: it allows nothing).
    pub(super) fn rule(
        mut self,
        policy: &Policy,
        direction: Direction,
        rule: &PolicyRule,
        local: &[&Pod],
    ) -> Result<RuleParts, String> {
        let mut parts = RuleParts::default();
        // `None`: any peer. Otherwise one match per distinct peer set.
        let mut peer_matches: Option<Vec<Match>> = None;
        let mut pod_selections: Vec<PodSelection> = Vec::new();
        // Parallel to the peer matches: the indices of the peers each stands for.
        let mut match_peers: Vec<Vec<usize>> = Vec::new();
        if let Some(peers) = &rule.peers {
            let mut matches = Vec::new();
            let mut blocks: Blocks = Vec::new();
            let mut block_peers = Vec::new();
            for (peer_index, peer) in peers.iter().enumerate() {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        let selection = PodSelection::of_peer(
                            &policy.namespace,
                            namespaces.as_ref(),
                            pods.as_ref(),
                        );
                        if let Some(k) = pod_selections.iter().position(|s| *s == selection) {
                            match_peers[k].push(peer_index);
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
                        match_peers.push(vec![peer_index]);
                    }
                    Peer::IpBlock { cidr, except } => {
                        blocks.push((*cidr, except.clone()));
                        block_peers.push(peer_index);
                    }
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
                    match_peers.push(block_peers);
                }
            }
            peer_matches = Some(matches);
        }
        let peer_alternatives: Vec<Option<Match>> = match &peer_matches {
            None => vec![None],
            Some(matches) => matches.iter().cloned().map(Some).collect(),
        };
        let alternative_peers: Vec<Option<Vec<usize>>> = match &peer_matches {
            None => vec![None],
            Some(_) => match_peers.iter().cloned().map(Some).collect(),
        };
        let Some(ports) = &rule.ports else {
            for (peer, peers) in peer_alternatives.iter().zip(&alternative_peers) {
                parts.rules.push(Rule::new(
                    peer.iter().cloned().collect(),
                    Target::SetAllowMark,
                ));
                parts.origins.push(origin(peers, None));
            }
            return Ok(parts);
        };
        for (port_index, spec) in ports.iter().enumerate() {
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
                        (&pod_selections, &match_peers),
                        (&peer_alternatives, &alternative_peers),
                        (port_name, port_index),
                        spec.protocol,
                        local,
                    )?;
                    continue;
                }
            };
            for (peer, peers) in peer_alternatives.iter().zip(&alternative_peers) {
                let mut matches: Vec<Match> = peer.iter().cloned().collect();
                matches.extend(port_matches.iter().cloned());
                parts.rules.push(Rule::new(matches, Target::SetAllowMark));
                parts.origins.push(origin(peers, Some(port_index)));
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
        (pod_selections, selection_peers): (&[PodSelection], &[Vec<usize>]),
        (peer_alternatives, alternative_peers): (&[Option<Match>], &[Option<Vec<usize>>]),
        (port_name, port_index): (&str, usize),
        protocol: Protocol,
        local: &[&Pod],
    ) -> Result<(), String> {
        let what = format!("its named port {port_name:?}");
        match direction {
            Direction::Ingress => {
                let selected =
                    PodSelection::of_peer(&policy.namespace, None, Some(&policy.pod_selector));
                let members = local
                    .iter()
                    .filter(|pod| policy.selects(pod))
                    .flat_map(|pod| peers::named_pairs(pod, port_name, protocol))
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
                for (peer, peers) in peer_alternatives.iter().zip(alternative_peers) {
                    let mut matches: Vec<Match> = peer.iter().cloned().collect();
                    matches.push(named.clone());
                    parts.rules.push(Rule::new(matches, Target::SetAllowMark));
                    parts.origins.push(origin(peers, Some(port_index)));
                }
            }
            Direction::Egress => {
                let everything = [PodSelection::everything()];
                let (selections, peers): (&[PodSelection], Vec<Option<Vec<usize>>>) =
                    match rule.peers {
                        None => (&everything[..], vec![None]),
                        Some(_) => (
                            pod_selections,
                            selection_peers.iter().cloned().map(Some).collect(),
                        ),
                    };
                for (selection, peers) in selections.iter().zip(&peers) {
                    let set =
                        self.selections
                            .named_port_set(selection, port_name, protocol, self.family);
                    self.check_size(&set.members, &what)?;
                    let named =
                        self.add_set(parts, set, SetKind::HashIpPort, SetDirection::DstDstPort);
                    parts
                        .rules
                        .push(Rule::new(vec![named], Target::SetAllowMark));
                    parts.origins.push(origin(peers, Some(port_index)));
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

/// A kernel rule's origin within its policy rule (the caller sets the rule's index).
fn origin(peers: &Option<Vec<usize>>, port: Option<usize>) -> RuleOrigin {
    RuleOrigin {
        rule: 0,
        peers: peers.clone(),
        port,
    }
}
