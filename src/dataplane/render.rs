//! Pure rendering: desired state + what the kernel holds → `ipset restore` and
//! `iptables-restore --noflush` text. Only our own chains, jumps and sets ever appear in it.

use super::kernel::{Jump, KernelSets, KernelTable, View};
use crate::names;
use crate::state::{ALLOW_MARK, DesiredState, Family, Hook, Match, Rule, SetDirection, Target};
use std::collections::BTreeSet;
use std::fmt::Write;

/// ipset's own default `maxelem`: sets smaller than half of it keep it, so most sets never change
/// parameters.
const MIN_MAXELEM: u32 = 65_536;

/// The `maxelem` a set of `members` entries is created with: room to double before it must be
/// rebuilt, and a kernel-enforced bound on what the set can ever hold.
pub fn maxelem_for(members: usize) -> u32 {
    let room = members.max(1).saturating_mul(2).next_power_of_two();
    u32::try_from(room).unwrap_or(u32::MAX).max(MIN_MAXELEM)
}

/// Whether a set created with `maxelem` suits `members` entries: at least half (so it can hold
/// them) and at most four times what a new one would get. Otherwise it is rebuilt (filled aside,
/// swapped in); the slack keeps a set that grows or shrinks a little from being rebuilt.
pub fn maxelem_fits(maxelem: Option<u32>, members: usize) -> bool {
    let new = maxelem_for(members);
    maxelem.is_some_and(|m| m >= new / 2 && m <= new.saturating_mul(4))
}

/// The initial hash size for `members` entries (a power of two, at least ipset's default 1024), so
/// that filling a large set does not rehash it over and over.
fn hashsize_for(members: usize) -> u32 {
    u32::try_from((members / 4).next_power_of_two())
        .unwrap_or(1 << 30)
        .clamp(1024, 1 << 30)
}

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
                "{} family {} hashsize {} maxelem {}",
                set.kind.ipset_type(),
                set.family.ipset_name(),
                hashsize_for(set.members.len()),
                maxelem_for(set.members.len())
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
                    if !maxelem_fits(existing.maxelem, set.members.len()) {
                        // Same type, but too small (adding would fail with "Hash is full") or far
                        // too large: fill a scratch set and swap it in, so no packet ever meets a
                        // half-filled set.
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

/// After [`render_ipset_update`] has been written: the `maxelem` of each set it updated in place
/// is the one the kernel already had, not the one a new set would get. `want` is corrected to
/// that, so the next incremental sync knows when a growing set must be rebuilt.
pub fn keep_kernel_set_sizes(want: &mut KernelSets, kernel: &KernelSets) {
    for (name, set) in want.sets.iter_mut() {
        set.maxelem = match kernel.sets.get(name) {
            Some(existing) if maxelem_fits(existing.maxelem, set.members.len()) => existing.maxelem,
            _ => Some(maxelem_for(set.members.len())),
        };
    }
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
        Target::Drop => "-j DROP".into(),
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

#[cfg(test)]
mod set_size_tests {
    use super::*;

    #[test]
    fn sets_are_sized_to_what_they_hold_and_rebuilt_only_when_far_off() {
        assert_eq!(maxelem_for(0), 65_536);
        assert_eq!(maxelem_for(3), 65_536);
        assert_eq!(maxelem_for(40_000), 131_072);
        assert_eq!(maxelem_for(crate::state::MAX_SET_MEMBERS), 524_288);
        for members in [
            0,
            1,
            1000,
            32_768,
            32_769,
            100_000,
            crate::state::MAX_SET_MEMBERS,
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

    fn hosts(count: u32) -> crate::state::Members {
        std::sync::Arc::new(
            (0..count)
                .map(|i| {
                    crate::state::SetMember::Net(ipnet::IpNet::from(std::net::IpAddr::from(
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
        use super::super::kernel::KernelSet;
        use crate::state::{IpSet, SetKind};
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
        let mut remembered = super::super::kernel::View::of_desired(&[(Family::V4, grown)]).sets;
        keep_kernel_set_sizes(&mut remembered, &kernel);
        assert_eq!(remembered.sets["KNI-4P-x"].maxelem, Some(65_536));
        // Growing on to 70,000 would overflow it: rebuilt with room, and swapped in.
        let text = render_ipset_update([&state(70_000)], &remembered).unwrap();
        assert!(text.contains("maxelem 262144"), "{}", &text[..200]);
        assert!(text.contains("swap KNI-4P-x-T"), "rebuilt");
    }
}
