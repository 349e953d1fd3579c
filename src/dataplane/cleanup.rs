//! Removing what the agent owns: our chains and jumps from a backend, then our sets.

use super::backend::Backend;
use super::error::{DataplaneError, Result};
use super::kernel::Kernel;
use super::parse::parse_iptables_save;
use super::process::Tables;
use super::render;
use super::sets;
use crate::compile::ir::Family;
use std::collections::BTreeSet;

/// Removes our chains and jumps from one backend (both families). Sets are left alone: the other
/// backend's rules may use them.
pub fn remove_rules(kernel: &(impl Kernel + ?Sized)) -> Result<bool> {
    remove_rules_noting(kernel, &mut BTreeSet::new(), false)
}

/// `remove_rules`, adding the sets the removed rules used to `used`. Chains under our prefix
/// that are not ours are left alone (and named in a warning if `warn`).
fn remove_rules_noting(
    kernel: &(impl Kernel + ?Sized),
    used: &mut BTreeSet<String>,
    warn: bool,
) -> Result<bool> {
    let mut removed = false;
    for family in Family::ALL {
        let table = parse_iptables_save(&kernel.iptables_save(family)?);
        if warn {
            warn_foreign_chains(family, &table.foreign);
        }
        used.extend(table.sets_used.iter().cloned());
        if let Some(text) = render::render_iptables_removal(&table) {
            kernel.iptables_restore(family, &text)?;
            removed = true;
        }
    }
    Ok(removed)
}

pub(super) fn warn_foreign_chains<'a>(
    family: Family,
    chains: impl IntoIterator<Item = &'a String>,
) {
    for chain in chains {
        tracing::warn!(
            %family,
            chain = chain.as_str(),
            "a chain with our prefix that this agent did not create (no hook of ours leads to it): left alone"
        );
    }
}

/// Removes every chain, jump and set the agent owns, on every installed backend.
pub fn cleanup() -> Result<()> {
    let found: Vec<Tables> = Backend::ALL
        .iter()
        .filter_map(|b| Tables::find(*b))
        .collect();
    cleanup_on(&found.iter().map(|t| t as &dyn Kernel).collect::<Vec<_>>())
}

/// Removes our chains and jumps from one backend, then every set the agent owns.
pub fn cleanup_backend(kernel: &dyn Kernel) -> Result<()> {
    cleanup_on(&[kernel])
}

fn cleanup_on(kernels: &[&dyn Kernel]) -> Result<()> {
    let Some(first) = kernels.first() else {
        return Err(DataplaneError::NoIptables);
    };
    let mut used = BTreeSet::new();
    for kernel in kernels {
        if remove_rules_noting(*kernel, &mut used, true)? {
            tracing::info!(backend = %kernel.backend(), "removed our chains and jumps");
        }
    }
    // Sets go last: no rule of ours references them any more.
    sets::destroy_all_sets(*first, &used)
}
