//! Profiling aid: replays the benchmark's incremental changes through the cached compile.
//! `cargo build --release --example profile_compile && perf record -g target/release/examples/profile_compile`
use kni_testlab::synthetic;
use kube_netpol_iptables::compile::Compiler;
use kube_netpol_iptables::reconcile::desired_states_cached;
use std::time::Instant;

fn main() {
    let p = synthetic::Params::default();
    let mut s = synthetic::generate(&p);
    let mut cache = Compiler::new();
    let mut keep = desired_states_cached(&s, synthetic::LOCAL_NODE, &mut cache);
    let mut step = |what: &str, s: &kube_netpol_iptables::model::ClusterSnapshot| {
        let t = Instant::now();
        // Keep the previous result alive, as the dataplane does: shared sets must be copied on write.
        let next = desired_states_cached(s, synthetic::LOCAL_NODE, &mut cache);
        eprintln!("{what}: {:?}", t.elapsed());
        keep = next;
    };
    let mut new_pod = s.pods[p.local_pods].clone();
    new_pod.name = "bench-new".into();
    new_pod.node_name = Some(synthetic::LOCAL_NODE.into());
    let (v4, v6) = synthetic::pod_ips(p.pods + 1);
    new_pod.ips = vec![v4, v6];
    s.pods_mut().push(new_pod);
    step("pod added", &s);
    s.pods_mut().pop();
    step("pod deleted", &s);
    let remote = p.local_pods + 7;
    s.pods_mut()[remote]
        .labels
        .insert("tier".into(), "db".into());
    s.pods_mut()[remote]
        .labels
        .insert("version".into(), "v2".into());
    step("remote label", &s);
    s.namespaces
        .get_mut("ns-3")
        .unwrap()
        .labels
        .insert("env".into(), "prod".into());
    step("namespace label", &s);
    let idx = s
        .policies
        .iter()
        .position(|x| x.namespace == s.pods[0].namespace)
        .unwrap();
    s.policies[idx].ingress.truncate(1);
    step("policy changed", &s);
    drop(keep);
}
