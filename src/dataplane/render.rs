//! Pure rendering: desired state + what the kernel holds → `ipset restore` and
//! `iptables-restore --noflush` text. Only our own chains, jumps and sets ever appear in it.

use super::kernel::{Jump, KernelSets, KernelTable, View};
use crate::names;
use crate::state::{ALLOW_MARK, DesiredState, Family, Hook, Match, Rule, SetDirection, Target};
use std::collections::BTreeSet;
use std::fmt::Write;

/// Room for a policy that selects every pod of a large cluster; ipset allocates lazily.
pub const SET_MAXELEM: u32 = 1_048_576;

pub const HOOK_COMMENT: &str = "kube-netpol-iptables";

/// The only rule of a chain we no longer use but cannot delete yet (someone else's rule jumps to
/// it): it matches everything and does nothing, so the chain marks nothing.
pub const RETIRED_RULE: &str =
    "-m comment --comment \"kube-netpol-iptables: retired, still referenced\"";

/// `ipset restore` text that creates missing sets and brings members of existing ones in line,
/// in place. Sets of ours that are no longer wanted are left for [`render_ipset_destroy`], after
/// the rules that used them are gone.
pub fn render_ipset_update<'a>(
    desired: impl IntoIterator<Item = &'a DesiredState>,
    kernel: &KernelSets,
) -> Result<String, String> {
    let mut out = String::new();
    for state in desired {
        for (name, set) in &state.sets {
            let header = format!(
                "{} family {} maxelem {SET_MAXELEM}",
                set.kind.ipset_type(),
                set.family.ipset_name()
            );
            match kernel.sets.get(name) {
                None => {
                    writeln!(out, "create {name} {header}").unwrap();
                    for m in set.members.iter() {
                        writeln!(out, "add {name} {m}").unwrap();
                    }
                }
                Some(existing) => {
                    if existing.kind != Some(set.kind) || existing.family != Some(set.family) {
                        // Names encode type and family, so only something else can cause this, and
                        // ipset cannot swap sets of different types.
                        return Err(format!(
                            "set {name} exists in the kernel as {:?} {:?}, not {header}; something else changed it (run `kube-netpol-iptables cleanup` and sync again)",
                            existing.kind, existing.family
                        ));
                    }
                    if existing.maxelem != Some(SET_MAXELEM) {
                        // Same type, other parameters: fill a scratch set and swap it in, so no
                        // packet ever meets a half-filled set.
                        let tmp = names::temporary_set(name);
                        writeln!(out, "create {tmp} {header}").unwrap();
                        writeln!(out, "flush {tmp}").unwrap();
                        for m in set.members.iter() {
                            writeln!(out, "add {tmp} {m}").unwrap();
                        }
                        writeln!(out, "swap {tmp} {name}").unwrap();
                        writeln!(out, "destroy {tmp}").unwrap();
                        continue;
                    }
                    // Shared with what we wrote last time: nothing changed.
                    if std::sync::Arc::ptr_eq(&set.members, &existing.members) {
                        continue;
                    }
                    for m in set.members.difference(&existing.members) {
                        writeln!(out, "add {name} {m}").unwrap();
                    }
                    for m in existing.members.difference(&set.members) {
                        writeln!(out, "del {name} {m}").unwrap();
                    }
                    for raw in &existing.unparsed_members {
                        writeln!(out, "del {name} {raw}").unwrap();
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `ipset restore` text destroying our sets that no desired state uses.
pub fn render_ipset_destroy<'a>(
    desired: impl IntoIterator<Item = &'a DesiredState>,
    kernel: &KernelSets,
) -> String {
    let wanted: BTreeSet<&String> = desired.into_iter().flat_map(|s| s.sets.keys()).collect();
    let mut out = String::new();
    for name in kernel.sets.keys() {
        if !wanted.contains(name) {
            writeln!(out, "destroy {name}").unwrap();
        }
    }
    out
}

/// `iptables-restore --noflush` text that turns one family's filter table from `have` into `want`
/// (our part of it, as `View` describes it), or `None` when they already agree. Only chains whose
/// rules differ are declared (which creates or flushes them) and refilled; stale chains of ours
/// are flushed and deleted; each hook is made the single first rule of its built-in chain.
/// Built-in chains are never flushed; only rules jumping to our chains are touched in them.
pub fn render_iptables(want: &KernelTable, have: &KernelTable) -> Option<String> {
    let empty = Vec::new();
    let changed: Vec<(&String, &Vec<String>)> = want
        .chains
        .iter()
        .map(|chain| (chain, want.rules.get(chain).unwrap_or(&empty)))
        .filter(|(chain, rules)| {
            !have.chains.contains(chain) || have.rules.get(*chain).unwrap_or(&empty) != *rules
        })
        .collect();
    let stale: Vec<&String> = have
        .chains
        .iter()
        .filter(|c| !want.chains.contains(c))
        .collect();
    // A stale chain someone else's rule still jumps to cannot be deleted: it is emptied instead
    // (it then marks nothing, so allows nothing) and deleted by a later sync once released.
    let (retained, deleted): (Vec<&String>, Vec<&String>) = stale
        .into_iter()
        .partition(|c| have.referenced.contains(*c));
    let retired = vec![RETIRED_RULE.to_string()];
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
        .map(|(c, _)| *c)
        .chain(retained.iter().copied())
        .chain(deleted.iter().copied())
    {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    for (chain, rules) in &changed {
        for rule in *rules {
            writeln!(out, "-A {chain} {rule}").unwrap();
        }
    }
    for chain in retained {
        writeln!(out, "-A {chain} {RETIRED_RULE}").unwrap();
    }
    out.push_str(&hooks);
    for chain in deleted {
        writeln!(out, "-X {chain}").unwrap();
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
            writeln!(out, "-A {chain} {RETIRED_RULE}").unwrap();
        } else {
            writeln!(out, "-X {chain}").unwrap();
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

pub fn hook_spec(hook: &Hook) -> String {
    format!("-m comment --comment {HOOK_COMMENT} -j {}", hook.target)
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
    let mut parts: Vec<String> = Vec::new();
    for m in &rule.matches {
        match m {
            Match::Source(net) => parts.push(format!("-s {net}")),
            Match::Destination(net) => parts.push(format!("-d {net}")),
            Match::Protocol(p) => parts.push(format!("-p {}", p.as_kernel_str())),
            Match::Icmp6Type(_) => parts.push("-p ipv6-icmp".into()),
            _ => {}
        }
    }
    if let Some(c) = &rule.comment {
        parts.push(format!("-m comment --comment \"{}\"", sanitize_comment(c)));
    }
    for m in &rule.matches {
        match m {
            Match::Source(_) | Match::Destination(_) | Match::Protocol(_) => {}
            Match::Icmp6Type(t) => parts.push(format!("-m icmp6 --icmpv6-type {t}")),
            Match::EstablishedOrRelated => {
                parts.push("-m conntrack --ctstate RELATED,ESTABLISHED".into())
            }
            Match::SourceIsLocal => parts.push("-m addrtype --src-type LOCAL".into()),
            Match::DestinationPorts { first, last } => {
                if first == last {
                    parts.push(format!("-m multiport --dports {first}"))
                } else {
                    parts.push(format!("-m multiport --dports {first}:{last}"))
                }
            }
            Match::Set { name, direction } => {
                let flags = match direction {
                    SetDirection::Src => "src",
                    SetDirection::Dst => "dst",
                    SetDirection::DstDstPort => "dst,dst",
                };
                parts.push(format!("-m set --match-set {name} {flags}"))
            }
            Match::AllowMarkSet => {
                parts.push(format!("-m mark --mark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}"))
            }
        }
    }
    parts.push(match &rule.target {
        Target::Jump(chain) => format!("-j {chain}"),
        Target::Return => "-j RETURN".into(),
        Target::SetAllowMark => format!("-j MARK --set-xmark {ALLOW_MARK:#x}/{ALLOW_MARK:#x}"),
        Target::ClearAllowMark => format!("-j MARK --set-xmark 0x0/{ALLOW_MARK:#x}"),
        Target::RejectWithTcpReset => "-j REJECT --reject-with tcp-reset".into(),
        Target::Reject => match family {
            Family::V4 => "-j REJECT --reject-with icmp-port-unreachable".into(),
            Family::V6 => "-j REJECT --reject-with icmp6-port-unreachable".into(),
        },
    });
    parts.join(" ")
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
