//! ClusterNetworkPolicy and Node objects in manifests mode.

use super::*;
use crate::model::{ClusterPeer, Tier};

const CNP: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n";

#[test]
fn cluster_network_policies_and_node_addresses_reach_the_snapshot() {
    let text = format!(
        "{CNP}metadata: {{name: deny-to-infra}}\nspec: {{tier: Admin, priority: 10, subject: {{namespaces: {{}}}}, egress: [{{action: Deny, to: [{{nodes: {{matchLabels: {{role: infra}}}}}}]}}]}}\n---\n\
         apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicyList\nitems:\n- metadata: {{name: baseline}}\n  spec: {{tier: Baseline, priority: 0, subject: {{pods: {{podSelector: {{}}}}}}, ingress: [{{action: Deny, from: [{{namespaces: {{}}}}]}}]}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{role: infra}}}}\nspec: {{podCIDRs: [10.244.1.0/24]}}\nstatus: {{addresses: [{{type: InternalIP, address: 10.0.0.1}}, {{type: Hostname, address: n1}}, {{type: ExternalIP, address: 'fd00::1'}}]}}\n"
    );
    let s = load_text("cnp.yaml", &text).unwrap();
    let names: Vec<(&str, Tier)> = s
        .cluster_policies
        .iter()
        .map(|p| (p.name.as_str(), p.tier))
        .collect();
    assert_eq!(
        names,
        [("deny-to-infra", Tier::Admin), ("baseline", Tier::Baseline)]
    );
    assert!(matches!(
        &s.cluster_policies[0].egress[0].peers[0],
        ClusterPeer::Nodes(sel) if sel.match_labels["role"] == "infra"
    ));
    let n1 = &s.nodes["n1"];
    assert_eq!(n1.labels["role"], "infra");
    assert_eq!(
        n1.addresses,
        vec![
            "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
            "fd00::1".parse().unwrap()
        ]
    );
    assert_eq!(
        s.node_pod_cidrs["n1"],
        vec!["10.244.1.0/24".parse().unwrap()]
    );
}

#[test]
fn an_invalid_cluster_network_policy_fails_the_load_with_its_reason() {
    // As for every other kind in a manifests directory: the last good state stays enforced until
    // the file is fixed, and the error says where.
    let err = load_text(
        "bad.yaml",
        &format!("{CNP}metadata: {{name: p}}\nspec: {{tier: Admin, priority: 2000, subject: {{namespaces: {{}}}}}}\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "bad.yaml document 1 (ClusterNetworkPolicy p): spec.priority: 2000 is out of range"
        ),
        "{err}"
    );
    let twice = format!(
        "{CNP}metadata: {{name: p}}\nspec: {{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}}}\n"
    );
    let err = load_text("twice.yaml", &format!("{twice}---\n{twice}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ClusterNetworkPolicy p is defined twice"),
        "{err}"
    );
    let err = load_text(
        "old.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: p}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unsupported apiVersion"), "{err}");
}
