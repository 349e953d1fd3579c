//! Golden test of `render --deny-action reject`: the pod chains end with a TCP reset and an ICMP
//! unreachable instead of the default DROP (tests/render_golden.rs pins the default).
//! Regenerate after an intended change: KNI_BLESS=1 cargo test --test render_deny_action

use std::process::Command;

#[test]
fn demo_manifests_render_with_reject_as_recorded() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_kube-netpol-iptables"))
        .args([
            "render",
            "--manifests",
            &format!("{root}/manifests/demo"),
            "--node-name",
            "demo-node",
            "--deny-action",
            "reject",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8(out.stdout).unwrap();
    let golden = format!("{root}/tests/golden/demo-reject.render");
    if std::env::var_os("KNI_BLESS").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("golden file (KNI_BLESS=1 to create)");
    assert_eq!(
        got, want,
        "rendered text changed; if intended, run KNI_BLESS=1 cargo test --test render_deny_action"
    );
    assert!(got.contains("-j REJECT --reject-with tcp-reset"));
    assert!(!got.contains("-j DROP"));
}
