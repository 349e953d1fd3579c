//! Oversized rules and the per-namespace ipBlock budget: they fail closed, the rest is enforced.

use super::*;

/// A policy whose ipBlocks need more set entries than `MAX_SET_MEMBERS` (17,000 IPv6 /64s, each
/// with one /128 cut out: 64 prefixes apiece, over a million in all) must not be programmed: that
/// rule allows nothing, the pod stays isolated, the policy's other rules and every other policy
/// still apply, and the failure is reported. A fresh and a long-lived Compiler agree.
mod oversized {
    use super::*;
    use crate::compile::ir::MAX_SET_MEMBERS;
    use crate::model::{LabelSelector, Peer, Policy, PolicyRule};
    use ipnet::IpNet;

    fn selector(label: &str, value: &str) -> LabelSelector {
        LabelSelector {
            match_labels: [(label.to_string(), value.to_string())].into(),
            match_expressions: vec![],
        }
    }

    /// `count` IPv6 /64 ipBlocks from the `first`th on, each with one /128 cut out (64 set
    /// entries apiece).
    fn holed_blocks(first: u32, count: u32) -> Vec<Peer> {
        (first..first + count)
            .map(|i| {
                let net: IpNet = format!("2001:db8:{:x}:{:x}::/64", i >> 8, i & 0xff)
                    .parse()
                    .unwrap();
                let hole: IpNet = format!("2001:db8:{:x}:{:x}::1/128", i >> 8, i & 0xff)
                    .parse()
                    .unwrap();
                Peer::IpBlock {
                    cidr: net,
                    except: vec![hole],
                }
            })
            .collect()
    }

    fn huge_policy() -> Policy {
        let blocks = holed_blocks(0, 17_000);
        Policy {
            namespace: "x".into(),
            name: "huge".into(),
            pod_selector: selector("pod", "a"),
            isolates_ingress: true,
            isolates_egress: false,
            ingress: vec![
                PolicyRule {
                    peers: Some(blocks),
                    ports: None,
                },
                PolicyRule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: None,
                        pods: Some(selector("pod", "b")),
                    }]),
                    ports: None,
                },
            ],
            egress: vec![],
        }
    }

    fn check(s: &ClusterSnapshot, compiled: &dyn Fn(Family) -> DesiredState) {
        let v6 = compiled(Family::V6);
        assert_eq!(v6.failed_closed.len(), 1, "{:?}", v6.failed_closed);
        let failed = &v6.failed_closed[0];
        assert_eq!(
            (failed.policy.as_str(), failed.direction, failed.rule),
            ("x/huge", "ingress", 0)
        );
        assert!(
            v6.sets
                .values()
                .all(|set| set.members.len() <= MAX_SET_MEMBERS)
        );
        // The blocks hold only IPv6 prefixes: the IPv4 rule is an empty set, nothing failed.
        assert!(compiled(Family::V4).failed_closed.is_empty());
        for family in Family::ALL {
            let state = compiled(family);
            let dst = *node_of(s, "x/a")
                .unwrap()
                .ips
                .iter()
                .find(|ip| Family::of(ip) == family)
                .unwrap();
            let src_of = |key: &str| {
                *node_of(s, key)
                    .unwrap()
                    .ips
                    .iter()
                    .find(|ip| Family::of(ip) == family)
                    .unwrap()
            };
            let packet = |src| Packet {
                src,
                dst,
                l4: L4::Port(Protocol::Tcp, 80),
                established: false,
                src_is_local: false,
            };
            assert!(
                passes(&state, "FORWARD", &packet(src_of("x/b"))),
                "{family}: rule 1 still allows x/b"
            );
            assert!(
                !passes(&state, "FORWARD", &packet(src_of("y/b"))),
                "{family}: x/a stays isolated"
            );
            // An address the blocks would have allowed is not let in either.
            if family == Family::V6 {
                let inside: IpAddr = "2001:db8:0:5::7".parse().unwrap();
                assert!(
                    !passes(&state, "FORWARD", &packet(inside)),
                    "fails closed, not open"
                );
            }
        }
    }

    /// Policies of one namespace, each under the per-set limit (4,000 IPv6 /64 blocks with a
    /// /128 cut out: 256,000 entries), together over the namespace's ipBlock budget.
    fn tenant_policy(namespace: &str, name: &str, offset: u32) -> Policy {
        let blocks = holed_blocks(offset, 4_000);
        Policy {
            namespace: namespace.into(),
            name: name.into(),
            pod_selector: selector("pod", "a"),
            isolates_ingress: true,
            isolates_egress: false,
            ingress: vec![PolicyRule {
                peers: Some(blocks),
                ports: None,
            }],
            egress: vec![],
        }
    }

    #[test]
    fn many_policies_of_one_namespace_share_one_ipblock_budget() {
        let mut s = cluster();
        for (i, name) in ["p1", "p2", "p3"].iter().enumerate() {
            s.policies.push(tenant_policy("x", name, i as u32 * 4_000));
        }
        // Another namespace has a budget of its own.
        s.policies.push(tenant_policy("y", "p1", 0));
        let check = |state: &DesiredState| {
            let failed: Vec<(&str, usize)> = state
                .failed_closed
                .iter()
                .map(|f| (f.policy.as_str(), f.rule))
                .collect();
            // Policies in name order: the first fits, the others fail closed.
            assert_eq!(
                failed,
                [("x/p2", 0), ("x/p3", 0)],
                "{:?}",
                state.failed_closed
            );
            assert!(state.failed_closed[0].reason.contains("namespace x"));
            let block_entries: usize = state.member_count();
            assert!(
                block_entries <= 2 * MAX_SET_MEMBERS + 100,
                "{block_entries}"
            );
        };
        check(&compile(&s, "n1", Family::V6));
        let mut compiler = Compiler::new();
        check(&compiler.compile_family(&s, "n1", Family::V6));
        // Once a policy goes, the next one fits.
        s.policies.retain(|p| p.key() != "x/p1");
        let state = compiler.compile_family(&s, "n1", Family::V6);
        let failed: Vec<&str> = state
            .failed_closed
            .iter()
            .map(|f| f.policy.as_str())
            .collect();
        assert_eq!(failed, ["x/p3"]);
    }

    #[test]
    fn an_oversized_rule_fails_closed_and_the_rest_is_enforced() {
        let mut s = with_policies(
            cluster(),
            &[
                "metadata: {name: deny-y, namespace: y}\nspec: {podSelector: {}, policyTypes: [Ingress]}",
            ],
        );
        s.policies.push(huge_policy());
        check(&s, &|family| compile(&s, "n1", family));
        let compiler = std::cell::RefCell::new(Compiler::new());
        check(&s, &|family| {
            compiler.borrow_mut().compile_family(&s, "n1", family)
        });
        // The unrelated policy is compiled as usual: y/a is isolated.
        assert!(!tcp80(&s, "x/b", "y/a"));
    }
}
