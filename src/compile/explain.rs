//! `explain`: why a flow is allowed or denied, from the compiled state itself. Pure.
//!
//! The verdict is [`evaluate::passes`] on the state compiled for the source's node (its egress)
//! and for the destination's node (its ingress), in the FORWARD hook, as the agent programs them
//! with the default enforcement options. The reasons come from the same walk
//! ([`evaluate::trace_chain`] on the pod's chain) and the provenance the compiler records
//! ([`DesiredState::origins`]): no second implementation of the semantics. Only the ipBlock
//! `except` hits are looked up in the snapshot, to say why a block did not match.

mod text;
mod tiers;

pub use tiers::{ClusterRuleHit, Decision};

use super::Compiler;
use super::enforcement;
use super::evaluate::{self, L4, Packet};
use super::ir::{DesiredState, Target};
use super::names;
use crate::model::{ClusterSnapshot, Family, Peer, Pod, PortRef, Protocol};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::IpAddr;

/// One end of the flow as given: `namespace/pod` or an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Pod { namespace: String, name: String },
    Address(IpAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Endpoint::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Endpoint::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?} is neither namespace/pod nor an IP address")),
        }
    }
}

/// The flow to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: Protocol,
    pub port: u16,
    /// `None`: the family both ends have (IPv4 first).
    pub family: Option<Family>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub allowed: bool,
    pub family: String,
    pub protocol: String,
    pub port: u16,
    pub from: End,
    pub to: End,
    /// The source pod's egress, on its node.
    pub egress: DirectionVerdict,
    /// The destination pod's ingress, on its node.
    pub ingress: DirectionVerdict,
}

/// One end of the flow, resolved.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct End {
    pub address: IpAddr,
    /// `namespace/name`; `None`: no pod holds the address (outside the cluster).
    pub pod: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DirectionVerdict {
    pub allowed: bool,
    /// Some policy (NetworkPolicy or ClusterNetworkPolicy) selects the pod for this direction.
    pub isolated: bool,
    /// The NetworkPolicies that do, `namespace/name`.
    pub isolating_policies: Vec<String>,
    /// The ClusterNetworkPolicies whose subject the pod is for this direction, in evaluation
    /// order (`Admin/name`, `Baseline/name`).
    pub cluster_policies: Vec<String>,
    /// The ClusterNetworkPolicy rules the flow met (each decided its tier: Accept, Deny, Pass).
    pub cluster_rules: Vec<ClusterRuleHit>,
    /// The stage that decided this direction, and its policy and rule.
    pub decided_by: Decision,
    /// The rules that allow the flow (every one that matches).
    pub allowed_by: Vec<AllowingRule>,
    /// ipBlock peers of the isolating policies whose cidr holds the other end but whose
    /// `except` takes it out.
    pub except_hits: Vec<ExceptHit>,
    /// Rules of the isolating policies that could not be programmed and allow nothing.
    pub failed_closed: Vec<String>,
    /// Why no policy applies, or what else decided.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AllowingRule {
    pub policy: String,
    /// Index in the policy's ingress or egress list.
    pub rule: usize,
    /// The peers that match (index and description); empty: the rule allows any peer.
    pub peers: Vec<Part>,
    /// The port that matches (index and description); `None`: the rule allows every port.
    pub port: Option<Part>,
}

/// A peer or port of a policy rule: its index in the rule's list, and what it says.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub what: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExceptHit {
    pub policy: String,
    pub rule: usize,
    pub peer: usize,
    pub cidr: String,
    pub except: String,
}

/// Explains `query` against `snapshot`. Errors name what could not be resolved.
pub fn explain(snapshot: &ClusterSnapshot, query: &Query) -> Result<Explanation, String> {
    let from = resolve(snapshot, &query.from)?;
    let to = resolve(snapshot, &query.to)?;
    let family = choose_family(&from, &to, query.family)?;
    let src = address(&from, family)?;
    let dst = address(&to, family)?;
    let packet = Packet::new(src, dst, L4::Port(query.protocol, query.port));
    let mut compiler = Compiler::new();
    let egress = direction(
        snapshot,
        &mut compiler,
        from.pod,
        to.pod,
        family,
        &packet,
        false,
    );
    let ingress = direction(
        snapshot,
        &mut compiler,
        to.pod,
        from.pod,
        family,
        &packet,
        true,
    );
    let mut explanation = Explanation {
        allowed: egress.allowed && ingress.allowed,
        family: family.to_string(),
        protocol: format!("{:?}", query.protocol).to_uppercase(),
        port: query.port,
        from: end(from.pod, src),
        to: end(to.pod, dst),
        egress,
        ingress,
    };
    // The verdict is the whole hook's, as the kernel walks it; the directions say why.
    let mut allowed = true;
    for (pod, dir) in [(from.pod, "egress"), (to.pod, "ingress")] {
        let Some(node) = pod.and_then(|p| p.node_name.as_deref()) else {
            continue;
        };
        let state = node_state(snapshot, &mut compiler, node, family);
        if let Some(chain) = evaluate::denying_chain(&state, "FORWARD", &packet) {
            allowed = false;
            let verdict = if dir == "egress" {
                &mut explanation.egress
            } else {
                &mut explanation.ingress
            };
            if verdict.allowed && !is_pod_chain(&chain) {
                verdict.allowed = false;
                verdict.note = Some(format!(
                    "denied on node {node} by chain {chain} (new-pod isolation: an address in the node's pod CIDRs that no known pod holds)"
                ));
            }
        }
    }
    explanation.allowed = allowed;
    Ok(explanation)
}

fn is_pod_chain(chain: &str) -> bool {
    chain.contains("PODI-") || chain.contains("PODE-") || chain.contains("CNP")
}

struct Resolved<'a> {
    pod: Option<&'a Pod>,
    address: Option<IpAddr>,
}

fn resolve<'a>(snapshot: &'a ClusterSnapshot, endpoint: &Endpoint) -> Result<Resolved<'a>, String> {
    match endpoint {
        Endpoint::Pod { namespace, name } => {
            let pod = snapshot
                .pods
                .iter()
                .find(|p| &p.namespace == namespace && &p.name == name)
                .ok_or_else(|| format!("no pod {namespace}/{name}"))?;
            if !pod.is_policy_relevant() {
                return Err(format!(
                    "pod {namespace}/{name} is not subject to policy (host network, finished, or no address yet)"
                ));
            }
            Ok(Resolved {
                pod: Some(pod),
                address: None,
            })
        }
        Endpoint::Address(ip) => Ok(Resolved {
            pod: snapshot
                .pods
                .iter()
                .find(|p| p.is_policy_relevant() && p.ips.contains(ip)),
            address: Some(*ip),
        }),
    }
}

fn choose_family(from: &Resolved, to: &Resolved, asked: Option<Family>) -> Result<Family, String> {
    let has = |r: &Resolved, f: Family| match (r.address, r.pod) {
        (Some(ip), _) => Family::of(&ip) == f,
        (None, Some(pod)) => pod.ips.iter().any(|ip| Family::of(ip) == f),
        (None, None) => false,
    };
    let candidates: Vec<Family> = match asked {
        Some(f) => vec![f],
        None => vec![Family::V4, Family::V6],
    };
    candidates
        .into_iter()
        .find(|f| has(from, *f) && has(to, *f))
        .ok_or_else(|| "the two ends have no address of a common family".to_string())
}

fn address(r: &Resolved, family: Family) -> Result<IpAddr, String> {
    r.address
        .or_else(|| {
            r.pod
                .and_then(|p| p.ips.iter().copied().find(|ip| Family::of(ip) == family))
        })
        .ok_or_else(|| format!("no {family} address"))
}

fn end(pod: Option<&Pod>, address: IpAddr) -> End {
    End {
        address,
        pod: pod.map(Pod::key),
        node: pod.and_then(|p| p.node_name.clone()),
    }
}

/// The state the agent on `node` programs for `family` (default enforcement options).
fn node_state(
    snapshot: &ClusterSnapshot,
    compiler: &mut Compiler,
    node: &str,
    family: Family,
) -> DesiredState {
    let mut states = compiler.compile(snapshot, node).into_vec();
    let mut options = enforcement::Options::default();
    if enforcement::pod_cidrs(&options, snapshot, node).is_empty() {
        // What the agent does then too, minus its warning (the agent's log says it).
        options.new_pod_isolation = super::new_pod_isolation::NewPodIsolation::Off;
    }
    enforcement::apply(&mut states, snapshot, node, &options);
    states
        .into_iter()
        .find(|(f, _)| *f == family)
        .map(|(_, state)| state)
        .unwrap_or_default()
}

/// The verdict of `pod`'s chain for one direction, and why.
fn direction(
    snapshot: &ClusterSnapshot,
    compiler: &mut Compiler,
    pod: Option<&Pod>,
    other: Option<&Pod>,
    family: Family,
    packet: &Packet,
    ingress: bool,
) -> DirectionVerdict {
    let mut verdict = DirectionVerdict {
        allowed: true,
        isolated: false,
        isolating_policies: vec![],
        cluster_policies: vec![],
        cluster_rules: vec![],
        decided_by: Decision::nothing_applies(),
        allowed_by: vec![],
        except_hits: vec![],
        failed_closed: vec![],
        note: None,
    };
    let which = if ingress { "destination" } else { "source" };
    let Some(pod) = pod else {
        verdict.note = Some(format!(
            "the {which} is outside the cluster: no policy of ours applies to it"
        ));
        return verdict;
    };
    let Some(node) = pod.node_name.as_deref() else {
        verdict.note = Some(format!("the {which} pod is on no node yet"));
        return verdict;
    };
    let state = node_state(snapshot, compiler, node, family);
    let pod_chain = names::pod_chain(ingress, &pod.key());
    let Some(trace) = evaluate::trace_chain(&state, &pod_chain, packet) else {
        verdict.note = Some("no policy selects the pod for this direction".into());
        return verdict;
    };
    verdict.isolated = true;
    verdict.allowed = trace.rejected_by.is_none();
    let direction_name = if ingress { "ingress" } else { "egress" };
    for rule in &state.chains[&pod_chain] {
        if let Target::Jump(chain) = &rule.target
            && let Some(origin) = state.origins.get(chain)
        {
            match origin.tier {
                None => verdict.isolating_policies.push(origin.policy.clone()),
                Some(tier) => {
                    verdict
                        .cluster_policies
                        .push(format!("{}/{}", tier.as_str(), origin.policy))
                }
            }
        }
    }
    let remote = if ingress { packet.src } else { packet.dst };
    for policy_key in &verdict.isolating_policies {
        let Some(policy) = snapshot.policies.iter().find(|p| &p.key() == policy_key) else {
            continue;
        };
        let rules = if ingress {
            &policy.ingress
        } else {
            &policy.egress
        };
        for (r, rule) in rules.iter().enumerate() {
            for (i, peer) in rule.peers.iter().flatten().enumerate() {
                if let Peer::IpBlock { cidr, except } = peer
                    && cidr.contains(&remote)
                    && let Some(hit) = except.iter().find(|e| e.contains(&remote))
                {
                    verdict.except_hits.push(ExceptHit {
                        policy: policy_key.clone(),
                        rule: r,
                        peer: i,
                        cidr: cidr.to_string(),
                        except: hit.to_string(),
                    });
                }
            }
        }
        verdict.failed_closed.extend(
            state
                .failed_closed
                .iter()
                .filter(|f| &f.policy == policy_key && f.direction == direction_name)
                .map(ToString::to_string),
        );
    }
    // The destination pod resolves named ports (ingress: the pod itself; egress: the peer).
    let destination = if ingress { Some(pod) } else { other };
    for (chain, position) in &trace.steps {
        let Some(origin) = state.origins.get(*chain) else {
            continue;
        };
        let Some(rule_origin) = origin.rules.get(*position) else {
            continue;
        };
        if let Some(tier) = origin.tier {
            verdict.cluster_rules.extend(tiers::hit(
                snapshot,
                tier,
                &origin.policy,
                rule_origin,
                ingress,
                remote,
                destination,
            ));
            continue;
        }
        let Some(policy) = snapshot.policies.iter().find(|p| p.key() == origin.policy) else {
            continue;
        };
        let rules = if ingress {
            &policy.ingress
        } else {
            &policy.egress
        };
        let rule = &rules[rule_origin.rule];
        let peers = match (&rule_origin.peers, &rule.peers) {
            (Some(indices), Some(peers)) => indices
                .iter()
                .filter(|i| peer_holds(&peers[**i], remote))
                .map(|i| Part {
                    index: *i,
                    what: describe_peer(&peers[*i]),
                })
                .collect(),
            _ => vec![],
        };
        let port = rule_origin.port.and_then(|i| {
            rule.ports.as_ref().map(|ports| Part {
                index: i,
                what: describe_port(&ports[i], destination),
            })
        });
        verdict.allowed_by.push(AllowingRule {
            policy: origin.policy.clone(),
            rule: rule_origin.rule,
            peers,
            port,
        });
    }
    tiers::decide(&mut verdict, pod, remote);
    verdict
}

/// Whether an ipBlock peer holds `remote` (pod peers: the kernel rule's set matched, so yes).
/// Only narrows which of several ipBlocks sharing one set to name.
fn peer_holds(peer: &Peer, remote: IpAddr) -> bool {
    match peer {
        Peer::Pods { .. } => true,
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&remote) && !except.iter().any(|e| e.contains(&remote))
        }
    }
}

fn describe_peer(peer: &Peer) -> String {
    match peer {
        Peer::IpBlock { cidr, except } if except.is_empty() => format!("ipBlock {cidr}"),
        Peer::IpBlock { cidr, except } => {
            let except: Vec<String> = except.iter().map(ToString::to_string).collect();
            format!("ipBlock {cidr} except {}", except.join(", "))
        }
        Peer::Pods { namespaces, pods } => {
            let mut s = String::new();
            match namespaces {
                None => s.push_str("pods of the policy's namespace"),
                Some(ns) => {
                    let _ = write!(s, "pods of namespaces {{{ns}}}");
                }
            }
            if let Some(pods) = pods {
                let _ = write!(s, " with labels {{{pods}}}");
            }
            s
        }
    }
}

fn describe_port(spec: &crate::model::PortSpec, destination: Option<&Pod>) -> String {
    let proto = format!("{:?}", spec.protocol).to_uppercase();
    match &spec.port {
        None => format!("{proto} any port"),
        Some(PortRef::Range { first, last }) if first == last => format!("{proto} {first}"),
        Some(PortRef::Range { first, last }) => format!("{proto} {first}-{last}"),
        Some(PortRef::Named(name)) => {
            let resolved = destination.and_then(|pod| {
                pod.ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(name) && p.protocol == spec.protocol)
            });
            match resolved {
                Some(p) => format!("{proto} {name:?} (= {} on the destination)", p.port),
                None => format!("{proto} {name:?}"),
            }
        }
    }
}
