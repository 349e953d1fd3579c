//! Large clusters compile (no rendering, no kernel).

use super::*;

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
        s.pods_mut().push(Pod {
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
    // A new flow meets one set lookup per direction, however many local pods are isolated.
    let forward = &state.chains[crate::compile::names::FORWARD_CHAIN];
    assert_eq!(forward.len(), 4, "{forward:?}");
    assert!(
        peer_sets(&state).all(|set| set.members.len() == 3000),
        "each team has 100 namespaces x 30 pods"
    );
    assert!(
        peer_sets(&compile(&s, "n1", Family::V6)).all(|set| set.members.is_empty()),
        "no IPv6 addresses"
    );
}

/// Walks the dispatch chains as the kernel would for a packet whose subject address is `ip`:
/// the pod chains it jumps to, in order, and how many rules it evaluated on the way.
fn dispatch_walk(
    state: &DesiredState,
    chain: &str,
    ingress: bool,
    ip: IpAddr,
) -> (Vec<String>, usize) {
    use crate::compile::ir::{Match, Target};
    let (mut reached, mut evaluated) = (Vec::new(), 0);
    for rule in &state.chains[chain] {
        evaluated += 1;
        let hit = rule.matches.iter().all(|m| match (m, ingress) {
            (Match::Destination(net), true) | (Match::Source(net), false) => net.contains(&ip),
            _ => panic!("a dispatch rule matches the subject's address only: {m:?}"),
        });
        match &rule.target {
            Target::Jump(next) if hit && next.starts_with("KNI-DISP") => {
                let (more, n) = dispatch_walk(state, next, ingress, ip);
                reached.extend(more);
                evaluated += n;
            }
            Target::Jump(next) if hit => reached.push(next.clone()),
            _ => {}
        }
    }
    (reached, evaluated)
}

#[test]
fn a_new_flow_reaches_its_pod_chain_through_a_logarithmic_dispatch() {
    // 250 isolated local pods (a kubelet's --max-pods), addresses as a node's pod CIDR gives them,
    // plus IPv6 addresses spread one bit apart (the depth limit), one address shared by two pods
    // and one pod with two addresses of a family.
    let mut s = ClusterSnapshot::default();
    s.namespaces.insert(
        "ns".into(),
        convert::implicit_namespace("ns", Default::default()),
    );
    let mut pods: Vec<(String, Vec<IpAddr>)> = (0..250u32)
        .map(|i| {
            let v4 = IpAddr::from(std::net::Ipv4Addr::from(0x0af4_0100 + i + 2));
            let v6 = if i < 40 {
                IpAddr::from(std::net::Ipv6Addr::from(
                    0xfd00u128 << 112 | 1u128 << (i * 3),
                ))
            } else {
                IpAddr::from(std::net::Ipv6Addr::from(
                    0xfd00u128 << 112 | 0x1_0000 | u128::from(i),
                ))
            };
            (format!("p{i}"), vec![v4, v6])
        })
        .collect();
    pods.push(("twin".into(), pods[7].1.clone()));
    pods.push((
        "two-addresses".into(),
        vec!["10.244.9.1".parse().unwrap(), "10.244.9.2".parse().unwrap()],
    ));
    for (name, ips) in &pods {
        s.pods_mut().push(Pod {
            namespace: "ns".into(),
            name: name.clone(),
            labels: Default::default(),
            node_name: Some("n1".into()),
            ips: ips.clone(),
            host_network: false,
            phase: PodPhase::Running,
            ports: vec![],
        });
    }
    let s = with_policies(
        s,
        &[
            "metadata: {name: all, namespace: ns}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]",
        ],
    );
    for family in [Family::V4, Family::V6] {
        let state = compile(&s, "n1", family);
        for ingress in [true, false] {
            let root = if ingress {
                crate::compile::names::INGRESS_DISPATCH_CHAIN
            } else {
                crate::compile::names::EGRESS_DISPATCH_CHAIN
            };
            let mut longest = 0;
            for (name, ips) in &pods {
                for ip in ips.iter().filter(|ip| Family::of(ip) == family) {
                    let (reached, evaluated) = dispatch_walk(&state, root, ingress, *ip);
                    let mut want = vec![crate::compile::names::pod_chain(
                        ingress,
                        &format!("ns/{name}"),
                    )];
                    let owners: Vec<_> = pods.iter().filter(|(_, o)| o.contains(ip)).collect();
                    if owners.len() > 1 {
                        // Both claimants of the shared address, in the order a list would meet them.
                        want = owners
                            .iter()
                            .map(|(n, _)| {
                                crate::compile::names::pod_chain(ingress, &format!("ns/{n}"))
                            })
                            .collect();
                        want.sort_by_key(|c| reached.iter().position(|r| r == c));
                    }
                    assert_eq!(reached, want, "{family:?} {ip} ingress={ingress}");
                    longest = longest.max(evaluated);
                }
            }
            // One rule per address would be up to 253; the sequential IPv4 addresses split evenly
            // (two rules a level, then a leaf), the spread IPv6 ones stop at the depth limit.
            let bound = if family == Family::V4 { 24 } else { 60 };
            assert!(
                longest <= bound,
                "{family:?} ingress={ingress}: {longest} rules walked"
            );
        }
    }
}
