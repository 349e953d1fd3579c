//! End-to-end under faults and hostile input: missing kernel features, a held xtables lock, a
//! rejected line, a set someone else still uses, SIGTERM mid-run, a vanished manifests directory,
//! names at the length limits, hostile labels, thousands of peers, other firewalls' rules and
//! backend detection. Faults that cannot be caused for real (a missing module) are injected with
//! tool shims on PATH. Needs root; without it every test says SKIPPED loudly and passes.

use kni_testlab::lab;

use lab::{Lab, Proto, http_get, probe, remote_pods, skip_unless_root, wait_until};
use std::process::Command;
use std::time::Duration;

const DENY_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}";
const ALLOW_X_FROM_Y: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]";

#[test]
fn a_missing_kernel_feature_is_named_and_nothing_is_programmed() {
    if skip_unless_root("a_missing_kernel_feature_is_named_and_nothing_is_programmed") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X]);
    // An ipset whose kernel lacks hash:ip,port.
    let (shim_dir, path) = lab.shims(
        &[(
            "ipset",
            "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *hash:ip,port*) echo 'ipset v7.17: Kernel error received: set type not supported' >&2; exit 1;; esac\nprintf '%s\\n' \"$input\" | /usr/sbin/ipset \"$@\"\n",
        )],
    );
    let out = lab.once("nft", &[("PATH", path)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ipset type hash:ip,port (kernel module ip_set_hash_ipport)"),
        "{stderr}"
    );
    assert!(stderr.contains("modprobe"), "{stderr}");
    assert_eq!(lab.our_state("nft"), "", "nothing may be programmed");
    assert!(lab.tcp("y/a", "x/a", 80), "the node is untouched");
    let _ = std::fs::remove_dir_all(shim_dir);
}

#[test]
fn a_rejected_line_is_quoted_and_the_last_good_state_stays() {
    if skip_unless_root("a_rejected_line_is_quoted_and_the_last_good_state_stays") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X]);
    lab.sync_all("nft");
    let good = lab.our_state("nft");
    // iptables-restore rejects the batch that brings the new policy's chain.
    let (shim_dir, path) = lab.shims(
        &[(
            "iptables-nft-restore",
            "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *KNI-POLI*) echo 'iptables-restore: line 3 failed' >&2; exit 1;; esac\nprintf '%s\\n' \"$input\" | /usr/sbin/iptables-nft-restore \"$@\"\n",
        )],
    );
    lab.write_cluster_manifests(&[DENY_X, ALLOW_X_FROM_Y]);
    let out = lab.once("nft", &[("PATH", path)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("iptables-nft-restore --noflush"),
        "names the command: {stderr}"
    );
    assert!(
        stderr.contains("input line 3: "),
        "quotes the line: {stderr}"
    );
    assert!(!lab.tcp("y/a", "x/a", 80), "the last good rules stay");
    assert!(!lab.our_state("nft").is_empty() && lab.our_state("nft").contains("KNI-FORWARD"));
    let _ = good;
    // Without the fault the next sync converges fully.
    lab.sync_all("nft");
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
    let _ = std::fs::remove_dir_all(shim_dir);
}

/// The only test here that uses the legacy backend: it holds the host-wide xtables lock.
#[test]
fn a_held_xtables_lock_fails_the_write_keeps_the_state_and_shows_in_readiness() {
    if skip_unless_root(
        "a_held_xtables_lock_fails_the_write_keeps_the_state_and_shows_in_readiness",
    ) {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X]);
    let mut agent = lab.spawn_agent("legacy", &["--xtables-wait", "1s"]);
    let node = lab.nodes[0].netns.clone();
    wait_until("ready", Duration::from_secs(10), || {
        http_get(&node, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    assert!(!lab.tcp("y/a", "x/a", 80));

    // kube-proxy (say) holds the lock for longer than we wait.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/xtables.lock")
        .unwrap();
    lock.lock().unwrap();
    lab.write_cluster_manifests(&[DENY_X, ALLOW_X_FROM_Y]);
    wait_until(
        "not ready while writes fail",
        Duration::from_secs(10),
        || http_get(&node, "/readyz").is_some_and(|(c, _)| c == 503),
    );
    let (_, metrics) = http_get(&node, "/metrics").unwrap();
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("kni_kernel_write_errors_total"))
        .unwrap()
        .to_string();
    assert!(!errors.ends_with(" 0"), "{errors}");
    assert!(!lab.tcp("y/a", "x/a", 80), "the last good state stays");
    let log = lab.agent_log();
    assert!(
        log.contains("iptables-legacy-restore") && log.contains("xtables lock"),
        "{log}"
    );
    assert_eq!(
        http_get(&node, "/healthz").map(|(c, _)| c),
        Some(200),
        "alive while retrying"
    );

    // With the lock free again, a retry converges.
    lock.unlock().unwrap();
    wait_until("ready again", Duration::from_secs(15), || {
        http_get(&node, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    assert!(lab.tcp("y/a", "x/a", 80));
    let _ = agent.kill();
    let _ = agent.wait();

    // Held at start: the agent says so instead of blaming a kernel module.
    lock.lock().unwrap();
    let out = lab.once("legacy", &[], &["--xtables-wait", "1s"]);
    lock.unlock().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("xtables lock") && !stderr.contains("kernel lacks"),
        "{stderr}"
    );
}

#[test]
fn a_set_someone_else_still_uses_is_destroyed_later_and_never_breaks_a_sync() {
    if skip_unless_root("a_set_someone_else_still_uses_is_destroyed_later_and_never_breaks_a_sync")
    {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    lab.sync_all("nft");
    let set = lab
        .node_cmd(0, &["ipset", "list", "-n"])
        .lines()
        .find(|l| l.starts_with("KNI-4S-"))
        .unwrap()
        .to_string();
    // Another firewall's rule uses our set.
    lab.node_cmd(
        0,
        &[
            "iptables-nft",
            "-A",
            "INPUT",
            "-m",
            "set",
            "--match-set",
            &set,
            "src",
            "-j",
            "RETURN",
        ],
    );
    lab.write_cluster_manifests(&[DENY_X]);
    let out = lab.once("nft", &[], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot destroy a set we no longer use"));
    assert!(
        lab.node_cmd(0, &["ipset", "list", "-n"]).contains(&set),
        "still there while used"
    );
    assert!(!lab.tcp("y/a", "x/a", 80), "the new state is in force");
    // Once released, the next sync destroys it.
    lab.node_cmd(
        0,
        &[
            "iptables-nft",
            "-D",
            "INPUT",
            "-m",
            "set",
            "--match-set",
            &set,
            "src",
            "-j",
            "RETURN",
        ],
    );
    lab.sync_all("nft");
    assert!(!lab.node_cmd(0, &["ipset", "list", "-n"]).contains(&set));
}

#[test]
fn sigterm_finishes_the_sync_and_leaves_a_complete_state() {
    if skip_unless_root("sigterm_finishes_the_sync_and_leaves_a_complete_state") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    // Many remote pods make the first sync take a while.
    let mut docs = vec![ALLOW_X_FROM_Y.to_string()];
    docs.extend(remote_pods("y", 3000));
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    lab.write_cluster_manifests(&refs);
    for delay in [150u64, 400, 900] {
        let _ = lab.agent(0, &["cleanup"]);
        let mut agent = lab.spawn_agent("nft", &[]);
        std::thread::sleep(Duration::from_millis(delay));
        let _ = Command::new("kill").arg(agent.id().to_string()).status();
        let status = agent.wait().unwrap();
        assert!(
            status.success(),
            "SIGTERM is a clean exit (after {delay}ms): {status:?}\n{}",
            lab.agent_log()
        );
        // Whatever the agent got to, the kernel holds all of a state or none of it.
        let state = lab.our_state("nft");
        if !state.is_empty() {
            let out = lab.once("nft", &[], &[]);
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(
                log.contains("iptables_lines=0"),
                "after {delay}ms a half-written state was left:\n{log}"
            );
        }
    }
}

#[test]
fn a_vanished_manifests_directory_keeps_the_last_state_and_recovers() {
    if skip_unless_root("a_vanished_manifests_directory_keeps_the_last_state_and_recovers") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X]);
    let mut agent = lab.spawn_agent("nft", &["--resync-period", "1s"]);
    wait_until("enforced", Duration::from_secs(10), || {
        !lab.tcp("y/a", "x/a", 80)
    });
    let hidden = lab.manifests_dir().with_extension("hidden");
    // Keep the agent's log outside while the directory is gone.
    std::fs::rename(lab.manifests_dir(), &hidden).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !lab.tcp("y/a", "x/a", 80),
        "still enforced without a source"
    );
    std::fs::rename(&hidden, lab.manifests_dir()).unwrap();
    lab.write_cluster_manifests(&[DENY_X, ALLOW_X_FROM_Y]);
    wait_until("recovered", Duration::from_secs(10), || {
        lab.tcp("y/a", "x/a", 80)
    });
    assert!(lab.agent_log().contains("cannot read manifests directory"));
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn names_at_the_limits_and_hostile_labels() {
    if skip_unless_root("names_at_the_limits_and_hostile_labels") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let long_ns = "n".repeat(63);
    let long_name = format!(
        "{}.{}.{}.{}",
        "p".repeat(63),
        "q".repeat(63),
        "r".repeat(63),
        "s".repeat(61)
    );
    // Pod x/a gets a label at the maximum lengths; a policy with a 253-character name in a
    // namespace with a 63-character name lets it in.
    let policy = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {long_ns}}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {long_name}, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}, podSelector: {{matchLabels: {{example.com/{k}: {v}}}}}}}]}}]",
        k = "k".repeat(63),
        v = "v".repeat(63)
    );
    let key = format!("example.com/{}", "k".repeat(63));
    let value = "v".repeat(63);
    lab.write_cluster_manifests_labelled(&[&policy], &[("y/b", &key, &value)]);
    lab.sync_all("nft");
    assert!(lab.tcp("y/b", "x/a", 80));
    assert!(!lab.tcp("y/a", "x/a", 80));
    for line in lab.our_state("nft").lines() {
        if let Some(chain) = line.strip_prefix(':') {
            assert!(
                chain.split_whitespace().next().unwrap().len() <= 28,
                "{line}"
            );
        }
    }

    // Hostile labels are refused with a clear error and nothing changes.
    let before = lab.our_state("nft");
    for hostile in [
        "'a b'",
        "'x\\ny'",
        "'$(reboot)'",
        "'café'",
        "'\"; iptables -F; \"'",
        &format!("'{}'", "v".repeat(64)),
    ] {
        lab.write_file(
            "zz-hostile.yaml",
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: h, namespace: z, labels: {{app: {hostile}}}}}\nspec: {{nodeName: node1}}\nstatus: {{phase: Running, podIP: 10.244.1.99}}\n"),
        );
        let out = lab.once("nft", &[], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{hostile} accepted");
        assert!(
            stderr.contains("zz-hostile.yaml document 1 (Pod z/h)")
                && stderr.contains("is not a valid label value"),
            "{stderr}"
        );
        assert_eq!(lab.our_state("nft"), before);
    }
}

#[test]
fn a_policy_can_select_thousands_of_peers() {
    if skip_unless_root("a_policy_can_select_thousands_of_peers") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let mut docs = vec![ALLOW_X_FROM_Y.to_string()];
    docs.extend(remote_pods("y", 5000));
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    lab.write_cluster_manifests(&refs);
    lab.sync_all("nft");
    let sets = lab.node_cmd(0, &["ipset", "save"]);
    let members = sets
        .lines()
        .filter(|l| l.starts_with("add KNI-4S-"))
        .count();
    assert!(
        members >= 5003,
        "{members} members: the lab's y pods and 5000 more"
    );
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
}

#[test]
fn other_firewalls_keep_working_and_detection_picks_the_hosts_backend() {
    if skip_unless_root("other_firewalls_keep_working_and_detection_picks_the_hosts_backend") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    // The host's firewall lives in nft and marks it as kubelet's (as kubelet does).
    lab.node_cmd(
        0,
        &["iptables-nft", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"],
    );
    // A host rule after our jump: our chains never ACCEPT, so it still applies.
    let za = lab.pod("z/a").v4.to_string();
    lab.node_cmd(
        0,
        &["iptables-nft", "-A", "FORWARD", "-s", &za, "-j", "DROP"],
    );
    lab.write_cluster_manifests(&["apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: all, namespace: x}\nspec: {podSelector: {}, ingress: [{}]}"]);
    let out = lab.once("auto", &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("backend=nft"), "{stderr}");
    assert!(lab.tcp("y/a", "x/a", 80));
    lab.forget_flows();
    assert!(
        !probe(
            &lab.pod("z/a").netns,
            lab.pod("x/a").ip(false),
            Proto::Udp,
            80
        ),
        "the host's DROP still applies"
    );
    // A rule added in front of ours while we run stays, and runs first (we never bypass it).
    lab.node_cmd(
        0,
        &[
            "iptables-nft",
            "-I",
            "FORWARD",
            "1",
            "-s",
            &lab.pod("y/b").v4.to_string(),
            "-j",
            "DROP",
        ],
    );
    lab.sync_all("nft");
    assert!(!lab.tcp("y/b", "x/a", 80));
    let save = lab.node_cmd(0, &["iptables-nft-save", "-t", "filter"]);
    assert_eq!(
        save.lines()
            .filter(|l| l.starts_with("-A FORWARD") && l.contains("DROP"))
            .count(),
        2,
        "{save}"
    );

    // With the kubelet canary in legacy instead, auto picks legacy.
    let lab2 = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab2.node_cmd(
        0,
        &[
            "iptables-legacy",
            "-t",
            "mangle",
            "-N",
            "KUBE-KUBELET-CANARY",
        ],
    );
    lab2.write_cluster_manifests(&[DENY_X]);
    let out = lab2.once("auto", &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("backend=legacy"),
        "{stderr}"
    );
}

/// A tenant's valid policy whose ipBlocks need over a million set entries (17,000 IPv6 /64s, each
/// with a /128 cut out) used to fail every sync with "Hash is full", freezing the node: later
/// policies were never applied and /readyz stayed 503. Now that rule fails closed (its pod stays
/// isolated, the policy's other rule still allows), it is reported, and other changes flow.
#[test]
fn an_oversized_policy_fails_closed_and_every_other_change_still_applies() {
    if skip_unless_root("an_oversized_policy_fails_closed_and_every_other_change_still_applies") {
        return;
    }
    let mut huge = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: huge, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n",
    );
    for i in 0..17_000u32 {
        let (hi, lo) = (i >> 8, i & 0xff);
        huge.push_str(&format!(
            "    - ipBlock: {{cidr: '2001:db8:{hi:x}:{lo:x}::/64', except: ['2001:db8:{hi:x}:{lo:x}::1/128']}}\n"
        ));
    }
    huge.push_str("  - from: [{podSelector: {matchLabels: {pod: b}}}]\n");
    const DENY_Y: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: y}\nspec: {podSelector: {}, policyTypes: [Ingress]}";

    for backend in ["nft", "legacy"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        lab.write_cluster_manifests(&[&huge]);
        let _agent = lab.spawn_agent(backend, &[]);
        let node = lab.nodes[0].netns.clone();
        wait_until(
            &format!("{backend}: ready, naming the policy that fails closed"),
            Duration::from_secs(60),
            || {
                http_get(&node, "/readyz").is_some_and(|(c, body)| {
                    c == 200 && body.contains("policy x/huge ingress rule 0")
                })
            },
        );
        let reach = |from: &str, v6: bool| {
            lab.forget_flows();
            probe(&lab.pod(from).netns, lab.pod("x/a").ip(v6), Proto::Tcp, 80)
        };
        for v6 in [false, true] {
            assert!(
                reach("x/b", v6),
                "{backend} v6={v6}: the policy's other rule still allows"
            );
            assert!(!reach("y/a", v6), "{backend} v6={v6}: x/a stays isolated");
        }
        // An unrelated change after it is programmed as usual.
        assert!(lab.tcp("z/a", "y/a", 80));
        lab.write_cluster_manifests(&[&huge, DENY_Y]);
        wait_until(
            &format!("{backend}: the unrelated deny applies"),
            Duration::from_secs(30),
            || !lab.tcp("z/a", "y/a", 80),
        );
        let (_, metrics) = http_get(&node, "/metrics").unwrap();
        assert!(
            metrics.contains("kni_policy_rules_failed_closed 1"),
            "{metrics}"
        );
        let log = lab.agent_log();
        assert!(
            log.contains("could not be programmed") && log.contains("x/huge"),
            "{log}"
        );
        // Nothing over-full was left in the kernel.
        let members = lab
            .node_cmd(0, &["ipset", "save"])
            .lines()
            .filter(|l| l.starts_with("add "))
            .count();
        assert!(members < 1000, "{members} set members in the kernel");
    }
}
