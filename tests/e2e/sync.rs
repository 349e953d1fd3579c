//! End-to-end: incremental writes, drift repair, and restarts that never flip a probe.
//! Needs root; without it every test says SKIPPED loudly and passes.

use kni_testlab::lab;

use lab::{Lab, Proto, probe, skip_unless_root, wait_until};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const ALLOW_X_FROM_Y: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]";
const FROM_DB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-db, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]";
const FROM_Z: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-z, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]";

/// `run --once`, returning how many ipset and iptables lines it wrote.
fn once(lab: &Lab, backend: &str) -> (usize, usize) {
    let out = lab.once(backend, &[], &[]);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    let field = |name: &str| -> usize {
        let at = log
            .rfind(&format!("{name}="))
            .unwrap_or_else(|| panic!("no {name} in {log}"));
        log[at + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("ipset_lines"), field("iptables_lines"))
}

#[test]
fn unchanged_input_writes_nothing_and_a_change_writes_only_what_it_touches() {
    if skip_unless_root("unchanged_input_writes_nothing_and_a_change_writes_only_what_it_touches") {
        return;
    }
    for backend in ["legacy", "nft"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        lab.write_cluster_manifests(&[ALLOW_X_FROM_Y, FROM_DB, FROM_Z]);
        let (sets, rules) = once(&lab, backend);
        assert!(sets > 0 && rules > 0);
        assert_eq!(
            once(&lab, backend),
            (0, 0),
            "{backend}: an unchanged cluster writes nothing"
        );

        // One pod label: one member per family in one set, no rule.
        lab.write_cluster_manifests_labelled(
            &[ALLOW_X_FROM_Y, FROM_DB, FROM_Z],
            &[("y/c", "role", "db")],
        );
        assert_eq!(
            once(&lab, backend),
            (2, 0),
            "{backend}: a pod label writes only set members"
        );
        lab.forget_flows();
        assert!(lab.tcp("y/c", "x/b", 81));

        // One policy's port: only that policy's chain, per family.
        let changed = ALLOW_X_FROM_Y.replace("port: 80", "port: 81");
        lab.write_cluster_manifests_labelled(
            &[&changed, FROM_DB, FROM_Z],
            &[("y/c", "role", "db")],
        );
        let (sets, rules) = once(&lab, backend);
        assert_eq!(sets, 0, "{backend}");
        // Per family: *filter, one chain declaration, its one rule, COMMIT. On nft the new rule
        // is first put in force ahead of the old one (*filter, the rule, a RETURN, COMMIT).
        let expected = if backend == "nft" { 16 } else { 8 };
        assert_eq!(
            rules, expected,
            "{backend}: a policy change rewrites only its own chain"
        );
        lab.forget_flows();
        assert!(lab.tcp("y/a", "x/a", 81));
        assert!(!lab.tcp("y/a", "x/a", 80));
    }
}

#[test]
fn drift_is_repaired_on_resync() {
    if skip_unless_root("drift_is_repaired_on_resync") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y, FROM_DB]);
    let backend = "nft";
    let mut agent = lab.spawn_agent(backend, &["--resync-period", "2s"]);
    wait_until("first sync", Duration::from_secs(10), || {
        lab.our_state(backend).contains("KNI-FORWARD")
    });
    let good = lab.our_state(backend);
    let set = good
        .lines()
        .find_map(|l| l.strip_prefix("create KNI-4S-"))
        .map(|rest| format!("KNI-4S-{}", rest.split_whitespace().next().unwrap()))
        .expect("a peer set");
    let policy_chain = good
        .lines()
        .find_map(|l| l.strip_prefix(":KNI-POLI-"))
        .map(|rest| format!("KNI-POLI-{}", rest.split_whitespace().next().unwrap()))
        .expect("a policy chain");
    let ipt = format!("iptables-{backend}");
    // Everything an admin or another agent might do to our state.
    let tampering: Vec<Vec<&str>> = vec![
        vec![&ipt, "-F", &policy_chain],
        vec![
            &ipt,
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
        vec![&ipt, "-I", "INPUT", "1", "-j", "ACCEPT"],
        vec![&ipt, "-A", "KNI-OUTPUT", "-j", "RETURN"],
        vec!["ipset", "flush", &set],
    ];
    for cmd in &tampering {
        lab.node_cmd(0, cmd);
    }
    // No probe here of the tampered state: the hooks canary (every 3 s) may already have put
    // the FORWARD jump back, and the point is that everything ends repaired.
    assert_ne!(lab.our_state(backend), good, "the tampering took effect");
    wait_until("drift repaired", Duration::from_secs(15), || {
        let now = lab.our_state(backend);
        now == good
    });
    lab.forget_flows();
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80), "isolation is back");
    // The foreign ACCEPT someone put first in INPUT stays, after our jump.
    let input: Vec<String> = lab
        .node_cmd(0, &[&format!("{ipt}-save"), "-t", "filter"])
        .lines()
        .filter(|l| l.starts_with("-A INPUT"))
        .map(str::to_owned)
        .collect();
    assert!(
        input[0].contains("KNI-INPUT") && input[1] == "-A INPUT -j ACCEPT",
        "{input:?}"
    );
    let log = lab.agent_log();
    assert!(log.contains("repaired drift"), "{log}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A full resync reads set headers and the entries of one slice of sets at a time: an entry
/// replaced by another (same count, so the header shows nothing) is still repaired within
/// `MEMBER_CHECK_ROUNDS` resyncs.
#[test]
fn a_peer_set_entry_swapped_for_another_is_repaired_within_the_rounds() {
    if skip_unless_root("a_peer_set_entry_swapped_for_another_is_repaired_within_the_rounds") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    let backend = "nft";
    let period = Duration::from_secs(1);
    let mut agent = lab.spawn_agent(backend, &["--resync-period", "1s"]);
    let (allowed, intruder) = (lab.pod("y/a").ip(false), lab.pod("z/a").ip(false));
    let sorted = |state: String| {
        let mut lines: Vec<String> = state.lines().map(str::to_owned).collect();
        lines.sort_unstable();
        lines
    };
    wait_until("first sync", Duration::from_secs(10), || {
        lab.our_state(backend).contains(&format!(" {allowed}\n"))
    });
    let good = sorted(lab.our_state(backend));
    let set = good
        .iter()
        .find_map(|l| l.strip_suffix(&format!(" {allowed}"))?.strip_prefix("add "))
        .expect("a set holding y/a")
        .to_string();
    assert!(!lab.tcp("z/a", "x/a", 80));
    lab.node_cmd(0, &["ipset", "del", &set, &allowed.to_string()]);
    lab.node_cmd(0, &["ipset", "add", &set, &intruder.to_string()]);
    assert!(lab.tcp("z/a", "x/a", 80), "the swapped entry lets z/a in");
    let rounds = u32::try_from(kube_netpol_iptables::dataplane::MEMBER_CHECK_ROUNDS).unwrap();
    wait_until("swapped entry repaired", period * (rounds + 4), || {
        sorted(lab.our_state(backend)) == good
    });
    assert!(!lab.tcp("z/a", "x/a", 80), "isolation is back");
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(lab.agent_log().contains("repaired drift"));
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn restarts_and_kills_never_flip_a_probe() {
    if skip_unless_root("restarts_and_kills_never_flip_a_probe") {
        return;
    }
    let backend = "legacy";
    let lab = Arc::new(Lab::new(crate::AGENT, 1, |_, _| 0));
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y, FROM_Z]);
    let mut agent = lab.spawn_agent(
        backend,
        &[
            "--resync-period",
            "200ms",
            "--sync-debounce",
            "10ms",
            // Refused probes answer at once, so many rounds fit between the restarts.
            "--deny-action",
            "reject",
        ],
    );
    wait_until("first sync", Duration::from_secs(10), || {
        lab.our_state(backend).contains("KNI-FORWARD")
    });
    std::thread::sleep(Duration::from_millis(300));

    // Keep the agent busy: an unrelated policy comes and goes all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (lab, stop) = (lab.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut on = false;
            while !stop.load(Ordering::Relaxed) {
                on = !on;
                let docs: Vec<&str> = if on {
                    vec![ALLOW_X_FROM_Y, FROM_Z, FROM_DB]
                } else {
                    vec![ALLOW_X_FROM_Y, FROM_Z]
                };
                lab.write_cluster_manifests(&docs);
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    // Probes whose verdict no state of the churn changes. New TCP connections each time.
    let prober = {
        let (lab, stop) = (lab.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = Vec::new();
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                for (from, to, port, want) in [
                    ("y/a", "x/a", 80, true),
                    ("z/a", "x/a", 80, false),
                    ("y/a", "x/a", 81, false),
                    ("z/b", "x/c", 81, true),
                    ("y/b", "x/c", 80, false),
                ] {
                    for v6 in [false, true] {
                        let got = probe(&lab.pod(from).netns, lab.pod(to).ip(v6), Proto::Tcp, port);
                        if got != want {
                            flips.push(format!(
                                "round {rounds}: {from} -> {to}:{port} v6={v6} was {got}"
                            ));
                        }
                    }
                }
                rounds += 1;
            }
            (rounds, flips)
        })
    };
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(150 + 37 * i));
        if i % 2 == 0 {
            // SIGTERM
            let _ = Command::new("kill").arg(agent.id().to_string()).status();
        } else {
            let _ = agent.kill(); // SIGKILL
        }
        let _ = agent.wait();
        // The agent runs under `ip netns exec`, which execs it: the pid is the agent's.
        agent = lab.spawn_agent(
            backend,
            &[
                "--resync-period",
                "200ms",
                "--sync-debounce",
                "10ms",
                // Refused probes answer at once, so many rounds fit between the restarts.
                "--deny-action",
                "reject",
            ],
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let (rounds, flips) = prober.join().unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    eprintln!("{rounds} probe rounds during 10 restarts");
    assert!(
        rounds >= 20,
        "too few probe rounds ({rounds}) to mean anything"
    );
    assert!(flips.is_empty(), "probes flipped:\n{}", flips.join("\n"));
}

#[test]
fn a_set_with_other_parameters_is_replaced_by_swap() {
    if skip_unless_root("a_set_with_other_parameters_is_replaced_by_swap") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    let rendered = lab.render();
    let set = rendered
        .lines()
        .find_map(|l| l.strip_prefix("create KNI-4S-"))
        .map(|rest| format!("KNI-4S-{}", rest.split_whitespace().next().unwrap()))
        .unwrap();
    // A set of our name left with other parameters and wrong members (e.g. by an older version).
    lab.node_cmd(
        0,
        &[
            "ipset", "create", &set, "hash:ip", "family", "inet", "maxelem", "16",
        ],
    );
    lab.node_cmd(0, &["ipset", "add", &set, "10.244.1.9"]);
    once(&lab, "nft");
    let listed = lab.node_cmd(0, &["ipset", "list", &set]);
    // Sized to what it holds: ipset's default for a small set.
    assert!(listed.contains("maxelem 65536"), "{listed}");
    assert!(!listed.contains("10.244.1.9"), "{listed}");
    for p in ["y/a", "y/b", "y/c"] {
        assert!(listed.contains(&lab.pod(p).v4.to_string()), "{listed}");
    }
    assert!(
        !lab.node_cmd(0, &["ipset", "list", "-n"]).contains("-T"),
        "the scratch set is gone"
    );
    lab.forget_flows();
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("z/a", "x/a", 80));
}

/// Packets counted by the rule of `save` (iptables-save -c) whose text ends with `rule`.
fn packets_of(save: &str, rule: &str) -> u64 {
    save.lines()
        .find(|l| l.ends_with(rule))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no rule ending with {rule:?} in\n{save}"))
        .parse()
        .unwrap()
}

#[test]
fn replies_of_allowed_flows_never_enter_our_chains() {
    if skip_unless_root("replies_of_allowed_flows_never_enter_our_chains") {
        return;
    }
    for backend in ["legacy", "nft"] {
        let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
        lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
        lab.sync_all(backend);
        for _ in 0..3 {
            assert!(lab.tcp("y/b", "x/a", 80), "{backend}: allowed");
        }
        assert!(!lab.tcp("z/b", "x/a", 80), "{backend}: denied");
        let save = lab.node_cmd(0, &[&format!("iptables-{backend}-save"), "-c"]);
        // Every probe's first packet went through our hook; its replies and the rest of the
        // connection matched the hook's conntrack test and stayed out.
        let new_flows = packets_of(&save, "! --ctstate RELATED,ESTABLISHED -j KNI-FORWARD");
        assert!(
            new_flows >= 4,
            "{backend}: {new_flows} packets jumped\n{save}"
        );
        assert_eq!(
            packets_of(
                &save,
                "-A KNI-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
            ),
            0,
            "{backend}: a reply entered our chains\n{save}"
        );
    }
}

#[test]
fn a_change_after_a_quiet_spell_is_synced_without_waiting_out_the_debounce() {
    if skip_unless_root("a_change_after_a_quiet_spell_is_synced_without_waiting_out_the_debounce") {
        return;
    }
    let backend = "nft";
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[]);
    // A debounce long enough that waiting it out cannot pass for syncing at once.
    let mut agent = lab.spawn_agent(
        backend,
        &[
            "--sync-debounce",
            "3s",
            "--sync-max-delay",
            "10s",
            "--poll-interval",
            "100ms",
            "--deny-action",
            "reject",
        ],
    );
    wait_until("first sync", Duration::from_secs(10), || {
        lab.our_state(backend).contains("KNI-FORWARD")
    });
    std::thread::sleep(Duration::from_millis(3500));
    assert!(lab.tcp("z/a", "x/a", 80), "no policy yet");
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    let took = wait_until("the policy enforced", Duration::from_secs(10), || {
        !lab.tcp("z/a", "x/a", 80)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        took < Duration::from_secs(2),
        "a change after a quiet spell waited {took:?} (the debounce is 3 s)"
    );
}

/// On nf_tables a change of existing rules is put in force by a restore that only adds (new rules
/// ahead of the old, then a RETURN), before the restore that replaces them: removing rules makes
/// a restore wait an RCU grace period. The clean-up restore is made to fail here, so what the
/// probes see is the first restore alone.
#[test]
fn a_policy_change_is_in_force_before_the_old_rules_are_removed() {
    if skip_unless_root("a_policy_change_is_in_force_before_the_old_rules_are_removed") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[ALLOW_X_FROM_Y]);
    lab.sync_all("nft");
    assert!(lab.tcp("y/a", "x/a", 80));
    assert!(!lab.tcp("y/a", "x/a", 81));

    let changed = ALLOW_X_FROM_Y.replace("port: 80", "port: 81");
    lab.write_cluster_manifests(&[&changed]);
    // Restores that add only (`-I`) pass; any other restore of a policy chain fails.
    let (shim_dir, path) = lab.shims(&[(
        "iptables-nft-restore",
        "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *'-I KNI-'*) ;; *KNI-POLI*) echo 'iptables-restore: line 2 failed' >&2; exit 1;; esac\nprintf '%s\\n' \"$input\" | /usr/sbin/iptables-nft-restore \"$@\"\n",
    )]);
    let out = lab.once("nft", &[("PATH", path)], &[]);
    assert!(
        !out.status.success(),
        "the clean-up restore was made to fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = lab.our_state("nft");
    assert!(
        state.contains("--dports 81") && state.contains("--dports 80"),
        "the new rule sits ahead of the old one: {state}"
    );
    lab.forget_flows();
    assert!(lab.tcp("y/a", "x/a", 81), "the new port is allowed");
    assert!(
        !lab.tcp("y/a", "x/a", 80),
        "the old port is not, though its rule is still there"
    );
    assert!(!lab.tcp("z/a", "x/a", 81), "other peers still are not");

    // Without the fault the next sync removes the old rules; verdicts stay.
    let _ = std::fs::remove_dir_all(shim_dir);
    lab.sync_all("nft");
    let state = lab.our_state("nft");
    assert!(
        state.contains("--dports 81") && !state.contains("--dports 80"),
        "{state}"
    );
    lab.forget_flows();
    assert!(lab.tcp("y/a", "x/a", 81));
    assert!(!lab.tcp("y/a", "x/a", 80));
}
