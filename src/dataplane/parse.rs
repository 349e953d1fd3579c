//! Reading the kernel: `iptables-save -t filter`, `iptables -S`, `ipset save` and `ipset list -n`
//! output → [`View`](super::view::View) parts (pure). Only what is ours is kept.

use super::view::{
    HOOK_COMMENT, Jump, KernelSet, KernelSets, KernelTable, RETIRED_COMMENT, SetHeader,
};
use crate::compile::ir::{Family, SetKind, SetMember};
use crate::compile::names;
use crate::model::Protocol;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

const BUILTIN_CHAINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

/// Our part of a filter table. Our prefix alone does not make a chain ours (another tool may use
/// it too): ours are the chains our hooks (the built-in chains' jumps carrying our comment) lead to,
/// through jumps in chains of ours, plus our fixed dispatch chains, chains we retired (see
/// [`RETIRED_COMMENT`]) and chains with the exact shape of our generated names
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
    let retired = [format!("-m comment --comment \"{RETIRED_COMMENT}\"")];
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

pub fn parse_ipset_save(text: &str) -> KernelSets {
    let mut sets = KernelSets::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("create"), Some(name)) if names::is_owned(name) => {
                let kind = set_kind(words.next().unwrap_or_default());
                let (family, maxelem) = header_fields(&words.collect::<Vec<_>>());
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

/// The set types we create, by ipset's name for them.
fn set_kind(word: &str) -> Option<SetKind> {
    match word {
        "hash:ip" => Some(SetKind::HashIp),
        "hash:net" => Some(SetKind::HashNet),
        "hash:ip,port" => Some(SetKind::HashIpPort),
        _ => None,
    }
}

/// `family` and `maxelem` from a set's creation options (`family inet hashsize 1024 maxelem …`).
fn header_fields(words: &[&str]) -> (Option<Family>, Option<u32>) {
    let value = |key: &str| words.windows(2).find(|w| w[0] == key).map(|w| w[1]);
    let family = value("family").and_then(|f| match f {
        "inet" => Some(Family::V4),
        "inet6" => Some(Family::V6),
        _ => None,
    });
    (family, value("maxelem").and_then(|m| m.parse().ok()))
}

/// Headers of our sets from `ipset list -t` output (`Name:`, `Type:`, `Header:`,
/// `Number of entries:` per set).
pub fn parse_ipset_headers(text: &str) -> BTreeMap<String, SetHeader> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, SetHeader)> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => {
                out.extend(current.take());
                current = names::is_owned(value).then(|| (value.to_string(), SetHeader::default()));
            }
            "Type" => {
                if let Some((_, h)) = &mut current {
                    h.kind = set_kind(value);
                }
            }
            "Header" => {
                if let Some((_, h)) = &mut current {
                    (h.family, h.maxelem) =
                        header_fields(&value.split_whitespace().collect::<Vec<_>>());
                }
            }
            "Number of entries" => {
                if let Some((_, h)) = &mut current {
                    // Unreadable: matches no count we wrote, so the set is read in full.
                    h.entries = value.parse().unwrap_or(usize::MAX);
                }
            }
            _ => {}
        }
    }
    out.extend(current);
    out
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

/// Set names from `ipset list -n` (one a line).
pub fn parse_set_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The members of a `list:set` from `ipset save` of it (`add REGISTRY NAME` lines).
pub fn parse_list_set_members(registry: &str, text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("add ")?
                .strip_prefix(registry)?
                .strip_prefix(' ')
        })
        .map(|n| n.trim().to_string())
        .collect()
}

/// The rules of `chain` from `iptables -S CHAIN [N]` output, in the canonical form
/// [`parse_iptables_save`] gives them (without `-A CHAIN`).
pub fn parse_listed_rules(chain: &str, text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("-A ")?
                .strip_prefix(chain)?
                .strip_prefix(' ')
        })
        .map(canonical_addresses)
        .collect()
}

/// Rules in `iptables-save` output that are not ours.
pub fn count_foreign_rules(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("-A ") && !l.contains(names::PREFIX))
        .count()
}

/// Whether kubelet's or kube-proxy's marker chains are declared in `iptables-save` output.
pub fn has_kubelet_canary(text: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"))
}

#[cfg(test)]
mod tests;
