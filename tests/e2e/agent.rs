//! End-to-end behaviour of the agent itself (beyond policy semantics): node traffic, converging
//! from previous state, leaving other firewalls alone, cleanup, bad input, watching the directory,
//! and switching backends. Needs root; without it every test says SKIPPED loudly and passes.

use kni_testlab::lab;

use lab::{Lab, Proto, probe, skip_unless_root};
use std::time::{Duration, Instant};

const DENY_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}";
const ALLOW_X_FROM_Y: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: web}]}]";

fn one_node_lab() -> Lab {
    Lab::new(crate::AGENT, 1, |_, _| 0)
}

/// Rules and chains of both families, per table, without counters: for exact comparisons. Empty
/// tables with default policies are left out (reading a table instantiates it).
fn tables(lab: &Lab, backend: &str) -> String {
    let mut out = String::new();
    for tool in ["iptables", "ip6tables"] {
        let text = lab.node_cmd(0, &[&format!("{tool}-{backend}-save")]);
        let mut table = "";
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t;
            } else if line.starts_with("-A") {
                out.push_str(&format!("{tool} {table} {line}\n"));
            } else if let Some(chain) = line.strip_prefix(':') {
                // Chain name and policy; counters change with traffic.
                let mut words = chain.split_whitespace();
                let (name, policy) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                if policy != "ACCEPT" {
                    out.push_str(&format!("{tool} {table} :{name} {policy}\n"));
                }
            }
        }
    }
    out
}

fn set_names(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = lab
        .node_cmd(0, &["ipset", "list", "-n"])
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

fn owned_chains(lab: &Lab, backend: &str) -> Vec<String> {
    ["iptables", "ip6tables"]
        .iter()
        .flat_map(|tool| {
            let save = lab.node_cmd(0, &[&format!("{tool}-{backend}-save"), "-t", "filter"]);
            save.lines()
                .filter_map(|l| l.strip_prefix(":KNI-"))
                .map(|c| format!("KNI-{}", c.split_whitespace().next().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn node_reaches_isolated_pods_and_pod_to_node_follows_egress() {
    if skip_unless_root("node_reaches_isolated_pods_and_pod_to_node_follows_egress") {
        return;
    }
    let lab = one_node_lab();
    lab.write_cluster_manifests(&[DENY_X]);
    lab.sync_all("nft");
    let node = &lab.nodes[0];
    for v6 in [false, true] {
        // kubelet-style traffic from the node to an isolated pod is always allowed.
        assert!(
            probe(&node.netns, lab.pod("x/a").ip(v6), Proto::Tcp, 80),
            "node -> x/a (v6={v6})"
        );
        assert!(
            probe(&node.netns, lab.pod("x/a").ip(v6), Proto::Udp, 81),
            "node -> x/a udp (v6={v6})"
        );
        let node_ip = if v6 { node.v6.into() } else { node.v4.into() };
        // An egress-isolated pod cannot reach its node; others can.
        assert!(
            !probe(&lab.pod("x/a").netns, node_ip, Proto::Tcp, 80),
            "x/a -> node (v6={v6})"
        );
        assert!(
            probe(&lab.pod("y/a").netns, node_ip, Proto::Tcp, 80),
            "y/a -> node (v6={v6})"
        );
    }
}

#[test]
fn converges_from_previous_runs_and_leaves_other_rules_alone() {
    if skip_unless_root("converges_from_previous_runs_and_leaves_other_rules_alone") {
        return;
    }
    for backend in ["legacy", "nft"] {
        let lab = one_node_lab();
        let ipt = format!("iptables-{backend}");
        // Rules of kube-proxy, a CNI and a host firewall, there before the agent.
        for args in [
            vec!["-N", "KUBE-FORWARD"],
            vec!["-A", "FORWARD", "-j", "KUBE-FORWARD"],
            vec![
                "-A",
                "KUBE-FORWARD",
                "-m",
                "mark",
                "--mark",
                "0x4000/0x4000",
                "-j",
                "ACCEPT",
            ],
            vec!["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
            vec![
                "-A",
                "OUTPUT",
                "-m",
                "comment",
                "--comment",
                "host firewall",
                "-j",
                "RETURN",
            ],
            vec!["-t", "nat", "-N", "CNI-NAT"],
            vec!["-t", "nat", "-A", "POSTROUTING", "-j", "CNI-NAT"],
        ] {
            let mut full = vec![ipt.as_str()];
            full.extend(args);
            lab.node_cmd(0, &full);
        }
        lab.node_cmd(0, &["ipset", "create", "foreign-set", "hash:ip"]);
        let before_tables = tables(&lab, backend);
        let before_sets = set_names(&lab);

        lab.write_cluster_manifests(&[DENY_X]);
        lab.sync_all(backend);
        assert!(!lab.tcp("y/a", "x/a", 80));
        let first_chains = owned_chains(&lab, backend);

        // A different directory converges: allowed flows open, stale chains and sets go.
        lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
        lab.sync_all(backend);
        assert!(lab.tcp("y/a", "x/a", 80), "x/a names port 80 web");
        assert!(!lab.tcp("y/a", "x/a", 81));
        assert!(!lab.tcp("z/a", "x/a", 80));
        assert!(lab.tcp("x/a", "z/a", 80), "no egress isolation any more");
        let chains = owned_chains(&lab, backend);
        let rendered = lab.render();
        for chain in &chains {
            assert!(
                rendered.contains(&format!(":{chain} ")),
                "stale chain {chain} left in the kernel"
            );
        }
        assert!(
            first_chains.iter().any(|c| !chains.contains(c)),
            "the deny policy's chains were removed"
        );
        for set in set_names(&lab)
            .iter()
            .filter(|s| s.starts_with("KNI-") && *s != "KNI-SETS")
        {
            assert!(
                rendered.contains(&format!("create {set} ")),
                "stale set {set} left in the kernel"
            );
        }

        // Someone inserts a rule above our jump while we run: the next sync puts ours first again
        // and keeps theirs.
        lab.node_cmd(0, &[&ipt, "-I", "FORWARD", "1", "-j", "KUBE-FORWARD"]);
        lab.sync_all(backend);
        let save = lab.node_cmd(0, &[&format!("{ipt}-save"), "-t", "filter"]);
        let forward: Vec<&str> = save
            .lines()
            .filter(|l| l.starts_with("-A FORWARD"))
            .collect();
        assert!(forward[0].contains("-j KNI-FORWARD"), "{forward:?}");
        assert_eq!(
            forward.iter().filter(|l| l.contains("KNI-")).count(),
            1,
            "{forward:?}"
        );
        assert_eq!(
            forward
                .iter()
                .filter(|l| l.contains("-j KUBE-FORWARD"))
                .count(),
            2,
            "{forward:?}"
        );
        lab.node_cmd(0, &[&ipt, "-D", "FORWARD", "-j", "KUBE-FORWARD"]);

        // Running twice with the same input writes the same state.
        let settled = tables(&lab, backend);
        lab.sync_all(backend);
        assert_eq!(settled, tables(&lab, backend));

        // cleanup removes exactly what is ours.
        let out = lab.agent(0, &["cleanup"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            tables(&lab, backend),
            before_tables,
            "{backend}: cleanup must restore the other rules exactly"
        );
        assert_eq!(set_names(&lab), before_sets);
        assert!(lab.tcp("z/a", "x/a", 81));
    }
}

#[test]
fn a_bad_manifest_changes_nothing_and_names_the_file() {
    if skip_unless_root("a_bad_manifest_changes_nothing_and_names_the_file") {
        return;
    }
    let lab = one_node_lab();
    lab.write_cluster_manifests(&[DENY_X]);
    lab.sync_all("nft");
    let before = (tables(&lab, "nft"), lab.node_cmd(0, &["ipset", "save"]));
    lab.write_file(
        "zz-bad.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: w}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/40}}]}]}\n",
    );
    let dir = lab.manifests_dir().to_str().unwrap().to_string();
    let out = lab.agent(
        0,
        &[
            "run",
            "--manifests",
            &dir,
            "--node-name",
            "node1",
            "--once",
            "--backend",
            "nft",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("zz-bad.yaml document 2 (NetworkPolicy x/bad)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.ingress[0].from[0].ipBlock.cidr"),
        "{stderr}"
    );
    assert_eq!(
        before,
        (tables(&lab, "nft"), lab.node_cmd(0, &["ipset", "save"]))
    );
    assert!(!lab.tcp("y/a", "x/a", 80));
}

#[test]
fn watches_the_directory_and_keeps_the_last_good_state() {
    if skip_unless_root("watches_the_directory_and_keeps_the_last_good_state") {
        return;
    }
    let lab = one_node_lab();
    lab.write_cluster_manifests(&[]);
    // Refused probes answer at once; a dropped one would add its timeout to the measured time.
    let mut agent = lab.spawn_agent("legacy", &["--deny-action", "reject"]);
    let wait_for = |what: &str, want: bool, limit: Duration| {
        let start = Instant::now();
        loop {
            lab.forget_flows();
            if lab.tcp("y/a", "x/a", 80) == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not reached within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The first sync has happened once our chains exist (open traffic alone proves nothing).
    let start = Instant::now();
    while !owned_chains(&lab, "legacy").contains(&"KNI-FORWARD".to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the agent never synced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for("initial sync", true, Duration::from_secs(1));
    lab.write_cluster_manifests(&[DENY_X]);
    let took = wait_for("deny applied", false, Duration::from_secs(3));
    eprintln!("policy change reached the kernel in {took:?}");
    assert!(
        took < Duration::from_secs(1) + Duration::from_millis(500),
        "took {took:?}"
    );

    // A broken file: the last good state stays.
    lab.write_file(
        "broken.yaml",
        "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: [\n",
    );
    lab.write_cluster_manifests(&[]);
    std::thread::sleep(Duration::from_millis(1500));
    lab.forget_flows();
    assert!(
        !lab.tcp("y/a", "x/a", 80),
        "a broken directory must not open traffic"
    );
    std::fs::remove_file(lab.manifests_dir().join("broken.yaml")).unwrap();
    wait_for("fixed directory applied", true, Duration::from_secs(3));
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn switching_backends_removes_our_rules_from_the_other() {
    if skip_unless_root("switching_backends_removes_our_rules_from_the_other") {
        return;
    }
    let lab = one_node_lab();
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    lab.sync_all("legacy");
    assert!(!owned_chains(&lab, "legacy").is_empty());
    // Switch backends and policies at once: the legacy rules still use sets the new state drops.
    lab.write_cluster_manifests(&[DENY_X]);
    lab.sync_all("nft");
    assert!(
        owned_chains(&lab, "legacy").is_empty(),
        "legacy leftovers must go"
    );
    assert!(!owned_chains(&lab, "nft").is_empty());
    assert!(!lab.tcp("y/a", "x/a", 80), "still enforced, now by nft");
    assert!(lab.tcp("y/a", "z/a", 80));
    let rendered = lab.render();
    for set in set_names(&lab)
        .iter()
        .filter(|s| s.starts_with("KNI-") && *s != "KNI-SETS")
    {
        assert!(
            rendered.contains(&format!("create {set} ")),
            "stale set {set} left in the kernel"
        );
    }
}
