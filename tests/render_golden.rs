//! Golden test of the exact restore text for the demo manifests. Packets prove behaviour (see
//! tests/e2e/); this pins the rendered form so changes to it are seen in review.
//! Regenerate after an intended change: KNI_BLESS=1 cargo test --test render_golden

use std::process::Command;

/// `render` of the demo manifests with `extra` flags, compared with (or, with KNI_BLESS, written to)
/// `tests/golden/<golden>`.
fn render_demo_as_recorded(extra: &[&str], golden: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifests = format!("{root}/manifests/demo");
    let mut args = vec![
        "render",
        "--manifests",
        &manifests,
        "--node-name",
        "demo-node",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_kube-netpol-iptables"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8(out.stdout).unwrap();
    let golden = format!("{root}/tests/golden/{golden}");
    if std::env::var_os("KNI_BLESS").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("golden file (KNI_BLESS=1 to create)");
    assert_eq!(
        got, want,
        "rendered text changed; if intended, run KNI_BLESS=1 cargo test --test render_golden"
    );
    got
}

#[test]
fn demo_manifests_render_as_recorded() {
    render_demo_as_recorded(&[], "demo.render");
}

/// `--deny-action reject`: the pod chains end with a TCP reset and an ICMP unreachable instead of
/// the default DROP.
#[test]
fn demo_manifests_render_with_reject_as_recorded() {
    let got = render_demo_as_recorded(&["--deny-action", "reject"], "demo-reject.render");
    assert!(got.contains("-j REJECT --reject-with tcp-reset"));
    assert!(!got.contains("-j DROP"));
}

#[test]
fn render_reports_bad_manifests_with_file_and_document() {
    let dir = std::env::temp_dir().join(format!("kni-render-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("p.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {matchExpressions: [{key: a, operator: Maybe}]}}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kube-netpol-iptables"))
        .args([
            "render",
            "--manifests",
            dir.to_str().unwrap(),
            "--node-name",
            "n",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("p.yaml document 1 (NetworkPolicy x/p)"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown operator \"Maybe\""), "{stderr}");
}
