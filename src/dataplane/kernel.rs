//! What the kernel holds of ours, parsed from `iptables-save -t filter` and `ipset save` (pure).

use super::render::{
    HOOK_COMMENT, RETIRED_RULE, hook_spec, maxelem_fits, maxelem_for, render_rule,
};
use crate::model::Protocol;
use crate::names;
use crate::state::{DesiredState, Family, Members, SetKind, SetMember};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

const BUILTIN_CHAINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

/// Our part of one family's filter table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Chains with our prefix.
    pub chains: Vec<String>,
    /// Rules in built-in chains that jump to one of our chains.
    pub jumps: Vec<Jump>,
    /// Our chains' rules, as iptables-save prints them (without `-A CHAIN`).
    pub rules: BTreeMap<String, Vec<String>>,
    /// Our chains that someone else's rule jumps to: the kernel refuses to delete them while that
    /// rule exists.
    pub referenced: BTreeSet<String>,
    /// Sets our chains' rules match on (what makes a set ours, besides our registry).
    pub sets_used: BTreeSet<String>,
    /// Chains with our prefix that are not ours: never touched, warned about.
    pub foreign: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub builtin: String,
    /// 1-based position in the built-in chain.
    pub position: usize,
    /// The rule as iptables-save prints it, after `-A CHAIN `.
    pub spec: String,
}

/// Our part of a filter table. Our prefix alone does not make a chain ours (another tool may use
/// it too): ours are the chains our hooks (the built-in chains' jumps carrying our comment) lead to,
/// through jumps in chains of ours, plus our fixed dispatch chains, chains we retired (see
/// [`RETIRED_RULE`]) and chains with the exact shape of our generated names
/// ([`names::is_generated_chain`]), which nothing may lead to after another tool flushed ours. That holds across restarts and for what earlier releases created, whose
/// hooks carry the same comment. Everything else under our prefix is listed in `foreign`.
pub fn parse_iptables_save(text: &str) -> KernelTable {
    let mut table = KernelTable::default();
    let mut in_filter = false;
    let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
    // Chains with our prefix and their rules, before we know which are ours.
    let mut prefixed: Vec<String> = Vec::new();
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // (chain, target) of every other rule that jumps to a name with our prefix.
    let mut jumps_in: Vec<(&str, &str)> = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_filter = t.trim() == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if names::is_owned(name) {
                prefixed.push(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            if names::is_owned(chain) {
                rules
                    .entry(chain.to_string())
                    .or_default()
                    .push(canonical_addresses(spec));
                continue;
            }
            let target = jump_target(spec).filter(|t| names::is_owned(t));
            let builtin = BUILTIN_CHAINS.iter().find(|b| **b == chain);
            if let Some(builtin) = builtin {
                let pos = positions.entry(builtin).or_insert(0);
                *pos += 1;
                if target.is_some() && is_our_hook(spec) {
                    table.jumps.push(Jump {
                        builtin: chain.to_string(),
                        position: *pos,
                        spec: spec.to_string(),
                    });
                    continue;
                }
            }
            if let Some(target) = target {
                jumps_in.push((chain, target));
            }
        }
    }
    // Ours: reachable from our hooks and fixed chains, and retired chains.
    let retired = [RETIRED_RULE.to_string()];
    let mut todo: Vec<String> = table
        .jumps
        .iter()
        .filter_map(|j| jump_target(&j.spec).map(str::to_owned))
        .chain(
            [
                names::FORWARD_CHAIN,
                names::INPUT_CHAIN,
                names::OUTPUT_CHAIN,
            ]
            .iter()
            .map(|c| c.to_string()),
        )
        .chain(
            prefixed
                .iter()
                .filter(|c| {
                    rules.get(*c).is_some_and(|r| r[..] == retired[..])
                        || names::is_generated_chain(c)
                })
                .cloned(),
        )
        .collect();
    let mut ours: BTreeSet<String> = BTreeSet::new();
    while let Some(chain) = todo.pop() {
        if !prefixed.contains(&chain) || !ours.insert(chain.clone()) {
            continue;
        }
        for rule in rules.get(&chain).into_iter().flatten() {
            if let Some(t) = jump_target(rule).filter(|t| names::is_owned(t)) {
                todo.push(t.to_string());
            }
        }
    }
    for chain in prefixed {
        if ours.contains(&chain) {
            if let Some(r) = rules.remove(&chain) {
                for rule in &r {
                    table.sets_used.extend(match_sets(rule).map(str::to_owned));
                }
                table.rules.insert(chain.clone(), r);
            }
            table.chains.push(chain);
        } else {
            for rule in rules.get(&chain).into_iter().flatten() {
                if let Some(t) = jump_target(rule).filter(|t| ours.contains(*t)) {
                    table.referenced.insert(t.to_string());
                }
            }
            table.foreign.push(chain);
        }
    }
    for (_, target) in jumps_in {
        if ours.contains(target) {
            table.referenced.insert(target.to_string());
        }
    }
    table
}

/// The chain a rule jumps or goes to.
fn jump_target(spec: &str) -> Option<&str> {
    spec.split_whitespace()
        .skip_while(|w| *w != "-j" && *w != "-g")
        .nth(1)
}

/// Whether a built-in chain's rule is one of our hooks (they all carry our comment).
fn is_our_hook(spec: &str) -> bool {
    spec.starts_with(&format!("-m comment --comment {HOOK_COMMENT} "))
}

/// The sets a rule matches on.
fn match_sets(spec: &str) -> impl Iterator<Item = &str> {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let sets: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "--match-set")
        .map(|w| w[1])
        .collect();
    sets.into_iter()
}

/// `spec` with its IPv6 addresses (`-s`, `-d`) in the form we render them. iptables prints an
/// IPv4-compatible address as `::10.0.0.1`, Rust as `::a00:1`: compared as text, such a rule would
/// differ on every read and be rewritten by every full sync.
fn canonical_addresses(spec: &str) -> String {
    if !spec.contains(':') {
        return spec.to_string();
    }
    let mut out: Vec<String> = Vec::new();
    let mut address_next = false;
    for word in spec.split(' ') {
        let canonical = address_next
            .then(|| word.parse::<IpNet>().ok())
            .flatten()
            .map(|net| net.to_string());
        address_next = matches!(word, "-s" | "-d");
        out.push(canonical.unwrap_or_else(|| word.to_string()));
    }
    out.join(" ")
}

/// Our sets, from `ipset save`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSets {
    pub sets: BTreeMap<String, KernelSet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSet {
    /// None when the kernel's type is not one we create.
    pub kind: Option<SetKind>,
    pub family: Option<Family>,
    pub maxelem: Option<u32>,
    pub members: Members,
    /// Entries we could not read back (they are deleted on the next sync).
    pub unparsed_members: Vec<String>,
}

pub fn parse_ipset_save(text: &str) -> KernelSets {
    let mut sets = KernelSets::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("create"), Some(name)) if names::is_owned(name) => {
                let kind = match words.next() {
                    Some("hash:ip") => Some(SetKind::HashIp),
                    Some("hash:net") => Some(SetKind::HashNet),
                    Some("hash:ip,port") => Some(SetKind::HashIpPort),
                    _ => None,
                };
                let rest: Vec<&str> = words.collect();
                let family = rest
                    .windows(2)
                    .find(|w| w[0] == "family")
                    .and_then(|w| match w[1] {
                        "inet" => Some(Family::V4),
                        "inet6" => Some(Family::V6),
                        _ => None,
                    });
                let maxelem = rest
                    .windows(2)
                    .find(|w| w[0] == "maxelem")
                    .and_then(|w| w[1].parse().ok());
                sets.sets.insert(
                    name.to_string(),
                    KernelSet {
                        kind,
                        family,
                        maxelem,
                        ..Default::default()
                    },
                );
            }
            (Some("add"), Some(name)) => {
                if let Some(set) = sets.sets.get_mut(name) {
                    let entry = words.next().unwrap_or_default();
                    match parse_member(set.kind, entry) {
                        Some(m) => {
                            std::sync::Arc::make_mut(&mut set.members).insert(m);
                        }
                        None => set.unparsed_members.push(entry.to_string()),
                    }
                }
            }
            _ => {}
        }
    }
    sets
}

fn parse_member(kind: Option<SetKind>, entry: &str) -> Option<SetMember> {
    match kind? {
        SetKind::HashIp => Some(SetMember::Ip(entry.parse().ok()?)),
        SetKind::HashNet => {
            let net = match entry.parse::<IpNet>() {
                Ok(n) => n,
                // ipset prints host entries without a prefix length.
                Err(_) => IpNet::from(entry.parse::<IpAddr>().ok()?),
            };
            Some(SetMember::Net(net))
        }
        SetKind::HashIpPort => {
            let (ip, proto_port) = entry.rsplit_once(',')?;
            let (proto, port) = proto_port.split_once(':')?;
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                _ => return None,
            };
            Some(SetMember::IpPort(
                ip.parse().ok()?,
                proto,
                port.parse().ok()?,
            ))
        }
    }
}

/// Our part of the kernel: sets and both families' filter tables. Either read from the kernel or
/// derived from what we last wrote (what the kernel holds if nobody else touched it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub sets: KernelSets,
    pub tables: BTreeMap<Family, KernelTable>,
}

impl View {
    /// The view the kernel shows once `desired` is written.
    pub fn of_desired(desired: &[(Family, DesiredState)]) -> View {
        let mut view = View::default();
        for (family, state) in desired {
            for (name, set) in &state.sets {
                view.sets.sets.insert(
                    name.clone(),
                    KernelSet {
                        kind: Some(set.kind),
                        family: Some(set.family),
                        maxelem: Some(maxelem_for(set.members.len())),
                        members: set.members.clone(),
                        unparsed_members: vec![],
                    },
                );
            }
            let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
            let table = KernelTable {
                chains: state.chains.keys().cloned().collect(),
                jumps: state
                    .hooks
                    .iter()
                    .map(|h| {
                        let pos = positions.entry(h.builtin).or_insert(0);
                        *pos += 1;
                        Jump {
                            builtin: h.builtin.to_string(),
                            position: *pos,
                            spec: hook_spec(h),
                        }
                    })
                    .collect(),
                rules: state
                    .chains
                    .iter()
                    .map(|(c, rules)| {
                        (
                            c.clone(),
                            rules.iter().map(|r| render_rule(*family, r)).collect(),
                        )
                    })
                    .collect(),
                ..Default::default()
            };
            view.tables.insert(*family, table);
        }
        view
    }

    /// Where `actual` (read from the kernel) differs from `self` (what we believe we wrote), one
    /// line per difference, for logs and the repair count.
    pub fn drift_from(&self, actual: &View) -> Vec<String> {
        let mut out = Vec::new();
        for (name, want) in &self.sets.sets {
            match actual.sets.sets.get(name) {
                None => out.push(format!("set {name} is missing")),
                Some(got) => {
                    if got.kind != want.kind
                        || got.family != want.family
                        || !maxelem_fits(got.maxelem, want.members.len())
                    {
                        out.push(format!("set {name} has other type or parameters"));
                    }
                    let missing = want.members.difference(&got.members).count();
                    let extra =
                        got.members.difference(&want.members).count() + got.unparsed_members.len();
                    if missing + extra > 0 {
                        out.push(format!(
                            "set {name}: {missing} members missing, {extra} extra"
                        ));
                    }
                }
            }
        }
        for name in actual
            .sets
            .sets
            .keys()
            .filter(|n| !self.sets.sets.contains_key(*n))
        {
            out.push(format!("set {name} is not ours any more but exists"));
        }
        let empty = KernelTable::default();
        for (family, want) in &self.tables {
            let got = actual.tables.get(family).unwrap_or(&empty);
            for chain in &want.chains {
                if !got.chains.contains(chain) {
                    out.push(format!("{family} chain {chain} is missing"));
                } else if got.rules.get(chain).map(Vec::as_slice).unwrap_or_default()
                    != want.rules.get(chain).map(Vec::as_slice).unwrap_or_default()
                {
                    out.push(format!("{family} chain {chain} has other rules"));
                }
            }
            for chain in got.chains.iter().filter(|c| !want.chains.contains(c)) {
                out.push(format!("{family} chain {chain} exists but is not wanted"));
            }
            // iptables-save lists built-in chains in its own order (INPUT, FORWARD, OUTPUT).
            let by_chain = |jumps: &[Jump]| {
                let mut sorted = jumps.to_vec();
                sorted.sort_by(|a, b| a.builtin.cmp(&b.builtin));
                sorted
            };
            if by_chain(&got.jumps) != by_chain(&want.jumps) {
                out.push(format!(
                    "{family} jumps from built-in chains differ: {:?}",
                    got.jumps
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:FOREIGN - [0:0]\n:KNI-FORWARD - [0:0]\n:KNI-PODI-1 - [0:0]\n:KNI-POLI-1 - [0:0]\n:KNI-POLI-OLD - [0:0]\n:KNI-custom - [0:0]\n:KNI-custom-2 - [0:0]\n-A FORWARD -j KNI-custom\n-A FORWARD -m comment --comment kube-netpol-iptables -j KNI-FORWARD\n-A FOREIGN -j KNI-POLI-1\n-A KNI-FORWARD -d 10.0.0.1/32 -j KNI-PODI-1\n-A KNI-PODI-1 -j KNI-POLI-1\n-A KNI-POLI-1 -m set --match-set KNI-4P-1 src -j MARK --set-xmark 0x400000/0x400000\n-A KNI-POLI-OLD {RETIRED_RULE}\n-A KNI-custom -j KNI-custom-2\n-A KNI-custom-2 -j KNI-PODI-1\nCOMMIT\n"
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
        assert_eq!(believed.drift_from(&actual), Vec::<String>::new());
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
}
