//! End-to-end hardening of the dataplane against neighbours and crashes: a kill mid-write, foreign
//! sets that must not be read or touched, the xtables lock, legacy tables on nft-only nodes, and
//! drift that is not there. Needs root; without it every test says SKIPPED loudly and passes.

use kni_testlab::lab;

use lab::{Lab, skip_unless_root, wait_until};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const ALLOW_X_FROM_Y: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]";
const DENY_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}";
const BIN: &str = env!("CARGO_BIN_EXE_kube-netpol-iptables");

/// The agent on node 1 with extra environment and arguments (not waited for).
fn agent_command(lab: &Lab, backend: &str, env: &[(&str, &str)], extra: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &lab.nodes[0].netns,
        BIN,
        "run",
        "--manifests",
    ])
    .arg(lab.manifests_dir())
    .args(["--node-name", "node1", "--backend", backend])
    .args(extra)
    .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn succeeded(out: &Output) -> String {
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    log
}

/// Remote pods of namespace y (peers of ALLOW_X_FROM_Y) whose addresses all have three-digit
/// last two octets, so that no prefix of one (`10.123.150.1`, `10.123.15`, `10.1`) is another:
/// an address cut short is never a wanted member. `short` more come first with a shorter address,
/// which moves where a 64 KiB pipe buffer cuts the batch.
fn remote_y_pods(count: usize, short: usize) -> (Vec<String>, Vec<String>) {
    let pod = |i: usize, ip: String| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: r{i}, namespace: y}}\nspec: {{nodeName: far}}\nstatus: {{phase: Running, podIPs: [{{ip: {ip}}}]}}"
        )
    };
    let mut ips: Vec<String> = (0..short)
        .map(|i| format!("10.122.1.{}", 100 + i))
        .collect();
    ips.extend((0..count).map(|i| format!("10.123.{}.{}", 100 + i / 100, 100 + i % 100)));
    let pods = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| pod(i, ip.clone()))
        .collect();
    (pods, ips)
}

/// Members of every set of ours, from `ipset save` in node 1's namespace.
fn our_members(lab: &Lab) -> Vec<(String, String)> {
    lab.node_cmd(0, &["ipset", "save"])
        .lines()
        .filter_map(|l| l.strip_prefix("add "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(set, _)| set.starts_with("KNI-") && *set != "KNI-SETS")
        .map(|(s, m)| (s.to_string(), m.to_string()))
        .collect()
}

#[test]
fn a_kill_mid_write_never_hands_ipset_a_cut_batch() {
    if skip_unless_root("a_kill_mid_write_never_hands_ipset_a_cut_batch") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let marks = lab.manifests_dir().with_extension("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Stands in for ipset: a restore that fills our peer sets starts only after a pause (in which
    // the test kills the agent), then passes on exactly what it was given, keeping a copy.
    let (shim_dir, path) = lab.shims(&[("ipset", &format!(
            "#!/bin/bash\nif [ \"$*\" = \"-exist restore\" ]; then\n  IFS= read -r first\n  case \"$first\" in\n    \"create KNI-SETS \"*|\"create KNI-4S-\"*) touch {m}/started; sleep 2; {{ printf '%s\\n' \"$first\"; cat; }} | tee {m}/input | /usr/sbin/ipset \"$@\"; rc=$?; touch {m}/done; exit $rc;;\n  esac\n  {{ printf '%s\\n' \"$first\"; cat; }} | /usr/sbin/ipset \"$@\"; exit $?\nfi\nexec /usr/sbin/ipset \"$@\"\n",
            m = marks.display()
        ))]);
    lab.ipset_restore(0, "create foreign hash:ip\nadd foreign 192.0.2.1\n");
    for short in 0..3 {
        let _ = std::fs::remove_file(marks.join("started"));
        let _ = std::fs::remove_file(marks.join("done"));
        lab.node_cmd(0, &[BIN, "cleanup", "--backend", "nft"]);
        let (pods, ips) = remote_y_pods(3000, short);
        let mut docs: Vec<&str> = vec![ALLOW_X_FROM_Y];
        docs.extend(pods.iter().map(String::as_str));
        lab.write_cluster_manifests(&docs);

        let mut agent = agent_command(&lab, "nft", &[("PATH", &path)], &["--once"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until(
            "the agent starts its set write",
            Duration::from_secs(20),
            || marks.join("started").exists(),
        );
        agent.kill().unwrap();
        agent.wait().unwrap();
        wait_until("ipset finishes", Duration::from_secs(20), || {
            marks.join("done").exists()
        });

        let input = std::fs::read_to_string(marks.join("input")).unwrap();
        let last = input.lines().last().unwrap_or_default().to_string();
        assert!(
            input.ends_with('\n') && last.split_whitespace().count() == 3,
            "trial {short}: ipset was handed a batch cut at {} bytes, ending {last:?}",
            input.len()
        );
        let mut wanted: Vec<String> = ips.clone();
        wanted.extend(
            lab.pods
                .iter()
                .filter(|p| p.namespace == "y")
                .map(|p| p.v4.to_string()),
        );
        wanted.extend(
            lab.pods
                .iter()
                .filter(|p| p.namespace == "y")
                .map(|p| p.v6.to_string()),
        );
        let peer_members = our_members(&lab)
            .into_iter()
            .filter(|(set, _)| !kube_netpol_iptables::compile::names::is_isolation_set(set));
        for (set, member) in peer_members {
            assert!(
                wanted.contains(&member),
                "trial {short}: set {set} holds {member}, which nobody wanted"
            );
        }
        assert_eq!(
            lab.node_cmd(0, &["ipset", "list", "foreign"])
                .lines()
                .filter(|l| l.contains("192.0.2.1"))
                .count(),
            1,
            "the foreign set is untouched"
        );
    }
    // The next run converges.
    succeeded(&lab.once("nft", &[], &[]));
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
    let _ = std::fs::remove_dir_all(shim_dir);
    let _ = std::fs::remove_dir_all(marks);
}

#[test]
fn a_full_sync_reads_only_our_sets() {
    if skip_unless_root("a_full_sync_reads_only_our_sets") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    // Someone's blocklist of 200,000 addresses.
    let mut blocklist =
        String::from("create blocklist hash:ip family inet hashsize 65536 maxelem 400000\n");
    for i in 0..200_000u32 {
        let [_, b, c, d] = (0x0a00_0000 | (200 << 16) | i).to_be_bytes();
        blocklist.push_str(&format!("add blocklist 10.{b}.{c}.{d}\n"));
    }
    lab.ipset_restore(0, &blocklist);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    // Stands in for ipset and keeps a copy of everything ipset printed for the agent.
    let read = lab.manifests_dir().with_extension("read");
    let (shim_dir, path) = lab.shims(&[(
        "ipset",
        &format!(
            "#!/bin/bash\n/usr/sbin/ipset \"$@\" | tee -a {}\nexit ${{PIPESTATUS[0]}}\n",
            read.display()
        ),
    )]);
    for _ in 0..2 {
        succeeded(&lab.once("nft", &[("PATH", path.clone())], &[]));
    }
    let text = std::fs::read_to_string(&read).unwrap();
    assert!(
        text.contains("create KNI-4S-"),
        "the agent read its own sets back: {text}"
    );
    assert!(
        !text.contains("add blocklist"),
        "the agent read the foreign blocklist's {} bytes",
        text.len()
    );
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
    assert_eq!(
        lab.node_cmd(0, &["ipset", "list", "-t", "blocklist"])
            .lines()
            .find(|l| l.starts_with("Number of entries"))
            .unwrap(),
        "Number of entries: 200000"
    );
    let _ = std::fs::remove_dir_all(shim_dir);
    let _ = std::fs::remove_file(read);
}

/// Holds the host-wide xtables lock, as kube-proxy does while it writes.
fn hold_xtables_lock() -> std::fs::File {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/xtables.lock")
        .unwrap();
    lock.lock().unwrap();
    lock
}

#[test]
fn the_nft_backend_never_waits_for_the_xtables_lock() {
    if skip_unless_root("the_nft_backend_never_waits_for_the_xtables_lock") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X]);
    let lock = hold_xtables_lock();
    // nft: probe, first sync and a change all go through while the lock is held.
    let first = lab.once("nft", &[], &["--xtables-wait", "1s"]);
    lab.write_cluster_manifests(&[DENY_X, ALLOW_X_FROM_Y]);
    let second = lab.once("nft", &[], &["--xtables-wait", "1s"]);
    // legacy still waits for it (and gives up after --xtables-wait).
    let legacy = lab.once("legacy", &[], &["--xtables-wait", "1s"]);
    lock.unlock().unwrap();
    succeeded(&first);
    succeeded(&second);
    let stderr = String::from_utf8_lossy(&legacy.stderr);
    assert!(
        !legacy.status.success() && stderr.contains("xtables lock"),
        "{stderr}"
    );
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
}

/// Legacy tables of a network namespace, as the kernel lists them.
fn legacy_tables(lab: &Lab) -> String {
    lab.node_cmd(
        0,
        &[
            "sh",
            "-c",
            "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null; true",
        ],
    )
}

#[test]
fn the_nft_backend_never_creates_legacy_tables() {
    if skip_unless_root("the_nft_backend_never_creates_legacy_tables") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    assert_eq!(
        legacy_tables(&lab),
        "",
        "a fresh namespace has no legacy tables"
    );
    lab.write_cluster_manifests(&[DENY_X]);
    // Probe and full syncs with nft chosen and detected, then both kinds of cleanup.
    succeeded(&lab.once("nft", &[], &[]));
    succeeded(&lab.once("auto", &[], &[]));
    assert!(!lab.tcp("y/a", "x/a", 80));
    for args in [&["cleanup"][..], &["cleanup", "--backend", "nft"]] {
        let out = lab.agent(0, args);
        succeeded(&out);
    }
    assert!(lab.tcp("y/a", "x/a", 80));
    assert_eq!(legacy_tables(&lab), "", "no legacy table was created");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.nodes[0].netns,
            "iptables-nft",
            "-L",
            "-n",
        ])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!all.contains("legacy tables present"), "{all}");
}

/// `ipset_lines` and `iptables_lines` of every `synced` line in a log, and its drift repairs.
fn writes_and_repairs(log: &str) -> (Vec<(usize, usize)>, usize) {
    let field = |line: &str, name: &str| -> usize {
        let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let synced = log
        .lines()
        .filter(|l| l.contains(" synced") || l.ends_with("synced"))
        .filter(|l| l.contains("ipset_lines="))
        .map(|l| (field(l, "ipset_lines"), field(l, "iptables_lines")))
        .collect();
    (synced, log.matches("repaired drift").count())
}

#[test]
fn resyncs_of_an_untouched_kernel_write_nothing() {
    if skip_unless_root("resyncs_of_an_untouched_kernel_write_nothing") {
        return;
    }
    // Local pods with an IPv4-compatible and an IPv4-mapped IPv6 address, which iptables and
    // Rust spell differently.
    let odd = |name: &str, v6: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{pod: {name}}}}}\nspec: {{nodeName: node1}}\nstatus: {{phase: Running, podIPs: [{{ip: '{v6}'}}]}}"
        )
    };
    let compatible = odd("compat", "::10.0.0.77");
    let mapped = odd("mapped", "::ffff:10.0.0.78");
    for backend in ["legacy", "nft"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        lab.write_cluster_manifests(&[ALLOW_X_FROM_Y, &compatible, &mapped]);
        let log = succeeded(&lab.once(backend, &[], &[]));
        let (first, _) = writes_and_repairs(&log);
        assert!(first[0].1 > 0, "{log}");
        assert!(
            lab.our_state(backend).contains("::10.0.0.77/128"),
            "the compatible address is in a rule"
        );
        // Full syncs by fresh processes and by one running agent's periodic resync.
        for _ in 0..2 {
            let log = succeeded(&lab.once(backend, &[], &[]));
            assert_eq!(
                writes_and_repairs(&log),
                (vec![(0, 0)], 0),
                "{backend}: {log}"
            );
        }
        let log_path = lab.manifests_dir().with_extension("agent.log");
        let mut agent = agent_command(
            &lab,
            backend,
            &[],
            &["--resync-period", "1s", "--metrics-bind-address", "off"],
        )
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
        wait_until("four resyncs", Duration::from_secs(20), || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            writes_and_repairs(&log).0.len() >= 4
        });
        agent.kill().unwrap();
        agent.wait().unwrap();
        let log = std::fs::read_to_string(&log_path).unwrap();
        let (syncs, repairs) = writes_and_repairs(&log);
        assert_eq!(repairs, 0, "{backend}: {log}");
        assert!(syncs.iter().all(|s| *s == (0, 0)), "{backend}: {log}");
        let _ = std::fs::remove_file(log_path);
        assert!(lab.tcp("y/a", "x/a", 80));
        assert!(!lab.tcp("z/a", "x/a", 80));
    }
}

#[test]
fn a_chain_someone_else_jumps_to_is_kept_empty_and_never_blocks_a_sync() {
    if skip_unless_root("a_chain_someone_else_jumps_to_is_kept_empty_and_never_blocks_a_sync") {
        return;
    }
    for backend in ["legacy", "nft"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        let ipt = format!("iptables-{backend}");
        lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
        let mut agent = lab.spawn_agent(backend, &["--resync-period", "3s"]);
        wait_until("first sync", Duration::from_secs(10), || {
            lab.our_state(backend).contains(":KNI-POLI-")
        });
        let chain = lab
            .our_state(backend)
            .lines()
            .find_map(|l| l.strip_prefix(":KNI-POLI-"))
            .map(|rest| format!("KNI-POLI-{}", rest.split_whitespace().next().unwrap()))
            .unwrap();
        // Another tool's chain jumps to our policy chain.
        lab.node_cmd(0, &[&ipt, "-N", "FOREIGN"]);
        lab.node_cmd(0, &[&ipt, "-A", "FOREIGN", "-j", &chain]);
        assert!(lab.tcp("y/a", "x/a", 80));

        // The policy goes (its chain is no longer used) and another one comes.
        lab.write_cluster_manifests(&[DENY_X]);
        wait_until(
            "the new policy is in force",
            Duration::from_secs(10),
            || !lab.tcp("y/a", "x/a", 80),
        );
        let save = lab.node_cmd(0, &[&format!("{ipt}-save"), "-t", "filter"]);
        let rules: Vec<&str> = save
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .collect();
        assert_eq!(
            rules,
            [format!(
                "-A {chain} -m comment --comment \"kube-netpol-iptables: retired, still referenced\""
            )],
            "{backend}: kept, with nothing in it that could allow a packet"
        );
        let node = lab.nodes[0].netns.clone();
        wait_until("reported in metrics", Duration::from_secs(10), || {
            lab::http_get(&node, "/metrics")
                .is_some_and(|(_, m)| m.contains("kni_retained_chains 1"))
        });
        let log = lab.agent_log();
        assert_eq!(
            log.matches("is still the target of someone else's rule")
                .count(),
            1,
            "{backend}: warned once, however many syncs: {log}"
        );
        assert!(!log.contains("repaired drift"), "{backend}: {log}");

        // Once released, a later sync deletes it.
        lab.node_cmd(0, &[&ipt, "-F", "FOREIGN"]);
        wait_until("deleted once released", Duration::from_secs(10), || {
            !lab.our_state(backend).contains(&chain)
        });
        lab.node_cmd(0, &[&ipt, "-X", "FOREIGN"]);
        assert!(!lab.tcp("y/a", "x/a", 80));
        let _ = agent.kill();
        let _ = agent.wait();
    }
}

#[test]
fn a_flushed_chain_or_a_removed_jump_is_repaired_within_seconds() {
    if skip_unless_root("a_flushed_chain_or_a_removed_jump_is_repaired_within_seconds") {
        return;
    }
    for backend in ["legacy", "nft"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        let ipt = format!("iptables-{backend}");
        lab.write_cluster_manifests(&[DENY_X]);
        // Full resyncs are far away: only the canary check can notice.
        let mut agent = lab.spawn_agent(backend, &["--resync-period", "1h"]);
        wait_until("first sync", Duration::from_secs(10), || {
            lab.our_state(backend).contains(":KNI-FORWARD")
        });
        assert!(!lab.tcp("y/a", "x/a", 80));
        let damage: [&[&str]; 2] = [
            &["-F", "KNI-FORWARD"],
            &[
                "-D",
                "FORWARD",
                "-m",
                "comment",
                "--comment",
                "kube-netpol-iptables",
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "KNI-FORWARD",
            ],
        ];
        for args in damage {
            let mut cmd = vec![ipt.as_str()];
            cmd.extend_from_slice(args);
            lab.node_cmd(0, &cmd);
            let took = wait_until(
                &format!("{backend}: denied again after {args:?}"),
                Duration::from_secs(10),
                || !lab.tcp("y/a", "x/a", 80),
            );
            eprintln!("{backend}: {args:?} repaired within {took:?}");
        }
        let log = lab.agent_log();
        assert_eq!(
            log.matches("our rules were changed by someone else")
                .count(),
            2,
            "{backend}: {log}"
        );
        let _ = agent.kill();
        let _ = agent.wait();
    }
}

/// `iptables-save -t filter` lines and `ipset save` lines that mention `what`.
fn mentions(lab: &Lab, backend: &str, what: &str) -> Vec<String> {
    let mut out: Vec<String> = lab
        .node_cmd(0, &[&format!("iptables-{backend}-save"), "-t", "filter"])
        .lines()
        .filter(|l| l.contains(what))
        .map(|l| l.split(" [").next().unwrap().to_string())
        .collect();
    out.extend(
        lab.node_cmd(0, &["ipset", "save"])
            .lines()
            .filter(|l| l.contains(what))
            .map(|l| l.split(" hashsize").next().unwrap().to_string()),
    );
    out
}

#[test]
fn objects_under_our_prefix_that_we_did_not_create_are_left_alone() {
    if skip_unless_root("objects_under_our_prefix_that_we_did_not_create_are_left_alone") {
        return;
    }
    for backend in ["legacy", "nft"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        let ipt = format!("iptables-{backend}");
        // Another tool's chain, its jump and its set, all named like ours.
        for args in [
            vec!["-N", "KNI-custom"],
            vec!["-A", "KNI-custom", "-s", "192.0.2.7/32", "-j", "DROP"],
            vec!["-A", "FORWARD", "-j", "KNI-custom"],
        ] {
            let mut cmd = vec![ipt.as_str()];
            cmd.extend(args);
            lab.node_cmd(0, &cmd);
        }
        lab.ipset_restore(0, "create KNI-foo hash:ip\nadd KNI-foo 192.0.2.8\n");
        let foreign = || {
            [
                mentions(&lab, backend, "KNI-custom"),
                mentions(&lab, backend, "KNI-foo"),
            ]
        };
        let before = foreign();
        assert_eq!(before[0].len(), 3, "{before:?}");

        // Syncs of two different states (the first one's objects become stale), a running agent's
        // resyncs, and both kinds of cleanup.
        lab.write_cluster_manifests(&[DENY_X]);
        let log = succeeded(&lab.once(backend, &[], &[]));
        assert!(
            log.contains("KNI-custom") && log.contains("KNI-foo"),
            "warned: {log}"
        );
        assert!(!lab.tcp("y/a", "x/a", 80));
        assert_eq!(foreign(), before);
        lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
        let mut agent = lab.spawn_agent(backend, &["--resync-period", "1s"]);
        wait_until("the new state", Duration::from_secs(10), || {
            lab.tcp("y/a", "x/a", 80)
        });
        std::thread::sleep(Duration::from_secs(3));
        let _ = agent.kill();
        let _ = agent.wait();
        let log = lab.agent_log();
        assert_eq!(
            log.matches("this agent did not create").count(),
            2,
            "{backend}: one warning per object, however many resyncs: {log}"
        );
        assert!(!lab.tcp("z/a", "x/a", 80));
        assert_eq!(foreign(), before);
        for args in [&["cleanup", "--backend", backend][..], &["cleanup"]] {
            succeeded(&lab.agent(0, args));
            assert_eq!(foreign(), before, "{backend}: {args:?}");
        }
        assert_eq!(
            lab.our_state(backend)
                .lines()
                .filter(|l| !l.contains("KNI-custom") && !l.contains("KNI-foo"))
                .collect::<Vec<_>>(),
            Vec::<&str>::new(),
            "{backend}: cleanup removed everything of ours"
        );
    }
}

#[test]
fn sets_of_an_earlier_release_without_a_registry_are_adopted() {
    if skip_unless_root("sets_of_an_earlier_release_without_a_registry_are_adopted") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    succeeded(&lab.once("nft", &[], &[]));
    // What an earlier release left: the same sets and rules, no registry.
    lab.node_cmd(0, &["ipset", "destroy", "KNI-SETS"]);
    let old_sets: Vec<String> = lab
        .node_cmd(0, &["ipset", "list", "-n"])
        .lines()
        .filter(|l| l.starts_with("KNI-"))
        .map(str::to_owned)
        .collect();
    assert!(!old_sets.is_empty());
    // The dispatch's isolation sets stay (the policy that replaces this one isolates x too).
    let stale: Vec<&String> = old_sets
        .iter()
        .filter(|s| !kube_netpol_iptables::compile::names::is_isolation_set(s))
        .collect();
    assert!(lab.tcp("y/a", "x/a", 80));
    // The upgrade's first sync: still the same state, nothing opens or closes.
    let log = succeeded(&lab.once("nft", &[], &[]));
    assert!(!log.contains("did not create"), "{log}");
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
    let registered = lab.node_cmd(0, &["ipset", "save", "KNI-SETS"]);
    for set in &old_sets {
        assert!(
            registered.contains(&format!("add KNI-SETS {set}")),
            "{set} adopted: {registered}"
        );
    }
    // And what it adopted is replaced like anything of ours.
    lab.write_cluster_manifests(&[DENY_X]);
    succeeded(&lab.once("nft", &[], &[]));
    assert!(!lab.tcp("y/a", "x/a", 80));
    let now = lab.node_cmd(0, &["ipset", "list", "-n"]);
    assert!(
        !stale.is_empty() && stale.iter().all(|s| !now.lines().any(|l| l == *s)),
        "stale adopted sets are destroyed: {now}"
    );
}

#[test]
fn a_kernel_without_list_set_is_named_at_start() {
    if skip_unless_root("a_kernel_without_list_set_is_named_at_start") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X]);
    // An ipset whose kernel lacks list:set, the type of our registry.
    let (shim_dir, path) = lab.shims(&[("ipset", "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *list:set*) echo 'ipset v7.17: Kernel error received: set type not supported' >&2; exit 1;; esac\nprintf '%s\\n' \"$input\" | /usr/sbin/ipset \"$@\"\n")]);
    let out = lab.once("nft", &[("PATH", path)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ipset type list:set") && stderr.contains("ip_set_list_set"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hash:net"),
        "only what is missing: {stderr}"
    );
    assert_eq!(lab.our_state("nft"), "", "nothing is programmed");
    let _ = std::fs::remove_dir_all(shim_dir);
}

/// Another tool flushes our dispatch chains while the agent is down, and a policy goes away
/// meanwhile: the pod and policy chains nothing leads to any more are still ours (their names
/// have our generated shape), so the next sync deletes them and destroys their sets, instead of
/// leaving them behind as "not ours" and failing to destroy their sets forever.
#[test]
fn chains_orphaned_by_a_flushed_dispatch_chain_are_still_cleaned_up() {
    if skip_unless_root("chains_orphaned_by_a_flushed_dispatch_chain_are_still_cleaned_up") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[DENY_X, ALLOW_X_FROM_Y]);
    succeeded(&lab.once("nft", &[], &[]));
    let from_y = kube_netpol_iptables::compile::names::policy_chain(true, "x/from-y");
    assert!(lab.our_state("nft").contains(&from_y));
    for tool in ["iptables-nft", "ip6tables-nft"] {
        for chain in ["KNI-FORWARD", "KNI-INPUT", "KNI-OUTPUT"] {
            lab.node_cmd(0, &[tool, "-F", chain]);
        }
    }
    lab.write_cluster_manifests(&[DENY_X]);
    let first = succeeded(&lab.once("nft", &[], &[]));
    let second = succeeded(&lab.once("nft", &[], &[]));
    for log in [&first, &second] {
        assert!(!log.contains("did not create"), "{log}");
        assert!(!log.contains("cannot destroy"), "{log}");
    }
    let state = lab.our_state("nft");
    assert!(!state.contains(&from_y), "{state}");
    assert!(
        !state.contains("KNI-4S-"),
        "the policy's peer set is gone:\n{state}"
    );
    assert!(
        !lab.tcp("y/a", "x/a", 80),
        "the remaining policy is enforced"
    );
}
