//! `--backend auto`: picks the iptables backend the host uses.

use super::backend::{Backend, BackendChoice};
use super::error::{DataplaneError, Result};
use super::parse;
use super::process::Tables;
use crate::compile::ir::Family;

/// Picks the backend the host uses, the way kube-proxy's iptables-wrapper does: the one where
/// kubelet's canary chains live, else the one holding more rules (ours not counted), nft on a tie.
pub fn detect_backend(choice: BackendChoice) -> Result<Tables> {
    let pick = |b: Backend| Tables::find(b).ok_or(DataplaneError::BackendMissing(b));
    match choice {
        BackendChoice::Legacy => pick(Backend::Legacy),
        BackendChoice::Nft => pick(Backend::Nft),
        BackendChoice::Auto => {
            let mut found: Vec<Tables> = Backend::ALL
                .iter()
                .filter_map(|b| Tables::find(*b))
                .collect();
            match found.len() {
                0 => Err(DataplaneError::NoIptables),
                1 => Ok(found.remove(0)),
                _ => {
                    let nft = found.remove(1);
                    let legacy = found.remove(0);
                    let chosen = if has_kubelet_canary(&nft) {
                        nft
                    } else if has_kubelet_canary(&legacy)
                        || foreign_rule_count(&legacy) > foreign_rule_count(&nft)
                    {
                        legacy
                    } else {
                        nft
                    };
                    Ok(chosen)
                }
            }
        }
    }
}

/// Rules in this backend (both families, all tables) that are not ours: how much the host uses it.
fn foreign_rule_count(tables: &Tables) -> usize {
    Family::ALL
        .iter()
        .filter_map(|f| tables.save_all_tables(*f).ok())
        .map(|text| parse::count_foreign_rules(&text))
        .sum()
}

/// Whether kubelet or kube-proxy left their marker chains here (what kube-proxy's
/// iptables-wrapper looks for first).
fn has_kubelet_canary(tables: &Tables) -> bool {
    Family::ALL.iter().any(|f| {
        tables
            .save_table(*f, "mangle")
            .is_ok_and(|t| parse::has_kubelet_canary(&t))
    })
}
