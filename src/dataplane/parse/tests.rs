use super::*;
use crate::dataplane::view::View;

#[test]
fn finds_our_chains_rules_and_jumps_only() {
    let save = "# Generated\n*nat\n:KNI-NOT-FILTER - [0:0]\n-A PREROUTING -j KNI-NOT-FILTER\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:KNI-FORWARD - [0:0]\n:KUBE-FORWARD - [0:0]\n-A FORWARD -j KUBE-FORWARD\n-A FORWARD -m comment --comment kube-netpol-iptables -j KNI-FORWARD\n-A FORWARD -j KNI-OLD\n-A KNI-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n-A KUBE-FORWARD -j ACCEPT\nCOMMIT\n";
    let t = parse_iptables_save(save);
    assert_eq!(t.chains, vec!["KNI-FORWARD".to_string()]);
    // `-j KNI-OLD` lacks our comment: not a hook of ours.
    assert_eq!(t.jumps.len(), 1);
    assert_eq!(t.jumps[0].position, 2);
    assert_eq!(
        t.jumps[0].spec,
        "-m comment --comment kube-netpol-iptables -j KNI-FORWARD"
    );
    assert_eq!(t.rules["KNI-FORWARD"].len(), 1);
}

#[test]
fn ours_is_what_our_hooks_lead_to_and_what_we_retired() {
    let save = format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:FOREIGN - [0:0]\n:KNI-FORWARD - [0:0]\n:KNI-PODI-1 - [0:0]\n:KNI-POLI-1 - [0:0]\n:KNI-POLI-OLD - [0:0]\n:KNI-custom - [0:0]\n:KNI-custom-2 - [0:0]\n-A FORWARD -j KNI-custom\n-A FORWARD -m comment --comment kube-netpol-iptables -j KNI-FORWARD\n-A FOREIGN -j KNI-POLI-1\n-A KNI-FORWARD -d 10.0.0.1/32 -j KNI-PODI-1\n-A KNI-PODI-1 -j KNI-POLI-1\n-A KNI-POLI-1 -m set --match-set KNI-4P-1 src -j MARK --set-xmark 0x400000/0x400000\n-A KNI-POLI-OLD {}\n-A KNI-custom -j KNI-custom-2\n-A KNI-custom-2 -j KNI-PODI-1\nCOMMIT\n",
        // Written by the renderer, recognised by the parser.
        crate::dataplane::render::retired_rule()
    );
    let t = parse_iptables_save(&save);
    assert_eq!(
        t.chains,
        ["KNI-FORWARD", "KNI-PODI-1", "KNI-POLI-1", "KNI-POLI-OLD"]
    );
    assert_eq!(t.foreign, ["KNI-custom", "KNI-custom-2"]);
    assert_eq!(t.jumps.len(), 1);
    assert_eq!(
        t.referenced,
        ["KNI-PODI-1".to_string(), "KNI-POLI-1".to_string()].into()
    );
    assert_eq!(t.sets_used, ["KNI-4P-1".to_string()].into());
    assert!(!t.rules.contains_key("KNI-custom"));
}

#[test]
fn an_untouched_table_shows_no_drift() {
    // What we believe we wrote: hooks in our order, rules in Rust's address spelling.
    let jump = |builtin: &str, chain: &str| Jump {
        builtin: builtin.into(),
        position: 1,
        spec: format!("-m comment --comment kube-netpol-iptables -j {chain}"),
    };
    let mut want = KernelTable {
        chains: vec![
            "KNI-FORWARD".into(),
            "KNI-INPUT".into(),
            "KNI-OUTPUT".into(),
        ],
        jumps: vec![
            jump("FORWARD", "KNI-FORWARD"),
            jump("INPUT", "KNI-INPUT"),
            jump("OUTPUT", "KNI-OUTPUT"),
        ],
        ..Default::default()
    };
    let compatible: IpNet = "::10.0.0.1/128".parse().unwrap();
    let mapped: IpNet = "::ffff:10.0.0.2/128".parse().unwrap();
    want.rules.insert(
        "KNI-FORWARD".into(),
        vec![
            format!("-s {compatible} -j KNI-PODE-1"),
            format!("-d {mapped} -j KNI-PODI-2"),
        ],
    );
    let believed = View {
        tables: [(Family::V6, want)].into(),
        ..Default::default()
    };
    // What iptables-save prints for it.
    let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KNI-FORWARD - [0:0]\n:KNI-INPUT - [0:0]\n:KNI-OUTPUT - [0:0]\n-A INPUT -m comment --comment kube-netpol-iptables -j KNI-INPUT\n-A FORWARD -m comment --comment kube-netpol-iptables -j KNI-FORWARD\n-A OUTPUT -m comment --comment kube-netpol-iptables -j KNI-OUTPUT\n-A KNI-FORWARD -s ::10.0.0.1/128 -j KNI-PODE-1\n-A KNI-FORWARD -d ::ffff:10.0.0.2/128 -j KNI-PODI-2\nCOMMIT\n";
    let actual = View {
        tables: [(Family::V6, parse_iptables_save(save))].into(),
        ..Default::default()
    };
    assert_eq!(believed.drift_from(&actual), vec![]);
    assert_eq!(
        super::super::render::render_iptables(
            &believed.tables[&Family::V6],
            &actual.tables[&Family::V6]
        ),
        None,
        "nothing to write"
    );
}

#[test]
fn reads_sets_and_normalises_members() {
    let save = "create OTHER hash:ip family inet\nadd OTHER 1.2.3.4\ncreate KNI-4P-1 hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1\nadd KNI-4P-1 10.0.0.1\nadd KNI-4P-1 10.1.0.0/16\ncreate KNI-6N-2 hash:ip,port family inet6 hashsize 1024 maxelem 1048576\nadd KNI-6N-2 fd00::1,sctp:80\nadd KNI-6N-2 fd00::2,icmpv6:128\n";
    let s = parse_ipset_save(save);
    assert!(!s.sets.contains_key("OTHER"));
    let a = &s.sets["KNI-4P-1"];
    assert_eq!(a.kind, Some(SetKind::HashNet));
    assert_eq!(a.family, Some(Family::V4));
    assert!(
        a.members
            .contains(&SetMember::Net("10.0.0.1/32".parse().unwrap()))
    );
    assert!(
        a.members
            .contains(&SetMember::Net("10.1.0.0/16".parse().unwrap()))
    );
    let b = &s.sets["KNI-6N-2"];
    assert_eq!(b.family, Some(Family::V6));
    assert!(b.members.contains(&SetMember::IpPort(
        "fd00::1".parse().unwrap(),
        Protocol::Sctp,
        80
    )));
    assert_eq!(b.unparsed_members, vec!["fd00::2,icmpv6:128".to_string()]);
}

#[test]
fn reads_headers_and_entry_counts_of_our_sets() {
    // `ipset list -t` of ipset 7.17.
    let text = "Name: KNI-4P-1\nType: hash:ip\nRevision: 6\nHeader: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x459d20e7\nSize in memory: 296\nReferences: 1\nNumber of entries: 2\n\nName: foo\nType: hash:net\nRevision: 7\nHeader: family inet6 hashsize 1024 maxelem 65536\nSize in memory: 1240\nReferences: 0\nNumber of entries: 0\nName: KNI-6N-2\nType: hash:net\nRevision: 7\nHeader: family inet6 hashsize 1024 maxelem 131072 bucketsize 12 initval 0x1aec8a78\nSize in memory: 1240\nReferences: 0\nNumber of entries: 70000\n";
    let headers = parse_ipset_headers(text);
    assert_eq!(headers.keys().collect::<Vec<_>>(), ["KNI-4P-1", "KNI-6N-2"]);
    assert_eq!(
        headers["KNI-4P-1"],
        SetHeader {
            kind: Some(SetKind::HashIp),
            family: Some(Family::V4),
            maxelem: Some(65_536),
            entries: 2
        }
    );
    assert_eq!(
        headers["KNI-6N-2"],
        SetHeader {
            kind: Some(SetKind::HashNet),
            family: Some(Family::V6),
            maxelem: Some(131_072),
            entries: 70_000
        }
    );
}
