//! The in-memory kernel refuses what the kernel refuses, so the sync tests mean something.

use super::*;

fn kernel() -> MemoryKernel {
    let kernel = MemoryKernel::new(Backend::Nft);
    kernel.foreign_ipset("create KNI-4P-1 hash:net family inet maxelem 2\n");
    kernel.foreign_iptables(
        Family::V4,
        "*filter\n:KNI-A - [0:0]\n-A KNI-A -m set --match-set KNI-4P-1 src -j RETURN\n-A FORWARD -j KNI-A\nCOMMIT\n",
    );
    kernel
}

#[test]
fn an_iptables_restore_applies_whole_or_not_at_all() {
    let kernel = kernel();
    let before = kernel.iptables_save(Family::V4).unwrap();
    for bad in [
        "*filter\n:KNI-B - [0:0]\n-A KNI-B -j KNI-MISSING\nCOMMIT\n",
        "*filter\n:KNI-B - [0:0]\n-A KNI-B -m set --match-set KNI-4P-9 src -j RETURN\nCOMMIT\n",
        "*filter\n:KNI-B - [0:0]\n-X KNI-A\nCOMMIT\n",
        "*filter\n:KNI-B - [0:0]\n-D FORWARD -j KNI-B\nCOMMIT\n",
    ] {
        let err = kernel.iptables_restore(Family::V4, bad).unwrap_err();
        assert_eq!(err.metric_label(), "restore_rejected", "{bad}");
        assert_eq!(kernel.iptables_save(Family::V4).unwrap(), before, "{bad}");
    }
    // Declaring a chain flushes it; unreferenced and empty, it can be deleted.
    kernel
        .iptables_restore(
            Family::V4,
            "*filter\n:KNI-A - [0:0]\n-D FORWARD -j KNI-A\n-X KNI-A\nCOMMIT\n",
        )
        .unwrap();
    assert!(!kernel.iptables_save(Family::V4).unwrap().contains("KNI-A"));
}

#[test]
fn a_set_in_use_is_not_destroyed_and_a_full_set_takes_no_more() {
    let kernel = kernel();
    let err = kernel.ipset_restore("destroy KNI-4P-1\n").unwrap_err();
    assert!(
        matches!(err, DataplaneError::SetInUse { ref set, .. } if set == "KNI-4P-1"),
        "{err}"
    );
    let err = kernel
        .ipset_restore("add KNI-4P-1 10.0.0.1\nadd KNI-4P-1 10.0.0.2\nadd KNI-4P-1 10.0.0.3\n")
        .unwrap_err();
    let blamed = match &err {
        DataplaneError::RestoreRejected { line, .. } => line.as_ref().map(|l| l.number),
        _ => None,
    };
    assert_eq!(blamed, Some(3), "{err}");
    // ipset applies line by line: the first two stay.
    assert_eq!(kernel.state().sets["KNI-4P-1"].members.len(), 2);
    kernel.foreign_ipset("create KNI-4P-2 hash:net family inet maxelem 8\nadd KNI-4P-2 10.9.0.1\n");
    kernel.ipset_restore("swap KNI-4P-1 KNI-4P-2\n").unwrap();
    assert_eq!(kernel.state().sets["KNI-4P-1"].members, ["10.9.0.1"]);
    kernel.foreign_ipset("create KNI-4N-3 hash:ip,port family inet\n");
    assert!(
        kernel.ipset_restore("swap KNI-4P-2 KNI-4N-3\n").is_err(),
        "types differ"
    );
}
