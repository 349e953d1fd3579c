//! A cheap check, run every few seconds between full syncs, that nobody has flushed our dispatch
//! chains or removed our jumps to them: either opens every flow we deny. The idea is kube-proxy's
//! canary chain (pkg/proxy/iptables/proxier.go watches KUBE-PROXY-CANARY to notice a flushed
//! table); ours reads only the few rules that matter instead of the whole table: for each hook,
//! the first rule of its built-in chain (`iptables -S FORWARD 1`) and our chain it jumps to
//! (`iptables -S KNI-FORWARD`, one rule per local pod).

use super::error::DataplaneError;
use super::kernel::Kernel;
use super::parse::parse_listed_rules;
use super::sync::Dataplane;

impl<K: Kernel> Dataplane<K> {
    /// What is wrong with our hooks and dispatch chains compared with what we last wrote, or
    /// `None` when they are intact (or nothing was written yet, or the check could not run: a
    /// held xtables lock is not damage).
    pub fn hooks_damaged(&self) -> Option<String> {
        let applied = self.applied.as_ref()?;
        for (family, table) in &applied.tables {
            for jump in &table.jumps {
                let Ok(first) = self.tables.iptables_list(*family, &jump.builtin, Some(1)) else {
                    continue;
                };
                if parse_listed_rules(&jump.builtin, &first) != [jump.spec.as_str()] {
                    return Some(format!(
                        "{family}: our jump is not the first rule of {}",
                        jump.builtin
                    ));
                }
                let target = jump.target();
                let rules = match self.tables.iptables_list(*family, target, None) {
                    Ok(rules) => rules,
                    Err(DataplaneError::LockHeld { .. }) => continue,
                    Err(_) => return Some(format!("{family}: chain {target} is missing")),
                };
                let want = table
                    .rules
                    .get(target)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                if parse_listed_rules(target, &rules) != want {
                    return Some(format!("{family}: chain {target} has other rules"));
                }
            }
        }
        None
    }
}
