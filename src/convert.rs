//! Kubernetes objects (k8s-openapi types) → the core's validated model. Shared by every source.
//!
//! Applies the defaults the API server would (policyTypes, protocol TCP, the namespace name label)
//! and rejects what its validation would reject, with a message that says where.

use crate::model::{
    ContainerPort, LabelSelector, Labels, Namespace, Peer, Pod, PodPhase, Policy, PolicyRule,
    PortRef, PortSpec, Protocol, Requirement,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::IpAddr;

/// The label the API server puts on every namespace (since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct InvalidField {
    pub path: String,
    pub message: String,
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> InvalidField {
    InvalidField {
        path: path.into(),
        message: message.into(),
    }
}

/// A DNS-1123 label: 1-63 lower-case alphanumerics or '-', alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated DNS labels.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The name part of a label key, or a label value: at most 63 alphanumerics, '-', '_' or '.',
/// alphanumeric at both ends.
fn is_label_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn validate_label_key(key: &str, path: &str) -> Result<(), InvalidField> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_word(name),
        None => is_label_word(key),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{key:?} is not a valid label key (optional DNS prefix and '/', then 1-63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
            ),
        ))
    }
}

fn validate_label_value(value: &str, path: &str) -> Result<(), InvalidField> {
    if value.is_empty() || is_label_word(value) {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{value:?} is not a valid label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
            ),
        ))
    }
}

fn validate_labels(labels: &Labels, path: &str) -> Result<(), InvalidField> {
    for (k, v) in labels {
        validate_label_key(k, &format!("{path}[{k:?}]"))?;
        validate_label_value(v, &format!("{path}[{k:?}]"))?;
    }
    Ok(())
}

fn labels_of(meta: &meta::ObjectMeta) -> Result<Labels, InvalidField> {
    let labels = meta.labels.clone().unwrap_or_default();
    validate_labels(&labels, "metadata.labels")?;
    Ok(labels)
}

/// `metadata.name`, which must be a DNS-1123 subdomain (or label, for namespaces).
fn required_name(meta: &meta::ObjectMeta, label_only: bool) -> Result<String, InvalidField> {
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n,
        _ => return Err(invalid("metadata.name", "is required")),
    };
    let ok = if label_only {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !ok {
        let rule = if label_only {
            "a DNS-1123 label: 1-63 of [a-z0-9-], alphanumeric at both ends"
        } else {
            "a DNS-1123 subdomain: at most 253 characters of dot-separated DNS labels"
        };
        return Err(invalid("metadata.name", format!("{name:?} is not {rule}")));
    }
    Ok(name.to_string())
}

fn namespace_of(meta: &meta::ObjectMeta) -> Result<String, InvalidField> {
    match meta.namespace.as_deref() {
        None | Some("") => Ok("default".to_string()),
        Some(ns) if is_dns_label(ns) => Ok(ns.to_string()),
        Some(ns) => Err(invalid(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name"),
        )),
    }
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace, InvalidField> {
    let name = required_name(&ns.metadata, true)?;
    Ok(implicit_namespace(&name, labels_of(&ns.metadata)?))
}

/// A namespace with the name label the API server adds.
pub fn implicit_namespace(name: &str, mut labels: Labels) -> Namespace {
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    Namespace {
        name: name.to_string(),
        labels,
    }
}

pub fn pod(pod: &core::Pod) -> Result<Pod, InvalidField> {
    let name = required_name(&pod.metadata, false)?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ips = pod_ips(status)?;
    let mut ports = Vec::new();
    for (ci, container) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (pi, cp) in container.ports.iter().flatten().enumerate() {
            let path = format!("spec.containers[{ci}].ports[{pi}]");
            ports.push(ContainerPort {
                name: cp.name.clone().filter(|n| !n.is_empty()),
                port: port_number(cp.container_port, &format!("{path}.containerPort"))?,
                protocol: protocol(cp.protocol.as_deref(), &format!("{path}.protocol"))?,
            });
        }
    }
    Ok(Pod {
        namespace: namespace_of(&pod.metadata)?,
        name,
        labels: labels_of(&pod.metadata)?,
        node_name: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase: status
            .and_then(|s| s.phase.as_deref())
            .map(PodPhase::parse)
            .unwrap_or(PodPhase::Pending),
        ports,
    })
}

/// The pod's addresses as the API server stores them, checked so a pod cannot claim addresses that
/// would make its policies act on the node's own traffic.
///
/// As in the API server: `podIP` wins over `podIPs` when the two disagree (the v1 → internal
/// conversion), `podIPs` holds at most one address per family and no duplicate (validatePodIPs),
/// and IPv4 may carry leading zeros (netutils.ParseIPSloppy: `010.001.002.003` is 10.1.2.3).
/// Beyond the API server, addresses no pod can have are refused: unspecified, loopback,
/// multicast, broadcast and link-local ones (a pod "at" 127.0.0.1 with an egress policy would
/// otherwise cut the node's own loopback traffic).
fn pod_ips(status: Option<&core::PodStatus>) -> Result<Vec<IpAddr>, InvalidField> {
    let pod_ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    let pod_ips: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|list| list.iter().map(|p| p.ip.as_str()).collect())
        .unwrap_or_default();
    let (listed, field) = match (pod_ip, pod_ips.first()) {
        (Some(single), Some(first)) if single != *first => (vec![single], "status.podIP"),
        (Some(single), None) => (vec![single], "status.podIP"),
        _ => (pod_ips, "status.podIPs"),
    };
    if listed.len() > 2 {
        return Err(invalid(
            field,
            format!(
                "{} addresses: a pod has at most one IP per family",
                listed.len()
            ),
        ));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, text) in listed.into_iter().enumerate() {
        let path = if field == "status.podIP" {
            field.to_string()
        } else {
            format!("{field}[{i}]")
        };
        let ip = parse_ip_sloppy(text)
            .ok_or_else(|| invalid(&path, format!("{text:?} is not an IP address")))?;
        if let Some(why) = unusable_pod_ip(ip) {
            return Err(invalid(
                &path,
                format!("{text:?} is {why}, not a pod address"),
            ));
        }
        if ips.contains(&ip) {
            return Err(invalid(&path, format!("duplicate address {text:?}")));
        }
        if ips.iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
            return Err(invalid(
                &path,
                "a pod has at most one IP per family".to_string(),
            ));
        }
        ips.push(ip);
    }
    Ok(ips)
}

/// Parses an address as Kubernetes' netutils.ParseIPSloppy does: Go's net.ParseIP, but IPv4
/// numbers (alone or as the tail of an IPv6 address) may have leading zeros, read as decimal.
/// IPv4-mapped IPv6 addresses are IPv4, as Go treats them.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (head, quad) = match text.rfind(':') {
        Some(colon) => text.split_at(colon + 1),
        None => ("", text),
    };
    let parts: Vec<&str> = quad.split('.').collect();
    if parts.len() != 4
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let stripped: Vec<&str> = parts
        .iter()
        .map(|p| {
            let t = p.trim_start_matches('0');
            if t.is_empty() { "0" } else { t }
        })
        .collect();
    format!("{head}{}", stripped.join("."))
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Why `ip` cannot be a pod's address, if it cannot.
fn unusable_pod_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("in 0.0.0.0/8 (this host on this network)"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        _ => None,
    }
}

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

fn rule(
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

fn peer(p: &net::NetworkPolicyPeer, path: &str) -> Result<Peer, InvalidField> {
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

fn parse_cidr(text: &str, path: &str) -> Result<IpNet, InvalidField> {
    text.trim().parse().map_err(|_| {
        invalid(
            path,
            format!("{text:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8)"),
        )
    })
}

fn ip_block(block: &net::IPBlock, path: &str) -> Result<Peer, InvalidField> {
    let cidr = parse_cidr(&block.cidr, &format!("{path}.cidr"))?;
    let mut except = Vec::new();
    for (i, text) in block.except.iter().flatten().enumerate() {
        let p = format!("{path}.except[{i}]");
        let hole = parse_cidr(text, &p)?;
        // The API server demands a strict subset of the cidr.
        if crate::state::Family::of_net(&hole) != crate::state::Family::of_net(&cidr)
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

fn port(p: &net::NetworkPolicyPort, path: &str) -> Result<PortSpec, InvalidField> {
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

fn port_number(n: i32, path: &str) -> Result<u16, InvalidField> {
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| invalid(path, format!("{n} is not a port number (1-65535)")))
}

fn protocol(p: Option<&str>, path: &str) -> Result<Protocol, InvalidField> {
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

/// IANA service names, as Kubernetes requires for named ports: 1-15 characters, lower-case
/// letters, digits and '-', at least one letter, no '-' at either end or twice in a row.
fn validate_port_name(name: &str, path: &str) -> Result<(), InvalidField> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!(
                "{name:?} is not a valid port name (1-15 lower-case letters, digits and '-', with a letter)"
            ),
        ))
    }
}

fn selector(s: Option<&meta::LabelSelector>, path: &str) -> Result<LabelSelector, InvalidField> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_from(yaml: &str) -> Result<Policy, InvalidField> {
        let p: net::NetworkPolicy = serde_yaml_ng::from_str(yaml).unwrap();
        policy(&p)
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

    #[test]
    fn policy_types_default_like_the_api_server() {
        let p = policy_from(&format!("{HEAD}spec: {{podSelector: {{}}}}")).unwrap();
        assert!(p.isolates_ingress && !p.isolates_egress);
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{}}]}}"
        ))
        .unwrap();
        assert!(p.isolates_ingress && p.isolates_egress);
        // An empty egress list without policyTypes does not imply Egress (len(egress) == 0).
        let p = policy_from(&format!("{HEAD}spec: {{podSelector: {{}}, egress: []}}")).unwrap();
        assert!(!p.isolates_egress);
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress]}}"
        ))
        .unwrap();
        assert!(!p.isolates_ingress && p.isolates_egress);
        assert_eq!(p.namespace, "x");
    }

    #[test]
    fn empty_lists_mean_everything() {
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [], ports: []}}, {{}}]}}"
        ))
        .unwrap();
        assert_eq!(
            p.ingress,
            vec![
                PolicyRule {
                    peers: None,
                    ports: None
                };
                2
            ]
        );
    }

    #[test]
    fn ports_default_to_tcp_and_validate() {
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{ports: [{{port: 80}}, {{protocol: UDP, port: 81, endPort: 90}}, {{port: web}}, {{protocol: SCTP}}]}}]}}"
        ))
        .unwrap();
        let ports = p.ingress[0].ports.clone().unwrap();
        assert_eq!(
            ports[0],
            PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Range {
                    first: 80,
                    last: 80
                })
            }
        );
        assert_eq!(
            ports[1],
            PortSpec {
                protocol: Protocol::Udp,
                port: Some(PortRef::Range {
                    first: 81,
                    last: 90
                })
            }
        );
        assert_eq!(ports[2].port, Some(PortRef::Named("web".into())));
        assert_eq!(
            ports[3],
            PortSpec {
                protocol: Protocol::Sctp,
                port: None
            }
        );

        for (bad, expect) in [
            ("{port: 80, endPort: 79}", "endPort: 79 is below port 80"),
            ("{port: 0}", "port: 0 is not a port number"),
            ("{port: 70000}", "port: 70000 is not a port number"),
            ("{protocol: ICMP}", "unknown protocol \"ICMP\""),
            ("{port: averyveryverylongname}", "not a valid port name"),
            ("{port: \"80\"}", "not a valid port name"),
            ("{endPort: 90}", "endPort: requires port"),
            (
                "{port: web, endPort: 90}",
                "cannot be used with a named port",
            ),
        ] {
            let err = policy_from(&format!(
                "{HEAD}spec: {{podSelector: {{}}, ingress: [{{ports: [{bad}]}}]}}"
            ))
            .unwrap_err();
            assert!(err.to_string().contains(expect), "{bad}: {err}");
            assert!(
                err.to_string().starts_with("spec.ingress[0].ports[0]"),
                "{err}"
            );
        }
    }

    #[test]
    fn peers_validate() {
        for (bad, expect) in [
            ("{}", "must set at least one"),
            (
                "{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}",
                "cannot be combined",
            ),
            ("{ipBlock: {cidr: 10.0.0.0/33}}", "is not a CIDR"),
            ("{ipBlock: {cidr: banana}}", "is not a CIDR"),
            (
                "{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}",
                "strictly within",
            ),
            (
                "{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}",
                "strictly within",
            ),
            (
                "{podSelector: {matchExpressions: [{key: a, operator: Like}]}}",
                "unknown operator",
            ),
            (
                "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
                "must not be empty",
            ),
            (
                "{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}",
                "must be empty",
            ),
        ] {
            let err = policy_from(&format!(
                "{HEAD}spec: {{podSelector: {{}}, egress: [{{to: [{bad}]}}]}}"
            ))
            .unwrap_err();
            assert!(err.to_string().contains(expect), "{bad}: {err}");
        }
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 10.1.2.3/8, except: [10.1.0.0/16]}}}}, {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{a: b}}}}}}]}}]}}"
        ))
        .unwrap();
        let peers = p.ingress[0].peers.clone().unwrap();
        assert!(
            matches!(&peers[0], Peer::IpBlock { cidr, except } if cidr.to_string() == "10.1.2.3/8" && except.len() == 1)
        );
        assert!(
            matches!(&peers[1], Peer::Pods { namespaces: Some(ns), pods: Some(_) } if *ns == LabelSelector::default())
        );
    }

    #[test]
    fn pod_addresses_and_ports() {
        let p: core::Pod = serde_yaml_ng::from_str(
            "metadata: {name: a, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 53, protocol: UDP}]}]}\nstatus: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}",
        )
        .unwrap();
        let p = pod(&p).unwrap();
        assert_eq!(p.namespace, "default");
        assert_eq!(p.ips.len(), 2);
        assert_eq!(
            p.ports[0],
            ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(p.ports[1].protocol, Protocol::Udp);
        assert_eq!(p.phase, PodPhase::Running);

        let only_pod_ip: core::Pod =
            serde_yaml_ng::from_str("metadata: {name: b}\nstatus: {podIP: 10.0.0.2}").unwrap();
        assert_eq!(
            pod(&only_pod_ip).unwrap().ips,
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
        let bad: core::Pod =
            serde_yaml_ng::from_str("metadata: {name: b}\nstatus: {podIP: 10.0.0.300}").unwrap();
        assert!(pod(&bad).unwrap_err().to_string().contains("status.podIP:"));
    }

    fn pod_with_status(status: &str) -> Result<Pod, InvalidField> {
        pod(&serde_yaml_ng::from_str(&format!("metadata: {{name: p}}\nstatus: {status}")).unwrap())
    }

    #[test]
    fn pod_addresses_are_parsed_like_the_api_server() {
        let ips = |status: &str| pod_with_status(status).unwrap().ips;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // netutils.ParseIPSloppy: leading zeros are decimal, not octal, also in an IPv6 tail.
        assert_eq!(ips("{podIP: 010.001.002.003}"), vec![ip("10.1.2.3")]);
        assert_eq!(ips("{podIPs: [{ip: 010.0.0.0010}]}"), vec![ip("10.0.0.10")]);
        assert_eq!(
            ips("{podIPs: [{ip: '::ffff:010.1.2.3'}]}"),
            vec![ip("10.1.2.3")]
        );
        assert_eq!(
            ips("{podIPs: [{ip: 'fd00::10.1.2.3'}]}"),
            vec![ip("fd00::a01:203")]
        );
        // podIP wins when podIPs[0] disagrees (the API server's v1 conversion).
        assert_eq!(
            ips("{podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}"),
            vec![ip("10.0.0.1")]
        );
        assert_eq!(
            ips("{podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}"),
            vec![ip("10.0.0.1"), ip("fd00::1")]
        );
        assert!(ips("{podIP: ''}").is_empty());
        for bad in [
            "10.0.0.256",
            "1.2.3",
            "10.0.0.1/32",
            "fe80::1%eth0",
            "0x0a.0.0.1",
            "+1.2.3.4",
        ] {
            let err = pod_with_status(&format!("{{podIPs: [{{ip: '{bad}'}}]}}")).unwrap_err();
            assert_eq!(err.path, "status.podIPs[0]", "{bad}");
        }
    }

    #[test]
    fn pods_claiming_impossible_addresses_are_invalid() {
        for (addr, why) in [
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "0.0.0.0/8"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("0127.0.0.01", "loopback"),
        ] {
            let err = pod_with_status(&format!("{{podIPs: [{{ip: '{addr}'}}]}}")).unwrap_err();
            assert_eq!(err.path, "status.podIPs[0]", "{addr}");
            assert!(err.message.contains(why), "{addr}: {err}");
            let err = pod_with_status(&format!("{{podIP: '{addr}'}}")).unwrap_err();
            assert_eq!(err.path, "status.podIP", "{addr}");
        }
        // At most one address per family, no duplicates, at most two in all.
        let err = pod_with_status("{podIPs: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]}").unwrap_err();
        assert_eq!(err.path, "status.podIPs[1]");
        assert!(err.message.contains("one IP per family"), "{err}");
        let err = pod_with_status("{podIPs: [{ip: 'fd00::1'}, {ip: 'fd00::1'}]}").unwrap_err();
        assert!(err.message.contains("duplicate"), "{err}");
        let many: Vec<String> = (1..=300)
            .map(|i| format!("{{ip: 10.0.{}.{}}}", i / 256, i % 256))
            .collect();
        let err = pod_with_status(&format!("{{podIPs: [{}]}}", many.join(", "))).unwrap_err();
        assert!(err.message.contains("300 addresses"), "{err}");
    }

    #[test]
    fn names_and_labels_are_validated_like_the_api_server() {
        let ns = |y: &str| namespace(&serde_yaml_ng::from_str::<core::Namespace>(y).unwrap());
        assert!(ns(&format!("metadata: {{name: {}}}", "n".repeat(63))).is_ok());
        assert!(
            ns(&format!("metadata: {{name: {}}}", "n".repeat(64)))
                .unwrap_err()
                .to_string()
                .contains("DNS-1123 label")
        );
        assert!(ns("metadata: {name: Upper}").is_err());
        for (bad, field) in [
            ("{'a b': x}", "metadata.labels"),
            ("{a: 'x y'}", "metadata.labels"),
            ("{a: 'x\\ny'}", "metadata.labels"),
            ("{a: '$(reboot)'}", "metadata.labels"),
            ("{a: 'café'}", "metadata.labels"),
            ("{a: '\"q\"'}", "metadata.labels"),
        ] {
            let err = ns(&format!("metadata: {{name: x, labels: {bad}}}")).unwrap_err();
            assert!(err.to_string().starts_with(field), "{bad}: {err}");
        }
        assert!(
            ns(&format!(
                "metadata: {{name: x, labels: {{example.com/{}: {}}}}}",
                "k".repeat(63),
                "v".repeat(63)
            ))
            .is_ok()
        );
        assert!(
            ns(&format!(
                "metadata: {{name: x, labels: {{a: {}}}}}",
                "v".repeat(64)
            ))
            .is_err()
        );
        let long = format!(
            "{}.{}.{}.{}",
            "p".repeat(63),
            "q".repeat(63),
            "r".repeat(63),
            "s".repeat(61)
        );
        assert_eq!(long.len(), 253);
        let p: net::NetworkPolicy = serde_yaml_ng::from_str(&format!(
            "metadata: {{name: {long}, namespace: x}}\nspec: {{podSelector: {{}}}}"
        ))
        .unwrap();
        assert!(policy(&p).is_ok());
        let p: net::NetworkPolicy = serde_yaml_ng::from_str(&format!(
            "metadata: {{name: {long}x, namespace: x}}\nspec: {{podSelector: {{}}}}"
        ))
        .unwrap();
        assert!(
            policy(&p)
                .unwrap_err()
                .to_string()
                .contains("DNS-1123 subdomain")
        );
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{matchLabels: {{app: 'a;b'}}}}}}"
        ));
        assert!(
            p.unwrap_err()
                .to_string()
                .starts_with("spec.podSelector.matchLabels")
        );
        let p = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{matchExpressions: [{{key: app, operator: In, values: ['x y']}}]}}}}"
        ));
        assert!(
            p.unwrap_err()
                .to_string()
                .contains("matchExpressions[0].values[0]")
        );
    }

    #[test]
    fn namespaces_get_the_name_label() {
        let ns: core::Namespace =
            serde_yaml_ng::from_str("metadata: {name: x, labels: {team: a}}").unwrap();
        let ns = namespace(&ns).unwrap();
        assert_eq!(
            ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("x")
        );
        assert_eq!(ns.labels.get("team").map(String::as_str), Some("a"));
    }
}
