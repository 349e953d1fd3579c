//! `explain --kubeconfig`: the real binary lists a (fake) API server once, explains and exits.

use kni_testlab::fakeapi::{FakeApi, Kind, seed};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_lists_the_cluster_once_and_exits() {
    let api = FakeApi::start_local();
    seed(&api);
    api.apply(
        Kind::Pod,
        "metadata: {name: b, namespace: y}\nspec: {nodeName: n2, containers: [{name: c}]}\nstatus: {phase: Running, podIPs: [{ip: 10.0.0.2}]}",
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let bin = env!("CARGO_BIN_EXE_kube-netpol-iptables");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .arg("explain")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--from", "y/b", "--to", "x/a", "--port", "80", "--output", "json",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    // x/deny isolates x/a for ingress and allows nothing.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["allowed"], false, "{json}");
    assert_eq!(json["ingress"]["isolating_policies"][0], "x/deny");
    assert_eq!(json["to"]["node"], "n1");
    assert_eq!(json["from"]["node"], "n2");
    assert_eq!(json["egress"]["isolated"], false);
}
