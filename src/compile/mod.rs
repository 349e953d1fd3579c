//! The pure core: a [`ClusterSnapshot`] and a node name in, the [`DesiredState`] of each family
//! out. No I/O; the dataplane renders and writes what this produces.
//!
//! - [`Compiler`]: the one compile path. It keeps peer selections ([`peers`]) between calls, so
//!   the agent's incremental syncs cost work in proportion to the change; a one-shot
//!   `Compiler::new().compile(..)` gives the same result.
//! - [`chains`]: dispatch, pod and policy chains and their rules; [`peers`]: the sets rules match,
//!   one per distinct selection; [`selection`] and [`names`]: what a set selects, canonically, and
//!   the kernel names derived from it; [`ir`]: the desired-state types; [`evaluate`]: walks a
//!   desired state packet by packet as netfilter would.
//! - [`enforcement`]: what the node's options add after compiling (deny action, new-pod
//!   isolation, see [`new_pod_isolation`]; denied-packet logging, see [`log_denied`]); [`strict`]: which established flows a state denies.

mod chains;
mod dispatch;
pub mod enforcement;
pub mod evaluate;
pub mod explain;
pub mod ir;
mod known_pod;
pub mod log_denied;
pub mod names;
pub mod new_pod_isolation;
mod peers;
mod pod_changes;
mod rules;
pub mod selection;
pub mod strict;
#[cfg(test)]
pub(crate) mod tests;
mod tiers;

pub use ir::DesiredState;

use crate::model::{ClusterSnapshot, Family, PerFamily, Pod};
use pod_changes::PodsSeen;
use std::sync::{Arc, Mutex, Weak};

/// Compiles snapshots for one node, remembering peer selections between calls.
#[derive(Default)]
pub struct Compiler {
    selections: peers::Selections,
    /// The pod list the selections were last brought up to date with (`None` before the first
    /// compile). A weak reference keeps its allocation's address from being reused, and a
    /// shared list cannot change in place (`Arc::make_mut` moves it away from weak references
    /// too), so the same address means the same pods: a policy or namespace change then skips
    /// comparing every pod, and a source's `PodsChanged` from this list names the only pods to
    /// compare.
    pods_seen: Option<Weak<Vec<Pod>>>,
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// The desired state of both families on `node`. Equal to what a fresh `Compiler` gives for
    /// the same snapshot, at a cost proportional to what changed since the previous call.
    pub fn compile(&mut self, snapshot: &ClusterSnapshot, node: &str) -> PerFamily<DesiredState> {
        let pods = match &self.pods_seen {
            Some(seen) if std::ptr::eq(seen.as_ptr(), Arc::as_ptr(&snapshot.pods)) => {
                PodsSeen::Same
            }
            Some(seen)
                if std::ptr::eq(seen.as_ptr(), snapshot.pods_changed.since.as_ptr())
                    && std::ptr::eq(
                        snapshot.pods_changed.to.as_ptr(),
                        Arc::as_ptr(&snapshot.pods),
                    ) =>
            {
                PodsSeen::Changed(&snapshot.pods_changed.keys)
            }
            _ => PodsSeen::Unknown,
        };
        self.selections.update(snapshot, pods);
        let policies = chains::sorted_policies(snapshot);
        // The two families are built at once (the agent's change latency is mostly this build):
        // they share only the selections, whose sets serve both. Until they are back, this
        // compiler is a fresh one (no selections, no list seen), should a build panic.
        self.pods_seen = None;
        let selections = Mutex::new(std::mem::take(&mut self.selections));
        let shared = peers::SharedSelections(&selections);
        let build = |family| chains::build(snapshot, &policies, node, family, shared);
        let states = std::thread::scope(|scope| {
            let v6 = scope.spawn(|| build(Family::V6));
            let v4 = build(Family::V4);
            PerFamily {
                v4,
                v6: v6
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            }
        });
        self.selections = selections.into_inner().unwrap_or_else(|e| e.into_inner());
        self.selections.evict_unused();
        self.pods_seen = Some(Arc::downgrade(&snapshot.pods));
        states
    }

    /// One family only (both are compiled; for tests and tools that look at one).
    pub fn compile_family(
        &mut self,
        snapshot: &ClusterSnapshot,
        node: &str,
        family: Family,
    ) -> DesiredState {
        let mut states = self.compile(snapshot, node);
        std::mem::take(&mut states[family])
    }
}
