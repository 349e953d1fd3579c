//! The incremental path: a long-lived Compiler fed random changes equals a fresh one each step.

use super::*;

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const POLICY_POOL: [&str; 10] = [
    "metadata: {name: p0, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: db}}}]}]",
    "metadata: {name: p1, namespace: y}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
    "metadata: {name: p2, namespace: z}\nspec:\n  podSelector: {matchExpressions: [{key: role, operator: Exists}]}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [red]}]}, podSelector: {matchLabels: {pod: b}}}]}]",
    "metadata: {name: p3, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}, {ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}], ports: [{port: web}, {port: 80}]}]",
    "metadata: {name: p4, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: web}]}]",
    "metadata: {name: p5, namespace: z}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: web}, {protocol: UDP, port: serve-80-udp}]}]",
    "metadata: {name: p6, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: db}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, c]}]}}]}]\n  egress: [{to: [{podSelector: {}}, {ipBlock: {cidr: 'fd00::/16'}}]}]",
    "metadata: {name: p7, namespace: w}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: red}}}]}]",
    // The same selections as p1 and p3 from other namespaces: shared sets.
    "metadata: {name: p8, namespace: z}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}, {podSelector: {matchLabels: {role: db}}}]}]",
    "metadata: {name: p9, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}, {ipBlock: {cidr: 10.0.0.0/17, except: [10.0.2.0/24, 10.0.64.0/18]}}], ports: [{port: web}, {port: 81}]}]",
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
fn a_long_lived_compiler_always_equals_a_fresh_one() {
    for seed in [1u64, 7, 42, 1234] {
        let mut rng = Rng(seed);
        let mut s = with_policies(cluster(), &[POLICY_POOL[0], POLICY_POOL[3], POLICY_POOL[5]]);
        let mut compiler = Compiler::new();
        let mut next_pod = 0;
        for step in 0..1000 {
            let what = rng.below(10);
            match what {
                0 | 1 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    let name = s.pods[i].name.clone();
                    s.pods_mut()[i].labels = random_labels(&mut rng, &name);
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
                    s.pods_mut().push(Pod {
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
                    s.pods_mut().remove(i);
                }
                4 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    s.pods_mut()[i].ips = if rng.below(5) == 0 {
                        vec![]
                    } else {
                        random_ips(&mut rng)
                    };
                }
                5 if !s.pods.is_empty() => {
                    let i = rng.below(s.pods.len());
                    match rng.below(3) {
                        0 => {
                            s.pods_mut()[i].phase =
                                [PodPhase::Running, PodPhase::Succeeded, PodPhase::Pending]
                                    [rng.below(3)]
                        }
                        1 => s.pods_mut()[i].host_network = !s.pods[i].host_network,
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
                                s.pods_mut()[i]
                                    .ports
                                    .retain(|p| p.name.as_deref() != Some("web"));
                            } else {
                                s.pods_mut()[i].ports.push(web);
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
            let cached = compiler.compile(&s, "n1");
            let fresh = Compiler::new().compile(&s, "n1");
            for family in Family::ALL {
                assert!(
                    cached[family] == fresh[family],
                    "seed {seed} step {step} (change {what}) {family}: cached compile differs\ncached: {:#?}\nfresh: {:#?}",
                    cached[family].sets,
                    fresh[family].sets
                );
            }
        }
    }
}

/// A source's `PodsChanged` is used only for the list it describes: the compiler compares just
/// the named pods when the hint leads from the list it saw to the snapshot's, and every pod
/// otherwise (a list replaced or changed after the hint was made).
#[test]
fn a_changed_pods_hint_counts_only_for_the_lists_it_names() {
    use crate::model::PodsChanged;
    use std::sync::Arc;
    let s = with_policies(cluster(), &[POLICY_POOL[0]]);
    let relabel = |s: &ClusterSnapshot, key: &str| {
        let mut pods = (*s.pods).clone();
        let pod = pods.iter_mut().find(|p| p.key() == key).unwrap();
        pod.labels.insert("role".into(), "db".into());
        pods.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Arc::new(pods)
    };
    let mut sorted = s.clone();
    sorted
        .pods_mut()
        .sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));

    // Told truthfully that x/b changed: the same as a fresh compile, and different from before.
    let mut compiler = Compiler::new();
    let before = compiler.compile(&sorted, "n1");
    let mut next = sorted.clone();
    next.pods = relabel(&sorted, "x/b");
    next.pods_changed = PodsChanged {
        since: Arc::downgrade(&sorted.pods),
        to: Arc::downgrade(&next.pods),
        keys: vec!["x/b".into()],
    };
    let after = compiler.compile(&next, "n1");
    assert!(after == Compiler::new().compile(&next, "n1"));
    assert!(after != before, "x/b joined the peers of p0");

    // A hint naming the wrong pod is believed (so the hint is what the compiler went by)...
    let mut compiler = Compiler::new();
    compiler.compile(&sorted, "n1");
    next.pods_changed.keys = vec!["y/a".into()];
    assert!(compiler.compile(&next, "n1") == before);

    // ...but not once the list is another than the one it describes.
    let mut compiler = Compiler::new();
    compiler.compile(&sorted, "n1");
    let mut replaced = next.clone();
    replaced.pods = relabel(&sorted, "x/b");
    assert!(compiler.compile(&replaced, "n1") == Compiler::new().compile(&replaced, "n1"));
    assert!(compiler.compile(&replaced, "n1") != before);

    // Nor for a compiler that saw another list before.
    let mut compiler = Compiler::new();
    compiler.compile(&s, "n1");
    assert!(compiler.compile(&next, "n1") == Compiler::new().compile(&next, "n1"));
}
