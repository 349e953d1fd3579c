//! ClusterNetworkPolicy objects → `ClusterPolicy`, rejecting what kube-apiserver would reject for
//! the CRD of kubernetes-sigs/network-policy-api v0.2.0: the OpenAPI schema (enums, minimum and
//! maximum, minItems/maxItems, min/maxProperties = "exactly one field", maxLength, the domain name
//! pattern, `x-kubernetes-list-type: set`) and its CEL rules (`isCIDR`, `start < end`, no named
//! port with networks/nodes/domainNames peers), as written in
//! `config/crd/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml`. Label
//! selectors are checked as for NetworkPolicy (an implementation cannot use a bad one either).

use super::cluster_policy_api as api;
use super::cluster_policy_values::*;
use super::policy::selector;
use super::validate::*;
use crate::model::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, ClusterRuleAction, ClusterSubject,
    LabelSelector, Protocol, Tier,
};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

const MAX_PRIORITY: i64 = 1000;
/// `maxLength` of a rule's name (characters).
const MAX_RULE_NAME: usize = 100;

pub fn cluster_policy(cnp: &api::ClusterNetworkPolicy) -> Result<ClusterPolicy, InvalidField> {
    let name = required_name(&cnp.metadata, false)?;
    let spec = cnp
        .spec
        .as_ref()
        .ok_or_else(|| invalid("spec", "is required"))?;
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(invalid(
                "spec.tier",
                format!("unsupported value {other:?} (expected Admin or Baseline)"),
            ));
        }
        None => return Err(invalid("spec.tier", "is required")),
    };
    let priority = match spec.priority {
        Some(p @ 0..=MAX_PRIORITY) => p as u32,
        Some(p) => {
            return Err(invalid(
                "spec.priority",
                format!("{p} is out of range (0-{MAX_PRIORITY})"),
            ));
        }
        None => return Err(invalid("spec.priority", "is required")),
    };
    let subject = subject(
        spec.subject
            .as_ref()
            .ok_or_else(|| invalid("spec.subject", "is required"))?,
    )?;
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let egress_rules = spec.egress.as_deref().unwrap_or_default();
    at_most(ingress_rules.len(), "spec.ingress")?;
    at_most(egress_rules.len(), "spec.egress")?;
    let mut ingress = Vec::new();
    for (i, r) in ingress_rules.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(rule(
            RuleFields {
                name: r.name.as_deref(),
                action: r.action.as_deref(),
                peers: r.from.as_deref(),
                protocols: r.protocols.as_deref(),
            },
            Direction::Ingress,
            &path,
        )?);
    }
    let mut egress = Vec::new();
    for (i, r) in egress_rules.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(rule(
            RuleFields {
                name: r.name.as_deref(),
                action: r.action.as_deref(),
                peers: r.to.as_deref(),
                protocols: r.protocols.as_deref(),
            },
            Direction::Egress,
            &path,
        )?);
    }
    Ok(ClusterPolicy {
        name,
        tier,
        priority,
        subject,
        ingress,
        egress,
    })
}

/// The `domainNames` of a policy's egress peers, if any: accepted, but they match nothing.
pub fn domain_names(policy: &ClusterPolicy) -> Vec<&str> {
    policy
        .egress
        .iter()
        .flat_map(|r| &r.peers)
        .filter_map(|p| match p {
            ClusterPeer::DomainNames(names) => Some(names),
            _ => None,
        })
        .flatten()
        .map(String::as_str)
        .collect()
}

/// Warns, once per policy name for the life of the process (sources re-read objects often), that
/// its `domainNames` peers match nothing. Whether it warned now.
pub fn warn_domain_names_once(policy: &ClusterPolicy) -> bool {
    let names = domain_names(policy);
    if names.is_empty() {
        return false;
    }
    static WARNED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let first = WARNED
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .insert(policy.name.clone());
    if first {
        tracing::warn!(
            policy = policy.name,
            domain_names = ?names,
            "ClusterNetworkPolicy has domainNames peers, which this agent accepts but never matches: enforcing names needs DNS replies held until the rules are in place, which iptables cannot do"
        );
    }
    first
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// The fields ingress and egress rules share (`from` and `to` are both `peers`).
struct RuleFields<'a> {
    name: Option<&'a str>,
    action: Option<&'a str>,
    peers: Option<&'a [api::Peer]>,
    protocols: Option<&'a [api::Protocol]>,
}

/// `minProperties: 1, maxProperties: 1`: exactly one of `fields` is set (`set` says which are).
fn exactly_one<'a>(
    set: &[(&'a str, bool)],
    unknown: impl Iterator<Item = &'a String>,
    path: &str,
) -> Result<&'a str, InvalidField> {
    let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
    let mut given: Vec<&str> = set.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect();
    let unknown: Vec<&str> = unknown.map(String::as_str).collect();
    if let Some(field) = unknown.first() {
        return Err(invalid(
            path,
            format!(
                "unknown field {field:?} (expected one of {}): written for a newer CRD version than this agent knows?",
                names.join(", ")
            ),
        ));
    }
    match given.len() {
        1 => Ok(given.remove(0)),
        0 => Err(invalid(
            path,
            format!("must set exactly one of {}", names.join(", ")),
        )),
        _ => Err(invalid(
            path,
            format!(
                "must set exactly one of {}, not {}",
                names.join(", "),
                given.join(" and ")
            ),
        )),
    }
}

fn subject(s: &api::Subject) -> Result<ClusterSubject, InvalidField> {
    let path = "spec.subject";
    exactly_one(
        &[
            ("namespaces", s.namespaces.is_some()),
            ("pods", s.pods.is_some()),
        ],
        s.unknown.keys(),
        path,
    )?;
    if let Some(ns) = &s.namespaces {
        return Ok(ClusterSubject::Namespaces(selector(
            Some(ns),
            &format!("{path}.namespaces"),
        )?));
    }
    let (namespaces, pods) = namespaced_pod(s.pods.as_ref().unwrap(), &format!("{path}.pods"))?;
    Ok(ClusterSubject::Pods { namespaces, pods })
}

/// `namespaceSelector` (optional: empty selects every namespace) and `podSelector` (required).
fn namespaced_pod(
    p: &api::NamespacedPod,
    path: &str,
) -> Result<(LabelSelector, LabelSelector), InvalidField> {
    let pods = p
        .pod_selector
        .as_ref()
        .ok_or_else(|| invalid(format!("{path}.podSelector"), "is required"))?;
    Ok((
        selector(
            p.namespace_selector.as_ref(),
            &format!("{path}.namespaceSelector"),
        )?,
        selector(Some(pods), &format!("{path}.podSelector"))?,
    ))
}

fn rule(r: RuleFields, direction: Direction, path: &str) -> Result<ClusterRule, InvalidField> {
    let name = r.name.unwrap_or_default();
    if name.chars().count() > MAX_RULE_NAME {
        return Err(invalid(
            format!("{path}.name"),
            format!("longer than {MAX_RULE_NAME} characters"),
        ));
    }
    let action = match r.action {
        Some("Accept") => ClusterRuleAction::Accept,
        Some("Deny") => ClusterRuleAction::Deny,
        Some("Pass") => ClusterRuleAction::Pass,
        Some(other) => {
            return Err(invalid(
                format!("{path}.action"),
                format!("unsupported value {other:?} (expected Accept, Deny or Pass)"),
            ));
        }
        None => return Err(invalid(format!("{path}.action"), "is required")),
    };
    let peers_field = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let peers_path = format!("{path}.{peers_field}");
    let listed = r.peers.ok_or_else(|| invalid(&peers_path, "is required"))?;
    one_to_max(listed.len(), &peers_path)?;
    let peers = listed
        .iter()
        .enumerate()
        .map(|(i, p)| peer(p, direction, &format!("{peers_path}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let unknown_peers = peers.iter().filter(|p| p.is_none()).count();
    let peers: Vec<ClusterPeer> = peers.into_iter().flatten().collect();
    let ports = match r.protocols {
        None => None,
        Some(list) => {
            let protocols_path = format!("{path}.protocols");
            one_to_max(list.len(), &protocols_path)?;
            let ports = list
                .iter()
                .enumerate()
                .map(|(i, p)| protocol(p, &format!("{protocols_path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            // The egress rule's CEL rule: named ports exist only on pods.
            let named = ports.iter().any(|p| matches!(p, ClusterPort::Named(_)));
            let addresses = peers.iter().any(|p| {
                matches!(
                    p,
                    ClusterPeer::Networks(_) | ClusterPeer::Nodes(_) | ClusterPeer::DomainNames(_)
                )
            });
            if named && addresses {
                return Err(invalid(
                    path,
                    "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames",
                ));
            }
            Some(ports)
        }
    };
    if unknown_peers > 0 {
        tracing::warn!(
            rule = %path,
            action = action.as_str(),
            unknown_peers,
            "ClusterNetworkPolicy rule has peers with no field this agent knows (a newer CRD version?): failing closed — an Accept rule ignores them, a Deny or Pass rule denies everything"
        );
        let closed = fail_closed(action, peers);
        return Ok(ClusterRule {
            name: name.to_string(),
            ports: if action == ClusterRuleAction::Accept {
                ports
            } else {
                None
            },
            ..closed
        });
    }
    Ok(ClusterRule {
        name: name.to_string(),
        action,
        peers,
        ports,
    })
}

/// `None`: the peer sets no field this agent knows (an empty peer, or one written for a newer CRD
/// version): the API asks implementations to fail closed on it (see [`fail_closed`]).
fn peer(
    p: &api::Peer,
    direction: Direction,
    path: &str,
) -> Result<Option<ClusterPeer>, InvalidField> {
    let mut fields = vec![
        ("namespaces", p.namespaces.is_some()),
        ("pods", p.pods.is_some()),
    ];
    let egress_only = [
        ("networks", p.networks.is_some()),
        ("nodes", p.nodes.is_some()),
        ("domainNames", p.domain_names.is_some()),
    ];
    match direction {
        Direction::Egress => fields.extend(egress_only),
        Direction::Ingress => {
            if let Some((field, _)) = egress_only.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    format!("{path}.{field}"),
                    "is allowed only in egress peers (ingress peers are namespaces or pods)",
                ));
            }
        }
    }
    if fields.iter().all(|(_, set)| !set) {
        return Ok(None);
    }
    let field = exactly_one(&fields, p.unknown.keys(), path)?;
    let at = format!("{path}.{field}");
    Ok(Some(match field {
        "namespaces" => ClusterPeer::Namespaces(selector(p.namespaces.as_ref(), &at)?),
        "pods" => {
            let (namespaces, pods) = namespaced_pod(p.pods.as_ref().unwrap(), &at)?;
            ClusterPeer::Pods { namespaces, pods }
        }
        "nodes" => ClusterPeer::Nodes(selector(p.nodes.as_ref(), &at)?),
        "networks" => ClusterPeer::Networks(networks(p.networks.as_deref().unwrap(), &at)?),
        _ => ClusterPeer::DomainNames(domain_name_list(p.domain_names.as_deref().unwrap(), &at)?),
    }))
}

/// A rule with peers this agent does not understand, made to fail closed as
/// `apis/v1alpha2/clusternetworkpolicy_types.go` (ClusterNetworkPolicyIngressPeer/EgressPeer) asks:
/// an Accept rule does not match them (it keeps its known peers, possibly none: it matches
/// nothing), a Deny or Pass rule becomes "deny all" (every address, every port).
fn fail_closed(action: ClusterRuleAction, known: Vec<ClusterPeer>) -> ClusterRule {
    match action {
        ClusterRuleAction::Accept => ClusterRule {
            name: String::new(),
            action,
            peers: known,
            ports: None,
        },
        ClusterRuleAction::Deny | ClusterRuleAction::Pass => ClusterRule {
            name: String::new(),
            action: ClusterRuleAction::Deny,
            peers: vec![ClusterPeer::Networks(vec![
                IpNet::V4(Default::default()),
                IpNet::V6(Default::default()),
            ])],
            ports: None,
        },
    }
}

fn networks(list: &[String], path: &str) -> Result<Vec<IpNet>, InvalidField> {
    one_to_max(list.len(), path)?;
    no_duplicate(list, path)?;
    list.iter()
        .enumerate()
        .map(|(i, text)| cidr(text, &format!("{path}[{i}]")))
        .collect()
}

fn protocol(p: &api::Protocol, path: &str) -> Result<ClusterPort, InvalidField> {
    let field = exactly_one(
        &[
            ("tcp", p.tcp.is_some()),
            ("udp", p.udp.is_some()),
            ("sctp", p.sctp.is_some()),
            ("destinationNamedPort", p.destination_named_port.is_some()),
        ],
        p.unknown.keys(),
        path,
    )?;
    let at = format!("{path}.{field}");
    let (protocol, ports) = match field {
        "tcp" => (Protocol::Tcp, p.tcp.as_ref()),
        "udp" => (Protocol::Udp, p.udp.as_ref()),
        "sctp" => (Protocol::Sctp, p.sctp.as_ref()),
        _ => {
            let name = p.destination_named_port.clone().unwrap_or_default();
            // The schema allows any string; an empty one names no port at all.
            if name.is_empty() {
                return Err(invalid(at, "must not be empty"));
            }
            return Ok(ClusterPort::Named(name));
        }
    };
    // `minProperties: 1`: the protocol's only field, destinationPort, is required.
    let port = ports
        .and_then(|p| p.destination_port.as_ref())
        .ok_or_else(|| invalid(format!("{at}.destinationPort"), "is required"))?;
    let at = format!("{at}.destinationPort");
    let range = match (port.number, &port.range) {
        (Some(n), None) => {
            let n = port_number(n, &format!("{at}.number"))?;
            (n, n)
        }
        (None, Some(range)) => {
            let at = format!("{at}.range");
            let number = |v: Option<i64>, field: &str| {
                let p = format!("{at}.{field}");
                port_number(v.ok_or_else(|| invalid(&p, "is required"))?, &p)
            };
            let (start, end) = (number(range.start, "start")?, number(range.end, "end")?);
            if start >= end {
                return Err(invalid(
                    at,
                    format!("start {start} must be less than end {end}"),
                ));
            }
            (start, end)
        }
        (None, None) => return Err(invalid(at, "must set exactly one of number, range")),
        (Some(_), Some(_)) => {
            return Err(invalid(
                at,
                "must set exactly one of number, range, not number and range",
            ));
        }
    };
    Ok(ClusterPort::Protocol {
        protocol,
        ports: Some(range),
    })
}
