//! End-to-end in Kubernetes mode with ClusterNetworkPolicy: the agent starts while the CRD is not
//! installed (ready, NetworkPolicy enforced), picks the kind up when the CRD is installed later,
//! enforces an Admin Deny over a NetworkPolicy allow and a Baseline Deny where no NetworkPolicy
//! selects, with real packets on both families, and lets everything through again when the CRD
//! is deleted. Needs root.

use kni_testlab::fakeapi;
use kni_testlab::lab;

use fakeapi::{FakeApi, Kind};
use lab::{Lab, Proto, http_get, probe, skip_unless_root, wait_until};
use std::time::Duration;

/// The agent asks discovery every 10 s while the CRD is absent (`CRD_RECHECK`), plus a sync.
const PICKED_UP: Duration = Duration::from_secs(20);

#[test]
fn cluster_policies_are_enforced_once_their_crd_is_installed_and_dropped_with_it() {
    if skip_unless_root(
        "cluster_policies_are_enforced_once_their_crd_is_installed_and_dropped_with_it",
    ) {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let runtime = fakeapi::runtime();
    let _guard = runtime.enter();
    let node_ns = lab.nodes[0].netns.clone();
    let api = FakeApi::start(lab.loopback_listener(0));
    api.apply_namespaces(&lab::NAMESPACES, true);
    for p in &lab.pods {
        api.apply(Kind::Pod, &p.api_manifest("containers: [{name: c}]"));
    }
    // x/a admits y only (NetworkPolicy).
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: from-y, namespace: x}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
    );
    let mut agent = lab.spawn_kube_agent(&api.kubeconfig(), "legacy", &["--deny-action", "reject"]);
    // Not installed: ready, and NetworkPolicy is enforced.
    wait_until("ready without the CRD", Duration::from_secs(15), || {
        http_get(&node_ns, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    let reach = |from: &str, to: &str, v6: bool| {
        lab.forget_flows();
        probe(&lab.pod(from).netns, lab.pod(to).ip(v6), Proto::Tcp, 80)
    };
    wait_until("NetworkPolicy enforced", Duration::from_secs(10), || {
        !reach("z/a", "x/a", false)
    });
    assert!(reach("y/a", "x/a", false));

    // Installed later, with an Admin Deny of y/b over the NetworkPolicy's allow and a Baseline
    // Deny from z to x/b (no NetworkPolicy selects x/b).
    api.install_cluster_policy_crd();
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: no-y-b}\nspec: {tier: Admin, priority: 5, subject: {namespaces: {matchLabels: {ns: x}}}, ingress: [{name: deny-y-b, action: Deny, from: [{pods: {namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}}]}]}",
    );
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: baseline-no-z}\nspec: {tier: Baseline, priority: 5, subject: {namespaces: {matchLabels: {ns: x}}}, ingress: [{action: Deny, from: [{namespaces: {matchLabels: {ns: z}}}]}]}",
    );
    let took = wait_until("the Admin Deny enforced", PICKED_UP, || {
        !reach("y/b", "x/a", false)
    });
    eprintln!("a ClusterNetworkPolicy applied with its CRD was enforced after {took:?}");
    for v6 in [false, true] {
        assert!(
            !reach("y/b", "x/a", v6),
            "Admin Deny over the NetworkPolicy allow (v6={v6})"
        );
        assert!(
            reach("y/a", "x/a", v6),
            "the NetworkPolicy still allows y/a (v6={v6})"
        );
        assert!(
            !reach("z/a", "x/b", v6),
            "Baseline Deny where no NetworkPolicy selects (v6={v6})"
        );
        assert!(reach("y/a", "x/b", v6), "Baseline denies z only (v6={v6})");
        assert!(reach("z/a", "y/a", v6), "y is no subject (v6={v6})");
    }
    let (_, metrics) = http_get(&node_ns, "/metrics").unwrap();
    assert!(
        metrics.contains("kni_cluster_network_policies{tier=\"Admin\"} 1")
            && metrics.contains("kni_cluster_network_policies{tier=\"Baseline\"} 1"),
        "{metrics}"
    );

    // The CRD deleted: its policies go, the NetworkPolicy stays, the agent stays ready.
    api.remove_cluster_policy_crd();
    wait_until("the cluster policies dropped", PICKED_UP, || {
        reach("y/b", "x/a", false)
    });
    for v6 in [false, true] {
        assert!(reach("z/a", "x/b", v6), "v6={v6}");
        assert!(
            !reach("z/a", "x/a", v6),
            "the NetworkPolicy stays (v6={v6})"
        );
    }
    assert_eq!(http_get(&node_ns, "/readyz").map(|(c, _)| c), Some(200));
    assert!(agent.try_wait().unwrap().is_none(), "the agent is running");
}
