//! How denied traffic is treated, beyond which traffic is denied: the deny action (drop or
//! reject), strict mode (cutting established flows a new state denies, see [`crate::compile::strict`]) and
//! new-pod isolation (see [`crate::compile::new_pod_isolation`]).
//!
//! `compile()` states policy semantics only; the choices here are applied to its output by
//! [`apply`], still pure, before the dataplane renders it.

use crate::compile::ir::{DesiredState, Family, Target};
use crate::compile::log_denied::{self, LogDenied};
use crate::compile::new_pod_isolation::{self, NewPodIsolation};
use crate::model::ClusterSnapshot;
use ipnet::IpNet;

/// What happens to a packet no policy allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DenyAction {
    /// Drop silently: the sender times out (what kube-network-policies, Calico and Cilium do,
    /// and what the ClusterNetworkPolicy conformance tests expect).
    #[default]
    Drop,
    /// Answer with a TCP reset, or ICMP(v6) port unreachable for other protocols: callers fail
    /// fast.
    Reject,
}

/// The node-wide enforcement choices, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub deny_action: DenyAction,
    /// Cut the conntrack flows a newly written state denies.
    pub strict_mode: bool,
    pub new_pod_isolation: NewPodIsolation,
    /// This node's pod CIDRs (`--pod-cidr`); when empty, those of its Node object are used.
    pub pod_cidrs: Vec<IpNet>,
    /// `--log-denied`: an NFLOG rule in front of every drop (see [`log_denied`]).
    pub log_denied: Option<LogDenied>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            deny_action: DenyAction::Drop,
            strict_mode: true,
            new_pod_isolation: NewPodIsolation::Ingress,
            pod_cidrs: Vec::new(),
            log_denied: None,
        }
    }
}

/// The pod CIDRs new-pod isolation uses on `node`: `--pod-cidr` if given (it overrides), else
/// the Node object's.
pub fn pod_cidrs<'a>(
    options: &'a Options,
    snapshot: &'a ClusterSnapshot,
    node: &str,
) -> &'a [IpNet] {
    if !options.pod_cidrs.is_empty() {
        return &options.pod_cidrs;
    }
    snapshot.node_pod_cidrs.get(node).map_or(&[], Vec::as_slice)
}

/// Applies the choices to the states compiled (one per family) from `snapshot` for `node`.
pub fn apply(
    states: &mut [(Family, DesiredState)],
    snapshot: &ClusterSnapshot,
    node: &str,
    options: &Options,
) {
    let pod_cidrs = pod_cidrs(options, snapshot, node);
    if options.new_pod_isolation != NewPodIsolation::Off {
        report_pod_cidrs(pod_cidrs);
    }
    for (family, state) in states.iter_mut() {
        apply_deny_action(state, options.deny_action);
        new_pod_isolation::apply(
            state,
            *family,
            options.new_pod_isolation,
            pod_cidrs,
            snapshot,
        );
        // Last: every drop the options above added is logged too.
        if let Some(log) = &options.log_denied {
            log_denied::apply(state, log);
        }
    }
}

/// Says once when new-pod isolation is off for want of a pod CIDR, and once when it is on again.
fn report_pod_cidrs(pod_cidrs: &[IpNet]) {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: nothing said yet, 1: said off, 2: said on.
    static SAID: AtomicU8 = AtomicU8::new(0);
    let now = if pod_cidrs.is_empty() { 1 } else { 2 };
    if SAID.swap(now, Ordering::Relaxed) == now {
        return;
    }
    if pod_cidrs.is_empty() {
        tracing::warn!(
            "new-pod isolation is off: no pod CIDR is known for this node (pass --pod-cidr, or give the Node object spec.podCIDRs); until a new pod is programmed, its address accepts any traffic"
        );
    } else {
        tracing::info!(pod_cidrs = ?pod_cidrs, "new-pod isolation is on for this node's pod CIDRs");
    }
}

/// `compile()` ends every pod chain with a TCP reset for TCP and an ICMP unreachable for the
/// rest. With `Drop`, both become one DROP.
pub fn apply_deny_action(state: &mut DesiredState, action: DenyAction) {
    if action == DenyAction::Reject {
        return;
    }
    for rules in state.chains.values_mut() {
        rules.retain(|r| r.target != Target::RejectWithTcpReset);
        for rule in rules.iter_mut() {
            if rule.target == Target::Reject {
                rule.target = Target::Drop;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::evaluate::{L4, Packet, passes};
    use crate::compile::ir::Rule;
    use crate::model::Protocol;

    fn pod_chain_state() -> DesiredState {
        crate::compile::Compiler::new().compile_family(
            &crate::model::ClusterSnapshot::default(),
            "node",
            Family::V4,
        )
    }

    #[test]
    fn drop_replaces_both_rejects_and_keeps_the_verdicts() {
        let mut state = pod_chain_state();
        // A pod chain as compile() ends it: reset for TCP, unreachable for the rest.
        state.chains.insert(
            "KNI-POD".into(),
            vec![
                Rule::new(
                    vec![crate::compile::ir::Match::Protocol(Protocol::Tcp)],
                    Target::RejectWithTcpReset,
                ),
                Rule::new(vec![], Target::Reject),
            ],
        );
        state
            .chains
            .get_mut(crate::compile::names::FORWARD_CHAIN)
            .unwrap()
            .insert(
                0,
                Rule::new(
                    vec![crate::compile::ir::Match::Destination(
                        "10.0.0.1/32".parse().unwrap(),
                    )],
                    Target::Jump("KNI-POD".into()),
                ),
            );
        let rejected = state.clone();
        apply_deny_action(&mut state, DenyAction::Drop);
        assert_eq!(
            state.chains["KNI-POD"],
            vec![Rule::new(vec![], Target::Drop)]
        );
        for l4 in [
            L4::Port(Protocol::Tcp, 80),
            L4::Port(Protocol::Udp, 53),
            L4::Icmp,
        ] {
            let p = Packet::new("10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap(), l4);
            assert!(!passes(&state, "FORWARD", &p));
            assert!(!passes(&rejected, "FORWARD", &p));
        }
        let mut kept = rejected.clone();
        apply_deny_action(&mut kept, DenyAction::Reject);
        assert_eq!(kept, rejected);
    }
}
