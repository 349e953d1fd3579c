//! `explain`: its verdict is the evaluator's and the matrix's, and its reasons name the policy,
//! rule, peer and port the compiled state records.

use super::*;
use crate::compile::explain::{Endpoint, Explanation, Query, explain};

fn query(from: &str, to: &str, protocol: Protocol, port: u16, family: Family) -> Query {
    Query {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        protocol,
        port,
        family: Some(family),
    }
}

fn tcp80_explained(s: &ClusterSnapshot, from: &str, to: &str, family: Family) -> Explanation {
    explain(s, &query(from, to, Protocol::Tcp, 80, family)).unwrap()
}

fn ns(key: &str) -> &str {
    &key[..1]
}

/// Cases of the e2e matrix (tests/e2e/matrix.rs), with their hand-written expectations.
#[allow(clippy::type_complexity)]
fn matrix_cases() -> Vec<(
    &'static str,
    Vec<&'static str>,
    Box<dyn Fn(&str, &str) -> bool>,
)> {
    vec![
        ("no policies", vec![], Box::new(|_: &str, _: &str| true)),
        (
            "default deny ingress in x",
            vec![
                "metadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]",
            ],
            Box::new(|_: &str, to: &str| ns(to) != "x"),
        ),
        (
            "default deny egress in x",
            vec![
                "metadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]",
            ],
            Box::new(|from: &str, _: &str| ns(from) != "x"),
        ),
        (
            "x/a from pods b of its namespace",
            vec![
                "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
            ],
            Box::new(|from: &str, to: &str| to != "x/a" || from == "x/b"),
        ),
        (
            "x from namespace y, or b of namespace y (two policies)",
            vec![
                "metadata: {name: p1, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
                "metadata: {name: p2, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
            ],
            Box::new(|from: &str, to: &str| {
                ns(to) != "x" || ns(from) == "z" || (to == "x/a" && ns(from) == "y")
            }),
        ),
        (
            "x egress only to namespace y",
            vec![
                "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
            ],
            Box::new(|from: &str, to: &str| ns(from) != "x" || ns(to) == "y"),
        ),
        (
            "x ingress on port 81 only",
            vec![
                "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 81}]}]",
            ],
            Box::new(|_: &str, to: &str| ns(to) != "x"),
        ),
    ]
}

#[test]
fn explain_agrees_with_the_matrix_and_the_evaluator_on_both_families() {
    for (name, policies, expect) in matrix_cases() {
        let s = with_policies(cluster(), &policies);
        for family in Family::ALL {
            for from in all_pods() {
                for to in all_pods() {
                    let e = tcp80_explained(&s, &from, &to, family);
                    let evaluator = reach_l4(&s, family, &from, &to, L4::Port(Protocol::Tcp, 80));
                    assert_eq!(e.allowed, evaluator, "{name}: {from} -> {to} {family}\n{e}");
                    assert_eq!(
                        e.allowed,
                        expect(&from, &to),
                        "{name}: {from} -> {to} {family}\n{e}"
                    );
                    assert_eq!(
                        e.allowed,
                        e.egress.allowed && e.ingress.allowed,
                        "{name}: {from} -> {to} {family}: the directions disagree with the verdict\n{e}"
                    );
                }
            }
        }
    }
}

#[test]
fn an_allowed_flow_names_the_policy_rule_peer_and_port() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n  - from: [{ipBlock: {cidr: 10.9.0.0/16}}, {namespaceSelector: {matchLabels: {ns: y}}}]\n    ports: [{port: 81}, {port: serve-80-tcp}]",
        ],
    );
    for family in Family::ALL {
        let e = tcp80_explained(&s, "y/b", "x/a", family);
        assert!(e.allowed, "{e}");
        assert!(!e.egress.isolated);
        assert!(e.ingress.isolated);
        assert_eq!(e.ingress.isolating_policies, ["x/web"]);
        let [allow] = e.ingress.allowed_by.as_slice() else {
            panic!("one allowing rule expected:\n{e}");
        };
        assert_eq!(allow.policy, "x/web");
        assert_eq!(allow.rule, 1);
        assert_eq!(allow.peers.iter().map(|p| p.index).collect::<Vec<_>>(), [1]);
        let port = allow.port.clone().unwrap();
        assert_eq!(port.index, 1);
        assert!(
            port.what.contains("= 80 on the destination"),
            "{}",
            port.what
        );
    }
    let e = tcp80_explained(&s, "x/c", "x/a", Family::V4);
    assert_eq!(e.ingress.allowed_by.len(), 1, "{e}");
    assert_eq!(e.ingress.allowed_by[0].rule, 0);
    assert!(e.ingress.allowed_by[0].port.is_none());
}

#[test]
fn a_denied_flow_lists_every_isolating_policy_and_no_allowing_rule() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]",
            "metadata: {name: to-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
        ],
    );
    let e = tcp80_explained(&s, "x/a", "z/c", Family::V6);
    assert!(!e.allowed);
    assert!(!e.egress.allowed);
    assert_eq!(e.egress.isolating_policies, ["x/deny", "x/to-y"]);
    assert!(e.egress.allowed_by.is_empty());
    assert!(e.ingress.allowed && !e.ingress.isolated);
    let text = e.to_string();
    assert!(
        text.contains("DENIED") && text.contains("no rule of these policies matches"),
        "{text}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["allowed"], false);
    assert_eq!(json["egress"]["isolating_policies"][1], "x/to-y");
    assert_eq!(json["ingress"]["isolated"], false);
}

#[test]
fn ipblock_except_hits_are_shown_and_outside_addresses_are_not_isolated() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: blocks, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.0/17]}}]}]",
        ],
    );
    let q = |from: &str| Query {
        from: from.parse().unwrap(),
        to: "x/b".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
        family: None,
    };
    let e = explain(&s, &q("10.244.1.1")).unwrap();
    assert!(!e.allowed, "{e}");
    assert_eq!(e.from.pod, None);
    assert!(!e.egress.isolated && e.egress.note.is_some());
    assert_eq!(e.ingress.except_hits.len(), 1);
    assert_eq!(e.ingress.except_hits[0].except, "10.244.0.0/17");
    let e = explain(&s, &q("10.244.200.1")).unwrap();
    assert!(e.allowed, "{e}");
    assert_eq!(e.ingress.allowed_by[0].peers[0].index, 0);
    assert!(e.ingress.except_hits.is_empty());
    // An address a pod holds is that pod.
    let e = explain(&s, &q("10.0.2.1")).unwrap();
    assert_eq!(e.from.pod.as_deref(), Some("y/a"));
    assert!(matches!(
        "10.0.2.1".parse::<Endpoint>(),
        Ok(Endpoint::Address(_))
    ));
    assert!("x/a/b".parse::<Endpoint>().is_err());
}

#[test]
fn new_pod_isolation_denials_are_named() {
    let mut s = cluster();
    s.node_pod_cidrs
        .insert("n1".into(), vec!["10.0.0.0/16".parse().unwrap()]);
    // 10.0.9.9 is in n1's pod CIDR and no known pod holds it: a pod not programmed yet.
    let q = Query {
        from: "x/a".parse().unwrap(),
        to: "10.0.9.9".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
        family: None,
    };
    let e = explain(&s, &q).unwrap();
    assert!(!e.allowed, "{e}");
    assert!(!e.egress.allowed && !e.egress.isolated, "{e}");
    assert!(
        e.egress
            .note
            .as_deref()
            .unwrap()
            .contains("new-pod isolation"),
        "{e}"
    );
    // Outside the pod CIDRs nothing stops it.
    let e = explain(
        &s,
        &Query {
            to: "10.9.9.9".parse().unwrap(),
            ..q
        },
    )
    .unwrap();
    assert!(e.allowed, "{e}");
}
