//! The sync's logic against the in-memory kernel (no root): order, failures, what cannot be
//! removed yet, drift repair, and that an unchanged state writes nothing.

use super::*;
use crate::compile::ir::{Hook, IpSet, Match, Rule, SetDirection, SetKind, SetMember, Target};
use crate::dataplane::memory::{MemoryKernel, Write};
use crate::dataplane::render::retired_rule;
use crate::dataplane::{Backend, DataplaneError, cleanup_backend};
use std::sync::Arc;

const POD: &str = "KNI-PODI-00000000000000aa";
const HOOK: &str = "-m comment --comment kube-netpol-iptables -m conntrack ! --ctstate RELATED,ESTABLISHED -j KNI-FORWARD";

fn policy_chain(n: u8) -> String {
    format!("KNI-POLI-{n:016x}")
}

fn peer_set(n: u8) -> String {
    format!("KNI-4P-{n}")
}

/// One local pod; policy `n` allows it from the hosts `10.n.0.1` and `10.n.0.2` (set `KNI-4P-n`).
/// FORWARD and INPUT are hooked, OUTPUT is not (its dispatch chain exists, empty).
fn desired(policies: &[u8]) -> Vec<(Family, DesiredState)> {
    let mut v4 = DesiredState::default();
    let mut v6 = DesiredState::default();
    for state in [&mut v4, &mut v6] {
        for chain in ["KNI-FORWARD", "KNI-INPUT"] {
            state.hooks.push(Hook {
                builtin: &chain[4..],
                target: chain.to_string(),
            });
            state.chains.insert(chain.to_string(), vec![]);
        }
        state.chains.insert("KNI-OUTPUT".into(), vec![]);
    }
    let to_pod = Rule::new(
        vec![Match::Destination("10.0.0.1/32".parse().unwrap())],
        Target::Jump(POD.into()),
    );
    v4.chains.insert("KNI-FORWARD".into(), vec![to_pod]);
    let mut pod = vec![Rule::new(vec![], Target::ClearAllowMark)];
    for n in policies {
        pod.push(Rule::new(vec![], Target::Jump(policy_chain(*n))));
        let from_peers = Match::Set {
            name: peer_set(*n),
            direction: SetDirection::Src,
        };
        v4.chains.insert(
            policy_chain(*n),
            vec![Rule::new(vec![from_peers], Target::SetAllowMark).commented(format!("p{n}"))],
        );
        let members = [1, 2].map(|h| SetMember::Net(format!("10.{n}.0.{h}/32").parse().unwrap()));
        v4.sets.insert(
            peer_set(*n),
            IpSet {
                kind: SetKind::HashNet,
                family: Family::V4,
                members: Arc::new(members.into()),
            },
        );
    }
    pod.push(Rule::new(vec![Match::AllowMarkSet], Target::Return));
    pod.push(Rule::new(vec![], Target::Reject));
    v4.chains.insert(POD.into(), pod);
    vec![(Family::V4, v4), (Family::V6, v6)]
}

fn node(backend: Backend) -> (MemoryKernel, Dataplane<MemoryKernel>) {
    let kernel = MemoryKernel::new(backend);
    (kernel.clone(), Dataplane::new(kernel))
}

/// Where the kernel differs from `desired` (empty once a sync converged).
fn differences(kernel: &MemoryKernel, desired: &[(Family, DesiredState)]) -> Vec<Drift> {
    let mut actual = View::default();
    for family in Family::ALL {
        let text = kernel.iptables_save(family).unwrap();
        actual.tables.insert(family, parse_iptables_save(&text));
    }
    actual.sets = sets::read_sets(kernel, &BTreeSet::new()).unwrap().0;
    View::of_desired(desired).drift_from(&actual)
}

fn writes(kernel: &MemoryKernel) -> Vec<Write> {
    kernel.state().writes.clone()
}

fn set_exists(kernel: &MemoryKernel, name: &str) -> bool {
    kernel.state().sets.contains_key(name)
}

#[test]
fn a_fresh_node_gets_its_sets_before_the_rules_that_use_them() {
    let (kernel, mut dp) = node(Backend::Nft);
    let want = desired(&[1, 2]);
    let report = dp.sync(&want, SyncMode::Incremental).unwrap();
    assert_eq!(differences(&kernel, &want), vec![]);
    assert!(report.ipset_lines > 0 && report.iptables_lines > 0);
    let log = writes(&kernel);
    let first_rules = log
        .iter()
        .position(|w| matches!(w, Write::Iptables(..)))
        .unwrap();
    let sets_created = log
        .iter()
        .position(
            |w| matches!(w, Write::Ipset(t) if t.contains(&format!("create {}", peer_set(2)))),
        )
        .unwrap();
    assert!(sets_created < first_rules, "{log:#?}");
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let (kernel, mut dp) = node(Backend::Nft);
    let want = desired(&[1, 2]);
    dp.sync(&want, SyncMode::Full).unwrap();
    let before = writes(&kernel).len();
    for mode in [SyncMode::Incremental, SyncMode::Full] {
        let report = dp.sync(&desired(&[1, 2]), mode).unwrap();
        assert_eq!(report, SyncReport::default(), "{mode:?}");
    }
    assert_eq!(
        writes(&kernel).len(),
        before,
        "{:#?}",
        &writes(&kernel)[before..]
    );
}

#[test]
fn a_set_is_destroyed_after_the_rules_that_used_it() {
    let (kernel, mut dp) = node(Backend::Nft);
    dp.sync(&desired(&[1, 2]), SyncMode::Full).unwrap();
    let start = writes(&kernel).len();
    let want = desired(&[1]);
    dp.sync(&want, SyncMode::Incremental).unwrap();
    assert_eq!(differences(&kernel, &want), vec![]);
    assert!(!set_exists(&kernel, &peer_set(2)));
    assert!(dp.undestroyed.is_empty(), "destroyed on the first try");
    let log = &writes(&kernel)[start..];
    let rules = log.iter().position(|w| matches!(w, Write::Iptables(..)));
    let destroy = log.iter().position(
        |w| matches!(w, Write::Ipset(t) if t.contains(&format!("destroy {}", peer_set(2)))),
    );
    assert!(rules.unwrap() < destroy.unwrap(), "{log:#?}");
}

#[test]
fn rejected_rules_forget_what_was_written_and_the_next_sync_rewrites() {
    let (kernel, mut dp) = node(Backend::Nft);
    kernel.state().faults.reject_iptables = 1;
    let want = desired(&[1]);
    let err = dp.sync(&want, SyncMode::Full).unwrap_err();
    assert_eq!(err.metric_label(), "restore_rejected", "{err}");
    assert!(set_exists(&kernel, &peer_set(1)), "sets are written first");
    assert!(
        kernel
            .iptables_save(Family::V4)
            .unwrap()
            .lines()
            .all(|l| !l.contains("KNI-"))
    );
    assert!(dp.applied.is_none(), "what we believed is forgotten");
    let report = dp.sync(&want, SyncMode::Incremental).unwrap();
    assert!(report.iptables_lines > 0);
    assert_eq!(differences(&kernel, &want), vec![]);

    // Written, then someone changes a rule; an incremental write that fails is retried in full,
    // which reads the kernel and so repairs the change too.
    kernel.foreign_iptables(
        Family::V4,
        &format!("*filter\n-A {} -j RETURN\nCOMMIT\n", policy_chain(1)),
    );
    kernel.state().faults.reject_iptables = 1;
    let want = desired(&[1, 2]);
    dp.sync(&want, SyncMode::Incremental).unwrap();
    assert_eq!(differences(&kernel, &want), vec![]);

    // Both attempts rejected: the sync fails and the next one reads the kernel again.
    kernel.state().faults.reject_iptables = 2;
    assert!(dp.sync(&desired(&[2]), SyncMode::Incremental).is_err());
    assert!(dp.applied.is_none());
    dp.sync(&desired(&[2]), SyncMode::Incremental).unwrap();
    assert_eq!(differences(&kernel, &desired(&[2])), vec![]);
}

#[test]
fn a_held_xtables_lock_fails_the_sync_as_such_and_the_next_one_converges() {
    let (kernel, mut dp) = node(Backend::Legacy);
    kernel.state().faults.lock_held = true;
    let want = desired(&[1]);
    let err = dp.sync(&want, SyncMode::Full).unwrap_err();
    assert!(matches!(err, DataplaneError::LockHeld { .. }), "{err}");
    assert_eq!(err.metric_label(), "lock_held");
    assert!(dp.applied.is_none());
    kernel.state().faults.lock_held = false;
    dp.sync(&want, SyncMode::Incremental).unwrap();
    assert_eq!(differences(&kernel, &want), vec![]);
}

#[test]
fn a_set_someone_else_still_uses_is_destroyed_by_a_later_sync() {
    let (kernel, mut dp) = node(Backend::Nft);
    dp.sync(&desired(&[1, 2]), SyncMode::Full).unwrap();
    let theirs = format!("-m set --match-set {} src -j RETURN", peer_set(2));
    kernel.foreign_iptables(Family::V4, &format!("*filter\n-A INPUT {theirs}\nCOMMIT\n"));
    let want = desired(&[1]);
    dp.sync(&want, SyncMode::Incremental).unwrap();
    assert!(set_exists(&kernel, &peer_set(2)), "still in use");
    assert_eq!(dp.undestroyed, [peer_set(2)].into());
    // A known leftover, not drift; still ours (registered), tried again.
    let report = dp.sync(&want, SyncMode::Full).unwrap();
    assert_eq!(report.repairs, vec![]);
    assert_eq!(dp.undestroyed, [peer_set(2)].into());
    kernel.foreign_iptables(Family::V4, &format!("*filter\n-D INPUT {theirs}\nCOMMIT\n"));
    dp.sync(&want, SyncMode::Incremental).unwrap();
    assert!(!set_exists(&kernel, &peer_set(2)));
    assert!(dp.undestroyed.is_empty());
}

#[test]
fn a_chain_someone_else_still_jumps_to_is_kept_empty_until_released() {
    let (kernel, mut dp) = node(Backend::Nft);
    dp.sync(&desired(&[1, 2]), SyncMode::Full).unwrap();
    let chain = policy_chain(2);
    kernel.foreign_iptables(
        Family::V4,
        &format!("*filter\n:THEIRS - [0:0]\n-A THEIRS -j {chain}\nCOMMIT\n"),
    );
    let want = desired(&[1]);
    let report = dp.sync(&want, SyncMode::Incremental).unwrap();
    assert_eq!(report.retained_chains, 1);
    let kept = kernel
        .state()
        .table(Backend::Nft, Family::V4)
        .rules(&chain)
        .cloned();
    assert_eq!(kept, Some(vec![retired_rule()]), "emptied: marks nothing");
    assert!(!set_exists(&kernel, &peer_set(2)), "its set is free");
    let report = dp.sync(&want, SyncMode::Full).unwrap();
    assert_eq!((report.repairs, report.retained_chains), (vec![], 1));
    kernel.foreign_iptables(
        Family::V4,
        &format!("*filter\n-D THEIRS -j {chain}\nCOMMIT\n"),
    );
    let report = dp.sync(&want, SyncMode::Full).unwrap();
    assert_eq!(report.retained_chains, 0);
    assert_eq!(
        kernel.state().table(Backend::Nft, Family::V4).rules(&chain),
        None
    );
    assert_eq!(differences(&kernel, &want), vec![]);
}

/// Syncs, lets `tamper` change the kernel, and checks that a full sync reports drift of `kinds`
/// and repairs it, after which a full sync finds nothing and writes nothing.
fn repaired(kinds: &[&str], tamper: impl FnOnce(&MemoryKernel)) {
    let (kernel, mut dp) = node(Backend::Nft);
    let want = desired(&[1, 2]);
    dp.sync(&want, SyncMode::Full).unwrap();
    tamper(&kernel);
    assert_ne!(
        differences(&kernel, &want),
        vec![],
        "the tampering changed something"
    );
    let report = dp.sync(&want, SyncMode::Full).unwrap();
    let mut found: Vec<&str> = report.repairs.iter().map(Drift::kind).collect();
    found.sort_unstable();
    assert_eq!(found, kinds, "{:?}", report.repairs);
    assert_eq!(differences(&kernel, &want), vec![]);
    let before = writes(&kernel).len();
    assert_eq!(
        dp.sync(&want, SyncMode::Full).unwrap(),
        SyncReport::default()
    );
    assert_eq!(writes(&kernel).len(), before);
}

#[test]
fn drift_of_sets_is_repaired() {
    repaired(&["set_missing"], |k| {
        drop(k.state().sets.remove(&peer_set(2)))
    });
    repaired(&["set_parameters"], |k| {
        k.state().sets.get_mut(&peer_set(2)).unwrap().header =
            "hash:net family inet maxelem 16".into()
    });
    repaired(&["set_members"], |k| {
        k.foreign_ipset(&format!("del {} 10.2.0.1/32\n", peer_set(2)))
    });
    repaired(&["set_unwanted"], |k| {
        sets::restore(k, "create KNI-4P-9 hash:net family inet maxelem 65536\n").unwrap()
    });
}

/// Sets whose entries the kernel printed since the last call (the registry aside).
fn take_entries_read(kernel: &MemoryKernel) -> BTreeSet<String> {
    std::mem::take(&mut kernel.state().entries_read)
        .into_iter()
        .filter(|n| n != crate::dataplane::render::REGISTRY)
        .collect()
}

#[test]
fn a_full_resync_reads_the_entries_of_one_slice_of_sets_per_round() {
    let (kernel, mut dp) = node(Backend::Nft);
    let policies: Vec<u8> = (1..=60).collect();
    let want = desired(&policies);
    let all: BTreeSet<String> = policies.iter().map(|n| peer_set(*n)).collect();
    dp.sync(&want, SyncMode::Full).unwrap();
    // After a restart nothing is known of what the kernel holds: every set is read.
    let mut dp = Dataplane::new(kernel.clone());
    take_entries_read(&kernel);
    assert_eq!(
        dp.sync(&want, SyncMode::Full).unwrap(),
        SyncReport::default()
    );
    assert_eq!(take_entries_read(&kernel), all);
    let mut seen = BTreeSet::new();
    for round in 0..MEMBER_CHECK_ROUNDS {
        assert_eq!(
            dp.sync(&want, SyncMode::Full).unwrap(),
            SyncReport::default()
        );
        let read = take_entries_read(&kernel);
        assert!(
            read.len() < all.len() / 2,
            "round {round} read {} of {} sets in full",
            read.len(),
            all.len()
        );
        assert!(seen.is_disjoint(&read), "round {round} read a set again");
        seen.extend(read);
    }
    assert_eq!(seen, all, "every set read in full within the rounds");
    // A set whose entry count changed is read (and repaired) at the next full sync.
    kernel.foreign_ipset(&format!("add {} 10.99.0.1/32\n", peer_set(7)));
    let report = dp.sync(&want, SyncMode::Full).unwrap();
    assert!(take_entries_read(&kernel).contains(&peer_set(7)));
    assert_eq!(
        report.repairs,
        vec![Drift::SetMembers {
            set: peer_set(7),
            missing: 0,
            extra: 1
        }]
    );
    assert_eq!(differences(&kernel, &want), vec![]);
}

#[test]
fn members_replaced_one_for_one_are_repaired_within_the_rounds() {
    let (kernel, mut dp) = node(Backend::Nft);
    let want = desired(&[1, 2, 3]);
    dp.sync(&want, SyncMode::Full).unwrap();
    // Same count, other entry: the header alone cannot show it.
    let set = peer_set(2);
    kernel.foreign_ipset(&format!("del {set} 10.2.0.1/32\nadd {set} 10.2.0.9/32\n"));
    let mut repairs = Vec::new();
    for _ in 0..MEMBER_CHECK_ROUNDS {
        repairs.extend(dp.sync(&want, SyncMode::Full).unwrap().repairs);
    }
    assert_eq!(
        repairs,
        vec![Drift::SetMembers {
            set,
            missing: 1,
            extra: 1
        }]
    );
    assert_eq!(differences(&kernel, &want), vec![]);
}

#[test]
fn drift_of_chains_is_repaired() {
    let (pod, policy) = (POD, policy_chain(2));
    repaired(&["chain_missing", "chain_rules"], |k| {
        k.foreign_iptables(
            Family::V4,
            &format!("*filter\n-F {pod}\n-F {policy}\n-X {policy}\nCOMMIT\n"),
        )
    });
    repaired(&["chain_rules"], |k| {
        k.foreign_iptables(
            Family::V4,
            &format!("*filter\n-A {policy} -j RETURN\nCOMMIT\n"),
        )
    });
    repaired(&["chain_unwanted"], |k| {
        k.foreign_iptables(
            Family::V6,
            "*filter\n:KNI-POLE-00000000000000ff - [0:0]\nCOMMIT\n",
        )
    });
}

#[test]
fn drift_of_hooks_is_repaired() {
    repaired(&["hook_missing"], |k| {
        k.foreign_iptables(Family::V4, &format!("*filter\n-D FORWARD {HOOK}\nCOMMIT\n"))
    });
    repaired(&["hook_moved"], |k| {
        k.foreign_iptables(Family::V6, "*filter\n-I FORWARD 1 -j ACCEPT\nCOMMIT\n")
    });
    repaired(&["hook_unwanted"], |k| {
        let ours = "-m comment --comment kube-netpol-iptables -j KNI-OUTPUT";
        k.foreign_iptables(Family::V4, &format!("*filter\n-A OUTPUT {ours}\nCOMMIT\n"))
    });
}

#[test]
fn a_full_sync_removes_our_rules_from_the_other_backend() {
    let (kernel, mut nft) = node(Backend::Nft);
    nft.sync(&desired(&[1]), SyncMode::Full).unwrap();
    kernel.state().other_installed = true;
    let mut legacy = Dataplane::new(kernel.through(Backend::Legacy));
    legacy.sync(&desired(&[1]), SyncMode::Full).unwrap();
    let nft_rules = kernel.iptables_save(Family::V4).unwrap();
    assert!(!nft_rules.contains("KNI-"), "{nft_rules}");
    assert_eq!(differences(&legacy.tables, &desired(&[1])), vec![]);
}

#[test]
fn the_canary_sees_a_flushed_dispatch_chain_and_a_moved_hook() {
    let (kernel, mut dp) = node(Backend::Nft);
    assert_eq!(dp.hooks_damaged(), None, "nothing written yet");
    dp.sync(&desired(&[1]), SyncMode::Full).unwrap();
    assert_eq!(dp.hooks_damaged(), None);
    kernel.foreign_iptables(Family::V4, "*filter\n-F KNI-FORWARD\nCOMMIT\n");
    assert_eq!(
        dp.hooks_damaged().as_deref(),
        Some("IPv4: chain KNI-FORWARD has other rules")
    );
    dp.sync(&desired(&[1]), SyncMode::Full).unwrap();
    kernel.foreign_iptables(Family::V6, "*filter\n-I INPUT 1 -j ACCEPT\nCOMMIT\n");
    assert_eq!(
        dp.hooks_damaged().as_deref(),
        Some("IPv6: our jump is not the first rule of INPUT")
    );
}

#[test]
fn cleanup_removes_everything_of_ours_and_keeps_a_chain_someone_jumps_to() {
    let (kernel, mut dp) = node(Backend::Nft);
    dp.sync(&desired(&[1, 2]), SyncMode::Full).unwrap();
    kernel.foreign_iptables(
        Family::V4,
        &format!(
            "*filter\n:THEIRS - [0:0]\n-A THEIRS -j {}\nCOMMIT\n",
            policy_chain(2)
        ),
    );
    cleanup_backend(&kernel).unwrap();
    let left: Vec<String> = kernel.state().sets.keys().cloned().collect();
    assert_eq!(left, Vec::<String>::new(), "sets and the registry are gone");
    let table = parse_iptables_save(&kernel.iptables_save(Family::V4).unwrap());
    assert_eq!(table.chains, [policy_chain(2)]);
    assert_eq!(table.rules[&policy_chain(2)], [retired_rule()]);
    assert!(table.jumps.is_empty());
}

/// On nf_tables a change of existing rules goes in by additions first (new rules ahead of the old,
/// then a RETURN), so no removal delays it; the usual replacement follows. Legacy replaces the
/// table in one write either way.
#[test]
fn on_nft_changed_rules_are_in_force_before_the_old_ones_are_removed() {
    for backend in [Backend::Nft, Backend::Legacy] {
        let (kernel, mut dp) = node(backend);
        dp.sync(&desired(&[1, 2]), SyncMode::Full).unwrap();
        let start = writes(&kernel).len();
        // The pod chain loses its jump to policy 2 and gains one to new policy 3.
        let want = desired(&[1, 3]);
        let report = dp.sync(&want, SyncMode::Incremental).unwrap();
        assert_eq!(differences(&kernel, &want), vec![], "{backend:?}");
        let rules: Vec<String> = writes(&kernel)[start..]
            .iter()
            .filter_map(|w| match w {
                Write::Iptables(_, Family::V4, text) => Some(text.clone()),
                _ => None,
            })
            .collect();
        if backend == Backend::Legacy {
            assert_eq!(rules.len(), 1, "{rules:#?}");
            assert_eq!(report.in_force_at, None);
            continue;
        }
        assert_eq!(rules.len(), 2, "ahead, then the replacement: {rules:#?}");
        assert!(report.in_force_at.is_some());
        let ahead = &rules[0];
        for line in ahead.lines() {
            assert!(
                ["*filter", "COMMIT"].contains(&line)
                    || line.starts_with("-I ")
                    || line.starts_with(&format!(":{}", policy_chain(3)))
                    || line.starts_with(&format!("-A {}", policy_chain(3))),
                "only additions: {line:?} in\n{ahead}"
            );
        }
        // In the kernel, as the first write left it: the new pod chain, a RETURN, the old one.
        let pod_rules = |kernel: &MemoryKernel| {
            let save = kernel.iptables_save(Family::V4).unwrap();
            parse_iptables_save(&save).rules[POD].clone()
        };
        let (replayed, mut before) = node(Backend::Nft);
        before.sync(&desired(&[1, 2]), SyncMode::Full).unwrap();
        let old = pod_rules(&replayed);
        replayed.foreign_ipset(&format!("create {} hash:net family inet\n", peer_set(3)));
        replayed.iptables_restore(Family::V4, ahead).unwrap();
        let mut expected = pod_rules(&kernel);
        expected.push("-j RETURN".into());
        expected.extend(old);
        assert_eq!(pod_rules(&replayed), expected);
    }
}
