//! The reconcile loop: one loop for every [`Source`](crate::source::Source) — debounce, backoff
//! after failures, periodic full resync, the hooks canary — that syncs into a [`Target`] (the
//! node: compile for both families, then the dataplane). Time is tokio's, so tests run it with
//! paused time and a fake target.

pub mod denied_log;
pub mod policy_counters;
mod run;
mod schedule;
mod strict;
mod target;

pub use run::{HEARTBEAT, once, run};
pub use schedule::{CANARY_INTERVAL, INITIAL_BACKOFF, MAX_BACKOFF, Timing};
pub use target::{NodeTarget, Target, desired_states, desired_states_cached};

#[cfg(test)]
mod tests;
