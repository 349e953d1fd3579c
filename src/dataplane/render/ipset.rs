//! `ipset restore` text: creating, filling, rebuilding and destroying our sets, the registry that
//! records which sets are ours, the batch check, and the probe's scratch sets.

use crate::compile::ir::{DesiredState, Family, SetKind};
use crate::compile::names;
use crate::dataplane::error::{DataplaneError, Result};
use crate::dataplane::view::{KernelSets, maxelem_fits, maxelem_for};
use std::collections::BTreeSet;
use std::fmt::Write;

/// Our registry of sets: a `list:set` holding every set this agent created. Our prefix alone does
/// not make a set ours (another tool may use it); membership here does, survives restarts, and is
/// read with one small command. A set in a `list:set` cannot be destroyed until it is taken out,
/// which every batch does right before a `destroy` (see [`with_registry`]).
pub const REGISTRY: &str = "KNI-SETS";
const REGISTRY_SIZE: u32 = 1 << 20;
/// Names of the kernel feature probe's scratch objects.
pub const PROBE_PREFIX: &str = "KNI-PROBE-";

/// The initial hash size for `members` entries (a power of two, at least ipset's default 1024), so
/// that filling a large set does not rehash it over and over.
pub(super) fn hashsize_for(members: usize) -> u32 {
    u32::try_from((members / 4).next_power_of_two())
        .unwrap_or(1 << 30)
        .clamp(1024, 1 << 30)
}

/// `ipset restore` text that creates missing sets and brings members of existing ones in line,
/// in place. Sets of ours that are no longer wanted are left for [`render_ipset_destroy`], after
/// the rules that used them are gone.
pub fn render_ipset_update<'a>(
    desired: impl IntoIterator<Item = &'a DesiredState>,
    kernel: &KernelSets,
) -> Result<String, DataplaneError> {
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
                        return Err(DataplaneError::SetConflict {
                            name: name.clone(),
                            found: format!("{:?} {:?}", existing.kind, existing.family),
                            wanted: header,
                        });
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

/// `batch` with registry bookkeeping: the registry is created when a set is, every created set is
/// registered right after its `create`, and taken out right before its `destroy`.
pub fn with_registry(batch: &str) -> String {
    let mut out = String::with_capacity(batch.len() + 64);
    let mut registry_created = false;
    for line in batch.lines() {
        let mut words = line.split_whitespace();
        let (command, name) = (words.next(), words.next().unwrap_or_default());
        // The kernel feature probe's scratch sets live for a moment and are not registered.
        if (command == Some("create") || name == REGISTRY && command == Some("add"))
            && !name.starts_with(PROBE_PREFIX)
            && !registry_created
        {
            registry_created = true;
            writeln!(out, "create {REGISTRY} list:set size {REGISTRY_SIZE}").unwrap();
        }
        if name == REGISTRY || name.starts_with(PROBE_PREFIX) {
            writeln!(out, "{line}").unwrap();
            continue;
        }
        match command {
            Some("create") => writeln!(out, "{line}\nadd {REGISTRY} {name}").unwrap(),
            Some("destroy") => writeln!(out, "del {REGISTRY} {name}\n{line}").unwrap(),
            _ => writeln!(out, "{line}").unwrap(),
        }
    }
    out
}

/// Commands that act on every set when their name is missing (`flush`, `destroy`) or that must
/// name one. A batch containing a command without its set name is refused before ipset sees it.
pub fn check_batch(text: &str) -> Result<()> {
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let Some(command) = words.next() else {
            continue;
        };
        let named = words.next().is_some_and(names::is_owned);
        let needs_name = matches!(
            command,
            "create" | "add" | "del" | "flush" | "destroy" | "swap" | "list"
        );
        if !needs_name || !named {
            return Err(DataplaneError::UnsafeBatch {
                number: n + 1,
                text: line.to_string(),
            });
        }
    }
    Ok(())
}

/// The set a batch line acts on (`destroy NAME` → NAME), to tell which command a tool refused.
pub fn batch_line_set(line: &str) -> Option<(&str, &str)> {
    let mut words = line.split_whitespace();
    Some((words.next()?, words.next()?))
}

pub fn destroy_batch<'a>(sets: impl IntoIterator<Item = &'a String>) -> String {
    sets.into_iter().map(|n| format!("destroy {n}\n")).collect()
}

/// Puts sets (back) into the registry.
pub fn register_batch<'a>(sets: impl IntoIterator<Item = &'a String>) -> String {
    sets.into_iter()
        .map(|n| format!("add {REGISTRY} {n}\n"))
        .collect()
}

/// `ipset restore` input that prints (`-o save`) the given sets.
pub fn list_batch<'a>(sets: impl IntoIterator<Item = &'a String>) -> String {
    sets.into_iter().map(|n| format!("list {n}\n")).collect()
}

/// `ipset restore` input that prints the header and entry count (`list NAME -t`) of the given sets.
pub fn list_headers_batch<'a>(sets: impl IntoIterator<Item = &'a String>) -> String {
    sets.into_iter().map(|n| format!("list {n} -t\n")).collect()
}

/// A scratch set of the probe: `kind` of `family`, or a `list:set` for `None`.
pub fn probe_set_create(name: &str, kind: Option<(SetKind, Family)>) -> String {
    match kind {
        // A list:set holds sets of any family and takes no `family`.
        None => format!("create {name} list:set\n"),
        Some((kind, family)) => format!(
            "create {name} {} family {}\n",
            kind.ipset_type(),
            family.ipset_name()
        ),
    }
}
