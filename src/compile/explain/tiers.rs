//! The ClusterNetworkPolicy part of an explanation: the cluster rules the flow met, from the
//! same trace as the verdict, and the stage that decided (Admin tier, NetworkPolicy, Baseline
//! tier, or nothing: allowed).

use super::{DirectionVerdict, Part};
use crate::compile::ir::RuleOrigin;
use crate::model::{ClusterPeer, ClusterPort, ClusterSnapshot, Pod, Tier};
use serde::Serialize;
use std::net::IpAddr;

/// A ClusterNetworkPolicy rule that matched the flow: it decided its tier (Accept, Deny, or
/// Pass to the next stage).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClusterRuleHit {
    /// `Admin` or `Baseline`.
    pub tier: String,
    pub policy: String,
    /// Index in the policy's ingress or egress list.
    pub rule: usize,
    /// The rule's `name` (may be empty).
    pub name: String,
    /// `Accept`, `Deny` or `Pass`.
    pub action: String,
    /// The peers that match (empty when the kernel rule stands for every peer).
    pub peers: Vec<Part>,
    /// The port that matches; `None`: the rule has no protocols, it matches every packet.
    pub port: Option<Part>,
}

/// What decided one direction.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    /// `Admin`, `NetworkPolicy`, `Baseline`, or `none` (no policy decided: allowed).
    pub stage: String,
    /// The ClusterNetworkPolicy's name, or the NetworkPolicy's `namespace/name` (the first that
    /// allows, when one does).
    pub policy: Option<String>,
    /// Index of the rule in its policy's list for this direction.
    pub rule: Option<usize>,
    /// A ClusterNetworkPolicy rule's `name`.
    pub rule_name: Option<String>,
    /// `Accept` / `Deny` for a cluster rule, `Allow` / `Deny` for the NetworkPolicy stage and
    /// `Allow` for none.
    pub action: String,
}

impl Decision {
    pub(super) fn nothing_applies() -> Decision {
        Decision {
            stage: "none".into(),
            policy: None,
            rule: None,
            rule_name: None,
            action: "Allow".into(),
        }
    }
}

/// The cluster rule a kernel rule of `policy`'s chain stands for, as met by a packet from or to
/// `remote`; `destination` resolves named ports.
pub(super) fn hit(
    snapshot: &ClusterSnapshot,
    tier: Tier,
    policy: &str,
    origin: &RuleOrigin,
    ingress: bool,
    remote: IpAddr,
    destination: Option<&Pod>,
) -> Option<ClusterRuleHit> {
    let found = snapshot
        .cluster_policies
        .iter()
        .find(|p| p.name == policy && p.tier == tier)?;
    let rules = if ingress {
        &found.ingress
    } else {
        &found.egress
    };
    let rule = rules.get(origin.rule)?;
    let peers = origin
        .peers
        .iter()
        .flatten()
        .filter_map(|i| rule.peers.get(*i).map(|peer| (*i, peer)))
        .filter(|(_, peer)| match peer {
            ClusterPeer::Networks(networks) => networks.iter().any(|n| n.contains(&remote)),
            _ => true,
        })
        .map(|(index, peer)| Part {
            index,
            what: describe_peer(peer),
        })
        .collect();
    let port = origin.port.and_then(|i| {
        rule.ports.as_ref()?.get(i).map(|port| Part {
            index: i,
            what: describe_port(port, destination),
        })
    });
    Some(ClusterRuleHit {
        tier: tier.as_str().into(),
        policy: policy.into(),
        rule: origin.rule,
        name: rule.name.clone(),
        action: rule.action.as_str().into(),
        peers,
        port,
    })
}

/// Fills in `decided_by` from what the walk met, in evaluation order: an Admin Accept or Deny,
/// else the NetworkPolicy stage if some NetworkPolicy selects the pod, else a Baseline Accept or
/// Deny, else nothing (allowed).
pub(super) fn decide(verdict: &mut DirectionVerdict, pod: &Pod, remote: IpAddr) {
    let decisive = |tier: Tier| {
        verdict
            .cluster_rules
            .iter()
            .find(|h| h.tier == tier.as_str() && h.action != "Pass")
    };
    let from_hit = |h: &ClusterRuleHit| Decision {
        stage: h.tier.clone(),
        policy: Some(h.policy.clone()),
        rule: Some(h.rule),
        rule_name: Some(h.name.clone()),
        action: h.action.clone(),
    };
    verdict.decided_by = if let Some(h) = decisive(Tier::Admin) {
        from_hit(h)
    } else if !verdict.isolating_policies.is_empty() {
        let first = verdict.allowed_by.first();
        Decision {
            stage: "NetworkPolicy".into(),
            policy: first.map(|a| a.policy.clone()),
            rule: first.map(|a| a.rule),
            rule_name: None,
            action: if verdict.allowed { "Allow" } else { "Deny" }.into(),
        }
    } else if let Some(h) = decisive(Tier::Baseline) {
        from_hit(h)
    } else {
        Decision::nothing_applies()
    };
    if !verdict.cluster_policies.is_empty() && pod.ips.contains(&remote) && verdict.note.is_none() {
        verdict.note =
            Some("a pod reaching its own address is not subject to ClusterNetworkPolicy".into());
    }
}

fn selector(s: &crate::model::LabelSelector) -> String {
    format!("{{{s}}}")
}

fn describe_peer(peer: &ClusterPeer) -> String {
    match peer {
        ClusterPeer::Namespaces(ns) => format!("pods of namespaces {}", selector(ns)),
        ClusterPeer::Pods { namespaces, pods } => format!(
            "pods with labels {} of namespaces {}",
            selector(pods),
            selector(namespaces)
        ),
        ClusterPeer::Networks(networks) => {
            let nets: Vec<String> = networks.iter().map(ToString::to_string).collect();
            format!("networks {}", nets.join(", "))
        }
        ClusterPeer::Nodes(nodes) => format!("nodes {}", selector(nodes)),
        ClusterPeer::DomainNames(names) => format!("domainNames {}", names.join(", ")),
    }
}

fn describe_port(port: &ClusterPort, destination: Option<&Pod>) -> String {
    match port {
        ClusterPort::Protocol { protocol, ports } => {
            let proto = protocol.as_kernel_str().to_uppercase();
            match ports {
                None => format!("{proto} any port"),
                Some((first, last)) if first == last => format!("{proto} {first}"),
                Some((first, last)) => format!("{proto} {first}-{last}"),
            }
        }
        ClusterPort::Named(name) => {
            let resolved: Vec<String> = destination
                .into_iter()
                .flat_map(|pod| &pod.ports)
                .filter(|p| p.name.as_deref() == Some(name))
                .map(|p| format!("{} {}", p.protocol.as_kernel_str().to_uppercase(), p.port))
                .collect();
            if resolved.is_empty() {
                format!("named port {name:?}")
            } else {
                format!(
                    "named port {name:?} (= {} on the destination)",
                    resolved.join(", ")
                )
            }
        }
    }
}
