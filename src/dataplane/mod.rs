//! The dataplane: reads what the kernel holds of ours, writes the difference in one
//! `ipset restore` and one `iptables-restore --noflush` per family, and removes what we own.
//!
//! One file per job: [`sync`] (the order of a sync, drift, what cannot be removed yet), [`view`]
//! (our part of the kernel as data), [`parse`] (tool output → view), [`render`] (desired state →
//! restore text; the only place that writes iptables/ipset syntax), [`drift`], [`kernel`] (the
//! [`Kernel`] trait the sync talks to), [`process`] (its implementation with the tools), [`lock`]
//! (the xtables lock), [`backend`] (legacy or nft) and [`detect`] (which one the host uses), [`probe`] (kernel features), [`sets`] (our
//! set registry), [`cleanup`], [`canary`] (the cheap hook check) and [`other_engines`].

mod backend;
mod canary;
mod cleanup;
pub mod conntrack;
pub mod counters;
mod detect;
mod drift;
mod error;
pub mod kernel;
mod lock;
#[cfg(test)]
pub(crate) mod memory;
pub mod nflog;
pub mod other_engines;
pub mod parse;
mod probe;
mod process;
pub mod render;
mod sets;
mod sync;
pub mod view;

pub use backend::{Backend, BackendChoice};
pub use cleanup::{cleanup, cleanup_backend, remove_rules};
pub use detect::detect_backend;
pub use drift::Drift;
pub use error::{BlamedLine, DataplaneError, MissingFeature};
pub use kernel::Kernel;
pub use lock::DEFAULT_LOCK_WAIT;
pub use probe::probe_kernel;
pub use process::Tables;
pub use sync::{Dataplane, MEMBER_CHECK_ROUNDS, SyncMode, SyncReport};
