//! ipset I/O: reading back only our own sets, and restore batches in which every command names
//! its set.

use super::{find_in_path, kernel, render, run_tool};
use crate::names;
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn ipset_bin() -> Result<PathBuf> {
    find_in_path("ipset")
        .ok_or_else(|| anyhow!("ipset is not installed (install the ipset package)"))
}

/// Names of every set in this network namespace (`ipset list -n`: names only, no members).
fn set_names() -> Result<Vec<String>> {
    Ok(run_tool(&ipset_bin()?, &["list", "-n"], None)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Our registry of sets: a `list:set` holding every set this agent created. Our prefix alone does
/// not make a set ours (another tool may use it); membership here does, survives restarts, and is
/// read with one small command. A set in a `list:set` cannot be destroyed until it is taken out,
/// which every batch does right before a `destroy` (see [`with_registry`]).
pub const REGISTRY: &str = "KNI-SETS";
const REGISTRY_SIZE: u32 = 1 << 20;
/// Names of the kernel feature probe's scratch objects.
pub const PROBE_PREFIX: &str = "KNI-PROBE-";

/// Our sets as ipset lists them: those in the registry, plus `used` (sets our own rules match on,
/// which earlier releases created without a registry) that exist but are not registered yet,
/// which are registered now. Also returns the other sets with our prefix (foreign).
pub fn ipset_save(used: &BTreeSet<String>) -> Result<(kernel::KernelSets, Vec<String>)> {
    let all = set_names()?;
    let registered: BTreeSet<String> = if all.iter().any(|n| n == REGISTRY) {
        run_tool(&ipset_bin()?, &["-o", "save", "list", REGISTRY], None)?
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("add {REGISTRY} ")))
            .map(|n| n.trim().to_string())
            .collect()
    } else {
        BTreeSet::new()
    };
    let (ours, foreign): (Vec<String>, Vec<String>) = all
        .into_iter()
        .filter(|n| names::is_owned(n) && n != REGISTRY && !n.starts_with(PROBE_PREFIX))
        .partition(|n| registered.contains(n) || used.contains(n));
    let adopt: String = ours
        .iter()
        .filter(|n| !registered.contains(*n))
        .map(|n| format!("add {REGISTRY} {n}\n"))
        .collect();
    if !adopt.is_empty() {
        ipset_restore(&adopt)?;
        tracing::info!(
            sets = adopt.lines().count(),
            "registered sets our rules use that an earlier release created"
        );
    }
    if ours.is_empty() {
        return Ok((kernel::KernelSets::default(), foreign));
    }
    // Only our sets are read: a foreign blocklist of millions of entries would otherwise be
    // copied and parsed on every full sync. One process lists them all.
    let batch: String = ours.iter().map(|n| format!("list {n}\n")).collect();
    let sets = kernel::parse_ipset_save(&run_tool(
        &ipset_bin()?,
        &["-o", "save", "restore"],
        Some(&batch),
    )?);
    Ok((sets, foreign))
}

/// `batch` with registry bookkeeping: the registry is created when a set is, every created set is
/// registered right after its `create`, and taken out right before its `destroy`.
fn with_registry(batch: &str) -> String {
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
            out.push_str(&format!(
                "create {REGISTRY} list:set size {REGISTRY_SIZE}\n"
            ));
        }
        if name == REGISTRY || name.starts_with(PROBE_PREFIX) {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        match command {
            Some("create") => {
                out.push_str(&format!("{line}\nadd {REGISTRY} {name}\n"));
            }
            Some("destroy") => out.push_str(&format!("del {REGISTRY} {name}\n{line}\n")),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
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
            bail!(
                "refusing to run an ipset batch whose line {} does not name a set of ours: {line:?}",
                n + 1
            );
        }
    }
    Ok(())
}

pub fn ipset_restore(text: &str) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    check_batch(text)?;
    let text = with_registry(text);
    run_tool(&ipset_bin()?, &["-exist", "restore"], Some(&text)).map(drop)
}

/// Destroys `names` and returns those that could not be: something else (another firewall's rule)
/// still uses them. That is not an error for the sync: our rules no longer point at them, and
/// later syncs try again.
pub fn destroy_sets(names: &BTreeSet<String>) -> BTreeSet<String> {
    if names.is_empty() {
        return BTreeSet::new();
    }
    let batch: String = names.iter().map(|n| format!("destroy {n}\n")).collect();
    if ipset_restore(&batch).is_ok() {
        return BTreeSet::new();
    }
    // One at a time, to destroy all that can be and learn which cannot.
    let mut left = BTreeSet::new();
    for name in names {
        if let Err(e) = ipset_restore(&format!("destroy {name}\n")) {
            let gone = set_names().map(|all| !all.contains(name)).unwrap_or(false);
            if !gone {
                // Taken out of the registry just before the failed destroy: still ours.
                let _ = ipset_restore(&format!("add {REGISTRY} {name}\n"));
                tracing::warn!(
                    set = name.as_str(),
                    "cannot destroy a set we no longer use (will retry on the next sync): {e:#}"
                );
                left.insert(name.clone());
            }
        }
    }
    left
}

/// Destroys every set of ours. Fails (naming the set) if a rule still uses one, e.g. in a
/// backend that was not cleaned.
pub fn destroy_unused_sets(used: &BTreeSet<String>) -> Result<()> {
    let (sets, foreign) = ipset_save(used)?;
    warn_foreign_sets(&foreign);
    let destroy = render::render_ipset_destroy(std::iter::empty(), &sets);
    ipset_restore(&destroy)?;
    if !destroy.is_empty() {
        tracing::info!(sets = sets.sets.len(), "destroyed our sets");
    }
    if set_names()?.iter().any(|n| n == REGISTRY) {
        ipset_restore(&format!("destroy {REGISTRY}\n"))?;
    }
    Ok(())
}

pub fn warn_foreign_sets<'a>(names: impl IntoIterator<Item = &'a String>) {
    for name in names {
        tracing::warn!(
            set = name.as_str(),
            "a set with our prefix that this agent did not create: left alone"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rendered_command_names_a_set_of_ours() {
        use crate::state::{DesiredState, Family, IpSet, SetKind, SetMember};
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
        let mut kernel = kernel::parse_ipset_save(
            "create KNI-4P-changed hash:net family inet maxelem 1048576\nadd KNI-4P-changed 10.9.9.9\ncreate KNI-4P-rebuilt hash:net family inet maxelem 16\ncreate KNI-4P-stale hash:net family inet maxelem 1048576\n",
        );
        kernel.sets.get_mut("KNI-4P-changed").unwrap().maxelem = desired_maxelem();
        let update = render::render_ipset_update([&desired], &kernel).unwrap();
        let destroy = render::render_ipset_destroy([&desired], &kernel);
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
        kernel::View::of_desired(&[(crate::state::Family::V4, {
            let mut d = crate::state::DesiredState::default();
            d.sets.insert(
                "KNI-4P-x".into(),
                crate::state::IpSet {
                    kind: crate::state::SetKind::HashNet,
                    family: crate::state::Family::V4,
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
                "create {REGISTRY} list:set size {REGISTRY_SIZE}\ncreate KNI-4P-1 hash:net family inet\nadd {REGISTRY} KNI-4P-1\nadd KNI-4P-1 10.0.0.1\ncreate KNI-4P-2 hash:net family inet\nadd {REGISTRY} KNI-4P-2\ndel {REGISTRY} KNI-4P-3\ndestroy KNI-4P-3\ncreate KNI-PROBE-NET4 hash:net\ndestroy KNI-PROBE-NET4\n"
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
}
