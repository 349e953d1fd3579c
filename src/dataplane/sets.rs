//! Our sets in the kernel: reading back only our own (those in our registry, see
//! [`REGISTRY`]), writing batches in which every command names a set of ours, and destroying
//! sets once no rule of ours uses them.

use super::error::Result;
use super::kernel::Kernel;
use super::parse;
use super::render::{self, PROBE_PREFIX, REGISTRY};
use super::view::KernelSets;
use crate::compile::names;
use std::collections::BTreeSet;

/// Names of every set in this network namespace.
fn set_names(kernel: &(impl Kernel + ?Sized)) -> Result<Vec<String>> {
    Ok(parse::parse_set_names(&kernel.ipset_list_names()?))
}

/// Our sets as ipset lists them: those in the registry, plus `used` (sets our own rules match on,
/// which earlier releases created without a registry) that exist but are not registered yet,
/// which are registered now. Also returns the other sets with our prefix (foreign).
pub fn read_sets(
    kernel: &(impl Kernel + ?Sized),
    used: &BTreeSet<String>,
) -> Result<(KernelSets, Vec<String>)> {
    let (ours, foreign) = our_set_names(kernel, used)?;
    // Only our sets are read: a foreign blocklist of millions of entries would otherwise be
    // copied and parsed on every full sync.
    let sets = parse::parse_ipset_save(&kernel.ipset_save(&ours)?);
    Ok((sets, foreign))
}

/// Like [`read_sets`], but cheaper when we know what we wrote (`believed`): only the headers
/// (`ipset list -t`) are read, and a set's entries only where its header differs from what we
/// wrote (type, family, size, number of entries) or `read_in_full` says so. The other sets are
/// taken to hold what we wrote, sharing its members.
pub fn read_sets_checked(
    kernel: &(impl Kernel + ?Sized),
    used: &BTreeSet<String>,
    believed: &KernelSets,
    read_in_full: impl Fn(&str) -> bool,
) -> Result<(KernelSets, Vec<String>)> {
    let (ours, foreign) = our_set_names(kernel, used)?;
    let headers = parse::parse_ipset_headers(&kernel.ipset_headers(&ours)?);
    let mut sets = KernelSets::default();
    let mut to_read = Vec::new();
    for name in ours {
        match (believed.sets.get(&name), headers.get(&name)) {
            (Some(wrote), Some(header)) if header.matches(wrote) && !read_in_full(&name) => {
                sets.sets.insert(name, wrote.clone());
            }
            _ => to_read.push(name),
        }
    }
    sets.sets
        .extend(parse::parse_ipset_save(&kernel.ipset_save(&to_read)?).sets);
    Ok((sets, foreign))
}

/// Names of our sets (see [`read_sets`]), registering those our rules use that are not yet, and
/// of the other sets with our prefix.
fn our_set_names(
    kernel: &(impl Kernel + ?Sized),
    used: &BTreeSet<String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let all = set_names(kernel)?;
    let registered: BTreeSet<String> = if all.iter().any(|n| n == REGISTRY) {
        parse::parse_list_set_members(REGISTRY, &kernel.ipset_save(&[REGISTRY.to_string()])?)
    } else {
        BTreeSet::new()
    };
    let (ours, foreign): (Vec<String>, Vec<String>) = all
        .into_iter()
        .filter(|n| names::is_owned(n) && n != REGISTRY && !n.starts_with(PROBE_PREFIX))
        .partition(|n| registered.contains(n) || used.contains(n));
    let adopt = render::register_batch(ours.iter().filter(|n| !registered.contains(*n)));
    if !adopt.is_empty() {
        restore(kernel, &adopt)?;
        tracing::info!(
            sets = adopt.lines().count(),
            "registered sets our rules use that an earlier release created"
        );
    }
    Ok((ours, foreign))
}

/// Writes a batch of ours: refused unless every line names a set of ours, and with the registry
/// kept up to date (see [`render::with_registry`]).
pub fn restore(kernel: &(impl Kernel + ?Sized), text: &str) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    render::check_batch(text)?;
    kernel.ipset_restore(&render::with_registry(text))
}

/// Destroys `sets` and returns those that could not be: something else (another firewall's rule)
/// still uses them. That is not an error for the sync: our rules no longer point at them, and
/// later syncs try again.
pub fn destroy_sets(kernel: &(impl Kernel + ?Sized), sets: &BTreeSet<String>) -> BTreeSet<String> {
    if sets.is_empty() || restore(kernel, &render::destroy_batch(sets)).is_ok() {
        return BTreeSet::new();
    }
    // One at a time, to destroy all that can be and learn which cannot.
    let mut left = BTreeSet::new();
    for name in sets {
        if let Err(e) = restore(kernel, &render::destroy_batch([name])) {
            let gone = set_names(kernel).is_ok_and(|all| !all.contains(name));
            if !gone {
                // Taken out of the registry just before the failed destroy: still ours.
                let _ = restore(kernel, &render::register_batch([name]));
                tracing::warn!(
                    set = name.as_str(),
                    "cannot destroy a set we no longer use (will retry on the next sync): {e}"
                );
                left.insert(name.clone());
            }
        }
    }
    left
}

/// Destroys every set of ours. Fails (naming the set) if a rule still uses one, e.g. in a
/// backend that was not cleaned.
pub fn destroy_all_sets(kernel: &(impl Kernel + ?Sized), used: &BTreeSet<String>) -> Result<()> {
    let (sets, foreign) = read_sets(kernel, used)?;
    warn_foreign_sets(&foreign);
    let destroy = render::render_ipset_destroy(std::iter::empty(), &sets);
    restore(kernel, &destroy)?;
    if !destroy.is_empty() {
        tracing::info!(sets = sets.sets.len(), "destroyed our sets");
    }
    if set_names(kernel)?.iter().any(|n| n == REGISTRY) {
        kernel.ipset_restore(&render::destroy_batch([&REGISTRY.to_string()]))?;
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
