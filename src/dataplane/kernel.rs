//! The kernel as the sync sees it: save and restore, for iptables (per family, filter table) and
//! for ipset. [`Tables`](super::Tables) runs the tools; tests use an in-memory kernel that applies
//! the same restore text.
//!
//! This module also keeps the older paths of the view types and parsers
//! (`dataplane::kernel::View`, `dataplane::kernel::parse_iptables_save`, …).

use super::backend::Backend;
use super::error::Result;
use crate::compile::ir::Family;

pub use super::parse::{parse_ipset_headers, parse_ipset_save, parse_iptables_save};
pub use super::view::{Jump, KernelSet, KernelSets, KernelTable, SetHeader, View};

pub trait Kernel: Send {
    fn backend(&self) -> Backend;
    /// `iptables-save -t filter` of one family (empty when the backend has no filter table yet).
    fn iptables_save(&self, family: Family) -> Result<String>;
    /// `iptables-restore --noflush`: applied whole or not at all (per table).
    fn iptables_restore(&self, family: Family, text: &str) -> Result<()>;
    /// `iptables -S CHAIN [RULE]`: one chain, or one rule of it (1-based).
    fn iptables_list(&self, family: Family, chain: &str, rule: Option<usize>) -> Result<String>;
    /// `ipset list -n`: every set's name, one a line.
    fn ipset_list_names(&self) -> Result<String>;
    /// `ipset save` of `sets` only.
    fn ipset_save(&self, sets: &[String]) -> Result<String>;
    /// `ipset list -t` of `sets` only: each set's header and number of entries, not its entries.
    fn ipset_headers(&self, sets: &[String]) -> Result<String>;
    /// `ipset -exist restore`, the text as given (a failing line stops the batch there).
    fn ipset_restore(&self, text: &str) -> Result<()>;
    /// The same node through the other iptables backend, when that is installed.
    fn other_backend(&self) -> Option<Box<dyn Kernel>>;
}

impl<K: Kernel + ?Sized> Kernel for Box<K> {
    fn backend(&self) -> Backend {
        (**self).backend()
    }
    fn iptables_save(&self, family: Family) -> Result<String> {
        (**self).iptables_save(family)
    }
    fn iptables_restore(&self, family: Family, text: &str) -> Result<()> {
        (**self).iptables_restore(family, text)
    }
    fn iptables_list(&self, family: Family, chain: &str, rule: Option<usize>) -> Result<String> {
        (**self).iptables_list(family, chain, rule)
    }
    fn ipset_list_names(&self) -> Result<String> {
        (**self).ipset_list_names()
    }
    fn ipset_save(&self, sets: &[String]) -> Result<String> {
        (**self).ipset_save(sets)
    }
    fn ipset_headers(&self, sets: &[String]) -> Result<String> {
        (**self).ipset_headers(sets)
    }
    fn ipset_restore(&self, text: &str) -> Result<()> {
        (**self).ipset_restore(text)
    }
    fn other_backend(&self) -> Option<Box<dyn Kernel>> {
        (**self).other_backend()
    }
}
