//! A Node object's pod CIDRs (for new-pod isolation), whichever source it came from.

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
