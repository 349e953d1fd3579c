//! NetworkPolicy semantics, judged packet by packet on the compiled state.

use super::*;
use crate::compile::ir::SetMember;

#[test]
fn no_policies_allow_everything() {
    assert_matrix(&cluster(), |_, _| true);
}

#[test]
fn default_deny_ingress_isolates_only_the_selected_namespace() {
    let s = with_policies(
        cluster(),
        &["metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}"],
    );
    assert_matrix(&s, |_, to| !to.starts_with("x/"));
}

#[test]
fn pod_selector_peers_are_in_the_policy_namespace() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
        ],
    );
    assert_matrix(&s, |from, to| to != "x/a" || from == "x/b");
}

#[test]
fn namespace_selector_alone_and_combined_with_pod_selector() {
    // One peer with both selectors: pods b of namespace y only.
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]",
        ],
    );
    assert_matrix(&s, |from, to| to != "x/a" || from == "y/b");
    // Two peers: any pod of y, or pods b of x.
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]",
        ],
    );
    assert_matrix(&s, |from, to| {
        to != "x/a" || from.starts_with("y/") || from == "x/b"
    });
    // Empty namespace selector: every namespace.
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]}]",
        ],
    );
    assert_matrix(&s, |from, to| to != "x/a" || from.ends_with("/c"));
}

#[test]
fn match_expressions() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x, y]}]}}]}]",
        ],
    );
    assert_matrix(&s, |from, to| {
        !(to == "x/a" || to == "x/b") || from.starts_with("z/")
    });
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: pod, operator: Exists}]}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}}]}]",
        ],
    );
    assert_matrix(&s, |_, to| !to.starts_with("x/"));
}

#[test]
fn numbered_ports_ranges_and_protocols() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 81}, {protocol: UDP, port: 70, endPort: 80}]}]",
        ],
    );
    assert!(!reach(&s, "y/a", "x/a", Protocol::Tcp, 80));
    assert!(reach(&s, "y/a", "x/a", Protocol::Tcp, 81));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Udp, 81));
    assert!(reach(&s, "y/a", "x/a", Protocol::Udp, 80));
    assert!(reach(&s, "y/a", "x/a", Protocol::Udp, 70));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Udp, 69));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Sctp, 81));
    assert!(
        reach(&s, "y/a", "x/b", Protocol::Tcp, 80),
        "x/b is not selected"
    );
}

#[test]
fn protocol_only_and_sctp_only_rules_isolate_other_protocols() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{protocol: SCTP}]}]",
        ],
    );
    assert!(reach(&s, "y/a", "x/a", Protocol::Sctp, 80));
    assert!(reach(&s, "y/a", "x/a", Protocol::Sctp, 5000));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Tcp, 80));
    assert!(!reach(&s, "y/a", "x/a", Protocol::Udp, 80));
    let rendered =
        crate::dataplane::render::render_fresh(&[(Family::V4, compile(&s, "n1", Family::V4))]);
    assert!(rendered.contains("-p sctp -j MARK"), "{rendered}");
    assert!(
        !rendered.contains("--dport "),
        "SCTP must not need the sctp match: {rendered}"
    );
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    // x/a and x/b serve "web" on different ports; y/a has no such port.
    let mut s = cluster();
    for p in s.pods_mut().iter_mut() {
        match p.key().as_str() {
            "x/a" => p.ports.push(ContainerPort {
                name: Some("web".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }),
            "x/b" => p.ports.push(ContainerPort {
                name: Some("web".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            }),
            "y/b" => p.ports.push(ContainerPort {
                name: Some("web".into()),
                port: 7070,
                protocol: Protocol::Tcp,
            }),
            _ => {}
        }
    }
    let ingress = with_policies(
        s.clone(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: web}, {port: serve-81-udp, protocol: UDP}]}]",
        ],
    );
    assert!(reach(&ingress, "z/a", "x/a", Protocol::Tcp, 8080));
    assert!(
        !reach(&ingress, "z/a", "x/a", Protocol::Tcp, 9090),
        "9090 is x/b's web, not x/a's"
    );
    assert!(reach(&ingress, "z/a", "x/b", Protocol::Tcp, 9090));
    assert!(!reach(&ingress, "z/a", "x/b", Protocol::Tcp, 8080));
    assert!(
        !reach(&ingress, "z/a", "x/c", Protocol::Tcp, 8080),
        "x/c has no port named web"
    );
    assert!(reach(&ingress, "z/a", "x/c", Protocol::Udp, 81));
    assert!(
        !reach(&ingress, "z/a", "x/c", Protocol::Tcp, 81),
        "the name is for UDP only"
    );

    let egress = with_policies(
        s,
        &[
            "metadata: {name: p, namespace: z}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}}, {ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: '::/0'}}], ports: [{port: web}]}]",
        ],
    );
    assert!(reach(&egress, "z/a", "x/a", Protocol::Tcp, 8080));
    assert!(!reach(&egress, "z/a", "x/a", Protocol::Tcp, 9090));
    assert!(reach(&egress, "z/a", "x/b", Protocol::Tcp, 9090));
    assert!(
        reach(&egress, "z/c", "y/b", Protocol::Tcp, 7070),
        "cross-node egress to a named port"
    );
    assert!(
        !reach(&egress, "z/a", "y/a", Protocol::Tcp, 7070),
        "y/a has no port named web"
    );
    // Named ports never match ipBlock peers: an address outside the cluster is not allowed.
    let outside = Packet::new(
        ip("10.0.0.200"),
        ip("8.8.8.8"),
        L4::Port(Protocol::Tcp, 8080),
    );
    let mut from_za = outside;
    from_za.src = pod_ips("z", "a").0;
    assert!(!passes(
        &compile(&egress, "n1", Family::V4),
        "FORWARD",
        &from_za
    ));
}

#[test]
fn ip_blocks_with_except_and_host_bits() {
    let (xb4, _) = pod_ips("x", "b");
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.1.77/24, except: [10.0.1.2/32]}}, {ipBlock: {cidr: 'fd00::1:0/112', except: ['fd00::1:2/128']}}]}]",
        ],
    );
    assert!(reach(&s, "y/a", "x/a", Protocol::Tcp, 80));
    assert!(
        !reach(&s, "y/a", "x/b", Protocol::Tcp, 80),
        "{xb4} is excepted"
    );
    assert!(reach(&s, "y/a", "x/c", Protocol::Udp, 81));
    assert!(!reach(&s, "y/a", "z/a", Protocol::Tcp, 80));
    assert!(
        reach(&s, "y/b", "z/a", Protocol::Tcp, 80),
        "y/b is not selected"
    );

    // Overlapping blocks are a union: the except of one does not cut into the other.
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}, {ipBlock: {cidr: 10.0.1.0/30}}, {ipBlock: {cidr: 'fd00::/64', except: ['fd00::1:0/112']}}, {ipBlock: {cidr: 'fd00::1:0/126'}}]}]",
        ],
    );
    assert!(
        reach(&s, "y/a", "x/a", Protocol::Tcp, 80),
        "10.0.1.1 is in the second block"
    );
    assert!(
        reach(&s, "y/a", "x/c", Protocol::Tcp, 80),
        "10.0.1.3 is in the second block"
    );
    assert!(reach(&s, "y/a", "z/a", Protocol::Tcp, 80));
}

#[test]
fn whole_address_space_blocks() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: '::/0'}}]}]",
        ],
    );
    assert_matrix(&s, |_, _| true);
    let st = compile(&s, "n1", Family::V4);
    assert!(
        st.sets
            .values()
            .flat_map(|s| s.members.iter())
            .all(|m| match m {
                SetMember::Net(n) => n.prefix_len() > 0,
                _ => true,
            })
    );
}

#[test]
fn policies_add_up_and_isolation_is_per_direction() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
            "metadata: {name: from-z, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
        ],
    );
    assert_matrix(&s, |from, to| {
        !to.starts_with("x/") || from.starts_with("z/") || (to == "x/a" && from.starts_with("y/"))
    });
    // Ingress-only policies do not restrict what x's pods send.
    assert!(tcp80(&s, "x/a", "y/b"));
}

#[test]
fn egress_and_ingress_both_apply_to_same_node_and_cross_node_flows() {
    let s = with_policies(
        cluster(),
        &[
            // x/a may only send to pods b (anywhere).
            "metadata: {name: out, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]",
            // y/b accepts only from namespace z.
            "metadata: {name: in, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
        ],
    );
    assert!(tcp80(&s, "x/a", "x/b"));
    assert!(
        !tcp80(&s, "x/a", "y/b"),
        "egress allows, ingress of y/b does not"
    );
    assert!(!tcp80(&s, "x/a", "x/c"), "egress forbids (cross-node)");
    assert!(tcp80(&s, "z/a", "y/b"));
    assert!(tcp80(&s, "z/c", "y/b"), "cross-node ingress");
    assert!(!tcp80(&s, "x/c", "y/b"));
}

#[test]
fn empty_rule_lists_deny_and_empty_rules_allow() {
    let deny = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress], ingress: [], egress: []}",
        ],
    );
    assert_matrix(&deny, |from, to| {
        !from.starts_with("x/") && !to.starts_with("x/")
    });
    let allow = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{}], egress: [{}]}",
        ],
    );
    assert_matrix(&allow, |_, _| true);
}

#[test]
fn peers_without_ports_allow_every_protocol_including_icmp() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]",
        ],
    );
    assert!(reach_l4(&s, Family::V4, "x/b", "x/a", L4::Icmp));
    assert!(reach_l4(&s, Family::V6, "x/b", "x/a", L4::Icmp6(128)));
    assert!(
        !reach_l4(&s, Family::V4, "y/b", "x/a", L4::Icmp),
        "no ICMP is allowed implicitly"
    );
    assert!(!reach_l4(&s, Family::V6, "y/b", "x/a", L4::Icmp6(128)));
}

#[test]
fn node_reaches_its_pods_and_pod_to_node_follows_egress() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
        ],
    );
    let state = compile(&s, "n1", Family::V4);
    let (xa, _) = pod_ips("x", "a");
    let mut from_node = Packet::new(ip(NODE_IP_N1), xa, L4::Port(Protocol::Tcp, 80));
    from_node.src_is_local = true;
    assert!(passes(&state, "OUTPUT", &from_node));
    let to_node = Packet::new(xa, ip(NODE_IP_N1), L4::Port(Protocol::Tcp, 10250));
    assert!(
        !passes(&state, "INPUT", &to_node),
        "egress isolation covers the node"
    );
    // Replies of flows that were allowed always pass.
    let mut reply = to_node;
    reply.established = true;
    assert!(passes(&state, "INPUT", &reply));
    assert!(passes(&state, "FORWARD", &reply));
    // Neighbour discovery between an IPv6 pod and its node keeps working.
    let state6 = compile(&s, "n1", Family::V6);
    let (_, xa6) = pod_ips("x", "a");
    let ns = Packet::new(xa6, ip("ff02::1:ff00:1"), L4::Icmp6(135));
    assert!(passes(&state6, "INPUT", &ns));
    let echo = Packet::new(xa6, ip("fd00::99"), L4::Icmp6(128));
    assert!(!passes(&state6, "INPUT", &echo));
}

#[test]
fn host_network_and_finished_pods_are_neither_subjects_nor_peers() {
    let mut s = cluster();
    let (xa, _) = pod_ips("x", "a");
    // A finished pod that once had x/a's address, labelled as the only allowed peer.
    s.pods_mut().push(Pod {
        namespace: "y".into(),
        name: "done".into(),
        labels: [("role".to_string(), "client".to_string())].into(),
        node_name: Some("n1".into()),
        ips: vec![xa],
        host_network: false,
        phase: PodPhase::Succeeded,
        ports: vec![],
    });
    s.pods_mut().push(Pod {
        namespace: "y".into(),
        name: "host".into(),
        labels: [("role".to_string(), "client".to_string())].into(),
        node_name: Some("n1".into()),
        ips: vec![NODE_IP_N1.parse().unwrap()],
        host_network: true,
        phase: PodPhase::Running,
        ports: vec![],
    });
    let s = with_policies(
        s,
        &[
            "metadata: {name: p, namespace: y}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]",
        ],
    );
    assert!(
        !tcp80(&s, "x/a", "y/b"),
        "the finished pod's address now belongs to x/a"
    );
    let state = compile(&s, "n1", Family::V4);
    assert!(
        peer_sets(&state).all(|set| set.members.is_empty()),
        "no peer is relevant"
    );
    assert!(
        !state.chains.values().flatten().any(|r| r
            .comment
            .as_deref()
            .is_some_and(|c| c.contains("y/host") || c.contains("y/done"))),
        "hostNetwork and finished pods get no chains"
    );
}

#[test]
fn label_changes_move_pods_in_and_out_of_peer_sets_on_every_node() {
    let policy = "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]";
    let mut s = with_policies(cluster(), &[policy]);
    assert!(!tcp80(&s, "z/c", "x/a"));
    s.namespaces
        .get_mut("z")
        .unwrap()
        .labels
        .insert("team".into(), "blue".into());
    assert!(tcp80(&s, "z/c", "x/a"), "namespace label change");
    assert!(tcp80(&s, "z/a", "x/a"));
    let policy2 = "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]";
    let mut s = with_policies(cluster(), &[policy2]);
    assert!(!tcp80(&s, "y/c", "x/a"));
    s.pods_mut()
        .iter_mut()
        .find(|p| p.key() == "y/c")
        .unwrap()
        .labels
        .insert("role".into(), "db".into());
    assert!(
        tcp80(&s, "y/c", "x/a"),
        "a remote pod's label change reaches n1's sets"
    );
}

#[test]
fn unchanged_input_compiles_to_identical_state_and_names() {
    let s = with_policies(
        cluster(),
        &[
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}], ports: [{port: serve-80-tcp}]}]",
        ],
    );
    let a = compile(&s, "n1", Family::V4);
    let mut reversed = s.clone();
    reversed.pods_mut().reverse();
    assert_eq!(
        a,
        compile(&reversed, "n1", Family::V4),
        "order of input does not matter"
    );
}
