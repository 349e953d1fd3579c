//! NetworkPolicy objects → `Policy`: rules, peers, ports and selectors, with the API server's
//! defaults and validation.

use super::validate::*;
use crate::model::{
    LabelSelector, Peer, Policy, PolicyRule, PortRef, PortSpec, Protocol, Requirement,
};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub fn policy(policy: &net::NetworkPolicy) -> Result<Policy, InvalidField> {
    let name = required_name(&policy.metadata, false)?;
    let spec = policy
        .spec
        .as_ref()
        .ok_or_else(|| invalid("spec", "is required"))?;
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let egress_rules = spec.egress.as_deref().unwrap_or_default();

    // As the API server defaults: Ingress always; Egress when there is at least one egress rule.
    let (isolates_ingress, isolates_egress) = match spec.policy_types.as_deref() {
        None | Some([]) => (true, !egress_rules.is_empty()),
        Some(types) => {
            let mut ing = false;
            let mut eg = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ing = true,
                    "Egress" => eg = true,
                    other => {
                        return Err(invalid(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        ));
                    }
                }
            }
            (ing, eg)
        }
    };

    let mut ingress = Vec::new();
    for (i, r) in ingress_rules.iter().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(rule(r.from.as_deref(), r.ports.as_deref(), &path, "from")?);
    }
    let mut egress = Vec::new();
    for (i, r) in egress_rules.iter().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(rule(r.to.as_deref(), r.ports.as_deref(), &path, "to")?);
    }

    Ok(Policy {
        namespace: namespace_of(&policy.metadata)?,
        name,
        pod_selector: selector(spec.pod_selector.as_ref(), "spec.podSelector")?,
        isolates_ingress,
        isolates_egress,
        ingress,
        egress,
    })
}

pub(super) fn rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    path: &str,
    peers_field: &str,
) -> Result<PolicyRule, InvalidField> {
    // An empty list means the same as an absent one: everything.
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| peer(p, &format!("{path}.{peers_field}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| port(p, &format!("{path}.ports[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(PolicyRule { peers, ports })
}

pub(super) fn peer(p: &net::NetworkPolicyPeer, path: &str) -> Result<Peer, InvalidField> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(block), None, None) => ip_block(block, &format!("{path}.ipBlock")),
        (Some(_), _, _) => Err(invalid(
            path,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        (None, None, None) => Err(invalid(
            path,
            "must set at least one of podSelector, namespaceSelector or ipBlock",
        )),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: ns
                .as_ref()
                .map(|s| selector(Some(s), &format!("{path}.namespaceSelector")))
                .transpose()?,
            pods: pods
                .as_ref()
                .map(|s| selector(Some(s), &format!("{path}.podSelector")))
                .transpose()?,
        }),
    }
}

pub(super) fn parse_cidr(text: &str, path: &str) -> Result<IpNet, InvalidField> {
    text.trim().parse().map_err(|_| {
        invalid(
            path,
            format!("{text:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8)"),
        )
    })
}

pub(super) fn ip_block(block: &net::IPBlock, path: &str) -> Result<Peer, InvalidField> {
    let cidr = parse_cidr(&block.cidr, &format!("{path}.cidr"))?;
    let mut except = Vec::new();
    for (i, text) in block.except.iter().flatten().enumerate() {
        let p = format!("{path}.except[{i}]");
        let hole = parse_cidr(text, &p)?;
        // The API server demands a strict subset of the cidr.
        if crate::model::Family::of_net(&hole) != crate::model::Family::of_net(&cidr)
            || !cidr.trunc().contains(&hole.trunc())
            || hole.prefix_len() <= cidr.prefix_len()
        {
            return Err(invalid(
                p,
                format!("{text} must be strictly within cidr {}", block.cidr),
            ));
        }
        except.push(hole);
    }
    Ok(Peer::IpBlock { cidr, except })
}

pub(super) fn port(p: &net::NetworkPolicyPort, path: &str) -> Result<PortSpec, InvalidField> {
    let protocol = protocol(p.protocol.as_deref(), &format!("{path}.protocol"))?;
    let port = match (&p.port, p.end_port) {
        (None, None) => None,
        (None, Some(_)) => return Err(invalid(format!("{path}.endPort"), "requires port")),
        (Some(IntOrString::Int(n)), end) => {
            let first = port_number(*n, &format!("{path}.port"))?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = port_number(e, &format!("{path}.endPort"))?;
                    if last < first {
                        return Err(invalid(
                            format!("{path}.endPort"),
                            format!("{last} is below port {first}"),
                        ));
                    }
                    last
                }
            };
            Some(PortRef::Range { first, last })
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(invalid(
                    format!("{path}.endPort"),
                    "cannot be used with a named port",
                ));
            }
            validate_port_name(name, &format!("{path}.port"))?;
            Some(PortRef::Named(name.clone()))
        }
    };
    Ok(PortSpec { protocol, port })
}

pub(super) fn port_number(n: i32, path: &str) -> Result<u16, InvalidField> {
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| invalid(path, format!("{n} is not a port number (1-65535)")))
}

pub(super) fn protocol(p: Option<&str>, path: &str) -> Result<Protocol, InvalidField> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s).ok_or_else(|| {
            invalid(
                path,
                format!("unknown protocol {s:?} (expected TCP, UDP or SCTP)"),
            )
        }),
    }
}
pub(super) fn selector(
    s: Option<&meta::LabelSelector>,
    path: &str,
) -> Result<LabelSelector, InvalidField> {
    let Some(s) = s else {
        return Ok(LabelSelector::default());
    };
    let mut match_expressions = Vec::new();
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        let values = e.values.clone().unwrap_or_default();
        let key = e.key.clone();
        validate_label_key(&key, &format!("{p}.key"))?;
        for (vi, v) in values.iter().enumerate() {
            validate_label_value(v, &format!("{p}.values[{vi}]"))?;
        }
        let req = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(invalid(
                    format!("{p}.values"),
                    format!("must not be empty for {}", e.operator),
                ));
            }
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(invalid(
                    format!("{p}.values"),
                    format!("must be empty for {}", e.operator),
                ));
            }
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            other => {
                return Err(invalid(
                    format!("{p}.operator"),
                    format!(
                        "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                ));
            }
        };
        match_expressions.push(req);
    }
    let match_labels = s.match_labels.clone().unwrap_or_default();
    validate_labels(&match_labels, &format!("{path}.matchLabels"))?;
    Ok(LabelSelector {
        match_labels,
        match_expressions,
    })
}
