//! A Node object's pod CIDRs (for new-pod isolation) and its labels and addresses (for
//! ClusterNetworkPolicy `nodes` peers), whichever source it came from.

use super::pod::parse_ip_sloppy;
use super::validate::*;
use crate::model::NodeInfo;
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use kube::ResourceExt;

/// The node's name and its pod CIDRs (`spec.podCIDRs`, else the older single `spec.podCIDR`).
pub fn pod_cidrs(node: &core::Node) -> Result<(String, Vec<IpNet>), String> {
    let name = node.name_any();
    let spec = node.spec.as_ref();
    let texts: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let cidrs = texts
        .into_iter()
        .map(|t| {
            t.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| format!("spec.podCIDRs: {t:?} is not a CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, cidrs))
}

/// A Node's name, labels and addresses (`status.addresses` of type InternalIP and ExternalIP,
/// without duplicates), for ClusterNetworkPolicy `nodes` peers. Other address types (Hostname,
/// InternalDNS, ExternalDNS) are names, not addresses.
pub fn node_info(node: &core::Node) -> Result<NodeInfo, InvalidField> {
    let name = required_name(&node.metadata, false)?;
    let labels = labels_of(&node.metadata)?;
    let mut addresses = Vec::new();
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    for (i, a) in listed.iter().enumerate() {
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        let ip = parse_ip_sloppy(&a.address).ok_or_else(|| {
            invalid(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", a.address),
            )
        })?;
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    Ok(NodeInfo {
        name,
        labels,
        addresses,
    })
}
