//! End-to-end: the real binary programs node namespaces, and real TCP/UDP connections between pod
//! namespaces decide pass or fail, on IPv4 and IPv6, both iptables backends, one and two nodes.
//! Needs root; without it every test says SKIPPED loudly and passes.

use kni_testlab::lab;

use lab::{Lab, Probe, Proto, check_matrix, skip_unless_root};

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!("{NP}metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

/// Whether a probe should get through.
type Expectation = Box<dyn Fn(&Lab, &Probe) -> bool>;

pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) policies: Vec<String>,
    /// Extra labels: (namespace or pod key, key, value).
    pub(crate) labels: Vec<(&'static str, &'static str, &'static str)>,
    /// Extra documents besides policies (e.g. odd pods).
    pub(crate) extra: Vec<String>,
    expect: Expectation,
}

fn case(
    name: &'static str,
    policies: Vec<String>,
    expect: impl Fn(&Lab, &Probe) -> bool + 'static,
) -> Case {
    Case {
        name,
        policies,
        labels: vec![],
        extra: vec![],
        expect: Box::new(expect),
    }
}

fn ns(p: &str) -> &str {
    &p[..1]
}

/// The NetworkPolicy cases, with expectations written out by hand for each (never derived from
/// the agent's own logic). Also what `explain::` checks `explain` against.
pub(crate) fn cases() -> Vec<Case> {
    let mut c = vec![
        case(
            "no policies: everything reaches everything",
            vec![],
            |_, _| true,
        ),
        case(
            "default deny ingress in x",
            vec![policy(
                "x",
                "deny",
                "  podSelector: {}\n  policyTypes: [Ingress]",
            )],
            |_, p| ns(&p.to) != "x",
        ),
        case(
            "default deny egress in x",
            vec![policy(
                "x",
                "deny",
                "  podSelector: {}\n  policyTypes: [Egress]",
            )],
            |_, p| ns(&p.from) != "x",
        ),
        case(
            "deny all in x with empty lists",
            vec![policy(
                "x",
                "deny",
                "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []",
            )],
            |_, p| ns(&p.from) != "x" && ns(&p.to) != "x",
        ),
        case(
            // Nine isolated pods per direction on one node: the dispatch chains branch by address
            // prefix, and every flow must still meet exactly its own pods' chains.
            "every pod isolated both ways, each namespace reachable from pod a of y only",
            ["x", "y", "z"]
                .iter()
                .map(|n| {
                    policy(
                        n,
                        "from-y-a",
                        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}]}]\n  egress: [{to: [{podSelector: {}, namespaceSelector: {}}]}]",
                    )
                })
                .collect(),
            |_, p| p.from == "y/a",
        ),
        case(
            "allow-all rules under isolation",
            vec![policy(
                "x",
                "all",
                "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n  egress: [{}]",
            )],
            |_, _| true,
        ),
        case(
            "ingress from pod b of the same namespace to x/a",
            vec![policy(
                "x",
                "p",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
            )],
            |_, p| p.to != "x/a" || p.from == "x/b",
        ),
        case(
            "ingress from namespace y to all of x",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
            )],
            |_, p| ns(&p.to) != "x" || ns(&p.from) == "y",
        ),
        case(
            "namespaceSelector AND podSelector in one peer",
            vec![policy(
                "x",
                "p",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]",
            )],
            |_, p| p.to != "x/a" || p.from == "y/b",
        ),
        case(
            "namespaceSelector OR podSelector as two peers",
            vec![policy(
                "x",
                "p",
                "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]",
            )],
            |_, p| p.to != "x/a" || ns(&p.from) == "y" || p.from == "x/b",
        ),
        case(
            "matchExpressions In, NotIn, Exists, DoesNotExist",
            vec![
                policy(
                    "x",
                    "in-notin",
                    "  podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x, y]}]}}]}]",
                ),
                policy(
                    "y",
                    "exists",
                    "  podSelector: {matchExpressions: [{key: pod, operator: Exists}]}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}}]}]",
                ),
            ],
            |_, p| (p.to != "x/a" && p.to != "x/b" || ns(&p.from) == "z") && ns(&p.to) != "y",
        ),
        case(
            "ingress only on TCP port 81",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{port: 81}]}]",
            )],
            |_, p| ns(&p.to) != "x" || (p.proto == Proto::Tcp && p.port == 81),
        ),
        case(
            "ingress on a UDP port range (endPort)",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP, port: 79, endPort: 80}]}]",
            )],
            |_, p| ns(&p.to) != "x" || (p.proto == Proto::Udp && p.port == 80),
        ),
        case(
            "protocol-only rule allows every UDP port",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP}]}]",
            )],
            |_, p| ns(&p.to) != "x" || p.proto == Proto::Udp,
        ),
        case(
            "an SCTP-only policy still isolates TCP and UDP",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]",
            )],
            |_, p| ns(&p.to) != "x",
        ),
        case(
            "named port serve-80-udp",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: serve-80-udp, protocol: UDP}]}]",
            )],
            |_, p| ns(&p.to) != "x" || (p.proto == Proto::Udp && p.port == 80),
        ),
        case(
            "ingress named port resolves per destination pod",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{port: web}]}]",
            )],
            |_, p| {
                ns(&p.to) != "x"
                    || p.proto == Proto::Tcp
                        && ((p.to == "x/a" && p.port == 80) || (p.to == "x/b" && p.port == 81))
            },
        ),
        case(
            "egress named port resolves per peer pod",
            vec![policy(
                "z",
                "p",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}}], ports: [{port: web}]}]",
            )],
            |_, p| {
                ns(&p.from) != "z"
                    || p.proto == Proto::Tcp
                        && ((p.to == "x/a" && p.port == 80)
                            || ((p.to == "x/b" || p.to == "y/a") && p.port == 81))
            },
        ),
        case(
            "policies add up",
            vec![
                policy(
                    "x",
                    "from-y",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
                ),
                policy(
                    "x",
                    "from-z",
                    "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
                ),
            ],
            |_, p| ns(&p.to) != "x" || ns(&p.from) == "z" || (p.to == "x/a" && ns(&p.from) == "y"),
        ),
        case(
            "egress only to namespace y",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
            )],
            |_, p| ns(&p.from) != "x" || ns(&p.to) == "y",
        ),
        case(
            "egress and ingress both judge a flow",
            vec![
                policy(
                    "x",
                    "out",
                    "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]",
                ),
                policy(
                    "y",
                    "in",
                    "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
                ),
            ],
            |_, p| {
                (p.from != "x/a" || p.to.ends_with("/b")) && (p.to != "y/b" || ns(&p.from) == "z")
            },
        ),
        case(
            "egress to ipBlocks with except: pods of node 1 cut out",
            vec![policy(
                "x",
                "p",
                "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.244.7.7/16, except: [10.244.1.0/24]}}, {ipBlock: {cidr: 'fd00:244::/32', except: ['fd00:244:1::/48']}}]}]",
            )],
            |lab, p| p.from != "x/a" || lab.pod(&p.to).node == 1,
        ),
        case(
            "egress to 0.0.0.0/0 and ::/0",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: '::/0'}}]}]",
            )],
            |_, _| true,
        ),
        case(
            "ingress from an ipBlock covering exactly one pod per family",
            vec![policy(
                "x",
                "p",
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.0/17]}}, {ipBlock: {cidr: 'fd00:244::/32', except: ['fd00:244::/33']}}]}]",
            )],
            // All lab addresses sit in the lower halves, so nothing is allowed in.
            |_, p| ns(&p.to) != "x",
        ),
    ];

    let mut by_namespace_label = case(
        "namespace label change: z gains team=blue",
        vec![policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
        )],
        |_, p| ns(&p.to) != "x" || ns(&p.from) == "z",
    );
    by_namespace_label.labels = vec![("z", "team", "blue")];
    let before_label = case(
        "namespace label change: before, nobody has team=blue",
        vec![policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
        )],
        |_, p| ns(&p.to) != "x",
    );
    let mut by_pod_label = case(
        "pod label change: y/c gains role=db",
        vec![policy(
            "x",
            "p",
            "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]",
        )],
        |_, p| ns(&p.to) != "x" || p.from == "y/c",
    );
    by_pod_label.labels = vec![("y/c", "role", "db")];
    let mut ignored_pods = case(
        "finished and hostNetwork pods are never peers",
        vec![policy(
            "y",
            "p",
            "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]",
        )],
        |_, p| ns(&p.to) != "y",
    );
    // A Succeeded pod that once had x/a's address, and a hostNetwork pod on the node's address,
    // both labelled as the only allowed clients.
    ignored_pods.extra = vec![
        "apiVersion: v1\nkind: Pod\nmetadata: {name: done, namespace: z, labels: {role: client}}\nspec: {nodeName: node1, containers: [{name: c, image: i}]}\nstatus: {phase: Succeeded, podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}, {ip: 'fd00:244:1::2'}]}".into(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: z, labels: {role: client}}\nspec: {nodeName: node1, hostNetwork: true, containers: [{name: c, image: i}]}\nstatus: {phase: Running, podIP: 192.168.100.1, podIPs: [{ip: 192.168.100.1}, {ip: 'fd00:100::1'}]}".into(),
    ];
    c.extend([before_label, by_namespace_label, by_pod_label, ignored_pods]);
    c
}

fn run_cases(test: &str, backend: &str, nodes: usize) {
    if skip_unless_root(test) {
        return;
    }
    // Two nodes: pods c live on node 2, so flows are same-node and cross-node.
    let lab = Lab::new(crate::AGENT, nodes, |_, pod| {
        if nodes == 2 && pod == "c" { 1 } else { 0 }
    });
    let mut failures = Vec::new();
    // Whether some case isolated enough pods on one node for the dispatch chains to branch by
    // address prefix, so that the matrix's packets also walk branch chains.
    let mut walked_branches = false;
    for c in cases() {
        let mut docs: Vec<&str> = c.policies.iter().map(String::as_str).collect();
        docs.extend(c.extra.iter().map(String::as_str));
        lab.write_cluster_manifests_labelled(&docs, &c.labels);
        lab.sync_all(backend);
        let save = lab.node_cmd(0, &[&format!("iptables-{backend}-save"), "-t", "filter"]);
        walked_branches |= save.contains("-j KNI-DISPI-");
        let wrong = check_matrix(&lab, &|p| (c.expect)(&lab, p));
        eprintln!(
            "{test}: {}: {}",
            c.name,
            if wrong.is_empty() {
                "ok".to_string()
            } else {
                format!("{} wrong", wrong.len())
            }
        );
        if !wrong.is_empty() {
            failures.push(format!("case {:?}:\n  {}", c.name, wrong.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{test} ({backend}, {nodes} node(s)):\n{}",
        failures.join("\n")
    );
    assert!(
        nodes > 1 || walked_branches,
        "{test}: no case made a branch of a dispatch chain (more than 4 isolated pods)"
    );
}

#[test]
fn matrix_legacy_one_node() {
    run_cases("matrix_legacy_one_node", "legacy", 1);
}

#[test]
fn matrix_nft_one_node() {
    run_cases("matrix_nft_one_node", "nft", 1);
}

#[test]
fn matrix_legacy_two_nodes() {
    run_cases("matrix_legacy_two_nodes", "legacy", 2);
}

#[test]
fn matrix_nft_two_nodes() {
    run_cases("matrix_nft_two_nodes", "nft", 2);
}
