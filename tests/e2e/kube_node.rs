//! End-to-end in Kubernetes mode: new-pod isolation takes this node's pod CIDRs from its Node
//! object, watched alone (a field selector on its name), and follows pods created through the API.
//! Needs root; without it the test says SKIPPED loudly and passes.

use kni_testlab::fakeapi;
use kni_testlab::lab;

use fakeapi::{FakeApi, Kind};
use lab::{Lab, Proto, http_get, probe, skip_unless_root, wait_until};
use std::time::Duration;

fn pod_doc(p: &lab::LabPod) -> String {
    p.api_manifest("containers: [{name: c}]")
}

#[test]
fn pod_cidrs_come_from_this_nodes_node_object() {
    if skip_unless_root("pod_cidrs_come_from_this_nodes_node_object") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let runtime = fakeapi::runtime();
    let _guard = runtime.enter();
    let node_ns = lab.nodes[0].netns.clone();
    let api = FakeApi::start(lab.loopback_listener(0));
    api.apply_namespaces(&lab::NAMESPACES, false);
    for p in lab.pods.iter().filter(|p| p.key() != "z/c") {
        api.apply(Kind::Pod, &pod_doc(p));
    }
    api.apply(
        Kind::Node,
        "metadata: {name: node1}\nspec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:244:1::/64']}",
    );
    // Another node's CIDRs must not be used (nor even be read).
    api.apply(
        Kind::Node,
        "metadata: {name: node2}\nspec: {podCIDRs: [10.244.0.0/16]}",
    );
    let mut agent = lab.spawn_kube_agent(&api.kubeconfig(), "nft", &[]);
    wait_until("ready", Duration::from_secs(15), || {
        http_get(&node_ns, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    let (a, c) = (lab.pod("x/a").clone(), lab.pod("z/c").clone());
    // The Node is read after the first sync may have run: wait for the address to close.
    wait_until("z/c closed", Duration::from_secs(10), || {
        !probe(&a.netns, c.ip(false), Proto::Tcp, 80)
    });
    assert!(!probe(&a.netns, c.ip(true), Proto::Udp, 80), "IPv6 too");
    assert!(probe(&node_ns, c.ip(false), Proto::Tcp, 80), "node -> z/c");
    // node2's wider CIDR is not used: x/b's address is known, and 10.244.0.0/16 outside node1's
    // /24 is not guarded at all (nothing to probe there; checked through the requests below).
    assert!(probe(&a.netns, lab.pod("x/b").ip(false), Proto::Tcp, 80));

    api.apply(Kind::Pod, &pod_doc(&c));
    wait_until(
        "z/c open once its pod exists",
        Duration::from_secs(10),
        || probe(&a.netns, c.ip(false), Proto::Tcp, 80),
    );
    api.delete(Kind::Pod, "z/c");
    wait_until(
        "z/c closed once its pod is gone",
        Duration::from_secs(10),
        || !probe(&a.netns, c.ip(false), Proto::Tcp, 80),
    );

    let node_requests = api.requests_of(Kind::Node, false);
    assert!(!node_requests.is_empty());
    for r in node_requests
        .iter()
        .chain(api.requests_of(Kind::Node, true).iter())
    {
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("metadata.name=node1"),
            "{r:?}"
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
}
