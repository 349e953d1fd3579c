//! End-to-end ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): the real agent on node
//! namespaces, real TCP and UDP probes on IPv4 and IPv6, both iptables backends.
//!
//! The cluster is the upstream conformance suite's (kubernetes-sigs/network-policy-api,
//! `conformance/base/manifests.yaml`): namespaces `network-policy-conformance-{gryffindor,
//! slytherin,hufflepuff,ravenclaw}` labelled `conformance-house`, two pods each (harry-potter,
//! draco-malfoy, cedric-diggory, luna-lovegood -0 and -1, the -1 on a second node) serving TCP
//! 80/8080 and UDP 53/5353, port 80 named `web` and UDP 53 named `dns`. The cases follow
//! `conformance/base/{admin,baseline}_tier/*.yaml` and `conformance/tests/*.go` (named per case),
//! plus the tier pitfalls the issue lists. Expectations are written out by hand.

use kni_testlab::lab::{self, Lab, Probe, Proto, check_matrix, skip_unless_root, wait_until};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A long-lived TCP flow between two pods (its own echo server on port 7000 of the
/// destination): a line every 100 ms, counting the echoes.
struct EchoFlow {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoFlow {
    fn start(lab: &Lab, from: &str, to: &str) -> EchoFlow {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicUsize::new(0));
        let listener = lab::in_netns(&lab.pod(to).netns, || {
            TcpListener::bind(("::", 7000)).unwrap()
        })
        .join()
        .unwrap();
        let server_stop = stop.clone();
        let server = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 64];
            while !server_stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => {}
                }
            }
        });
        let target = SocketAddr::new(lab.pod(to).ip(false), 7000);
        let (client_stop, count) = (stop.clone(), echoes.clone());
        let client = lab::in_netns(&lab.pod(from).netns, move || {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(150)))
                .unwrap();
            let mut buf = [0u8; 64];
            while !client_stop.load(Ordering::Relaxed) {
                if s.write_all(b"line\n").is_err() {
                    return;
                }
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        EchoFlow {
            stop,
            echoes,
            threads: vec![server, client],
        }
    }

    fn echoes(&self) -> usize {
        self.echoes.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

const HOUSES: [(&str, &str); 4] = [
    ("gryffindor", "harry-potter"),
    ("slytherin", "draco-malfoy"),
    ("hufflepuff", "cedric-diggory"),
    ("ravenclaw", "luna-lovegood"),
];
const PORTS: [u16; 4] = [80, 8080, 53, 5353];
const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

fn namespace(house: &str) -> String {
    format!("network-policy-conformance-{house}")
}

/// The house of a pod key.
fn house(key: &str) -> &str {
    key.split('/')
        .next()
        .and_then(|ns| ns.strip_prefix("network-policy-conformance-"))
        .expect("a conformance pod")
}

fn pod_name(key: &str) -> &str {
    key.split('/').nth(1).unwrap()
}

fn conformance_lab(nodes: usize) -> Lab {
    let layout: Vec<(String, String)> = HOUSES
        .iter()
        .flat_map(|(h, pod)| (0..2).map(move |i| (namespace(h), format!("{pod}-{i}"))))
        .collect();
    let layout: Vec<(&str, &str)> = layout
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_str()))
        .collect();
    Lab::with_layout(crate::AGENT, nodes, &layout, &PORTS, |_, pod| {
        usize::from(nodes == 2 && pod.ends_with("-1"))
    })
}

/// Namespaces, Pods and Nodes (node1 labelled role=infra) as the conformance manifests make
/// them, with extra namespace labels `(house, key, value)`.
fn cluster_yaml(lab: &Lab, namespace_labels: &[(&str, &str, &str)]) -> String {
    let mut docs = Vec::new();
    for (h, _) in HOUSES {
        let mut labels = format!("conformance-house: {h}");
        for (_, k, v) in namespace_labels.iter().filter(|(w, ..)| *w == h) {
            labels.push_str(&format!(", {k}: {v}"));
        }
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{{labels}}}}}",
            namespace(h)
        ));
    }
    for p in &lab.pods {
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{conformance-house: {h}, statefulset.kubernetes.io/pod-name: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{containerPort: 80, protocol: TCP, name: web}}\n    - {{containerPort: 53, protocol: UDP, name: dns}}\nstatus:\n  phase: Running\n  podIPs: [{{ip: {v4}}}, {{ip: \"{v6}\"}}]",
            name = p.name,
            ns = p.namespace,
            h = house(&p.key()),
            node = lab.nodes[p.node].name,
            v4 = p.v4,
            v6 = p.v6,
        ));
    }
    for (i, n) in lab.nodes.iter().enumerate() {
        let role = if i == 0 { "infra" } else { "worker" };
        docs.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{role: {role}}}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}, {{type: InternalIP, address: \"{}\"}}]}}",
            n.name, n.v4, n.v6
        ));
    }
    docs.join("\n---\n")
}

fn cnp(name: &str, tier: &str, priority: u32, subject_house: &str, body: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject:\n    namespaces: {{matchLabels: {{conformance-house: {subject_house}}}}}\n{body}"
    )
}

/// A `namespaces` peer of one house.
fn from(h: &str) -> String {
    format!("{{namespaces: {{matchLabels: {{conformance-house: {h}}}}}}}")
}

fn np(h: &str, name: &str, spec: &str) -> String {
    format!(
        "{NP}metadata: {{name: {name}, namespace: {}}}\nspec:\n{spec}",
        namespace(h)
    )
}

type Expect = Box<dyn Fn(&Probe) -> bool>;

struct Case {
    name: &'static str,
    docs: Vec<String>,
    namespace_labels: Vec<(&'static str, &'static str, &'static str)>,
    expect: Expect,
}

fn case(name: &'static str, docs: Vec<String>, expect: impl Fn(&Probe) -> bool + 'static) -> Case {
    Case {
        name,
        docs,
        namespace_labels: vec![],
        expect: Box::new(expect),
    }
}

fn tcp(p: &Probe, port: u16) -> bool {
    p.proto == Proto::Tcp && p.port == port
}

/// Modelled on `admin_tier/standard-ingress-tcp-rules.yaml` (`ingress-tcp`): rules in order, then
/// the upstream test's reorderings (deny first, pass first).
fn ingress_tcp(order: [usize; 3]) -> String {
    let first_three = [
        format!(
            "  - {{name: allow-from-ravenclaw-everything, action: Accept, from: [{}]}}",
            from("ravenclaw")
        ),
        format!(
            "  - {{name: deny-from-ravenclaw-everything, action: Deny, from: [{}]}}",
            from("ravenclaw")
        ),
        format!(
            "  - {{name: pass-from-ravenclaw-everything, action: Pass, from: [{}]}}",
            from("ravenclaw")
        ),
    ];
    let mut rules: Vec<String> = order.iter().map(|i| first_three[*i].clone()).collect();
    rules.extend([
        format!("  - {{name: deny-from-slytherin-at-port-80, action: Deny, from: [{}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}", from("slytherin")),
        format!("  - {{name: allow-from-hufflepuff-at-port-80, action: Accept, from: [{}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}", from("hufflepuff")),
        format!("  - {{name: deny-from-hufflepuff-everything-else, action: Deny, from: [{}]}}", from("hufflepuff")),
    ]);
    cnp(
        "ingress-tcp",
        "Admin",
        3,
        "gryffindor",
        &format!("  ingress:\n{}", rules.join("\n")),
    )
}

fn cases(lab: &Lab) -> Vec<Case> {
    let into_g = |p: &Probe, h: &str| house(&p.to) == "gryffindor" && house(&p.from) == h;
    let r0 = lab.pod(&format!("{}/luna-lovegood-0", namespace("ravenclaw")));
    let s1 = lab.pod(&format!("{}/draco-malfoy-1", namespace("slytherin")));
    let (r0_key, s1_key) = (r0.key(), s1.key());
    let mut c = vec![
        case(
            "no cluster policies: everything reaches everything",
            vec![],
            |_| true,
        ),
        case(
            "CNPAdminTierIngressTCP: accept, deny and pass in order, per port",
            vec![ingress_tcp([0, 1, 2])],
            move |p| {
                !(into_g(p, "slytherin") && tcp(p, 80) || into_g(p, "hufflepuff") && !tcp(p, 80))
            },
        ),
        case(
            "CNPAdminTierIngressTCP: deny before accept",
            vec![ingress_tcp([1, 0, 2])],
            move |p| {
                !(into_g(p, "ravenclaw")
                    || into_g(p, "slytherin") && tcp(p, 80)
                    || into_g(p, "hufflepuff") && !tcp(p, 80))
            },
        ),
        case(
            "CNPAdminTierIngressTCP: pass first, nothing below denies",
            vec![ingress_tcp([2, 1, 0])],
            move |p| {
                !(into_g(p, "slytherin") && tcp(p, 80) || into_g(p, "hufflepuff") && !tcp(p, 80))
            },
        ),
        // Modelled on admin_tier/standard-egress-udp-rules.yaml: UDP rules leave TCP alone (a
        // protocol needs a destinationPort: the CRD's MinProperties=1; all ports is a range).
        case(
            "CNPAdminTierEgressUDP: UDP port and all-UDP rules, egress",
            vec![cnp(
                "egress-udp",
                "Admin",
                4,
                "gryffindor",
                &format!(
                    "  egress:\n  - {{name: allow-to-ravenclaw-dns, action: Accept, to: [{r}], protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}]}}\n  - {{name: deny-to-ravenclaw-udp, action: Deny, to: [{r}], protocols: [{{udp: {{destinationPort: {{range: {{start: 1, end: 65535}}}}}}}}]}}\n  - {{name: deny-to-slytherin-5353, action: Deny, to: [{s}], protocols: [{{udp: {{destinationPort: {{range: {{start: 5353, end: 5354}}}}}}}}]}}",
                    r = from("ravenclaw"),
                    s = from("slytherin")
                ),
            )],
            |p| {
                let g = house(&p.from) == "gryffindor";
                let udp = p.proto == Proto::Udp;
                !(g && udp && house(&p.to) == "ravenclaw" && p.port != 53
                    || g && udp && house(&p.to) == "slytherin" && p.port == 5353)
            },
        ),
        case(
            "named ports resolve on the destination (web = TCP 80, dns = UDP 53)",
            vec![cnp(
                "named",
                "Admin",
                5,
                "hufflepuff",
                &format!(
                    "  ingress:\n  - {{action: Accept, from: [{r}], protocols: [{{destinationNamedPort: web}}, {{destinationNamedPort: dns}}]}}\n  - {{action: Deny, from: [{r}]}}",
                    r = from("ravenclaw")
                ),
            )],
            |p| {
                !(house(&p.to) == "hufflepuff"
                    && house(&p.from) == "ravenclaw"
                    && !(tcp(p, 80) || p.proto == Proto::Udp && p.port == 53))
            },
        ),
        case(
            "Pass falls through to NetworkPolicy, then Baseline where none selects",
            vec![
                cnp(
                    "pass-slytherin",
                    "Admin",
                    10,
                    "gryffindor",
                    &format!(
                        "  ingress: [{{action: Pass, from: [{}]}}]",
                        from("slytherin")
                    ),
                ),
                cnp(
                    "deny-slytherin",
                    "Admin",
                    20,
                    "gryffindor",
                    &format!(
                        "  ingress: [{{action: Deny, from: [{}]}}]",
                        from("slytherin")
                    ),
                ),
                np(
                    "gryffindor",
                    "harry-0-from-slytherin",
                    "  podSelector: {matchLabels: {statefulset.kubernetes.io/pod-name: harry-potter-0}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {conformance-house: slytherin}}}]}]",
                ),
                cnp(
                    "baseline-slytherin-80",
                    "Baseline",
                    1,
                    "gryffindor",
                    &format!(
                        "  ingress: [{{action: Deny, from: [{}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}]",
                        from("slytherin")
                    ),
                ),
            ],
            |p| match (house(&p.to), pod_name(&p.to)) {
                ("gryffindor", "harry-potter-0") => house(&p.from) == "slytherin",
                ("gryffindor", _) => !(house(&p.from) == "slytherin" && tcp(p, 80)),
                _ => true,
            },
        ),
        case(
            "Admin Deny wins over a NetworkPolicy allow",
            vec![
                np(
                    "slytherin",
                    "allow-all",
                    "  podSelector: {}\n  ingress: [{}]",
                ),
                cnp(
                    "deny-ravenclaw",
                    "Admin",
                    1,
                    "slytherin",
                    &format!(
                        "  ingress: [{{action: Deny, from: [{}]}}]",
                        from("ravenclaw")
                    ),
                ),
            ],
            |p| !(house(&p.to) == "slytherin" && house(&p.from) == "ravenclaw"),
        ),
        case(
            "Baseline default deny only where no NetworkPolicy selects",
            vec![
                cnp(
                    "baseline-deny-all",
                    "Baseline",
                    50,
                    "hufflepuff",
                    "  ingress: [{action: Deny, from: [{namespaces: {}}]}]",
                ),
                np(
                    "hufflepuff",
                    "cedric-1-from-gryffindor",
                    "  podSelector: {matchLabels: {statefulset.kubernetes.io/pod-name: cedric-diggory-1}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {conformance-house: gryffindor}}}]}]",
                ),
            ],
            |p| match (house(&p.to), pod_name(&p.to)) {
                ("hufflepuff", "cedric-diggory-1") => house(&p.from) == "gryffindor",
                ("hufflepuff", _) => false,
                _ => true,
            },
        ),
        // Modelled on admin_tier/standard-egress-inline-cidr-rules.yaml, one address per family.
        case(
            "networks: an IPv4 and an IPv6 address",
            vec![cnp(
                "networks",
                "Admin",
                1,
                "gryffindor",
                &format!(
                    "  egress: [{{action: Deny, to: [{{networks: [{}/32, '{}/128']}}]}}]",
                    r0.v4, s1.v6
                ),
            )],
            move |p| {
                !(house(&p.from) == "gryffindor"
                    && (p.to == r0_key && !p.v6 || p.to == s1_key && p.v6))
            },
        ),
        // The SCTP rule of admin_tier/standard-ingress-sctp-rules.yaml: an SCTP Accept does not
        // let TCP or UDP past the Deny after it.
        case(
            "an SCTP-only rule still isolates TCP and UDP",
            vec![cnp(
                "ingress-sctp",
                "Admin",
                7,
                "ravenclaw",
                &format!(
                    "  ingress:\n  - {{action: Accept, from: [{h}], protocols: [{{sctp: {{destinationPort: {{number: 9003}}}}}}]}}\n  - {{action: Deny, from: [{h}]}}",
                    h = from("hufflepuff")
                ),
            )],
            |p| !(house(&p.to) == "ravenclaw" && house(&p.from) == "hufflepuff"),
        ),
    ];
    // Modelled on admin_tier/standard-egress-inline-cidr-rules.yaml and its test's variant with
    // an Accept for two pod addresses inserted first.
    let cidr_policy = |first: Option<String>| {
        let mut rules = first.into_iter().collect::<Vec<_>>();
        rules.push(
            "  - {name: allow-egress-to-slytherin, action: Accept, to: [{pods: {namespaceSelector: {matchLabels: {conformance-house: slytherin}}, podSelector: {matchLabels: {conformance-house: slytherin}}}}]}"
                .into(),
        );
        rules.push(
            "  - {name: deny-egress-to-internet, action: Deny, to: [{networks: [0.0.0.0/0, '::/0']}]}"
                .into(),
        );
        cnp(
            "inline-cidr-as-peers-example",
            "Admin",
            85,
            "gryffindor",
            &format!("  egress:\n{}", rules.join("\n")),
        )
    };
    c.push(case(
        "CNPAdminTierEgressInlineCIDRPeers: deny to 0.0.0.0/0 and ::/0",
        vec![cidr_policy(None)],
        |p| !(house(&p.from) == "gryffindor" && house(&p.to) != "slytherin"),
    ));
    let h0 = lab.pod(&format!("{}/cedric-diggory-0", namespace("hufflepuff")));
    let (r0_v4, h0_v6) = (r0.v4, h0.v6);
    let (r0_key, h0_key) = (r0.key(), h0.key());
    c.push(case(
        "CNPAdminTierEgressInlineCIDRPeers: accept to a pod's IPv4 and another's IPv6 first",
        vec![cidr_policy(Some(format!(
            "  - {{name: allow-egress-to-specific-podIPs, action: Accept, to: [{{networks: [{r0_v4}/32, '{h0_v6}/128']}}]}}"
        )))],
        move |p| {
            house(&p.from) != "gryffindor"
                || house(&p.to) == "slytherin"
                || p.to == r0_key && !p.v6
                || p.to == h0_key && p.v6
        },
    ));
    // Modelled on baseline_tier/standard-gress-rules-combined.yaml (the `default` policy; the
    // subject by the kubernetes.io/metadata.name label the API server adds).
    let combined = |dir: &str, peer: &str| {
        let at = |h: &str| {
            format!(
                "{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}}}",
                namespace(h)
            )
        };
        format!(
            "  {dir}:\n  - {{name: accept-ravenclaw, action: Accept, {peer}: [{r}]}}\n  - {{name: deny-ravenclaw, action: Deny, {peer}: [{r}]}}\n  - {{name: deny-slytherin-80-53-9003, action: Deny, {peer}: [{s}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}, {{udp: {{destinationPort: {{number: 53}}}}}}, {{sctp: {{destinationPort: {{number: 9003}}}}}}]}}\n  - {{name: accept-hufflepuff-8080-5353-9003, action: Accept, {peer}: [{h}], protocols: [{{tcp: {{destinationPort: {{number: 8080}}}}}}, {{udp: {{destinationPort: {{number: 5353}}}}}}, {{sctp: {{destinationPort: {{number: 9003}}}}}}]}}\n  - {{name: deny-hufflepuff-everything-else, action: Deny, {peer}: [{h}]}}",
            r = at("ravenclaw"),
            s = at("slytherin"),
            h = at("hufflepuff"),
        )
    };
    c.push(case(
        "CNPBaselineTierGressRules: combined egress and ingress rules in order",
        vec![format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: default}}\nspec:\n  tier: Baseline\n  priority: 10\n  subject:\n    namespaces: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}\n{}\n{}",
            namespace("gryffindor"),
            combined("egress", "to"),
            combined("ingress", "from"),
        )],
        |p| {
            let other = match (house(&p.from), house(&p.to)) {
                ("gryffindor", "gryffindor") => return true,
                ("gryffindor", to) => to,
                (from, "gryffindor") => from,
                _ => return true,
            };
            let udp = p.proto == Proto::Udp;
            match other {
                "slytherin" => !(tcp(p, 80) || udp && p.port == 53),
                "hufflepuff" => tcp(p, 8080) || udp && p.port == 5353,
                _ => true,
            }
        },
    ));
    let mut relabelled = case(
        "namespace label selects a new peer",
        vec![cnp(
            "deny-blue",
            "Admin",
            1,
            "gryffindor",
            "  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {team: blue}}}]}]",
        )],
        |p| !(house(&p.to) == "gryffindor" && house(&p.from) == "hufflepuff"),
    );
    relabelled.namespace_labels = vec![("hufflepuff", "team", "blue")];
    c.push(relabelled);
    c.push(case(
        "every cluster policy deleted: full reachability",
        vec![],
        |_| true,
    ));
    c
}

/// Flows whose ingress decision `explain` must name, per case: (from, to, port, IPv6, stage,
/// policy, action).
#[allow(clippy::type_complexity)]
fn explained_cases(
    case: &str,
) -> Vec<(
    String,
    String,
    u16,
    bool,
    &'static str,
    Option<&'static str>,
    &'static str,
)> {
    let pod = |h: &str, p: &str| format!("{}/{p}", namespace(h));
    let (g0, g1) = (
        pod("gryffindor", "harry-potter-0"),
        pod("gryffindor", "harry-potter-1"),
    );
    let (s0, h0) = (
        pod("slytherin", "draco-malfoy-0"),
        pod("hufflepuff", "cedric-diggory-0"),
    );
    let r1 = pod("ravenclaw", "luna-lovegood-1");
    if case.starts_with("Pass falls through") {
        vec![
            (
                s0.clone(),
                g0,
                80,
                false,
                "NetworkPolicy",
                Some("network-policy-conformance-gryffindor/harry-0-from-slytherin"),
                "Allow",
            ),
            (
                s0,
                g1.clone(),
                80,
                true,
                "Baseline",
                Some("baseline-slytherin-80"),
                "Deny",
            ),
            (h0, g1, 80, false, "none", None, "Allow"),
        ]
    } else if case.starts_with("Admin Deny wins") {
        vec![(
            r1,
            pod("slytherin", "draco-malfoy-1"),
            8080,
            true,
            "Admin",
            Some("deny-ravenclaw"),
            "Deny",
        )]
    } else {
        vec![]
    }
}

fn sync(lab: &Lab, backend: &str, docs: &[String], labels: &[(&str, &str, &str)]) {
    lab.write_file("cluster.yaml", &cluster_yaml(lab, labels));
    lab.write_file("policies.yaml", &docs.join("\n---\n"));
    lab.sync_all(backend);
}

fn run_cases(test: &str, backend: &str) {
    if skip_unless_root(test) {
        return;
    }
    let lab = conformance_lab(2);
    let mut failures = Vec::new();
    for c in cases(&lab) {
        sync(&lab, backend, &c.docs, &c.namespace_labels);
        let wrong = check_matrix(&lab, &*c.expect);
        eprintln!("{test}: {}: {} wrong", c.name, wrong.len());
        if !wrong.is_empty() {
            failures.push(format!("case {:?}:\n  {}", c.name, wrong.join("\n  ")));
        }
        for (from, to, port, v6, stage, policy, action) in explained_cases(c.name) {
            let json = lab.explain_json(&from, &to, port, "TCP", v6);
            let d = &json["ingress"]["decided_by"];
            let want = (c.expect)(&Probe {
                from: from.clone(),
                to: to.clone(),
                proto: Proto::Tcp,
                port,
                v6,
            });
            if json["allowed"] != want
                || d["stage"] != stage
                || d["policy"].as_str() != policy
                || d["action"] != action
            {
                failures.push(format!(
                    "case {:?}: explain {from} -> {to} TCP/{port} v6={v6}: want allowed={want} decided by {stage} {policy:?} {action}, got {json}",
                    c.name
                ));
            }
        }
        if c.name.contains("SCTP") {
            let state = lab.our_state(backend);
            assert!(
                state.contains("-p sctp -m comment --comment \"cnp Admin ingress-sctp rule 0 Accept\" -m mark --mark 0x0/0x1000 -m multiport --dports 9003 -m set --match-set ")
                    && state.contains(" src -j MARK --set-xmark 0x401000/0x401000"),
                "{test}: the SCTP rule is not rendered as expected:\n{state}"
            );
        }
    }
    // Deleted: no chain of ours stands for a cluster policy any more.
    let state = lab.our_state(backend);
    assert!(!state.contains("KNI-CNP"), "{test}: left behind:\n{state}");
    assert!(
        failures.is_empty(),
        "{test} ({backend}):\n{}",
        failures.join("\n")
    );
}

#[test]
fn conformance_cases_legacy() {
    run_cases("conformance_cases_legacy", "legacy");
}

#[test]
fn conformance_cases_nft() {
    run_cases("conformance_cases_nft", "nft");
}

/// The running agent follows a priority change and a namespace relabel from the manifests
/// directory (modelled on `admin_tier/standard-priority-field.yaml` and the
/// CNPAdminTierPriorityField test); `nodes` peers match node addresses; and with the default
/// deny action a denied connection times out.
fn running_agent(test: &str, backend: &str) {
    if skip_unless_root(test) {
        return;
    }
    let lab = conformance_lab(1);
    let g0 = format!("{}/harry-potter-0", namespace("gryffindor"));
    let s0 = format!("{}/draco-malfoy-0", namespace("slytherin"));
    let h0 = format!("{}/cedric-diggory-0", namespace("hufflepuff"));
    let priority = |accept_priority: u32| {
        vec![
            cnp(
                "priority-50-example",
                "Admin",
                50,
                "gryffindor",
                &format!(
                    "  ingress: [{{name: deny-all-ingress-from-slytherin, action: Deny, from: [{}]}}]",
                    from("slytherin")
                ),
            ),
            cnp(
                "old-priority-60-new-priority-40-example",
                "Admin",
                accept_priority,
                "gryffindor",
                &format!(
                    "  ingress: [{{name: allow-all-ingress-from-slytherin, action: Accept, from: [{}]}}]",
                    from("slytherin")
                ),
            ),
            cnp(
                "deny-blue",
                "Admin",
                1,
                "gryffindor",
                "  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {team: blue}}}]}]",
            ),
        ]
    };
    lab.write_file("cluster.yaml", &cluster_yaml(&lab, &[]));
    lab.write_file("policies.yaml", &priority(60).join("\n---\n"));
    let _agent = lab.spawn_agent(backend, &["--deny-action", "reject"]);
    let limit = Duration::from_secs(30);
    wait_until("priority 50 deny applies", limit, || !lab.tcp(&s0, &g0, 80));
    assert!(lab.tcp(&h0, &g0, 80));
    lab.write_file("policies.yaml", &priority(40).join("\n---\n"));
    wait_until("priority 40 accept applies", limit, || {
        lab.tcp(&s0, &g0, 80)
    });
    lab.write_file(
        "cluster.yaml",
        &cluster_yaml(&lab, &[("hufflepuff", "team", "blue")]),
    );
    wait_until("the relabelled namespace is denied", limit, || {
        !lab.tcp(&h0, &g0, 80)
    });
    assert!(lab.tcp(&s0, &g0, 80));

    // Strict mode: the priority going back denies an established flow, which is cut.
    let flow = EchoFlow::start(&lab, &s0, &g0);
    std::thread::sleep(Duration::from_millis(600));
    assert!(flow.echoes() >= 3, "{test}: the flow does not work");
    lab.write_file("policies.yaml", &priority(60).join("\n---\n"));
    let (s_netns, g_ip) = (lab.pod(&s0).netns.clone(), lab.pod(&g0).ip(false));
    wait_until("the deny is back", limit, || {
        !lab::probe(&s_netns, g_ip, Proto::Tcp, 80)
    });
    std::thread::sleep(Duration::from_millis(1000));
    let at = flow.echoes();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(flow.echoes(), at, "{test}: the denied flow goes on");
    flow.stop();
    drop(_agent);

    // nodes peers (experimental): node1 has role=infra; its addresses, both families.
    let nodes_rule = cnp(
        "deny-infra",
        "Admin",
        1,
        "gryffindor",
        "  egress: [{action: Deny, to: [{nodes: {matchLabels: {role: infra}}}]}]",
    );
    sync(&lab, backend, &[nodes_rule], &[]);
    let node = &lab.nodes[0];
    let g_ns = lab.pod(&g0).netns.clone();
    for ip in [node.v4.into(), node.v6.into()] {
        assert!(!lab::probe(&g_ns, ip, Proto::Tcp, 80), "{test}: {ip}");
        assert!(lab::probe(&lab.pod(&s0).netns, ip, Proto::Tcp, 80), "{ip}");
    }

    // The default deny action drops: the denied probe waits out its timeout.
    let deny = cnp(
        "deny-slytherin",
        "Admin",
        1,
        "gryffindor",
        &format!(
            "  ingress: [{{action: Deny, from: [{}]}}]",
            from("slytherin")
        ),
    );
    lab.write_file("policies.yaml", &deny);
    let once = || {
        let out = lab.once(backend, &[], &[]);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        log
    };
    once();
    // What we render is what iptables-save shows (marks, SCTP, sets): no endless rewrite.
    let again = once();
    assert!(
        again.contains("ipset_lines=0") && again.contains("iptables_lines=0"),
        "{test}: an unchanged cluster wrote again:\n{again}"
    );
    lab.forget_flows();
    let start = Instant::now();
    assert!(!lab.tcp(&s0, &g0, 80));
    assert!(
        start.elapsed() >= lab::PROBE_TIMEOUT,
        "{test}: denied in {:?}: not dropped",
        start.elapsed()
    );
    assert!(lab.tcp(&h0, &g0, 80));
}

#[test]
fn running_agent_legacy() {
    running_agent("running_agent_legacy", "legacy");
}

#[test]
fn running_agent_nft() {
    running_agent("running_agent_nft", "nft");
}
