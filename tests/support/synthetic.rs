//! A deterministic synthetic cluster for benchmarks.

use kube_netpol_iptables::model::{
    ClusterSnapshot, ContainerPort, LabelSelector, Peer, Pod, PodPhase, Policy, PolicyRule,
    PortRef, PortSpec, Protocol, Requirement,
};
use kube_netpol_iptables::source::convert;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const LOCAL_NODE: &str = "bench-node";

#[derive(Debug, Clone)]
pub struct Params {
    pub namespaces: usize,
    pub pods: usize,
    /// Pods on the benchmarked node (at most 110, kubelet's default limit).
    pub local_pods: usize,
    pub policies: usize,
    pub rules_per_policy: usize,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            namespaces: 500,
            pods: 10_000,
            local_pods: 110,
            policies: 1_000,
            rules_per_policy: 3,
        }
    }
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn match_labels(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

pub fn pod_ips(j: usize) -> (IpAddr, IpAddr) {
    let n = j as u32 + 10;
    (
        IpAddr::V4(Ipv4Addr::new(
            10,
            100 + (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
        )),
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0xb,
            0,
            0,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        )),
    )
}

const TIERS: [&str; 3] = ["web", "api", "db"];
const ENVS: [&str; 3] = ["prod", "dev", "staging"];

/// Selector shapes cycle through: label match, matchExpressions In, namespace selector,
/// namespace AND pod selector, ipBlock with except, named port, numbered port range.
pub fn generate(p: &Params) -> ClusterSnapshot {
    let mut s = ClusterSnapshot::default();
    for i in 0..p.namespaces {
        let name = format!("ns-{i}");
        s.namespaces.insert(
            name.clone(),
            convert::implicit_namespace(
                &name,
                labels(&[
                    ("team", format!("team-{}", i % 20)),
                    ("env", ENVS[i % 3].into()),
                ]),
            ),
        );
    }
    for j in 0..p.pods {
        let (v4, v6) = pod_ips(j);
        s.pods_mut().push(Pod {
            namespace: format!("ns-{}", j % p.namespaces),
            name: format!("pod-{j}"),
            labels: labels(&[
                ("app", format!("app-{}", j % 50)),
                ("tier", TIERS[j % 3].into()),
                ("version", format!("v{}", j % 4)),
            ]),
            node_name: Some(if j < p.local_pods {
                LOCAL_NODE.to_string()
            } else {
                format!("node-{}", j % 100)
            }),
            ips: vec![v4, v6],
            host_network: false,
            phase: PodPhase::Running,
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("metrics".into()),
                    port: 9090,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Protocol::Udp,
                },
            ],
        });
    }
    for k in 0..p.policies {
        let namespace = format!("ns-{}", k % p.namespaces);
        let pod_selector = match k % 4 {
            0 => LabelSelector::default(),
            1 => match_labels(&[("tier", TIERS[k % 3].into())]),
            2 => LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![Requirement::In(
                    "version".into(),
                    vec!["v0".into(), "v1".into()],
                )],
            },
            _ => match_labels(&[("app", format!("app-{}", k % 50))]),
        };
        let rules: Vec<PolicyRule> = (0..p.rules_per_policy).map(|r| rule(k, r)).collect();
        let egress = k % 3 == 0;
        s.policies.push(Policy {
            namespace,
            name: format!("policy-{k}"),
            pod_selector,
            isolates_ingress: true,
            isolates_egress: egress,
            ingress: rules.clone(),
            egress: if egress { rules } else { vec![] },
        });
    }
    s
}

fn rule(k: usize, r: usize) -> PolicyRule {
    let tcp = |first, last| PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Range { first, last }),
    };
    let (peers, ports) = match (k + r) % 6 {
        0 => (
            vec![Peer::Pods {
                namespaces: None,
                pods: Some(match_labels(&[("tier", "web".into())])),
            }],
            vec![tcp(80, 80)],
        ),
        1 => (
            vec![Peer::Pods {
                namespaces: Some(match_labels(&[("team", format!("team-{}", k % 20))])),
                pods: None,
            }],
            vec![
                tcp(443, 443),
                PortSpec {
                    protocol: Protocol::Udp,
                    port: Some(PortRef::Range {
                        first: 53,
                        last: 53,
                    }),
                },
            ],
        ),
        2 => (
            vec![Peer::Pods {
                namespaces: Some(match_labels(&[("env", "prod".into())])),
                pods: Some(match_labels(&[("app", format!("app-{}", (k + r) % 50))])),
            }],
            vec![tcp(8000, 8100)],
        ),
        3 => (
            vec![Peer::IpBlock {
                cidr: format!("172.{}.0.0/16", 16 + k % 16).parse().unwrap(),
                except: vec![format!("172.{}.{}.0/24", 16 + k % 16, r).parse().unwrap()],
            }],
            vec![tcp(5432, 5432)],
        ),
        4 => (
            vec![Peer::Pods {
                namespaces: Some(LabelSelector::default()),
                pods: Some(match_labels(&[("version", "v2".into())])),
            }],
            vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Named("http".into())),
            }],
        ),
        _ => (
            vec![Peer::Pods {
                namespaces: None,
                pods: Some(match_labels(&[("app", format!("app-{}", k % 50))])),
            }],
            vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Named("metrics".into())),
            }],
        ),
    };
    PolicyRule {
        peers: Some(peers),
        ports: Some(ports),
    }
}

/// The snapshot as manifests (for measuring the real binary).
pub fn to_manifests(s: &ClusterSnapshot) -> String {
    let mut docs = Vec::new();
    let map = |m: &BTreeMap<String, String>| {
        let items: Vec<String> = m.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
        format!("{{{}}}", items.join(", "))
    };
    let selector = |sel: &LabelSelector| {
        let exprs: Vec<String> = sel
            .match_expressions
            .iter()
            .map(|r| match r {
                Requirement::In(k, v) => {
                    format!("{{key: {k}, operator: In, values: [{}]}}", v.join(", "))
                }
                Requirement::NotIn(k, v) => {
                    format!("{{key: {k}, operator: NotIn, values: [{}]}}", v.join(", "))
                }
                Requirement::Exists(k) => format!("{{key: {k}, operator: Exists}}"),
                Requirement::DoesNotExist(k) => format!("{{key: {k}, operator: DoesNotExist}}"),
            })
            .collect();
        format!(
            "{{matchLabels: {}, matchExpressions: [{}]}}",
            map(&sel.match_labels),
            exprs.join(", ")
        )
    };
    for ns in s.namespaces.values() {
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {}}}",
            ns.name,
            map(&ns.labels)
        ));
    }
    for p in s.pods.iter() {
        let ips: Vec<String> = p.ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|c| {
                format!(
                    "{{name: {}, containerPort: {}, protocol: {}}}",
                    c.name.as_deref().unwrap_or(""),
                    c.port,
                    c.protocol.as_kernel_str().to_uppercase()
                )
            })
            .collect();
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {}}}\nspec: {{nodeName: {}, containers: [{{name: c, image: i, ports: [{}]}}]}}\nstatus: {{phase: Running, podIPs: [{}]}}",
            p.name,
            p.namespace,
            map(&p.labels),
            p.node_name.as_deref().unwrap_or(""),
            ports.join(", "),
            ips.join(", ")
        ));
    }
    for pol in &s.policies {
        let rules = |rules: &[PolicyRule], field: &str| -> String {
            let items: Vec<String> = rules
                .iter()
                .map(|r| {
                    let peers: Vec<String> = r
                        .peers
                        .iter()
                        .flatten()
                        .map(|peer| match peer {
                            Peer::Pods { namespaces, pods } => {
                                let mut parts = Vec::new();
                                if let Some(n) = namespaces {
                                    parts.push(format!("namespaceSelector: {}", selector(n)));
                                }
                                if let Some(p) = pods {
                                    parts.push(format!("podSelector: {}", selector(p)));
                                }
                                format!("{{{}}}", parts.join(", "))
                            }
                            Peer::IpBlock { cidr, except } => {
                                let e: Vec<String> = except.iter().map(|n| n.to_string()).collect();
                                format!(
                                    "{{ipBlock: {{cidr: \"{cidr}\", except: [{}]}}}}",
                                    e.join(", ")
                                )
                            }
                        })
                        .collect();
                    let ports: Vec<String> = r
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| {
                            let proto = p.protocol.as_kernel_str().to_uppercase();
                            match &p.port {
                                None => format!("{{protocol: {proto}}}"),
                                Some(PortRef::Named(n)) => {
                                    format!("{{protocol: {proto}, port: {n}}}")
                                }
                                Some(PortRef::Range { first, last }) => {
                                    format!("{{protocol: {proto}, port: {first}, endPort: {last}}}")
                                }
                            }
                        })
                        .collect();
                    format!(
                        "{{{field}: [{}], ports: [{}]}}",
                        peers.join(", "),
                        ports.join(", ")
                    )
                })
                .collect();
            format!("[{}]", items.join(", "))
        };
        let mut types = vec!["Ingress"];
        if pol.isolates_egress {
            types.push("Egress");
        }
        docs.push(format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}, namespace: {}}}\nspec: {{podSelector: {}, policyTypes: [{}], ingress: {}, egress: {}}}",
            pol.name,
            pol.namespace,
            selector(&pol.pod_selector),
            types.join(", "),
            rules(&pol.ingress, "from"),
            rules(&pol.egress, "to")
        ));
    }
    docs.join("\n---\n") + "\n"
}
