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
