//! One set per distinct selection: shared by every rule and policy that selects the same pods,
//! whatever order or form the selectors were written in; pod addresses in `hash:ip`, ipBlocks in
//! `hash:net`.

use super::*;
use crate::compile::ir::{Match, SetKind, SetMember};
use crate::model::{LabelSelector, Peer, Policy, PolicyRule, Requirement};
use std::collections::{BTreeMap, BTreeSet};

/// The selectors the generator uses, by meaning (the index is the test's own identity of what
/// the selector selects). Each can be written several ways.
const POD_SELECTORS: usize = 4;
const NAMESPACE_SELECTORS: usize = 3;

fn vals(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Pod selector number `meaning`, written in variant `form` (order, repeats, `{}` vs absent).
fn pod_selector(meaning: usize, form: usize) -> Option<LabelSelector> {
    let mut sel = LabelSelector::default();
    match meaning {
        0 => {
            if form == 0 {
                return None;
            }
        }
        1 => {
            sel.match_labels.insert("app".into(), "db".into());
        }
        2 => {
            let v = if form == 0 {
                vals(&["db", "web"])
            } else {
                vals(&["web", "db", "web"])
            };
            sel.match_expressions.push(Requirement::In("app".into(), v));
        }
        _ => {
            let mut e = vec![
                Requirement::Exists("tier".into()),
                Requirement::NotIn("app".into(), vals(&["cache"])),
            ];
            if form == 1 {
                e.reverse();
            }
            sel.match_expressions = e;
        }
    }
    Some(sel)
}

/// Namespace selector number `meaning` (0: every namespace), in variant `form`.
fn namespace_selector(meaning: usize, form: usize) -> LabelSelector {
    let mut sel = LabelSelector::default();
    match meaning {
        0 => {}
        1 => {
            sel.match_labels.insert("team".into(), "blue".into());
        }
        _ => {
            let v = if form == 0 {
                vals(&["blue", "red"])
            } else {
                vals(&["red", "blue"])
            };
            sel.match_expressions
                .push(Requirement::In("team".into(), v));
        }
    }
    sel
}

/// What a generated peer selects, as the generator knows it: (namespace part, pod selector),
/// the namespace part being the policy's namespace only without a namespaceSelector.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Own(String),
    Selector(usize),
}

struct Generated {
    snapshot: ClusterSnapshot,
    /// Per policy key: its ingress rules' pod peers, as (scope, pod selector meaning).
    peers: BTreeMap<String, Vec<(Scope, usize)>>,
}

/// A cluster of 8 namespaces and 400 pods (a tenth on n1, a few IPv4-only), and 60 ingress
/// policies whose rules mix pod peers (often the same selection, written differently, from other
/// namespaces) and ipBlocks.
fn generate(seed: u64) -> Generated {
    let mut rng = super::cache::Rng(seed);
    let mut s = ClusterSnapshot::default();
    let namespaces: Vec<String> = (0..8).map(|i| format!("ns{i}")).collect();
    for (i, ns) in namespaces.iter().enumerate() {
        let team = ["blue", "red", "green"][i % 3];
        s.namespaces.insert(
            ns.clone(),
            convert::implicit_namespace(ns, [("team".to_string(), team.to_string())].into()),
        );
    }
    for i in 0..400u32 {
        let mut labels = crate::model::Labels::new();
        labels.insert("app".into(), ["db", "web", "cache"][rng.below(3)].into());
        if rng.below(2) == 0 {
            labels.insert("tier".into(), "back".into());
        }
        let mut ips: Vec<IpAddr> = vec![format!("10.1.{}.{}", i / 256, i % 256).parse().unwrap()];
        if !i.is_multiple_of(7) {
            ips.push(format!("fd00::1:{i:x}").parse().unwrap());
        }
        s.pods_mut().push(Pod {
            namespace: namespaces[rng.below(namespaces.len())].clone(),
            name: format!("p{i}"),
            labels,
            node_name: Some(if i.is_multiple_of(10) { "n1" } else { "n2" }.into()),
            ips,
            host_network: false,
            phase: PodPhase::Running,
            ports: vec![],
        });
    }
    let mut peers_by_policy = BTreeMap::new();
    for k in 0..60 {
        let namespace = namespaces[rng.below(namespaces.len())].clone();
        let mut rules = Vec::new();
        let mut known = Vec::new();
        for _ in 0..rng.below(3) + 1 {
            let mut peers = Vec::new();
            for _ in 0..rng.below(3) + 1 {
                if rng.below(6) == 0 {
                    let cidr = ["10.1.0.0/24", "10.1.1.0/25", "fd00::1:0/120"][rng.below(3)];
                    peers.push(Peer::IpBlock {
                        cidr: cidr.parse().unwrap(),
                        except: vec![],
                    });
                    continue;
                }
                let pods = rng.below(POD_SELECTORS);
                let form = rng.below(2);
                let scope = if rng.below(2) == 0 {
                    Scope::Own(namespace.clone())
                } else {
                    Scope::Selector(rng.below(NAMESPACE_SELECTORS))
                };
                peers.push(Peer::Pods {
                    namespaces: match &scope {
                        Scope::Own(_) => None,
                        Scope::Selector(m) => Some(namespace_selector(*m, form)),
                    },
                    pods: pod_selector(pods, form),
                });
                known.push((scope, pods));
            }
            rules.push(PolicyRule {
                peers: Some(peers),
                ports: None,
            });
        }
        let policy = Policy {
            namespace,
            name: format!("pol{k}"),
            // Every namespace has local pods with and without `tier`: most policies select some.
            pod_selector: pod_selector([0, 3][rng.below(2)], 0).unwrap_or_default(),
            isolates_ingress: true,
            isolates_egress: false,
            ingress: rules,
            egress: vec![],
        };
        peers_by_policy.insert(policy.key(), known);
        s.policies.push(policy);
    }
    Generated {
        snapshot: s,
        peers: peers_by_policy,
    }
}

/// The pods the generator's selection stands for, judged without the compiler's selection code.
fn members(s: &ClusterSnapshot, scope: &Scope, pods: usize, family: Family) -> BTreeSet<IpAddr> {
    let pod_sel = pod_selector(pods, 1).unwrap_or_default();
    s.pods
        .iter()
        .filter(|p| match scope {
            Scope::Own(ns) => p.namespace == *ns,
            Scope::Selector(m) => {
                namespace_selector(*m, 0).matches(&s.namespaces[&p.namespace].labels)
            }
        })
        .filter(|p| pod_sel.matches(&p.labels))
        .flat_map(|p| p.ips.iter().copied())
        .filter(|ip| Family::of(ip) == family)
        .collect()
}

#[test]
fn one_pod_set_per_distinct_selection_holding_exactly_its_pods() {
    for seed in [3u64, 11, 2024] {
        let g = generate(seed);
        let s = &g.snapshot;
        let states = Compiler::new().compile(s, "n1");
        for family in Family::ALL {
            // The policies that are compiled on n1: those selecting one of its pods that has an
            // address of this family.
            let programmed: Vec<&Policy> = s
                .policies
                .iter()
                .filter(|pol| {
                    s.pods.iter().any(|p| {
                        p.node_name.as_deref() == Some("n1")
                            && pol.selects(p)
                            && p.ips.iter().any(|ip| Family::of(ip) == family)
                    })
                })
                .collect();
            assert!(programmed.len() > 30, "the generator exercises sharing");
            let distinct: BTreeSet<(Scope, usize)> = programmed
                .iter()
                .flat_map(|pol| g.peers[&pol.key()].iter().cloned())
                .collect();
            let written: usize = programmed.iter().map(|pol| g.peers[&pol.key()].len()).sum();
            assert!(
                distinct.len() * 2 < written,
                "selections repeat across rules and policies"
            );
            let state = &states[family];
            let isolation = [true, false].map(|i| crate::compile::names::isolated_set(family, i));
            let pod_sets: Vec<_> = state
                .sets
                .iter()
                .filter(|(name, set)| set.kind == SetKind::HashIp && !isolation.contains(name))
                .map(|(_, set)| set)
                .collect();
            assert_eq!(pod_sets.len(), distinct.len(), "seed {seed} {family}");
            let want: usize = distinct
                .iter()
                .map(|(scope, pods)| members(s, scope, *pods, family).len())
                .sum();
            let got: usize = pod_sets.iter().map(|set| set.members.len()).sum();
            assert_eq!(got, want, "seed {seed} {family}: members");
            for set in state.sets.values() {
                assert_eq!(set.family, family);
                assert!(set.members.iter().all(|m| match set.kind {
                    SetKind::HashIp => matches!(m, SetMember::Ip(ip) if Family::of(ip) == family),
                    SetKind::HashNet =>
                        matches!(m, SetMember::Net(n) if Family::of_net(n) == family),
                    SetKind::HashIpPort => false,
                }));
            }
            // Every set is used by some rule: none is made for a combination of peers.
            let used: BTreeSet<&str> = state
                .chains
                .values()
                .flatten()
                .flat_map(|r| &r.matches)
                .filter_map(|m| match m {
                    Match::Set { name, .. } => Some(name.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(used.len(), state.sets.len());
        }
    }
}

#[test]
fn policies_in_different_namespaces_share_the_set_of_one_selection() {
    let policy = |ns: &str| {
        format!(
            "metadata: {{name: p, namespace: {ns}}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: z}}}}, podSelector: {{matchLabels: {{pod: b}}}}}}, {{podSelector: {{matchLabels: {{pod: c}}}}}}]}}]"
        )
    };
    let s = with_policies(cluster(), &[&policy("x"), &policy("y")]);
    let state = compile(&s, "n1", Family::V4);
    // z/b for both policies; x/c and y/c each in their own namespace.
    let isolation = [true, false].map(|i| crate::compile::names::isolated_set(Family::V4, i));
    let sizes: Vec<usize> = state
        .sets
        .iter()
        .filter(|(name, _)| !isolation.contains(name))
        .map(|(_, set)| set.members.len())
        .collect();
    assert_eq!(sizes, [1, 1, 1], "{:?}", state.sets.keys());
    // The rule with two peers matches each peer's set, not a union made for it.
    let policy_chain = &state.chains[&crate::compile::names::policy_chain(true, "x/p")];
    assert_eq!(policy_chain.len(), 2, "{policy_chain:?}");
    assert!(tcp80(&s, "z/b", "x/a") && tcp80(&s, "x/c", "x/a") && !tcp80(&s, "y/c", "x/a"));
    assert!(tcp80(&s, "z/b", "y/a") && tcp80(&s, "y/c", "y/a") && !tcp80(&s, "x/c", "y/a"));
}
