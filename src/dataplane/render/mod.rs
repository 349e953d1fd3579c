//! Pure rendering: desired state + what the kernel holds → `ipset restore` and
//! `iptables-restore --noflush` text. The only place that writes iptables and ipset syntax; only
//! our own chains, jumps and sets ever appear in it.

mod ipset;
#[cfg(test)]
mod tests;

pub use ipset::{
    PROBE_PREFIX, REGISTRY, batch_line_set, check_batch, destroy_batch, keep_kernel_set_sizes,
    list_batch, list_headers_batch, probe_set_create, register_batch, render_ipset_destroy,
    render_ipset_update, with_registry,
};

use super::view::{
    HOOK_COMMENT, Jump, KernelSet, KernelSets, KernelTable, RETIRED_COMMENT, View, maxelem_for,
};
use crate::compile::ir::{
    ALLOW_MARK, DesiredState, Family, Hook, LogRule, Match, Rule, SetDirection, TIER_MARK, Target,
};
use std::collections::BTreeMap;
use std::fmt::Write;

/// A chain of ours whose rules change: its name, its wanted rules, and the rules it has now
/// (`None`: the chain is not there yet).
type ChangedChain<'a> = (&'a String, &'a [String], Option<&'a [String]>);

/// Our chains whose rules `want` changes.
fn changed_chains<'a>(want: &'a KernelTable, have: &'a KernelTable) -> Vec<ChangedChain<'a>> {
    let have_chains = have.chain_names();
    let rules_of = |table: &'a KernelTable, chain: &String| -> &'a [String] {
        table.rules.get(chain).map_or(&[], Vec::as_slice)
    };
    want.chains
        .iter()
        .filter_map(|chain| {
            let rules = rules_of(want, chain);
            let old = have_chains
                .contains(chain.as_str())
                .then(|| rules_of(have, chain));
            (old != Some(rules)).then_some((chain, rules, old))
        })
        .collect()
}

/// `iptables-restore --noflush` text that turns one family's filter table from `have` into `want`
/// (our part of it, as `View` describes it), or `None` when they already agree. Only chains whose
/// rules differ are declared (which creates or flushes them) and refilled; stale chains of ours
/// are flushed and deleted; each hook is made the single first rule of its built-in chain.
/// Built-in chains are never flushed; only rules jumping to our chains are touched in them.
pub fn render_iptables(want: &KernelTable, have: &KernelTable) -> Option<String> {
    let changed = changed_chains(want, have);
    let want_chains = want.chain_names();
    let stale: Vec<&String> = have
        .chains
        .iter()
        .filter(|c| !want_chains.contains(c.as_str()))
        .collect();
    // A stale chain someone else's rule still jumps to cannot be deleted: it is emptied instead
    // (it then marks nothing, so allows nothing) and deleted by a later sync once released.
    let (retained, deleted): (Vec<&String>, Vec<&String>) = stale
        .into_iter()
        .partition(|c| have.referenced.contains(*c));
    let retired = vec![retired_rule()];
    let retained: Vec<&String> = retained
        .into_iter()
        .filter(|c| have.rules.get(*c) != Some(&retired))
        .collect();
    let hooks = render_hooks(&want.jumps, have);
    if changed.is_empty() && retained.is_empty() && deleted.is_empty() && hooks.is_empty() {
        return None;
    }
    let mut out = String::from("*filter\n");
    for chain in changed
        .iter()
        .map(|(c, ..)| *c)
        .chain(retained.iter().copied())
        .chain(deleted.iter().copied())
    {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    for (chain, rules, _) in &changed {
        for rule in *rules {
            writeln!(out, "-A {chain} {rule}").unwrap();
        }
    }
    for chain in retained {
        writeln!(out, "-A {chain} {}", retired_rule()).unwrap();
    }
    out.push_str(&hooks);
    for chain in deleted {
        writeln!(out, "-X {chain}").unwrap();
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Above this many rules a write takes far longer than the grace periods it would spare (and
/// would be written twice): the replacement alone is done.
pub const AHEAD_MAX_RULES: usize = 1000;

/// Text that puts `want` in force in chains we already have without removing anything, or `None`
/// when no existing rule of ours would change: each changed chain gets its new rules in front of
/// its old ones, then `-j RETURN`, so the old ones are never reached (falling off a chain of ours
/// returns anyway); chains new to it are created with their rules. [`render_iptables`] then
/// replaces the lot as usual. `None` too above [`AHEAD_MAX_RULES`].
///
/// Why: on nf_tables a commit that removes rules makes its process's exit wait an RCU grace
/// period (see docs/performance.md), two per policy change with both families. Adding only
/// costs none, so a change is in force that much sooner; the clean-up that follows changes no
/// verdict.
pub fn render_iptables_ahead(want: &KernelTable, have: &KernelTable) -> Option<String> {
    let changed = changed_chains(want, have);
    // Whether the chain has rules now, which the new ones go ahead of.
    let replaces = |old: &Option<&[String]>| old.is_some_and(|o| !o.is_empty());
    let lines: usize = changed.iter().map(|(_, rules, _)| rules.len()).sum();
    if !changed.iter().any(|(_, _, old)| replaces(old)) || lines > AHEAD_MAX_RULES {
        return None;
    }
    let mut out = String::from("*filter\n");
    for (chain, _, old) in &changed {
        if old.is_none() {
            writeln!(out, ":{chain} - [0:0]").unwrap();
        }
    }
    for (chain, rules, old) in &changed {
        if replaces(old) {
            // Inserted at the head in reverse: the rules, then the RETURN, before the old rules.
            writeln!(out, "-I {chain} 1 -j RETURN").unwrap();
            for rule in rules.iter().rev() {
                writeln!(out, "-I {chain} 1 {rule}").unwrap();
            }
        } else {
            for rule in *rules {
                writeln!(out, "-A {chain} {rule}").unwrap();
            }
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// Text removing every chain and jump of ours from one family's filter table.
pub fn render_iptables_removal(kernel: &KernelTable) -> Option<String> {
    if kernel.chains.is_empty() && kernel.jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*filter\n");
    for chain in &kernel.chains {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    for jump in &kernel.jumps {
        writeln!(out, "-D {} {}", jump.builtin, jump.spec).unwrap();
    }
    for chain in &kernel.chains {
        if kernel.referenced.contains(chain) {
            // Someone else's rule jumps here: emptied, deleted by a later cleanup.
            writeln!(out, "-A {chain} {}", retired_rule()).unwrap();
        } else {
            writeln!(out, "-X {chain}").unwrap();
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The only rule of a chain we retired (see [`RETIRED_COMMENT`]), as iptables-save prints it.
pub fn retired_rule() -> String {
    format!("-m comment --comment \"{RETIRED_COMMENT}\"")
}

/// Our jump from a built-in chain. Replies and related packets of tracked flows, most packets on
/// a busy node, never enter our chains (whose first rule would let them through anyway): they
/// cost this one rule instead of a jump and a rule.
pub fn hook_spec(hook: &Hook) -> String {
    format!(
        "-m comment --comment {HOOK_COMMENT} -m conntrack ! --ctstate RELATED,ESTABLISHED -j {}",
        hook.target
    )
}

fn render_hooks(want: &[Jump], have: &KernelTable) -> String {
    let mut out = String::new();
    for hook in want {
        let ours: Vec<_> = have
            .jumps
            .iter()
            .filter(|j| j.builtin == hook.builtin)
            .collect();
        // Already exactly right: our single jump, first in the chain.
        if let [only] = ours.as_slice()
            && only.position == 1
            && only.spec == hook.spec
        {
            continue;
        }
        for jump in ours {
            writeln!(out, "-D {} {}", jump.builtin, jump.spec).unwrap();
        }
        writeln!(out, "-I {} 1 {}", hook.builtin, hook.spec).unwrap();
    }
    // Jumps of ours from built-in chains we no longer hook.
    for jump in &have.jumps {
        if !want.iter().any(|h| h.builtin == jump.builtin) {
            writeln!(out, "-D {} {}", jump.builtin, jump.spec).unwrap();
        }
    }
    out
}

/// One rule in iptables-save's canonical form (addresses and protocol first), without `-A CHAIN`.
pub fn render_rule(family: Family, rule: &Rule) -> String {
    // One string written in place: this runs for every rule of every sync.
    let mut out = String::with_capacity(96);
    macro_rules! part {
        ($($arg:tt)*) => {{
            if !out.is_empty() {
                out.push(' ');
            }
            write!(out, $($arg)*).unwrap();
        }};
    }
    for m in &rule.matches {
        match m {
            Match::Source(net) => part!("-s {net}"),
            Match::Destination(net) => part!("-d {net}"),
            Match::Protocol(p) => part!("-p {}", p.as_kernel_str()),
            Match::Icmp6Type(_) => part!("-p ipv6-icmp"),
            _ => {}
        }
    }
    if let Some(c) = &rule.comment {
        part!("-m comment --comment \"{}\"", sanitize_comment(c));
    }
    // Set lookups last: iptables-nft runs `-m set` as an xtables compatibility expression, the
    // other matches as native ones, and a packet stops at the first match that fails, so a rule
    // for another port or a marked packet never pays for the lookup.
    let is_set = |m: &&Match| matches!(m, Match::Set { .. });
    let sets = rule.matches.iter().filter(is_set);
    for m in rule.matches.iter().filter(|m| !is_set(m)).chain(sets) {
        match m {
            Match::Source(_) | Match::Destination(_) | Match::Protocol(_) => {}
            Match::Icmp6Type(t) => part!("-m icmp6 --icmpv6-type {t}"),
            Match::EstablishedOrRelated => {
                part!("-m conntrack --ctstate RELATED,ESTABLISHED")
            }
            Match::SourceIsLocal => part!("-m addrtype --src-type LOCAL"),
            Match::DestinationPorts { first, last } => {
                if first == last {
                    part!("-m multiport --dports {first}")
                } else {
                    part!("-m multiport --dports {first}:{last}")
                }
            }
            Match::Set { name, direction } => {
                let flags = match direction {
                    SetDirection::Src => "src",
                    SetDirection::Dst => "dst",
                    SetDirection::DstDstPort => "dst,dst",
                };
                part!("-m set --match-set {name} {flags}")
            }
            Match::AllowMarkSet => {
                part!("-m mark --mark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}")
            }
            Match::TierUndecided => part!("-m mark --mark 0x0/{TIER_MARK:#x}"),
        }
    }
    match &rule.target {
        Target::Jump(chain) => part!("-j {chain}"),
        Target::Return => part!("-j RETURN"),
        Target::SetAllowMark => part!("-j MARK --set-xmark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}"),
        Target::ClearAllowMark => part!("-j MARK --set-xmark 0x0/{ALLOW_MARK:#x}"),
        Target::SetTierMark { accept } => {
            let bits = TIER_MARK | if *accept { ALLOW_MARK } else { 0 };
            part!("-j MARK --set-xmark {bits:#x}/{bits:#x}")
        }
        Target::ClearMarks => {
            let bits = ALLOW_MARK | TIER_MARK;
            part!("-j MARK --set-xmark 0x0/{bits:#x}")
        }
        Target::RejectWithTcpReset => part!("-j REJECT --reject-with tcp-reset"),
        Target::Reject => match family {
            Family::V4 => part!("-j REJECT --reject-with icmp-port-unreachable"),
            Family::V6 => part!("-j REJECT --reject-with icmp6-port-unreachable"),
        },
        Target::Drop => part!("-j DROP"),
        Target::LogDenied(log) => part!("{}", render_log(log)),
    }
    out
}

/// `-m limit … -j NFLOG …` exactly as iptables-save prints it back (both backends), so that an
/// unchanged rule compares equal and is never rewritten: the rate as the kernel stores it (an
/// interval of 1/10,000 s, `XT_LIMIT_SCALE`, printed back per second), the burst and the group
/// only when not their defaults (5, 0), the prefix unquoted (it holds only letters, digits, `-`).
fn render_log(log: &LogRule) -> String {
    const LIMIT_SCALE: u32 = 10_000;
    const DEFAULT_BURST: u32 = 5;
    let per_second = log.per_second.clamp(1, LIMIT_SCALE);
    let mut out = format!(
        "-m limit --limit {}/sec",
        LIMIT_SCALE / (LIMIT_SCALE / per_second)
    );
    if log.burst != DEFAULT_BURST {
        write!(out, " --limit-burst {}", log.burst).unwrap();
    }
    write!(
        out,
        " -j NFLOG --nflog-prefix {}",
        sanitize_prefix(&log.prefix)
    )
    .unwrap();
    if log.group != 0 {
        write!(out, " --nflog-group {}", log.group).unwrap();
    }
    out
}

/// Prefixes are made of chain names; as for comments, nothing else can reach the restore text.
fn sanitize_prefix(p: &str) -> String {
    p.chars()
        .filter(|ch| ch.is_ascii_alphanumeric() || "_-".contains(*ch))
        .take(crate::compile::log_denied::MAX_PREFIX_LEN)
        .collect()
}

/// Comments only ever carry validated Kubernetes names; this is a second line of defence so that
/// nothing can break out of the quoted argument in the restore text.
fn sanitize_comment(c: &str) -> String {
    c.chars()
        .filter(|ch| ch.is_ascii_alphanumeric() || " ./:_-".contains(*ch))
        .take(200)
        .collect()
}

/// Everything `run` would write to a node with none of our state yet, for `render`.
pub fn render_fresh(states: &[(Family, DesiredState)]) -> String {
    let empty_sets = KernelSets::default();
    let empty_table = KernelTable::default();
    let want = View::of_desired(states);
    let mut out = String::from("# ipset restore\n");
    out.push_str(
        &render_ipset_update(states.iter().map(|(_, s)| s), &empty_sets)
            .expect("an empty kernel has no conflicting sets"),
    );
    for (family, _) in states {
        let tool = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        writeln!(out, "# {tool} --noflush ({family})").unwrap();
        out.push_str(&render_iptables(&want.tables[family], &empty_table).unwrap_or_default());
    }
    out
}

/// A restore batch declaring (creating or flushing) `chain` and appending `rules` to it.
pub fn chain_batch(family: Family, chain: &str, rules: &[&Rule]) -> String {
    let mut out = format!("*filter\n:{chain} - [0:0]\n");
    for rule in rules {
        writeln!(out, "-A {chain} {}", render_rule(family, rule)).unwrap();
    }
    out.push_str("COMMIT\n");
    out
}

/// A restore batch flushing and deleting `chain`.
pub fn delete_chain_batch(chain: &str) -> String {
    format!("*filter\n:{chain} - [0:0]\n-X {chain}\nCOMMIT\n")
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
}
