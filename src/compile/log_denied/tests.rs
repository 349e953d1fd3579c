//! Prefixes, rates and where the NFLOG rules go: in front of every drop, judged with the same
//! evaluator as everything else, never changing a verdict.

use super::*;
use crate::compile::enforcement::{self, DenyAction, Options};
use crate::compile::evaluate::{L4, Packet, passes, trace_chain};
use crate::compile::ir::Family;
use crate::compile::new_pod_isolation::NewPodIsolation;
use crate::compile::tests::{NAMESPACES, PODS, cluster, pod_ips, with_policies};
use crate::compile::{Compiler, names};
use crate::model::{ClusterSnapshot, Protocol};

const LOG: LogDenied = LogDenied {
    group: 100,
    rate: Rate {
        per_second: 5,
        burst: 10,
    },
};

#[test]
fn a_prefix_names_the_direction_and_the_chain_and_decodes_back() {
    let longest = format!("KNI-{}", "X".repeat(names::MAX_CHAIN_NAME - 4));
    for direction in [Direction::Ingress, Direction::Egress, Direction::Other] {
        for chain in [
            "KNI-PODI-0123456789abcdef",
            "KNI-NEWPOD-DST",
            longest.as_str(),
        ] {
            let prefix = encode_prefix(direction, chain);
            assert!(prefix.len() <= MAX_PREFIX_LEN, "{prefix}");
            assert!(
                prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "iptables-save must print it unquoted: {prefix}"
            );
            assert_eq!(
                decode_prefix(&prefix),
                Some(Prefix {
                    direction,
                    chain: chain.to_string()
                })
            );
        }
    }
    assert_eq!(
        encode_prefix(Direction::Ingress, "KNI-PODI-0123456789abcdef"),
        "kni-deny-ingress-KNI-PODI-0123456789abcdef"
    );
    for foreign in [
        "",
        "kni-deny-",
        "kni-deny-ingress",
        "kni-deny-sideways-KNI-PODI-0",
        "kni-deny-ingress-OTHER-CHAIN",
        "calico-deny-ingress-KNI-PODI-0",
    ] {
        assert_eq!(decode_prefix(foreign), None, "{foreign:?}");
    }
}

#[test]
fn rates_parse_with_a_default_burst_and_refuse_what_limit_cannot_do() {
    let rate = |s: &str| s.parse::<Rate>();
    assert_eq!(
        rate("5/s"),
        Ok(Rate {
            per_second: 5,
            burst: 10
        })
    );
    assert_eq!(
        rate("1/s,burst=3"),
        Ok(Rate {
            per_second: 1,
            burst: 3
        })
    );
    assert_eq!(rate("10000/s").unwrap().burst, 10_000);
    for bad in [
        "0/s",
        "5",
        "5/min",
        "10001/s",
        "5/s,burst=0",
        "5/s,burst=x",
        "-1/s",
    ] {
        assert!(rate(bad).is_err(), "{bad}");
    }
    assert_eq!(Rate::default().to_string().parse(), Ok(Rate::default()));
}

/// x/a isolated both ways; x/b ingress; new-pod isolation on for the n1 pod CIDR.
fn snapshot() -> ClusterSnapshot {
    let mut s = with_policies(
        cluster(),
        &[
            "metadata: {name: deny-in, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]",
            "metadata: {name: a-out, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]",
            "metadata: {name: b-from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
        ],
    );
    s.node_pod_cidrs
        .insert("n1".into(), vec!["10.0.0.0/16".parse().unwrap()]);
    s
}

fn states(s: &ClusterSnapshot, options: &Options) -> Vec<(Family, crate::compile::DesiredState)> {
    let mut states = Compiler::new().compile(s, "n1").into_vec();
    enforcement::apply(&mut states, s, "n1", options);
    states
}

#[test]
fn every_drop_is_preceded_by_its_log_rule_and_nothing_else_changes() {
    let s = snapshot();
    for deny_action in [DenyAction::Drop, DenyAction::Reject] {
        let plain = Options {
            deny_action,
            new_pod_isolation: NewPodIsolation::Both,
            ..Options::default()
        };
        let logged = Options {
            log_denied: Some(LOG),
            ..plain.clone()
        };
        for ((_, without), (_, with)) in states(&s, &plain).iter().zip(&states(&s, &logged)) {
            let mut drops = 0;
            for (chain, rules) in &with.chains {
                let unlogged: Vec<_> = rules
                    .iter()
                    .filter(|r| !matches!(r.target, Target::LogDenied(_)))
                    .cloned()
                    .collect();
                assert_eq!(
                    &unlogged, &without.chains[chain],
                    "{chain}: only log rules added"
                );
                for (i, rule) in rules.iter().enumerate() {
                    if is_deny(&rule.target) {
                        drops += 1;
                        let before = &rules[i - 1];
                        assert_eq!(before.matches, rule.matches, "{chain}: same matches");
                        let Target::LogDenied(log) = &before.target else {
                            panic!("{chain}: rule {i} drops without a log rule before it");
                        };
                        assert_eq!((log.group, log.per_second, log.burst), (100, 5, 10));
                        assert_eq!(decode_prefix(&log.prefix).unwrap().chain, *chain);
                    }
                }
            }
            assert!(
                drops >= 3,
                "three pod chains (and new-pod isolation in IPv4): {drops}"
            );
            assert_eq!(with.chains.len(), without.chains.len());
            assert_eq!(with.sets, without.sets);
        }
        // The evaluator steps past the log rules: every verdict stays.
        let (without, with) = (states(&s, &plain), states(&s, &logged));
        for family in Family::ALL {
            let pick = |v: &Vec<(Family, crate::compile::DesiredState)>| {
                v.iter().find(|(f, _)| *f == family).unwrap().1.clone()
            };
            let (without, with) = (pick(&without), pick(&with));
            let addr = |ns: &str, pod: &str| match family {
                Family::V4 => pod_ips(ns, pod).0,
                Family::V6 => pod_ips(ns, pod).1,
            };
            for from_ns in NAMESPACES {
                for from in PODS {
                    for to_ns in NAMESPACES {
                        for to in PODS {
                            for l4 in [L4::Port(Protocol::Tcp, 80), L4::Port(Protocol::Udp, 81)] {
                                let p = Packet::new(addr(from_ns, from), addr(to_ns, to), l4);
                                assert_eq!(
                                    passes(&with, "FORWARD", &p),
                                    passes(&without, "FORWARD", &p),
                                    "{from_ns}/{from} -> {to_ns}/{to} {l4:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn log_rules_name_the_direction_of_their_chain_and_the_pod_chain_lists_its_policies() {
    let s = snapshot();
    let options = Options {
        new_pod_isolation: NewPodIsolation::Both,
        log_denied: Some(LOG),
        ..Options::default()
    };
    let (_, state) = states(&s, &options).remove(0);
    let prefix_of = |chain: &str| {
        state.chains[chain]
            .iter()
            .find_map(|r| match &r.target {
                Target::LogDenied(log) => decode_prefix(&log.prefix),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{chain} logs nothing"))
    };
    let a_in = names::pod_chain(true, "x/a");
    let a_out = names::pod_chain(false, "x/a");
    assert_eq!(prefix_of(&a_in).direction, Direction::Ingress);
    assert_eq!(prefix_of(&a_out).direction, Direction::Egress);
    assert_eq!(
        prefix_of(crate::compile::new_pod_isolation::DESTINATION_CHAIN).direction,
        Direction::Ingress
    );
    assert_eq!(
        prefix_of(crate::compile::new_pod_isolation::SOURCE_CHAIN).direction,
        Direction::Egress
    );
    assert_eq!(isolating_policies(&state, &a_in), vec!["x/deny-in"]);
    assert_eq!(isolating_policies(&state, &a_out), vec!["x/a-out"]);
    let mut b_in = isolating_policies(&state, &names::pod_chain(true, "x/b"));
    b_in.sort();
    assert_eq!(b_in, vec!["x/b-from-y", "x/deny-in"]);
    // The packet y/a → x/b is refused by deny-in's chain but allowed by b-from-y's: it passes,
    // so its walk through x/b's chain meets no log rule.
    let (y_a, x_b) = (pod_ips("y", "a").0, pod_ips("x", "b").0);
    let allowed_later = Packet::new(y_a, x_b, L4::Port(Protocol::Tcp, 80));
    let b_chain = names::pod_chain(true, "x/b");
    let trace = trace_chain(&state, &b_chain, &allowed_later).unwrap();
    assert_eq!(trace.rejected_by, None);
    assert!(
        !trace
            .steps
            .iter()
            .any(|(chain, i)| matches!(state.chains[*chain][*i].target, Target::LogDenied(_))),
        "an allowed packet meets no log rule: {:?}",
        trace.steps
    );
    let denied = Packet::new(pod_ips("z", "a").0, x_b, L4::Port(Protocol::Tcp, 80));
    let trace = trace_chain(&state, &b_chain, &denied).unwrap();
    assert_eq!(trace.rejected_by.as_deref(), Some(b_chain.as_str()));
    let logged: Vec<_> = trace
        .steps
        .iter()
        .filter(|(chain, i)| matches!(state.chains[*chain][*i].target, Target::LogDenied(_)))
        .collect();
    assert_eq!(
        logged.len(),
        1,
        "a denied packet is logged once: {logged:?}"
    );
}

/// A ClusterNetworkPolicy Deny drops in the policy's own chain: it is logged there, with the
/// direction of the pod chains that reach it, and its line names the policy with its tier; a
/// pod chain's NetworkPolicy deny lists NetworkPolicies only.
#[test]
fn cluster_policy_denies_are_logged_in_their_chain_and_named_with_their_tier() {
    use crate::compile::tests::tiers::{cnp, from_ns, rule};
    use crate::model::{ClusterRuleAction, Tier};
    let mut s = snapshot();
    let mut admin = cnp("no-z", Tier::Admin, 1, "x");
    admin.ingress = vec![rule(ClusterRuleAction::Deny, vec![from_ns("z")], None)];
    s.cluster_policies = vec![admin];
    let options = Options {
        log_denied: Some(LOG),
        ..Options::default()
    };
    let (_, state) = states(&s, &options).remove(0);
    let cnp_chain = state
        .origins
        .iter()
        .find(|(_, o)| o.tier.is_some())
        .map(|(chain, _)| chain.clone())
        .expect("a cluster policy chain");
    let rules = &state.chains[&cnp_chain];
    let log = rules
        .iter()
        .position(|r| matches!(r.target, Target::LogDenied(_)))
        .expect("the Deny is logged");
    assert!(
        is_deny(&rules[log + 1].target),
        "the log rule precedes the drop"
    );
    let Target::LogDenied(log) = &rules[log].target else {
        unreachable!()
    };
    assert_eq!(
        decode_prefix(&log.prefix).unwrap().direction,
        Direction::Ingress
    );
    assert_eq!(isolating_policies(&state, &cnp_chain), vec!["Admin/no-z"]);
    assert_eq!(
        isolating_policies(&state, &names::pod_chain(true, "x/a")),
        vec!["x/deny-in"]
    );
}
