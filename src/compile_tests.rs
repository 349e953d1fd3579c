//! compile() semantics, checked packet by packet with the simulator.
//!
//! Cluster: namespaces x, y, z (label ns=NAME); pods a, b, c in each (label pod=NAME), serving
//! named ports serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp, serve-80-sctp. Pods a and b
//! run on n1, pods c on n2, so same-node and cross-node flows both occur.

use crate::compile::compile;
use crate::convert;
use crate::model::{ClusterSnapshot, ContainerPort, Pod, PodPhase, Protocol};
use crate::simulate::{L4, Packet, passes};
use crate::state::{Family, SetMember};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::net::IpAddr;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const NODE_IP_N1: &str = "192.168.0.1";

fn pod_ips(ns: &str, pod: &str) -> (IpAddr, IpAddr) {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() + 1;
    let p = PODS.iter().position(|x| *x == pod).unwrap() + 1;
    (
        format!("10.0.{n}.{p}").parse().unwrap(),
        format!("fd00::{n}:{p}").parse().unwrap(),
    )
}

fn cluster() -> ClusterSnapshot {
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
            s.pods.push(Pod {
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

fn with_policies(mut s: ClusterSnapshot, yamls: &[&str]) -> ClusterSnapshot {
    for y in yamls {
        let full = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{y}");
        let p: NetworkPolicy = serde_yaml_ng::from_str(&full).unwrap();
        s.policies.push(convert::policy(&p).unwrap());
    }
    s
}

fn node_of<'a>(s: &'a ClusterSnapshot, key: &str) -> Option<&'a Pod> {
    s.pods.iter().find(|p| p.key() == key)
}

/// Whether `from` (a pod key) reaches `to` (a pod key) in `family`, judged by FORWARD on the
/// node of each end, as the kernel would for a routed flow.
fn reach_l4(s: &ClusterSnapshot, family: Family, from: &str, to: &str, l4: L4) -> bool {
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

fn reach(s: &ClusterSnapshot, from: &str, to: &str, proto: Protocol, port: u16) -> bool {
    let v4 = reach_l4(s, Family::V4, from, to, L4::Port(proto, port));
    let v6 = reach_l4(s, Family::V6, from, to, L4::Port(proto, port));
    assert_eq!(
        v4, v6,
        "IPv4 and IPv6 disagree for {from} -> {to} {proto:?}/{port}"
    );
    v4
}

fn tcp80(s: &ClusterSnapshot, from: &str, to: &str) -> bool {
    reach(s, from, to, Protocol::Tcp, 80)
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Asserts the TCP/80 matrix: `allowed(from, to)` says which flows should pass.
fn assert_matrix(s: &ClusterSnapshot, allowed: impl Fn(&str, &str) -> bool) {
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
    for p in s.pods.iter_mut() {
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
    let outside = Packet::new("10.0.0.200", "8.8.8.8", L4::Port(Protocol::Tcp, 8080));
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
    let mut from_node = Packet::new(NODE_IP_N1, &xa.to_string(), L4::Port(Protocol::Tcp, 80));
    from_node.src_is_local = true;
    assert!(passes(&state, "OUTPUT", &from_node));
    let to_node = Packet::new(&xa.to_string(), NODE_IP_N1, L4::Port(Protocol::Tcp, 10250));
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
    let ns = Packet::new(&xa6.to_string(), "ff02::1:ff00:1", L4::Icmp6(135));
    assert!(passes(&state6, "INPUT", &ns));
    let echo = Packet::new(&xa6.to_string(), "fd00::99", L4::Icmp6(128));
    assert!(!passes(&state6, "INPUT", &echo));
}

#[test]
fn host_network_and_finished_pods_are_neither_subjects_nor_peers() {
    let mut s = cluster();
    let (xa, _) = pod_ips("x", "a");
    // A finished pod that once had x/a's address, labelled as the only allowed peer.
    s.pods.push(Pod {
        namespace: "y".into(),
        name: "done".into(),
        labels: [("role".to_string(), "client".to_string())].into(),
        node_name: Some("n1".into()),
        ips: vec![xa],
        host_network: false,
        phase: PodPhase::Succeeded,
        ports: vec![],
    });
    s.pods.push(Pod {
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
        state.sets.values().all(|set| set.members.is_empty()),
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
    s.pods
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
    reversed.pods.reverse();
    assert_eq!(
        a,
        compile(&reversed, "n1", Family::V4),
        "order of input does not matter"
    );
}

#[test]
fn incremental_rendering_writes_only_the_difference() {
    use crate::dataplane::kernel::View;
    use crate::dataplane::render::{render_ipset_destroy, render_ipset_update, render_iptables};
    let policy = "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]";
    let before = with_policies(cluster(), &[policy]);
    let states = |s: &ClusterSnapshot| -> Vec<(Family, crate::state::DesiredState)> {
        Family::ALL
            .iter()
            .map(|f| (*f, compile(s, "n1", *f)))
            .collect()
    };
    let old = states(&before);
    let view = View::of_desired(&old);
    // Nothing changed: compiling again renders nothing to write against what was written.
    let again = View::of_desired(&states(&before));
    for (family, _) in &old {
        assert_eq!(
            render_iptables(&again.tables[family], &view.tables[family]),
            None
        );
    }
    assert_eq!(
        render_ipset_update(old.iter().map(|(_, s)| s), &view.sets).unwrap(),
        ""
    );
    assert_eq!(
        render_ipset_destroy(old.iter().map(|(_, s)| s), &view.sets),
        ""
    );
    assert!(view.drift_from(&view).is_empty());

    // A remote pod's label: one member per family, no rules.
    let mut after = before.clone();
    after
        .pods
        .iter_mut()
        .find(|p| p.key() == "y/c")
        .unwrap()
        .labels
        .insert("role".into(), "db".into());
    let new = states(&after);
    let want = View::of_desired(&new);
    for (family, _) in &new {
        assert_eq!(
            render_iptables(&want.tables[family], &view.tables[family]),
            None
        );
    }
    let update = render_ipset_update(new.iter().map(|(_, s)| s), &view.sets).unwrap();
    assert_eq!(update.lines().count(), 2, "{update}");
    assert!(
        update.lines().all(|l| l.starts_with("add KNI-")),
        "{update}"
    );

    // The drift report names what differs.
    let drift = View::of_desired(&new).drift_from(&view);
    assert_eq!(drift.len(), 2, "{drift:?}");
    assert!(
        matches!(
            drift[0],
            crate::dataplane::Drift::SetMembers { missing: 1, .. }
        ),
        "{drift:?}"
    );
}

#[test]
fn tens_of_thousands_of_objects_compile() {
    // 30,000 pods in 1,000 namespaces, 3,000 policies; 100 pods on n1.
    let mut s = ClusterSnapshot::default();
    for n in 0..1000 {
        let name = format!("ns{n}");
        s.namespaces.insert(
            name.clone(),
            convert::implicit_namespace(
                &name,
                [("team".to_string(), format!("t{}", n % 10))].into(),
            ),
        );
    }
    for i in 0..30_000u32 {
        s.pods.push(Pod {
            namespace: format!("ns{}", i % 1000),
            name: format!("p{i}"),
            labels: [("app".to_string(), format!("a{}", i % 7))].into(),
            node_name: Some(if i < 100 { "n1".into() } else { "far".into() }),
            ips: vec![IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))],
            host_network: false,
            phase: PodPhase::Running,
            ports: vec![],
        });
    }
    let mut yamls = Vec::new();
    for k in 0..3000 {
        yamls.push(format!(
            "metadata: {{name: p{k}, namespace: ns{}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}}}]}}]",
            k % 1000,
            k % 7,
            k % 10
        ));
    }
    let refs: Vec<&str> = yamls.iter().map(String::as_str).collect();
    let s = with_policies(s, &refs);
    let state = compile(&s, "n1", Family::V4);
    // Every local pod is selected by some policy here; each peer set holds a tenth of the pods.
    let pod_chains = state
        .chains
        .keys()
        .filter(|c| c.starts_with("KNI-PODI-"))
        .count();
    assert!(pod_chains > 0 && pod_chains <= 100);
    assert!(
        state.sets.values().all(|set| set.members.len() == 3000),
        "each team has 100 namespaces x 30 pods"
    );
    assert!(
        compile(&s, "n1", Family::V6)
            .sets
            .values()
            .all(|set| set.members.is_empty()),
        "no IPv6 addresses"
    );
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const POLICY_POOL: [&str; 8] = [
    "metadata: {name: p0, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: db}}}]}]",
    "metadata: {name: p1, namespace: y}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
    "metadata: {name: p2, namespace: z}\nspec:\n  podSelector: {matchExpressions: [{key: role, operator: Exists}]}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [red]}]}, podSelector: {matchLabels: {pod: b}}}]}]",
    "metadata: {name: p3, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}, {ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}], ports: [{port: web}, {port: 80}]}]",
    "metadata: {name: p4, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: web}]}]",
    "metadata: {name: p5, namespace: z}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: web}, {protocol: UDP, port: serve-80-udp}]}]",
    "metadata: {name: p6, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: db}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, c]}]}}]}]\n  egress: [{to: [{podSelector: {}}, {ipBlock: {cidr: 'fd00::/16'}}]}]",
    "metadata: {name: p7, namespace: w}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: red}}}]}]",
];

fn random_labels(rng: &mut Rng, name: &str) -> crate::model::Labels {
    let mut l: crate::model::Labels =
        [("pod".to_string(), ["a", "b", "c"][rng.below(3)].to_string())].into();
    if rng.below(3) == 0 {
        l.insert("role".into(), ["db", "web"][rng.below(2)].into());
    }
    let _ = name;
    l
}

fn random_ips(rng: &mut Rng) -> Vec<IpAddr> {
    // A small address space, so addresses are often shared between pods.
    let n = rng.below(4) + 1;
    let h = rng.below(6) + 1;
    vec![
        format!("10.0.{n}.{h}").parse().unwrap(),
        format!("fd00::{n}:{h}").parse().unwrap(),
    ]
}

#[test]
fn the_peer_cache_always_equals_a_fresh_compile() {
    use crate::compile::compile_cached;
    use crate::peer_cache::PeerCache;
    for seed in [1u64, 7, 42, 1234] {
        let mut rng = Rng(seed);
        let mut s = with_policies(cluster(), &[POLICY_POOL[0], POLICY_POOL[3], POLICY_POOL[5]]);
        let mut cache = PeerCache::default();
        let mut next_pod = 0;
        for step in 0..1000 {
            let what = rng.below(10);
            match what {
                0 | 1 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    let name = s.pods[i].name.clone();
                    s.pods[i].labels = random_labels(&mut rng, &name);
                }
                2 => {
                    next_pod += 1;
                    let ports = if rng.below(2) == 0 {
                        vec![ContainerPort {
                            name: Some("web".into()),
                            port: 8000 + rng.below(3) as u16,
                            protocol: Protocol::Tcp,
                        }]
                    } else {
                        vec![]
                    };
                    let name = format!("n{next_pod}");
                    s.pods.push(Pod {
                        namespace: ["x", "y", "z", "w"][rng.below(4)].into(),
                        labels: random_labels(&mut rng, &name),
                        name,
                        node_name: Some(["n1", "n2"][rng.below(2)].into()),
                        ips: random_ips(&mut rng),
                        host_network: false,
                        phase: PodPhase::Running,
                        ports,
                    });
                }
                3 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    s.pods.remove(i);
                }
                4 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    s.pods[i].ips = if rng.below(5) == 0 {
                        vec![]
                    } else {
                        random_ips(&mut rng)
                    };
                }
                5 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    match rng.below(3) {
                        0 => {
                            s.pods[i].phase =
                                [PodPhase::Running, PodPhase::Succeeded, PodPhase::Pending]
                                    [rng.below(3)]
                        }
                        1 => s.pods[i].host_network = !s.pods[i].host_network,
                        _ => {
                            let web = ContainerPort {
                                name: Some("web".into()),
                                port: 8000 + rng.below(3) as u16,
                                protocol: Protocol::Tcp,
                            };
                            if s.pods[i]
                                .ports
                                .iter()
                                .any(|p| p.name.as_deref() == Some("web"))
                            {
                                s.pods[i].ports.retain(|p| p.name.as_deref() != Some("web"));
                            } else {
                                s.pods[i].ports.push(web);
                            }
                        }
                    }
                }
                6 => {
                    let ns = ["x", "y", "z", "w"][rng.below(4)];
                    if rng.below(4) == 0 {
                        s.namespaces.remove(ns);
                    } else {
                        let team = ["blue", "red", "green"][rng.below(3)];
                        s.namespaces.insert(
                            ns.into(),
                            convert::implicit_namespace(
                                ns,
                                [("team".to_string(), team.to_string())].into(),
                            ),
                        );
                    }
                }
                7 | 8 => {
                    let k = rng.below(POLICY_POOL.len());
                    let name = format!("p{k}");
                    if let Some(i) = s.policies.iter().position(|p| p.name == name) {
                        s.policies.remove(i);
                    } else {
                        s = with_policies(s, &[POLICY_POOL[k]]);
                    }
                }
                _ => {}
            }
            cache.update(&s);
            for family in Family::ALL {
                let cached = compile_cached(&s, "n1", family, &mut cache);
                let fresh = compile(&s, "n1", family);
                assert!(
                    cached == fresh,
                    "seed {seed} step {step} (change {what}) {family}: cached compile differs\ncached: {:#?}\nfresh: {:#?}",
                    cached.sets,
                    fresh.sets
                );
            }
            cache.evict_unused();
        }
    }
}

/// A policy whose ipBlocks need more set entries than `MAX_SET_MEMBERS` (17,000 IPv6 /64s, each
/// with one /128 cut out: 64 prefixes apiece, over a million in all) must not be programmed: that
/// rule allows nothing, the pod stays isolated, the policy's other rules and every other policy
/// still apply, and the failure is reported. Both compile paths agree.
mod oversized {
    use super::*;
    use crate::compile::compile_cached;
    use crate::model::{LabelSelector, Peer, Policy, PolicyRule};
    use crate::peer_cache::PeerCache;
    use crate::state::{DesiredState, MAX_SET_MEMBERS};
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
        let mut cache = PeerCache::default();
        cache.update(&s);
        check(&compile_cached(&s, "n1", Family::V6, &mut cache));
        // Once a policy goes, the next one fits.
        s.policies.retain(|p| p.key() != "x/p1");
        cache.update(&s);
        let state = compile_cached(&s, "n1", Family::V6, &mut cache);
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
        let cache = std::cell::RefCell::new(PeerCache::default());
        cache.borrow_mut().update(&s);
        check(&s, &|family| {
            compile_cached(&s, "n1", family, &mut cache.borrow_mut())
        });
        // The unrelated policy is compiled as usual: y/a is isolated.
        assert!(!tcp80(&s, "x/b", "y/a"));
    }
}
