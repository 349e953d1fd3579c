//! Namespaces and pods → the model: names, labels, container ports and addresses.

use super::policy::{port_number, protocol};
use super::validate::*;
use crate::model::{ContainerPort, Labels, Namespace, Pod, PodPhase};
use k8s_openapi::api::core::v1 as core;
use std::net::IpAddr;

/// The label the API server puts on every namespace (since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

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
pub(super) fn pod_ips(status: Option<&core::PodStatus>) -> Result<Vec<IpAddr>, InvalidField> {
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
pub(super) fn unusable_pod_ip(ip: IpAddr) -> Option<&'static str> {
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
