//! The agent says at start whether another NetworkPolicy engine's nftables table is on its node
//! (kube-network-policies, or kind's kindnetd that embeds it). The tables are made with `nft` in
//! the lab node's own network namespace. Needs root and `nft` (hack/lib.sh installs nftables).

use kni_testlab::lab;

use lab::{Lab, skip_unless_root};

fn nft_available(test: &str) -> bool {
    let found = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("KNI_E2E_REQUIRED").is_none(),
            "{test}: KNI_E2E_REQUIRED is set but `nft` is missing (hack/lib.sh installs nftables)"
        );
        eprintln!("\n*** SKIPPED {test}: `nft` is not installed (apt-get install nftables) ***\n");
    }
    found
}

fn start_log(lab: &Lab) -> String {
    let out = lab.once("nft", &[], &[]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "agent failed: {log}");
    log
}

#[test]
fn logs_other_engines_tables_present_on_the_node() {
    if skip_unless_root("logs_other_engines_tables_present_on_the_node")
        || !nft_available("logs_other_engines_tables_present_on_the_node")
    {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[]);

    // A table that is not an engine's must not be reported.
    lab.node_cmd(0, &["nft", "add", "table", "inet", "filter-of-someone"]);
    let log = start_log(&lab);
    assert!(
        !log.contains("of another NetworkPolicy engine"),
        "reported an engine where there is none:\n{log}"
    );
    assert!(
        log.contains("this agent is the only NetworkPolicy engine here"),
        "says plainly that no other engine was found:\n{log}"
    );

    lab.node_cmd(0, &["nft", "add", "table", "inet", "kube-network-policies"]);
    lab.node_cmd(
        0,
        &["nft", "add", "table", "ip", "kindnet-network-policies"],
    );
    let log = start_log(&lab);
    for table in ["inet kube-network-policies", "ip kindnet-network-policies"] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("nftables table {table} ")))
            .unwrap_or_else(|| panic!("no line about {table}:\n{log}"));
        // Nothing listens on an nfqueue in the lab: the other engine is fail-open and inert.
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("enforces nothing"), "{line}");
    }
    assert!(!log.contains("filter-of-someone"), "{log}");
    assert!(!log.contains("the only NetworkPolicy engine"), "{log}");

    lab.node_cmd(
        0,
        &["nft", "delete", "table", "inet", "kube-network-policies"],
    );
    lab.node_cmd(
        0,
        &["nft", "delete", "table", "ip", "kindnet-network-policies"],
    );
    let log = start_log(&lab);
    assert!(
        !log.contains("of another NetworkPolicy engine")
            && log.contains("this agent is the only NetworkPolicy engine here"),
        "reported a table that is gone:\n{log}"
    );
}
