use super::ipset::hashsize_for;
use super::*;
use crate::dataplane::view::maxelem_fits;

#[test]
fn sets_are_sized_to_what_they_hold_and_rebuilt_only_when_far_off() {
    assert_eq!(maxelem_for(0), 65_536);
    assert_eq!(maxelem_for(3), 65_536);
    assert_eq!(maxelem_for(40_000), 131_072);
    assert_eq!(maxelem_for(crate::compile::ir::MAX_SET_MEMBERS), 524_288);
    for members in [
        0,
        1,
        1000,
        32_768,
        32_769,
        100_000,
        crate::compile::ir::MAX_SET_MEMBERS,
    ] {
        let made = maxelem_for(members);
        assert!(made as usize >= members);
        assert!(maxelem_fits(Some(made), members));
        // A set made for this many keeps fitting while it grows until it would overflow...
        assert!(!maxelem_fits(Some(made), made as usize + 1));
        // ...and a small change never rebuilds it.
        assert!(maxelem_fits(Some(made), members + members / 4));
    }
    // What older releases created (1,048,576 for every set) is rebuilt for small sets.
    assert!(!maxelem_fits(Some(1_048_576), 3));
    assert!(!maxelem_fits(Some(16), 3));
    assert!(!maxelem_fits(None, 3));
    assert_eq!(hashsize_for(10), 1024);
    assert_eq!(hashsize_for(200_000), 65_536);
}

fn hosts(count: u32) -> crate::compile::ir::Members {
    std::sync::Arc::new(
        (0..count)
            .map(|i| {
                crate::compile::ir::SetMember::Net(ipnet::IpNet::from(std::net::IpAddr::from(
                    std::net::Ipv4Addr::from(0x0a00_0000 + i),
                )))
            })
            .collect(),
    )
}

/// A set that grows across several incremental syncs is rebuilt before an `add` would
/// overflow the `maxelem` it was created with ("Hash is full"), even though a new set of the
/// intermediate size would have been created larger.
#[test]
fn a_growing_set_is_rebuilt_before_it_overflows() {
    use crate::compile::ir::{IpSet, SetKind};
    use crate::dataplane::view::KernelSet;
    let state = |count| DesiredState {
        sets: [(
            "KNI-4P-x".to_string(),
            IpSet {
                kind: SetKind::HashNet,
                family: Family::V4,
                members: hosts(count),
            },
        )]
        .into(),
        ..Default::default()
    };
    // What the kernel holds: created small, so with ipset's default maxelem.
    let mut kernel = KernelSets::default();
    kernel.sets.insert(
        "KNI-4P-x".into(),
        KernelSet {
            kind: Some(SetKind::HashNet),
            family: Some(Family::V4),
            maxelem: Some(65_536),
            members: hosts(10),
            unparsed_members: vec![],
        },
    );
    // Growing to 40,000 fits in place; the remembered size stays 65,536.
    let grown = state(40_000);
    let text = render_ipset_update([&grown], &kernel).unwrap();
    assert!(!text.contains("swap"));
    let mut remembered = View::of_desired(&[(Family::V4, grown)]).sets;
    keep_kernel_set_sizes(&mut remembered, &kernel);
    assert_eq!(remembered.sets["KNI-4P-x"].maxelem, Some(65_536));
    // Growing on to 70,000 would overflow it: rebuilt with room, and swapped in.
    let text = render_ipset_update([&state(70_000)], &remembered).unwrap();
    assert!(text.contains("maxelem 262144"), "{}", &text[..200]);
    assert!(text.contains("swap KNI-4P-x-T"), "rebuilt");
}

#[test]
fn every_rendered_command_names_a_set_of_ours() {
    use crate::compile::ir::{DesiredState, Family, IpSet, SetKind, SetMember};
    let set = |members: &[&str]| IpSet {
        kind: SetKind::HashNet,
        family: Family::V4,
        members: std::sync::Arc::new(
            members
                .iter()
                .map(|m| SetMember::Net(m.parse().unwrap()))
                .collect(),
        ),
    };
    let mut desired = DesiredState::default();
    for name in ["KNI-4P-new", "KNI-4P-changed", "KNI-4P-rebuilt"] {
        desired
            .sets
            .insert(name.into(), set(&["10.0.0.1/32", "10.1.0.0/16"]));
    }
    // In the kernel: one set to change in place, one with other parameters (rebuilt by
    // swap), one no longer wanted (destroyed).
    let mut kernel = crate::dataplane::parse::parse_ipset_save(
        "create KNI-4P-changed hash:net family inet maxelem 1048576\nadd KNI-4P-changed 10.9.9.9\ncreate KNI-4P-rebuilt hash:net family inet maxelem 16\ncreate KNI-4P-stale hash:net family inet maxelem 1048576\n",
    );
    kernel.sets.get_mut("KNI-4P-changed").unwrap().maxelem = desired_maxelem();
    let update = render_ipset_update([&desired], &kernel).unwrap();
    let destroy = render_ipset_destroy([&desired], &kernel);
    for command in ["create", "add", "del", "flush", "swap", "destroy"] {
        assert!(
            update
                .lines()
                .chain(destroy.lines())
                .any(|l| l.starts_with(command)),
            "the test covers {command}:\n{update}{destroy}"
        );
    }
    check_batch(&update).unwrap();
    check_batch(&destroy).unwrap();
}

/// The maxelem `render` gives our sets, whatever it is.
fn desired_maxelem() -> Option<u32> {
    View::of_desired(&[(crate::compile::ir::Family::V4, {
        let mut d = crate::compile::ir::DesiredState::default();
        d.sets.insert(
            "KNI-4P-x".into(),
            crate::compile::ir::IpSet {
                kind: crate::compile::ir::SetKind::HashNet,
                family: crate::compile::ir::Family::V4,
                members: Default::default(),
            },
        );
        d
    })])
    .sets
    .sets["KNI-4P-x"]
        .maxelem
}

#[test]
fn created_sets_are_registered_and_taken_out_before_destroy() {
    assert_eq!(
        with_registry(
            "create KNI-4P-1 hash:net family inet\nadd KNI-4P-1 10.0.0.1\ncreate KNI-4P-2 hash:net family inet\ndestroy KNI-4P-3\ncreate KNI-PROBE-NET4 hash:net\ndestroy KNI-PROBE-NET4\n"
        ),
        format!(
            "create {REGISTRY} list:set size 1048576\ncreate KNI-4P-1 hash:net family inet\nadd {REGISTRY} KNI-4P-1\nadd KNI-4P-1 10.0.0.1\ncreate KNI-4P-2 hash:net family inet\nadd {REGISTRY} KNI-4P-2\ndel {REGISTRY} KNI-4P-3\ndestroy KNI-4P-3\ncreate KNI-PROBE-NET4 hash:net\ndestroy KNI-PROBE-NET4\n"
        )
    );
}

#[test]
fn a_command_without_its_set_name_is_refused() {
    assert!(check_batch("create KNI-4P-1 hash:net family inet\nadd KNI-4P-1 10.0.0.1\nflush KNI-4P-1-T\nswap KNI-4P-1-T KNI-4P-1\ndestroy KNI-4P-1-T\n").is_ok());
    for bad in [
        "flush",
        "destroy\n",
        "flush \n",
        "add KNI-4P-1 1.2.3.4\ndestroy",
        "destroy other-set",
        "flus KNI-4P-1",
    ] {
        assert!(check_batch(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn set_lookups_come_after_the_native_matches() {
    use crate::compile::ir::{Match, Rule, SetDirection, Target};
    let rule = Rule::new(
        vec![
            Match::Set {
                name: "KNI-4S-0123456789abcdef".into(),
                direction: SetDirection::Src,
            },
            Match::TierUndecided,
            Match::Protocol(crate::model::Protocol::Tcp),
            Match::DestinationPorts {
                first: 80,
                last: 90,
            },
        ],
        Target::SetAllowMark,
    );
    // As iptables-save prints it back (both backends keep the order given).
    assert_eq!(
        render_rule(Family::V4, &rule),
        "-p tcp -m mark --mark 0x0/0x1000 -m multiport --dports 80:90 -m set --match-set KNI-4S-0123456789abcdef src -j MARK --set-xmark 0x400000/0x400000"
    );
}

fn table(chains: &[(&str, &[&str])]) -> KernelTable {
    KernelTable {
        chains: chains.iter().map(|(c, _)| c.to_string()).collect(),
        rules: chains
            .iter()
            .map(|(c, rules)| (c.to_string(), rules.iter().map(|r| r.to_string()).collect()))
            .collect(),
        ..KernelTable::default()
    }
}

#[test]
fn rules_go_ahead_only_where_existing_rules_change() {
    let old = table(&[("KNI-A", &["-s 10.0.0.1/32 -j RETURN"]), ("KNI-E", &[])]);
    // Nothing there yet, only new chains, or an empty chain filled: nothing is removed, so no
    // first step.
    assert_eq!(render_iptables_ahead(&old, &KernelTable::default()), None);
    let more = table(&[
        ("KNI-A", &["-s 10.0.0.1/32 -j RETURN"]),
        ("KNI-E", &["-j KNI-N"]),
        ("KNI-N", &["-j RETURN"]),
    ]);
    assert_eq!(render_iptables_ahead(&more, &old), None);
    assert_eq!(render_iptables_ahead(&old, &old), None);

    // An existing rule changes: new rules ahead, in order, a RETURN, and the new chain made.
    let changed = table(&[
        (
            "KNI-A",
            &["-s 10.0.0.2/32 -j KNI-N", "-s 10.0.0.3/32 -j RETURN"],
        ),
        ("KNI-E", &["-j RETURN"]),
        ("KNI-N", &["-j RETURN"]),
    ]);
    assert_eq!(
        render_iptables_ahead(&changed, &old).unwrap(),
        "*filter\n:KNI-N - [0:0]\n-I KNI-A 1 -j RETURN\n-I KNI-A 1 -s 10.0.0.3/32 -j RETURN\n-I KNI-A 1 -s 10.0.0.2/32 -j KNI-N\n-A KNI-E -j RETURN\n-A KNI-N -j RETURN\nCOMMIT\n"
    );
}

#[test]
fn a_large_change_is_written_once() {
    let old = table(&[("KNI-A", &["-j RETURN"])]);
    let many: Vec<String> = (0..=AHEAD_MAX_RULES)
        .map(|i| format!("-s 10.0.{}.{}/32 -j RETURN", i / 256, i % 256))
        .collect();
    let mut big = old.clone();
    big.rules.insert("KNI-A".into(), many.clone());
    assert_eq!(render_iptables_ahead(&big, &old), None);
    big.rules.get_mut("KNI-A").unwrap().pop();
    assert!(render_iptables_ahead(&big, &old).is_some());
}
