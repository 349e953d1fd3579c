//! The sync: brings the kernel to the desired state and remembers what it wrote.
//!
//! Order: sets are created and filled first (so no rule ever points at a missing set), then each
//! family's rules are replaced in one atomic restore (on nf_tables, when existing rules change,
//! preceded by one that puts the new rules in force by additions only; see
//! `render::render_iptables_ahead`), and sets no rule uses any more are destroyed last. Sets and
//! chains that cannot be removed yet (someone else's rule uses them) are remembered and retried,
//! and are not drift. After any failure the applied view is forgotten, so
//! the next sync reads the kernel again.

use super::Backend;
use super::cleanup::{remove_rules, warn_foreign_chains};
use super::drift::Drift;
use super::error::Result;
use super::kernel::Kernel;
use super::parse::parse_iptables_save;
use super::process::Tables;
use super::render;
use super::sets;
use super::view::{KernelTable, View};
use crate::compile::ir::{DesiredState, Family};
use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

/// A full sync that knows what it wrote reads each set's header and entry count, and the entries
/// themselves only of sets whose header differs and of one slice of the sets in this many (by a
/// hash of the name, the next slice each time). So members replaced one for one, which keeps the
/// count, are found within this many full syncs; anything else at the next one.
pub const MEMBER_CHECK_ROUNDS: u64 = 12;

/// The slice of [`MEMBER_CHECK_ROUNDS`] whose members a full sync reads in full.
fn member_check_slice(set: &str) -> u64 {
    // Stable within the process, which is all the rotation needs.
    let mut hasher = DefaultHasher::new();
    set.hash(&mut hasher);
    hasher.finish() % MEMBER_CHECK_ROUNDS
}

/// What one sync wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub ipset_lines: usize,
    pub iptables_lines: usize,
    /// Differences between the kernel and what we had written, found (and repaired) by a full
    /// sync.
    pub repairs: Vec<Drift>,
    /// Chains of ours kept (emptied) because someone else's rule still jumps to them.
    pub retained_chains: usize,
    /// When the rules written were in force, if that was before the sync ended: on nf_tables a
    /// change of existing rules is first put in force by additions only (see
    /// `render::render_iptables_ahead`), then cleaned up.
    pub in_force_at: Option<std::time::Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Diff against what we last wrote; touches the kernel only where the desired state changed.
    Incremental,
    /// Read the kernel back first and repair whatever differs (drift), then clean the other backend.
    Full,
}

/// Writes desired state to one backend and remembers what it wrote, so the next sync can write
/// only the difference.
pub struct Dataplane<K: Kernel = Tables> {
    pub tables: K,
    /// What the kernel holds of ours after our last successful write. `None` after a failure or at
    /// start: the next sync then reads the kernel.
    pub(super) applied: Option<View>,
    /// Sets we no longer use that could not be destroyed yet (still referenced by someone else).
    undestroyed: BTreeSet<String>,
    /// Chains we no longer use, kept empty because someone else's rule jumps to them.
    retained: BTreeSet<(Family, String)>,
    /// Objects under our prefix that are not ours, already warned about.
    warned_foreign: BTreeSet<String>,
    /// Full syncs that read the kernel against what we wrote: picks the slice of sets whose
    /// members are read in full (see [`MEMBER_CHECK_ROUNDS`]).
    member_checks: u64,
}

impl<K: Kernel> Dataplane<K> {
    pub fn new(tables: K) -> Dataplane<K> {
        Dataplane {
            tables,
            applied: None,
            undestroyed: BTreeSet::new(),
            retained: BTreeSet::new(),
            warned_foreign: BTreeSet::new(),
            member_checks: 0,
        }
    }

    /// Warns once per chain we had to keep, and forgets those that are gone. Only a full sync
    /// sees references, so an incremental one keeps the list as it is.
    fn note_retained(
        &mut self,
        seen: BTreeSet<(Family, String)>,
        full: bool,
        report: &mut SyncReport,
    ) {
        if full {
            for (family, chain) in seen.difference(&self.retained) {
                tracing::warn!(
                    %family,
                    chain = chain.as_str(),
                    "a chain we no longer use is still the target of someone else's rule: kept empty (it allows nothing) until that rule goes"
                );
            }
            self.retained = seen;
        }
        report.retained_chains = self.retained.len();
    }

    /// Reads our part of the kernel: the filter tables first, then our sets (the registry's,
    /// those our rules use, and those named exactly as a set we want, or its scratch copy: we
    /// cannot program the name without taking it over, and nobody else derives it). Objects under
    /// our prefix that are not ours are warned about once. With `believed` (what we wrote last),
    /// set members are read only where they may differ (see [`MEMBER_CHECK_ROUNDS`]).
    fn read_kernel(&mut self, want: &View, believed: Option<&View>) -> Result<View> {
        let mut view = View::default();
        let mut used: BTreeSet<String> = want
            .sets
            .sets
            .keys()
            .flat_map(|n| [n.clone(), crate::compile::names::temporary_set(n)])
            .collect();
        for family in Family::ALL {
            let table = parse_iptables_save(&self.tables.iptables_save(family)?);
            used.extend(table.sets_used.iter().cloned());
            let new: Vec<&String> = table
                .foreign
                .iter()
                .filter(|c| !self.warned_foreign.contains(&format!("{family} {c}")))
                .collect();
            warn_foreign_chains(family, new.iter().copied());
            self.warned_foreign
                .extend(table.foreign.iter().map(|c| format!("{family} {c}")));
            view.tables.insert(family, table);
        }
        let (sets, foreign) = match believed {
            None => sets::read_sets(&self.tables, &used)?,
            Some(believed) => {
                let slice = self.member_checks % MEMBER_CHECK_ROUNDS;
                self.member_checks += 1;
                sets::read_sets_checked(&self.tables, &used, &believed.sets, |set| {
                    member_check_slice(set) == slice
                })?
            }
        };
        sets::warn_foreign_sets(foreign.iter().filter(|s| !self.warned_foreign.contains(*s)));
        self.warned_foreign.extend(foreign);
        view.sets = sets;
        Ok(view)
    }

    /// Brings the kernel to `desired` (one state per family). Sets are created and filled first,
    /// then each family's rules are replaced in one atomic restore (on nft after the new rules were
    /// put in force ahead of the old), then sets no rule uses any more are destroyed. On failure
    /// the kernel keeps what it had, or the new rules ahead of the old (each restore is atomic per
    /// table), and the next sync reads the kernel again.
    pub fn sync(
        &mut self,
        desired: &[(Family, DesiredState)],
        mode: SyncMode,
    ) -> Result<SyncReport> {
        // Rendered once: diffed against the kernel now, remembered as what we wrote afterwards.
        let mut want = View::of_desired(desired);
        let incremental = mode == SyncMode::Incremental && self.applied.is_some();
        let mut result = self.sync_inner(desired, &mut want, mode);
        if incremental && let Err(e) = &result {
            // What we remember does not show what others did since (e.g. a rule of theirs that
            // now jumps to a chain we are deleting): read the kernel and try once more.
            tracing::info!("incremental write failed, retrying with a full sync: {e}");
            result = self.sync_inner(desired, &mut want, SyncMode::Full);
        }
        self.applied = result.is_ok().then_some(want);
        result
    }

    fn sync_inner(
        &mut self,
        desired: &[(Family, DesiredState)],
        want: &mut View,
        mode: SyncMode,
    ) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let full = mode == SyncMode::Full || self.applied.is_none();
        // Replaced by `sync` whatever happens, so it is taken rather than copied.
        let view = match (self.applied.take(), full) {
            (Some(applied), false) => applied,
            (believed, _) => {
                let actual = self.read_kernel(want, believed.as_ref())?;
                if let Some(believed) = &believed {
                    report.repairs = believed
                        .drift_from(&actual)
                        .into_iter()
                        .filter(|d| !self.is_known_leftover(d))
                        .collect();
                }
                actual
            }
        };

        let update = render::render_ipset_update(desired.iter().map(|(_, s)| s), &view.sets)?;
        sets::restore(&self.tables, &update)?;
        report.ipset_lines += update.lines().count();
        // Sets updated in place keep the size they were created with; remember that one.
        render::keep_kernel_set_sizes(&mut want.sets, &view.sets);

        let empty = KernelTable::default();
        if self.tables.backend() == Backend::Nft {
            let mut ahead = false;
            for (family, _) in desired {
                let have = view.tables.get(family).unwrap_or(&empty);
                if let Some(text) = render::render_iptables_ahead(&want.tables[family], have) {
                    self.tables.iptables_restore(*family, &text)?;
                    report.iptables_lines += text.lines().count();
                    ahead = true;
                }
            }
            if ahead {
                report.in_force_at = Some(std::time::Instant::now());
            }
        }
        let mut retained = BTreeSet::new();
        for (family, _) in desired {
            let have = view.tables.get(family).unwrap_or(&empty);
            let wanted = want.tables[family].chain_names();
            retained.extend(
                have.chains
                    .iter()
                    .filter(|c| !wanted.contains(c.as_str()))
                    .filter(|c| have.referenced.contains(*c))
                    .map(|c| (*family, c.clone())),
            );
            if let Some(text) = render::render_iptables(&want.tables[family], have) {
                self.tables.iptables_restore(*family, &text)?;
                report.iptables_lines += text.lines().count();
            }
        }

        self.note_retained(retained, full, &mut report);

        // Our rules belong in one backend only. Leftovers in the other (from a run with another
        // --backend, or before the host switched) would judge packets twice and keep sets in use.
        if full
            && let Some(other) = self.tables.other_backend()
            && remove_rules(&other)?
        {
            tracing::info!(backend = %other.backend(), "removed our leftover rules from the other iptables backend");
        }

        // Sets no rule of ours uses any more, plus those an earlier sync could not destroy.
        let wanted: BTreeSet<&String> = desired.iter().flat_map(|(_, s)| s.sets.keys()).collect();
        let mut stale: BTreeSet<String> = view
            .sets
            .sets
            .keys()
            .filter(|n| !wanted.contains(n))
            .cloned()
            .collect();
        stale.extend(
            self.undestroyed
                .iter()
                .filter(|n| !wanted.contains(n))
                .cloned(),
        );
        report.ipset_lines += stale.len();
        self.undestroyed = sets::destroy_sets(&self.tables, &stale);
        Ok(report)
    }

    /// Sets we could not destroy yet and chains we had to keep are known leftovers, not drift.
    fn is_known_leftover(&self, drift: &Drift) -> bool {
        match drift {
            Drift::SetUnwanted { set } => self.undestroyed.contains(set),
            Drift::ChainUnwanted { family, chain } => {
                self.retained.contains(&(*family, chain.clone()))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
