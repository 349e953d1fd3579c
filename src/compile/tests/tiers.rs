//! ClusterNetworkPolicy tiers, judged packet by packet with the evaluator on the compiled state
//! (the shared cluster of `tests/mod.rs`: namespaces x, y, z labelled ns=NAME; pods a, b on n1,
//! c on n2).

use super::*;
use crate::compile::strict::{CutDirection, Flow, FlowTuple, denied_by};
use crate::model::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, ClusterRuleAction, ClusterSubject,
    LabelSelector, NodeInfo, Tier,
};
use ClusterRuleAction::{Accept, Deny, Pass};

pub(crate) fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: vec![],
    }
}

pub(crate) fn ns(name: &str) -> LabelSelector {
    labels(&[("ns", name)])
}

pub(crate) fn cnp(name: &str, tier: Tier, priority: u32, subject_ns: &str) -> ClusterPolicy {
    ClusterPolicy {
        name: name.into(),
        tier,
        priority,
        subject: ClusterSubject::Namespaces(if subject_ns.is_empty() {
            LabelSelector::default()
        } else {
            ns(subject_ns)
        }),
        ingress: vec![],
        egress: vec![],
    }
}

pub(crate) fn rule(
    action: ClusterRuleAction,
    peers: Vec<ClusterPeer>,
    ports: Option<Vec<ClusterPort>>,
) -> ClusterRule {
    ClusterRule {
        name: format!("{}-rule", action.as_str().to_lowercase()),
        action,
        peers,
        ports,
    }
}

pub(crate) fn from_ns(name: &str) -> ClusterPeer {
    ClusterPeer::Namespaces(if name.is_empty() {
        LabelSelector::default()
    } else {
        ns(name)
    })
}

fn from_pod(namespace: &str, pod: &str) -> ClusterPeer {
    ClusterPeer::Pods {
        namespaces: ns(namespace),
        pods: labels(&[("pod", pod)]),
    }
}

fn tcp(first: u16, last: u16) -> ClusterPort {
    ClusterPort::Protocol {
        protocol: Protocol::Tcp,
        ports: Some((first, last)),
    }
}

fn with(mut s: ClusterSnapshot, policies: Vec<ClusterPolicy>) -> ClusterSnapshot {
    s.cluster_policies = policies;
    s
}

#[test]
fn pass_falls_through_to_network_policy_then_baseline() {
    let mut pass_y = cnp("pass-y", Tier::Admin, 10, "x");
    pass_y.ingress = vec![rule(Pass, vec![from_ns("y")], None)];
    let mut deny_all = cnp("deny-all", Tier::Admin, 20, "x");
    deny_all.ingress = vec![rule(Deny, vec![from_ns("")], None)];
    let mut baseline = cnp("baseline-deny-y-a", Tier::Baseline, 10, "x");
    baseline.ingress = vec![rule(Deny, vec![from_pod("y", "a")], None)];
    let s = with_policies(
        with(cluster(), vec![deny_all, baseline, pass_y]),
        &["metadata: {name: np, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]"],
    );
    // y passes the Admin tier (the later Admin Deny is skipped) ...
    assert!(tcp80(&s, "y/b", "x/a"), "NetworkPolicy allows y/b");
    assert!(!tcp80(&s, "y/a", "x/a"), "NetworkPolicy decides for x/a");
    assert!(!tcp80(&s, "y/c", "x/a"));
    // ... and where no NetworkPolicy selects, the Baseline tier decides, then allow.
    assert!(!tcp80(&s, "y/a", "x/b"), "Baseline denies y/a");
    assert!(tcp80(&s, "y/b", "x/b"), "no Baseline rule matches: allowed");
    assert!(tcp80(&s, "y/c", "x/c"));
    // Everything else meets the Admin Deny.
    for from in ["z/a", "z/c", "x/b"] {
        for to in ["x/a", "x/b", "x/c"] {
            if from != to {
                assert!(!tcp80(&s, from, to), "{from} -> {to}");
            }
        }
    }
    // Subjects are ns x only.
    assert!(tcp80(&s, "z/a", "y/a"));
}

#[test]
fn admin_deny_wins_over_a_network_policy_allow_and_admin_accept_over_its_deny() {
    let allow_all = "metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]";
    let deny_all = "metadata: {name: deny-all, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress]";
    let mut deny = cnp("deny-z", Tier::Admin, 1, "x");
    deny.ingress = vec![rule(Deny, vec![from_ns("z")], None)];
    let mut accept = cnp("accept-z", Tier::Admin, 1, "y");
    accept.ingress = vec![rule(Accept, vec![from_ns("z")], None)];
    let s = with_policies(with(cluster(), vec![deny, accept]), &[allow_all, deny_all]);
    assert!(!tcp80(&s, "z/a", "x/a"));
    assert!(!tcp80(&s, "z/c", "x/c"));
    assert!(
        tcp80(&s, "y/a", "x/a"),
        "the NetworkPolicy still allows the rest"
    );
    assert!(
        tcp80(&s, "z/a", "y/b"),
        "Admin Accept over the NetworkPolicy deny"
    );
    assert!(
        !tcp80(&s, "x/a", "y/b"),
        "the NetworkPolicy denies the rest"
    );
}

#[test]
fn baseline_applies_only_where_no_network_policy_selects() {
    let mut baseline = cnp("default-deny", Tier::Baseline, 50, "x");
    baseline.ingress = vec![rule(Deny, vec![from_ns("")], None)];
    let s = with_policies(
        with(cluster(), vec![baseline]),
        &["metadata: {name: np, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"],
    );
    assert!(tcp80(&s, "y/a", "x/a"), "the NetworkPolicy decides for x/a");
    assert!(!tcp80(&s, "z/a", "x/a"));
    assert!(
        !tcp80(&s, "y/a", "x/b"),
        "Baseline denies where no NetworkPolicy selects"
    );
    assert!(!tcp80(&s, "y/c", "x/c"));
    assert!(tcp80(&s, "x/a", "y/a"), "not a subject");
    // An egress-only NetworkPolicy does not take ingress away from the Baseline tier.
    let s = with_policies(
        s,
        &["metadata: {name: egress-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress: [{}]"],
    );
    assert!(!tcp80(&s, "y/a", "x/b"));
}

#[test]
fn priority_orders_the_tier_and_ties_are_broken_by_name() {
    let policy = |name: &str, priority, action| {
        let mut p = cnp(name, Tier::Admin, priority, "x");
        p.ingress = vec![rule(action, vec![from_ns("y")], None)];
        p
    };
    // Same priority: "a-deny" before "b-accept", whatever the snapshot's order.
    let s = with(
        cluster(),
        vec![policy("b-accept", 5, Accept), policy("a-deny", 5, Deny)],
    );
    assert!(!tcp80(&s, "y/a", "x/a"));
    let s = with(
        cluster(),
        vec![policy("a-accept", 5, Accept), policy("b-deny", 5, Deny)],
    );
    assert!(tcp80(&s, "y/a", "x/a"));
    // A lower priority goes first, whatever the names.
    let s = with(
        cluster(),
        vec![policy("a-deny", 6, Deny), policy("b-accept", 5, Accept)],
    );
    assert!(tcp80(&s, "y/a", "x/a"));
    // Within one policy, rules in order.
    let mut p = cnp("ordered", Tier::Baseline, 1, "x");
    p.ingress = vec![
        rule(Accept, vec![from_pod("y", "a")], None),
        rule(Deny, vec![from_ns("y")], None),
    ];
    let s = with(cluster(), vec![p]);
    assert!(tcp80(&s, "y/a", "x/b"));
    assert!(!tcp80(&s, "y/b", "x/b"));
}

#[test]
fn egress_accept_still_needs_the_destination_ingress() {
    let mut accept = cnp("egress-accept", Tier::Admin, 1, "x");
    accept.egress = vec![rule(Accept, vec![from_ns("")], None)];
    let mut deny_in = cnp("deny-into-y", Tier::Admin, 2, "y");
    deny_in.ingress = vec![rule(Deny, vec![from_ns("x")], None)];
    let s = with_policies(
        with(cluster(), vec![accept, deny_in]),
        &["metadata: {name: no-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]"],
    );
    // x/a and y/b share n1: the egress Accept returns, the ingress Deny still runs.
    assert!(!tcp80(&s, "x/a", "y/b"));
    assert!(!tcp80(&s, "x/c", "y/c"));
    // The Accept overrides x's NetworkPolicy egress deny.
    assert!(tcp80(&s, "x/a", "z/b"));
    assert!(tcp80(&s, "x/a", "x/b"));
}

#[test]
fn a_pod_reaching_its_own_address_is_not_subject_to_cluster_policy() {
    let mut deny = cnp("deny-everything", Tier::Admin, 1, "x");
    deny.ingress = vec![rule(Deny, vec![from_ns("")], None)];
    deny.egress = vec![rule(Deny, vec![from_ns("")], None)];
    let mut baseline = cnp("baseline-deny", Tier::Baseline, 1, "y");
    baseline.ingress = vec![rule(Deny, vec![from_ns("")], None)];
    baseline.egress = vec![rule(Deny, vec![from_ns("")], None)];
    let s = with(cluster(), vec![deny, baseline]);
    for pod in ["x/a", "x/c", "y/b"] {
        assert!(tcp80(&s, pod, pod), "{pod} to itself");
    }
    assert!(!tcp80(&s, "x/a", "x/b"));
    assert!(!tcp80(&s, "y/a", "y/b"));
    // NetworkPolicy still applies to it.
    let s = with_policies(
        s,
        &["metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]"],
    );
    assert!(!tcp80(&s, "x/a", "x/a"));
}

#[test]
fn named_ports_resolve_on_the_destination_with_their_protocol() {
    let mut p = cnp("named", Tier::Admin, 1, "x");
    p.ingress = vec![
        rule(
            Accept,
            vec![from_ns("y")],
            Some(vec![ClusterPort::Named("serve-80-udp".into())]),
        ),
        rule(Deny, vec![from_ns("y")], None),
    ];
    p.egress = vec![
        rule(
            Accept,
            vec![from_ns("z")],
            Some(vec![ClusterPort::Named("serve-81-tcp".into())]),
        ),
        rule(Deny, vec![from_ns("z")], None),
    ];
    let s = with(cluster(), vec![p]);
    assert!(reach(&s, "y/a", "x/a", Protocol::Udp, 80));
    assert!(reach(&s, "y/c", "x/b", Protocol::Udp, 80));
    assert!(
        !reach(&s, "y/a", "x/a", Protocol::Tcp, 80),
        "protocol differs"
    );
    assert!(
        !reach(&s, "y/a", "x/a", Protocol::Udp, 81),
        "number differs"
    );
    assert!(
        reach(&s, "x/a", "z/c", Protocol::Tcp, 81),
        "egress: on the peer"
    );
    assert!(!reach(&s, "x/a", "z/c", Protocol::Udp, 81));
    assert!(!reach(&s, "x/a", "z/c", Protocol::Tcp, 80));
}

#[test]
fn port_ranges_protocols_and_no_ports_meaning_everything() {
    let mut p = cnp("ranges", Tier::Admin, 1, "x");
    p.ingress = vec![
        rule(Deny, vec![from_ns("y")], Some(vec![tcp(80, 81)])),
        rule(
            Deny,
            vec![from_ns("y")],
            Some(vec![ClusterPort::Protocol {
                protocol: Protocol::Sctp,
                ports: None,
            }]),
        ),
        rule(Deny, vec![from_ns("z")], None),
    ];
    let s = with(cluster(), vec![p]);
    assert!(!reach(&s, "y/a", "x/a", Protocol::Tcp, 80));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Tcp, 81));
    assert!(reach(&s, "y/a", "x/a", Protocol::Tcp, 82));
    assert!(reach(&s, "y/a", "x/a", Protocol::Udp, 80));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Sctp, 9999));
    for family in Family::ALL {
        assert!(!reach_l4(&s, family, "z/a", "x/a", L4::Icmp), "{family}");
        assert!(reach_l4(&s, family, "y/a", "x/a", L4::Icmp), "{family}");
    }
}

#[test]
fn networks_match_per_family_and_match_pod_addresses() {
    let mut p = cnp("networks", Tier::Admin, 1, "x");
    p.egress = vec![
        rule(
            Deny,
            vec![ClusterPeer::Networks(vec![
                "10.0.2.0/24".parse().unwrap(),
                "fd00::2:0/112".parse().unwrap(),
            ])],
            None,
        ),
        rule(
            Deny,
            vec![ClusterPeer::Networks(vec!["10.0.3.3/32".parse().unwrap()])],
            None,
        ),
    ];
    let s = with(cluster(), vec![p]);
    let v4 = |from, to| reach_l4(&s, Family::V4, from, to, L4::Port(Protocol::Tcp, 80));
    let v6 = |from, to| reach_l4(&s, Family::V6, from, to, L4::Port(Protocol::Tcp, 80));
    for to in ["y/a", "y/c"] {
        assert!(!v4("x/a", to) && !v6("x/a", to), "{to}");
    }
    assert!(
        !v4("x/a", "z/c") && v6("x/a", "z/c"),
        "an IPv4-only network"
    );
    assert!(v4("x/a", "z/a") && v6("x/a", "z/a"));
    assert!(v4("y/a", "y/b"), "not a subject");
}

#[test]
fn nodes_peers_match_the_addresses_of_the_selected_nodes() {
    let mut s = cluster();
    for (name, role, address) in [
        ("n1", "worker", NODE_IP_N1),
        ("n2", "control", "192.168.0.2"),
    ] {
        s.nodes.insert(
            name.into(),
            NodeInfo {
                name: name.into(),
                labels: [("role".to_string(), role.to_string())].into(),
                addresses: vec![ip(address)],
            },
        );
    }
    let mut p = cnp("no-control-plane", Tier::Admin, 1, "x");
    p.egress = vec![rule(
        Deny,
        vec![ClusterPeer::Nodes(labels(&[("role", "control")]))],
        None,
    )];
    let s = with(s, vec![p]);
    let state = compile(&s, "n1", Family::V4);
    let to = |dst: &str| Packet::new(pod_ips("x", "a").0, ip(dst), L4::Port(Protocol::Tcp, 6443));
    assert!(!passes(&state, "FORWARD", &to("192.168.0.2")));
    assert!(passes(&state, "INPUT", &to(NODE_IP_N1)));
    assert!(passes(&state, "FORWARD", &to("192.168.0.3")));
}

#[test]
fn domain_names_match_nothing() {
    let mut p = cnp("domains", Tier::Admin, 1, "x");
    p.egress = vec![rule(
        Deny,
        vec![ClusterPeer::DomainNames(vec!["*.example.com".into()])],
        None,
    )];
    let s = with(cluster(), vec![p]);
    assert!(tcp80(&s, "x/a", "y/a"));
}

/// What the sources make of peers written for a newer CRD (fail closed): an Accept rule left
/// without peers matches nothing, a deny-all rule (both whole spaces as networks) denies
/// everything, in ingress too.
#[test]
fn failed_closed_rules_match_nothing_or_deny_everything() {
    let mut accept_nothing = cnp("accept-nothing", Tier::Admin, 1, "x");
    accept_nothing.ingress = vec![rule(Accept, vec![], None)];
    let mut deny_later = cnp("deny-later", Tier::Admin, 2, "x");
    deny_later.ingress = vec![rule(Deny, vec![from_ns("z")], None)];
    let s = with(cluster(), vec![accept_nothing.clone(), deny_later]);
    assert!(!tcp80(&s, "z/a", "x/a"), "the empty Accept matched nothing");
    assert!(tcp80(&s, "y/a", "x/a"));

    let mut deny_all = cnp("deny-all", Tier::Admin, 1, "x");
    deny_all.ingress = vec![rule(
        Deny,
        vec![ClusterPeer::Networks(vec![
            "0.0.0.0/0".parse().unwrap(),
            "::/0".parse().unwrap(),
        ])],
        None,
    )];
    let s = with(cluster(), vec![deny_all]);
    for from in ["y/a", "z/c", "x/b"] {
        assert!(!tcp80(&s, from, "x/a"), "{from} -> x/a");
    }
    assert!(tcp80(&s, "x/a", "y/a"), "egress untouched");
}

#[test]
fn only_subjects_are_isolated_and_host_network_pods_never_are() {
    let mut p = cnp("x-only", Tier::Baseline, 1, "x");
    p.ingress = vec![rule(Deny, vec![from_ns("z")], None)];
    let mut s = with(cluster(), vec![p]);
    let host = s.pods_mut().iter_mut().find(|p| p.key() == "x/b").unwrap();
    host.host_network = true;
    let state = compile(&s, "n1", Family::V4);
    let isolated = &state.sets[&crate::compile::names::isolated_set(Family::V4, true)];
    let want: Vec<_> = vec![crate::compile::ir::SetMember::Ip(pod_ips("x", "a").0)];
    assert_eq!(isolated.members.iter().cloned().collect::<Vec<_>>(), want);
    let egress = &state.sets[&crate::compile::names::isolated_set(Family::V4, false)];
    assert!(egress.members.is_empty(), "no egress rules: not isolated");
}

#[test]
fn the_namespaces_peer_is_the_network_policy_namespace_selector_set() {
    let mut p = cnp("shared", Tier::Admin, 1, "x");
    p.ingress = vec![rule(Accept, vec![from_ns("y")], None)];
    let s = with_policies(
        with(cluster(), vec![p]),
        &["metadata: {name: np, namespace: z}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"],
    );
    let state = compile(&s, "n1", Family::V4);
    assert_eq!(peer_sets(&state).count(), 1, "{:?}", state.sets.keys());
}

#[test]
fn strict_mode_cuts_a_flow_a_new_cluster_policy_denies() {
    let before = cluster();
    let mut deny = cnp("deny-y", Tier::Admin, 1, "x");
    deny.egress = vec![rule(Deny, vec![from_ns("y")], None)];
    let after = with(cluster(), vec![deny]);
    let (src, dst) = (pod_ips("x", "a").0, pod_ips("y", "c").0);
    let flow = Flow {
        original: FlowTuple {
            protocol: 6,
            src,
            dst,
            src_port: 40000,
            dst_port: 80,
        },
        reply: FlowTuple {
            protocol: 6,
            src: dst,
            dst: src,
            src_port: 80,
            dst_port: 40000,
        },
    };
    let states = |s: &ClusterSnapshot| vec![(Family::V4, compile(s, "n1", Family::V4))];
    let is_local = |addr: &IpAddr| *addr == ip(NODE_IP_N1);
    assert_eq!(denied_by(&states(&before), &flow, &is_local), None);
    assert_eq!(
        denied_by(&states(&after), &flow, &is_local),
        Some(CutDirection::Egress)
    );
}

#[test]
fn drop_is_the_default_deny_and_the_tier_mark_is_cleared_by_the_dispatch() {
    use crate::compile::enforcement::{DenyAction, apply_deny_action};
    use crate::compile::ir::Target;
    let mut p = cnp("deny", Tier::Admin, 1, "x");
    p.ingress = vec![rule(Deny, vec![from_ns("y")], None)];
    let s = with(cluster(), vec![p]);
    let mut state = compile(&s, "n1", Family::V4);
    apply_deny_action(&mut state, DenyAction::Drop);
    let cnp_chain = crate::compile::names::cluster_policy_chain(true, "deny");
    assert!(
        state.chains[&cnp_chain]
            .iter()
            .all(|r| r.target == Target::Drop),
        "{:?}",
        state.chains[&cnp_chain]
    );
    let packet = Packet::new(
        pod_ips("y", "a").0,
        pod_ips("x", "a").0,
        L4::Port(Protocol::Udp, 53),
    );
    assert!(!passes(&state, "FORWARD", &packet));
    for chain in [
        crate::compile::names::FORWARD_CHAIN,
        "KNI-INPUT",
        "KNI-OUTPUT",
    ] {
        assert_eq!(
            state.chains[chain].last().unwrap().target,
            Target::ClearMarks,
            "{chain}"
        );
    }
}

#[test]
fn explain_names_the_tier_policy_and_rule_that_decided() {
    use crate::compile::explain::{Query, explain};
    let mut admin = cnp("admin", Tier::Admin, 1, "x");
    admin.ingress = vec![
        rule(Pass, vec![from_ns("y")], Some(vec![tcp(80, 80)])),
        rule(Deny, vec![from_ns("z")], None),
    ];
    let mut baseline = cnp("baseline", Tier::Baseline, 1, "x");
    baseline.ingress = vec![rule(
        Accept,
        vec![from_ns("y")],
        Some(vec![ClusterPort::Named("serve-80-tcp".into())]),
    )];
    let s = with_policies(
        with(cluster(), vec![admin, baseline]),
        &["metadata: {name: np, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]"],
    );
    let explained = |from: &str, to: &str| {
        let e = explain(
            &s,
            &Query {
                from: from.parse().unwrap(),
                to: to.parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 80,
                family: Some(Family::V6),
            },
        )
        .unwrap();
        assert_eq!(e.allowed, tcp80(&s, from, to), "{e}");
        e
    };
    // Admin Deny.
    let e = explained("z/a", "x/b");
    let d = &e.ingress.decided_by;
    assert_eq!(
        (
            d.stage.as_str(),
            d.policy.as_deref(),
            d.rule,
            d.action.as_str()
        ),
        ("Admin", Some("admin"), Some(1), "Deny"),
        "{e}"
    );
    assert_eq!(
        e.ingress.cluster_policies,
        ["Admin/admin", "Baseline/baseline"]
    );
    assert!(
        e.to_string()
            .contains("decided by: Admin admin rule 1 (\"deny-rule\"): Deny"),
        "{e}"
    );
    // Admin Pass, then the NetworkPolicy decides.
    let e = explained("y/a", "x/a");
    assert_eq!(e.ingress.cluster_rules.len(), 1, "{e}");
    assert_eq!(e.ingress.cluster_rules[0].action, "Pass");
    assert_eq!(
        e.ingress.cluster_rules[0].port.as_ref().unwrap().what,
        "TCP 80"
    );
    assert_eq!(e.ingress.decided_by.stage, "NetworkPolicy");
    assert_eq!(e.ingress.decided_by.action, "Deny");
    // Admin Pass, no NetworkPolicy: the Baseline Accept on a named port.
    let e = explained("y/a", "x/b");
    let d = &e.ingress.decided_by;
    assert_eq!(
        (
            d.stage.as_str(),
            d.policy.as_deref(),
            d.rule_name.as_deref()
        ),
        ("Baseline", Some("baseline"), Some("accept-rule")),
        "{e}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["ingress"]["decided_by"]["action"], "Accept");
    assert_eq!(json["ingress"]["cluster_rules"][1]["tier"], "Baseline");
    assert!(
        json["ingress"]["cluster_rules"][1]["port"]["what"]
            .as_str()
            .unwrap()
            .contains("TCP 80 on the destination"),
        "{json}"
    );
    // Not a subject in this direction: nothing decided.
    assert_eq!(e.egress.decided_by.stage, "none");
}

#[test]
fn a_long_lived_compiler_gives_a_fresh_compilers_state_with_cluster_policies() {
    let mut p = cnp("mixed", Tier::Admin, 1, "x");
    p.ingress = vec![
        rule(
            Accept,
            vec![from_ns("y")],
            Some(vec![ClusterPort::Named("serve-80-udp".into())]),
        ),
        rule(Deny, vec![from_pod("z", "a")], None),
    ];
    p.egress = vec![rule(
        Pass,
        vec![
            ClusterPeer::Nodes(labels(&[("role", "infra")])),
            ClusterPeer::Networks(vec!["10.0.2.0/24".parse().unwrap()]),
        ],
        None,
    )];
    let mut b = cnp("baseline", Tier::Baseline, 3, "");
    b.egress = vec![rule(Deny, vec![from_ns("z")], Some(vec![tcp(80, 90)]))];
    let mut s = with(cluster(), vec![p, b]);
    s.nodes.insert(
        "n1".into(),
        NodeInfo {
            name: "n1".into(),
            labels: [("role".to_string(), "infra".to_string())].into(),
            addresses: vec![ip(NODE_IP_N1)],
        },
    );
    let mut long_lived = Compiler::new();
    let mut steps = vec![s.clone()];
    // z relabelled as y; a pod loses its named port; the node loses its label; priorities swap.
    s.namespaces
        .get_mut("z")
        .unwrap()
        .labels
        .insert("ns".into(), "y".into());
    steps.push(s.clone());
    s.pods_mut()[0]
        .ports
        .retain(|p| p.name.as_deref() != Some("serve-80-udp"));
    steps.push(s.clone());
    s.nodes.get_mut("n1").unwrap().labels.clear();
    s.cluster_policies[1].tier = Tier::Admin;
    s.cluster_policies[1].priority = 0;
    steps.push(s.clone());
    s.cluster_policies.clear();
    steps.push(s);
    for (i, step) in steps.iter().enumerate() {
        for node in ["n1", "n2"] {
            assert_eq!(
                long_lived.compile(step, node),
                Compiler::new().compile(step, node),
                "step {i} on {node}"
            );
        }
    }
}

#[test]
fn a_baseline_chain_is_built_only_where_it_can_decide() {
    let mut baseline = cnp("baseline", Tier::Baseline, 1, "x");
    baseline.ingress = vec![rule(Deny, vec![from_ns("z")], None)];
    let np = "metadata: {name: np, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]";
    let chain = crate::compile::names::cluster_policy_chain(true, "baseline");
    let s = with_policies(with(cluster(), vec![baseline.clone()]), &[np]);
    let state = compile(&s, "n1", Family::V4);
    assert!(!state.chains.contains_key(&chain), "no pod can reach it");
    let s = with(cluster(), vec![baseline]);
    assert!(compile(&s, "n1", Family::V4).chains.contains_key(&chain));
}
