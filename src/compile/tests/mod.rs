//! The compiler's tests, by topic. Shared here: a small cluster and verdict helpers that judge
//! packets with [`crate::compile::evaluate`].
//!
//! Cluster: namespaces x, y, z (label ns=NAME); pods a, b, c in each (label pod=NAME), serving
//! named ports serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp, serve-80-sctp. Pods a and b
//! run on n1, pods c on n2, so same-node and cross-node flows both occur.

mod budgets;
pub(crate) mod cache;
mod dataplane_rendering;
mod explain;
mod scale;
mod selections;
mod semantics;
pub(crate) mod tiers;
use crate::compile::evaluate::{L4, Packet, passes};
use crate::compile::{Compiler, DesiredState};
use crate::model::Family;
use crate::model::{ClusterSnapshot, ContainerPort, Pod, PodPhase, Protocol};
use crate::source::convert;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::net::IpAddr;

pub(super) const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub(super) const PODS: [&str; 3] = ["a", "b", "c"];
pub(super) const NODE_IP_N1: &str = "192.168.0.1";

pub(super) fn pod_ips(ns: &str, pod: &str) -> (IpAddr, IpAddr) {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() + 1;
    let p = PODS.iter().position(|x| *x == pod).unwrap() + 1;
    (
        format!("10.0.{n}.{p}").parse().unwrap(),
        format!("fd00::{n}:{p}").parse().unwrap(),
    )
}

pub(super) fn cluster() -> ClusterSnapshot {
    let mut s = ClusterSnapshot::default();
    for ns in NAMESPACES {
        s.namespaces.insert(
            ns.into(),
            convert::implicit_namespace(ns, [("ns".to_string(), ns.to_string())].into()),
        );
        for pod in PODS {
            let (v4, v6) = pod_ips(ns, pod);
            let port = |name: &str, port, protocol| ContainerPort {
                name: Some(name.into()),
                port,
                protocol,
            };
            s.pods_mut().push(Pod {
                namespace: ns.into(),
                name: pod.into(),
                labels: [("pod".to_string(), pod.to_string())].into(),
                node_name: Some(if pod == "c" { "n2" } else { "n1" }.into()),
                ips: vec![v4, v6],
                host_network: false,
                phase: PodPhase::Running,
                ports: vec![
                    port("serve-80-tcp", 80, Protocol::Tcp),
                    port("serve-81-tcp", 81, Protocol::Tcp),
                    port("serve-80-udp", 80, Protocol::Udp),
                    port("serve-81-udp", 81, Protocol::Udp),
                    port("serve-80-sctp", 80, Protocol::Sctp),
                ],
            });
        }
    }
    s
}

pub(super) fn with_policies(mut s: ClusterSnapshot, yamls: &[&str]) -> ClusterSnapshot {
    for y in yamls {
        let full = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{y}");
        let p: NetworkPolicy = serde_yaml_ng::from_str(&full).unwrap();
        s.policies.push(convert::policy(&p).unwrap());
    }
    s
}

pub(super) fn node_of<'a>(s: &'a ClusterSnapshot, key: &str) -> Option<&'a Pod> {
    s.pods.iter().find(|p| p.key() == key)
}

/// Whether `from` (a pod key) reaches `to` (a pod key) in `family`, judged by FORWARD on the
/// node of each end, as the kernel would for a routed flow.
pub(super) fn reach_l4(s: &ClusterSnapshot, family: Family, from: &str, to: &str, l4: L4) -> bool {
    let src = node_of(s, from).unwrap();
    let dst = node_of(s, to).unwrap();
    let pick = |p: &Pod| *p.ips.iter().find(|ip| Family::of(ip) == family).unwrap();
    let packet = Packet {
        src: pick(src),
        dst: pick(dst),
        l4,
        established: false,
        src_is_local: false,
    };
    let mut nodes = vec![
        src.node_name.clone().unwrap(),
        dst.node_name.clone().unwrap(),
    ];
    nodes.dedup();
    nodes
        .iter()
        .all(|node| passes(&compile(s, node, family), "FORWARD", &packet))
}

pub(super) fn reach(s: &ClusterSnapshot, from: &str, to: &str, proto: Protocol, port: u16) -> bool {
    let v4 = reach_l4(s, Family::V4, from, to, L4::Port(proto, port));
    let v6 = reach_l4(s, Family::V6, from, to, L4::Port(proto, port));
    assert_eq!(
        v4, v6,
        "IPv4 and IPv6 disagree for {from} -> {to} {proto:?}/{port}"
    );
    v4
}

pub(super) fn tcp80(s: &ClusterSnapshot, from: &str, to: &str) -> bool {
    reach(s, from, to, Protocol::Tcp, 80)
}

pub(super) fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Asserts the TCP/80 matrix: `allowed(from, to)` says which flows should pass.
pub(super) fn assert_matrix(s: &ClusterSnapshot, allowed: impl Fn(&str, &str) -> bool) {
    let mut wrong = Vec::new();
    for from in all_pods() {
        for to in all_pods() {
            let want = allowed(&from, &to);
            if tcp80(s, &from, &to) != want {
                wrong.push(format!(
                    "{from} -> {to}: expected {}",
                    if want { "allowed" } else { "blocked" }
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
}

/// A one-shot compile of one family.
pub(super) fn compile(s: &ClusterSnapshot, node: &str, family: Family) -> DesiredState {
    Compiler::new().compile_family(s, node, family)
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The sets rules match peers with (all but the dispatch's isolation sets).
pub(super) fn peer_sets(state: &DesiredState) -> impl Iterator<Item = &crate::compile::ir::IpSet> {
    state
        .sets
        .iter()
        .filter(|(name, set)| {
            !Family::ALL.iter().any(|f| {
                [true, false].iter().any(|ingress| {
                    crate::compile::names::isolated_set(*f, *ingress) == **name && set.family == *f
                })
            })
        })
        .map(|(_, set)| set)
}
