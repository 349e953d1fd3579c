//! New-pod isolation, pure: traffic to an address in this node's pod CIDRs that no known pod holds
//! is dropped, so a pod that has its address but is not programmed yet (the agent has not seen it,
//! or not written its chains) is closed rather than open. With `Both`, such an address cannot send
//! either. The node's own traffic (OUTPUT from a local address: kubelet probes) always passes.
//!
//! Two sets and one early rule per dispatch chain: a `hash:net` of the node's pod CIDRs and a
//! `hash:net` of host prefixes of the known pods' addresses; traffic to (from) the CIDRs goes to a
//! small chain that returns for known addresses and drops the rest.

use crate::compile::ir::{
    DesiredState, Family, IpSet, Match, Members, Rule, SetDirection, SetKind, SetMember, Target,
};
use crate::compile::names;
use crate::model::ClusterSnapshot;
use ipnet::IpNet;

/// `--new-pod-isolation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NewPodIsolation {
    /// Nothing reaches an unknown address in the pod CIDRs.
    #[default]
    Ingress,
    /// Nothing reaches it and it reaches nothing.
    Both,
    /// Addresses no known pod holds are not treated differently.
    Off,
}

pub const DESTINATION_CHAIN: &str = "KNI-NEWPOD-DST";
pub const SOURCE_CHAIN: &str = "KNI-NEWPOD-SRC";

fn cidr_set(family: Family) -> &'static str {
    match family {
        Family::V4 => "KNI-4NEWPOD-CIDRS",
        Family::V6 => "KNI-6NEWPOD-CIDRS",
    }
}

fn known_set(family: Family) -> &'static str {
    match family {
        Family::V4 => "KNI-4NEWPOD-KNOWN",
        Family::V6 => "KNI-6NEWPOD-KNOWN",
    }
}

/// Adds new-pod isolation for `family` to a compiled state. Nothing when off or without a pod
/// CIDR of that family.
pub fn apply(
    state: &mut DesiredState,
    family: Family,
    mode: NewPodIsolation,
    pod_cidrs: &[IpNet],
    snapshot: &ClusterSnapshot,
) {
    let cidrs: Vec<IpNet> = pod_cidrs
        .iter()
        .filter(|c| Family::of_net(c) == family)
        .map(IpNet::trunc)
        .collect();
    if mode == NewPodIsolation::Off || cidrs.is_empty() {
        return;
    }
    // Pods that can hold an address (not finished, not hostNetwork): the same pods compile()
    // programs, so an address is open exactly when its pod's rules are in the same write.
    let known: Members = Members::new(
        snapshot
            .pods
            .iter()
            .filter(|p| p.is_policy_relevant())
            .flat_map(|p| p.ips.iter())
            .filter(|ip| Family::of(ip) == family && cidrs.iter().any(|c| c.contains(*ip)))
            .map(|ip| SetMember::Net(IpNet::from(*ip)))
            .collect(),
    );
    let (cidr_set, known_set) = (cidr_set(family), known_set(family));
    state.sets.insert(
        cidr_set.into(),
        IpSet {
            kind: SetKind::HashNet,
            family,
            members: Members::new(cidrs.into_iter().map(SetMember::Net).collect()),
        },
    );
    state.sets.insert(
        known_set.into(),
        IpSet {
            kind: SetKind::HashNet,
            family,
            members: known,
        },
    );
    let set = |name: &str, direction| Match::Set {
        name: name.into(),
        direction,
    };
    let guard = |direction, chain: &str| {
        Rule::new(vec![set(cidr_set, direction)], Target::Jump(chain.into()))
            .commented("unknown pod address")
    };
    let chain = |direction| {
        vec![
            Rule::new(vec![set(known_set, direction)], Target::Return),
            Rule::new(vec![], Target::Drop),
        ]
    };
    state
        .chains
        .insert(DESTINATION_CHAIN.into(), chain(SetDirection::Dst));
    let mut guards = vec![guard(SetDirection::Dst, DESTINATION_CHAIN)];
    if mode == NewPodIsolation::Both {
        state
            .chains
            .insert(SOURCE_CHAIN.into(), chain(SetDirection::Src));
        guards.push(guard(SetDirection::Src, SOURCE_CHAIN));
    }
    for (dispatch, senders_only) in [
        (names::FORWARD_CHAIN, false),
        // Traffic to the node: only the sender can be an unknown pod.
        (names::INPUT_CHAIN, true),
        (names::OUTPUT_CHAIN, false),
    ] {
        let Some(rules) = state.chains.get_mut(dispatch) else {
            continue;
        };
        // After the preamble (replies, neighbour discovery, the node's own traffic), before the
        // pods' chains.
        let at = rules
            .iter()
            .position(|r| matches!(r.target, Target::Jump(_) | Target::ClearAllowMark))
            .unwrap_or(rules.len());
        let wanted: Vec<Rule> = guards
            .iter()
            .filter(|g| !senders_only || g.target == Target::Jump(SOURCE_CHAIN.into()))
            .cloned()
            .collect();
        rules.splice(at..at, wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::evaluate::{L4, Packet, passes};

    fn snapshot(with_c: bool) -> ClusterSnapshot {
        let mut docs = String::from(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec: {nodeName: here}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
"#,
        );
        if with_c {
            docs.push_str(
                r#"---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x}
spec: {nodeName: here}
status: {phase: Running, podIPs: [{ip: 10.0.0.3}, {ip: "fd00::3"}]}
"#,
            );
        }
        crate::source::manifests::load_text("test.yaml", &docs).unwrap()
    }

    fn state(mode: NewPodIsolation, with_c: bool, family: Family) -> DesiredState {
        let snapshot = snapshot(with_c);
        let mut s = crate::compile::Compiler::new().compile_family(&snapshot, "here", family);
        let cidrs = ["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        apply(&mut s, family, mode, &cidrs, &snapshot);
        s
    }

    fn tcp(src: &str, dst: &str) -> Packet {
        Packet::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            L4::Port(crate::model::Protocol::Tcp, 80),
        )
    }

    #[test]
    fn unknown_addresses_in_the_pod_cidrs_are_closed_until_their_pod_is_known() {
        for (family, a, c, outside) in [
            (Family::V4, "10.0.0.1", "10.0.0.3", "10.9.0.1"),
            (Family::V6, "fd00::1", "fd00::3", "fd00:9::1"),
        ] {
            let unknown_c = state(NewPodIsolation::Ingress, false, family);
            assert!(!passes(&unknown_c, "FORWARD", &tcp(a, c)), "{family}");
            assert!(!passes(&unknown_c, "FORWARD", &tcp(outside, c)));
            assert!(passes(&unknown_c, "FORWARD", &tcp(c, a)), "ingress only");
            assert!(passes(&unknown_c, "FORWARD", &tcp(outside, a)));
            // The node's own traffic passes.
            let mut probe = tcp(outside, c);
            probe.src_is_local = true;
            assert!(passes(&unknown_c, "OUTPUT", &probe));
            // Replies of flows already allowed pass (strict mode judges those).
            let mut reply = tcp(a, c);
            reply.established = true;
            assert!(passes(&unknown_c, "FORWARD", &reply));

            let both = state(NewPodIsolation::Both, false, family);
            assert!(!passes(&both, "FORWARD", &tcp(c, a)));
            assert!(!passes(&both, "INPUT", &tcp(c, outside)));
            assert!(passes(&both, "FORWARD", &tcp(a, outside)));

            let known_c = state(NewPodIsolation::Both, true, family);
            assert!(passes(&known_c, "FORWARD", &tcp(a, c)));
            assert!(passes(&known_c, "FORWARD", &tcp(c, a)));

            let off = state(NewPodIsolation::Off, false, family);
            assert!(passes(&off, "FORWARD", &tcp(a, c)));
            assert_eq!(
                off,
                crate::compile::Compiler::new().compile_family(&snapshot(false), "here", family)
            );
        }
    }
}
