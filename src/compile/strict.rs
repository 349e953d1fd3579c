//! Strict mode's decision, pure: which conntrack flows a newly written state denies.
//!
//! Our dispatch chains let `ESTABLISHED,RELATED` packets through first, so a flow that was allowed
//! when it started goes on after a change denies it. After such a change the agent dumps the
//! conntrack table and deletes the flows decided here; the next packet of a cut flow is `NEW`
//! again and meets the pod chains (and their DROP or REJECT).
//!
//! A flow is judged by its first packet as the kernel rules would judge it now, with the same
//! evaluator the tests use against compiled state ([`crate::compile::evaluate`]): source from the original
//! tuple, destination and port from the reply tuple. For a flow DNAT'd by kube-proxy (service
//! address to pod) the reply tuple's source is the real destination, which is what our FORWARD
//! rules saw after PREROUTING's DNAT.

use crate::compile::evaluate::{L4, Packet, denying_chain};
use crate::compile::ir::{DesiredState, Family};
use crate::compile::names;
use crate::model::Protocol;
use std::net::IpAddr;

/// One direction of a conntrack entry. Ports are 0 for protocols without ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTuple {
    /// IP protocol number.
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A conntrack entry: the tuple of the packet that opened it, and the tuple replies carry (which
/// differs from the mirrored original when the flow is NATed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub original: FlowTuple,
    pub reply: FlowTuple,
}

/// Why a flow is cut: the policy direction that denies it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CutDirection {
    Ingress,
    Egress,
}

impl CutDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            CutDirection::Ingress => "ingress",
            CutDirection::Egress => "egress",
        }
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
/// ICMPv6 echo request: the only ICMPv6 flows conntrack keeps that policy can deny.
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// The packet that opened `flow` as our rules see it, and the built-in chain it traverses; `None`
/// for protocols our rules never judge on their own (they are left alone).
pub fn opening_packet(
    flow: &Flow,
    is_local: &dyn Fn(&IpAddr) -> bool,
) -> Option<(&'static str, Packet)> {
    let src = flow.original.src;
    let dst = flow.reply.src;
    if Family::of(&src) != Family::of(&dst) {
        return None;
    }
    let l4 = match flow.original.protocol {
        IPPROTO_TCP => L4::Port(Protocol::Tcp, flow.reply.src_port),
        IPPROTO_UDP => L4::Port(Protocol::Udp, flow.reply.src_port),
        IPPROTO_SCTP => L4::Port(Protocol::Sctp, flow.reply.src_port),
        IPPROTO_ICMP => L4::Icmp,
        IPPROTO_ICMPV6 => L4::Icmp6(ICMPV6_ECHO_REQUEST),
        _ => return None,
    };
    let src_is_local = is_local(&src);
    let builtin = if src_is_local {
        "OUTPUT"
    } else if is_local(&dst) {
        "INPUT"
    } else {
        "FORWARD"
    };
    Some((
        builtin,
        Packet {
            src,
            dst,
            l4,
            established: false,
            src_is_local,
        },
    ))
}

/// Whether `states` (one per family) deny `flow` now, and by which direction's policies.
pub fn denied_by(
    states: &[(Family, DesiredState)],
    flow: &Flow,
    is_local: &dyn Fn(&IpAddr) -> bool,
) -> Option<CutDirection> {
    let (builtin, packet) = opening_packet(flow, is_local)?;
    let family = Family::of(&packet.src);
    let (_, state) = states.iter().find(|(f, _)| *f == family)?;
    let chain = denying_chain(state, builtin, &packet)?;
    // Denied on the sending side: a pod's egress chain, or an unknown pod address sending.
    let egress = chain.starts_with(&format!("{}PODE-", names::PREFIX))
        || names::is_cluster_egress_chain(&chain)
        || chain == crate::compile::new_pod_isolation::SOURCE_CHAIN;
    Some(if egress {
        CutDirection::Egress
    } else {
        CutDirection::Ingress
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::enforcement::{DenyAction, apply_deny_action};
    use crate::model::ClusterSnapshot;

    const LOCAL_NODE_IP: &str = "192.168.1.1";

    /// x/a and x/b on this node, y/c on another; a policy in x lets only x/b reach x/a, on TCP
    /// port 80.
    fn snapshot() -> ClusterSnapshot {
        let docs = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: here}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: here}
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {pod: c}}
spec: {nodeName: there}
status: {phase: Running, podIPs: [{ip: 10.0.1.3}, {ip: "fd00:1::3"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {pod: a}}}]}]
"#;
        crate::source::manifests::load_text("test.yaml", docs).unwrap()
    }

    fn states() -> Vec<(Family, DesiredState)> {
        let snapshot = snapshot();
        Family::ALL
            .iter()
            .map(|f| {
                let mut s = crate::compile::Compiler::new().compile_family(&snapshot, "here", *f);
                apply_deny_action(&mut s, DenyAction::Drop);
                (*f, s)
            })
            .collect()
    }

    fn tuple(protocol: u8, src: &str, sport: u16, dst: &str, dport: u16) -> FlowTuple {
        FlowTuple {
            protocol,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: sport,
            dst_port: dport,
        }
    }

    /// A flow without NAT: the reply tuple mirrors the original.
    fn direct(protocol: u8, src: &str, sport: u16, dst: &str, dport: u16) -> Flow {
        Flow {
            original: tuple(protocol, src, sport, dst, dport),
            reply: tuple(protocol, dst, dport, src, sport),
        }
    }

    /// A flow to a service address that kube-proxy DNAT'd to `pod:port`.
    fn via_service(src: &str, service: &str, pod: &str, port: u16) -> Flow {
        Flow {
            original: tuple(IPPROTO_TCP, src, 40000, service, 8080),
            reply: tuple(IPPROTO_TCP, pod, port, src, 40000),
        }
    }

    fn is_local(ip: &IpAddr) -> bool {
        *ip == LOCAL_NODE_IP.parse::<IpAddr>().unwrap()
    }

    #[test]
    fn flows_are_judged_as_the_rules_judge_their_first_packet() {
        let states = states();
        let judge = |flow: &Flow| denied_by(&states, flow, &is_local);
        // Allowed: x/b to x/a on TCP 80, both families.
        assert_eq!(
            judge(&direct(IPPROTO_TCP, "10.0.0.2", 40000, "10.0.0.1", 80)),
            None
        );
        assert_eq!(
            judge(&direct(IPPROTO_TCP, "fd00::2", 40000, "fd00::1", 80)),
            None
        );
        // Denied by x/a's ingress: another port, UDP, another pod.
        for flow in [
            direct(IPPROTO_TCP, "10.0.0.2", 40000, "10.0.0.1", 81),
            direct(IPPROTO_UDP, "10.0.0.2", 40000, "10.0.0.1", 80),
            direct(IPPROTO_TCP, "10.0.1.3", 40000, "10.0.0.1", 80),
            direct(IPPROTO_TCP, "fd00:1::3", 40000, "fd00::1", 80),
            direct(IPPROTO_ICMP, "10.0.1.3", 0, "10.0.0.1", 0),
        ] {
            assert_eq!(judge(&flow), Some(CutDirection::Ingress), "{flow:?}");
        }
        // Denied by x/b's egress: anything but x/a.
        assert_eq!(
            judge(&direct(IPPROTO_UDP, "10.0.0.2", 40000, "10.0.1.3", 53)),
            Some(CutDirection::Egress)
        );
        // Not ours to judge: the node's own flows (kubelet probes), flows between unselected
        // pods, protocols our rules do not see.
        assert_eq!(
            judge(&direct(IPPROTO_TCP, LOCAL_NODE_IP, 40000, "10.0.0.1", 81)),
            None
        );
        assert_eq!(
            judge(&direct(IPPROTO_TCP, "10.0.1.3", 40000, "10.0.1.4", 81)),
            None
        );
        assert_eq!(judge(&direct(47, "10.0.1.3", 0, "10.0.0.1", 0)), None);
    }

    /// Flows of an address in the pod CIDRs that no known pod holds are cut too, counted by the
    /// side the unknown address is on.
    #[test]
    fn flows_of_unknown_pod_addresses_are_cut_by_their_side() {
        use crate::compile::new_pod_isolation::{NewPodIsolation, apply};
        let snapshot = snapshot();
        let states: Vec<(Family, DesiredState)> = Family::ALL
            .iter()
            .map(|f| {
                let mut s = crate::compile::Compiler::new().compile_family(&snapshot, "here", *f);
                let cidrs = ["10.0.0.0/24".parse().unwrap()];
                apply(&mut s, *f, NewPodIsolation::Both, &cidrs, &snapshot);
                (*f, s)
            })
            .collect();
        let judge = |flow: &Flow| denied_by(&states, flow, &is_local);
        assert_eq!(
            judge(&direct(IPPROTO_UDP, "10.0.1.3", 40000, "10.0.0.9", 53)),
            Some(CutDirection::Ingress)
        );
        assert_eq!(
            judge(&direct(IPPROTO_UDP, "10.0.0.9", 40000, "10.0.1.3", 53)),
            Some(CutDirection::Egress)
        );
        assert_eq!(
            judge(&direct(IPPROTO_UDP, LOCAL_NODE_IP, 40000, "10.0.0.9", 53)),
            None
        );
    }

    /// A service flow is judged by the pod kube-proxy chose (the reply source), not by the
    /// service address it was sent to.
    #[test]
    fn dnat_flows_are_judged_by_their_real_destination() {
        let states = states();
        let judge = |flow: &Flow| denied_by(&states, flow, &is_local);
        assert_eq!(
            judge(&via_service("10.0.0.2", "10.96.0.10", "10.0.0.1", 80)),
            None
        );
        assert_eq!(
            judge(&via_service("10.0.1.3", "10.96.0.10", "10.0.0.1", 80)),
            Some(CutDirection::Ingress)
        );
        // Port 8080 of the service is port 81 of the pod: denied though 8080 is not 80 either way.
        assert_eq!(
            judge(&via_service("10.0.0.2", "10.96.0.10", "10.0.0.1", 81)),
            Some(CutDirection::Ingress)
        );
        // Judged by the original destination it would have been let through (no policy selects
        // the service address): the reply tuple is what makes the difference.
        let flow = via_service("10.0.1.3", "10.96.0.10", "10.0.0.1", 80);
        let unnatted = direct(IPPROTO_TCP, "10.0.1.3", 40000, "10.96.0.10", 8080);
        assert_eq!(judge(&unnatted), None);
        assert_ne!(judge(&flow), None);
    }
}
