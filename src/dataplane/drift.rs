//! Drift: where the kernel differs from what we believe we wrote, by kind.

use super::view::{Jump, KernelTable, View, maxelem_fits};
use crate::compile::ir::Family;
use std::fmt;

/// One difference between the kernel and what we had written, found by a full sync (and then
/// repaired by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    SetMissing {
        set: String,
    },
    /// Other type, family or size than we created it with.
    SetParameters {
        set: String,
    },
    SetMembers {
        set: String,
        missing: usize,
        extra: usize,
    },
    /// A set we no longer want still exists.
    SetUnwanted {
        set: String,
    },
    ChainMissing {
        family: Family,
        chain: String,
    },
    ChainRules {
        family: Family,
        chain: String,
    },
    /// A chain we no longer want still exists.
    ChainUnwanted {
        family: Family,
        chain: String,
    },
    /// A built-in chain we hook has no jump of ours.
    HookMissing {
        family: Family,
        builtin: String,
    },
    /// Our jump in a built-in chain is not the single first rule we wrote.
    HookMoved {
        family: Family,
        builtin: String,
        found: Vec<Jump>,
    },
    /// A built-in chain we no longer hook still has a jump of ours.
    HookUnwanted {
        family: Family,
        builtin: String,
    },
}

impl Drift {
    /// The set, chain or built-in chain the drift is about.
    pub fn object(&self) -> &str {
        match self {
            Drift::SetMissing { set }
            | Drift::SetParameters { set }
            | Drift::SetMembers { set, .. }
            | Drift::SetUnwanted { set } => set,
            Drift::ChainMissing { chain, .. }
            | Drift::ChainRules { chain, .. }
            | Drift::ChainUnwanted { chain, .. } => chain,
            Drift::HookMissing { builtin, .. }
            | Drift::HookMoved { builtin, .. }
            | Drift::HookUnwanted { builtin, .. } => builtin,
        }
    }

    /// A short, fixed label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Drift::SetMissing { .. } => "set_missing",
            Drift::SetParameters { .. } => "set_parameters",
            Drift::SetMembers { .. } => "set_members",
            Drift::SetUnwanted { .. } => "set_unwanted",
            Drift::ChainMissing { .. } => "chain_missing",
            Drift::ChainRules { .. } => "chain_rules",
            Drift::ChainUnwanted { .. } => "chain_unwanted",
            Drift::HookMissing { .. } => "hook_missing",
            Drift::HookMoved { .. } => "hook_moved",
            Drift::HookUnwanted { .. } => "hook_unwanted",
        }
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::SetMissing { set } => write!(f, "set {set} is missing"),
            Drift::SetParameters { set } => write!(f, "set {set} has other type or parameters"),
            Drift::SetMembers {
                set,
                missing,
                extra,
            } => write!(f, "set {set}: {missing} members missing, {extra} extra"),
            Drift::SetUnwanted { set } => write!(f, "set {set} is not ours any more but exists"),
            Drift::ChainMissing { family, chain } => write!(f, "{family} chain {chain} is missing"),
            Drift::ChainRules { family, chain } => {
                write!(f, "{family} chain {chain} has other rules")
            }
            Drift::ChainUnwanted { family, chain } => {
                write!(f, "{family} chain {chain} exists but is not wanted")
            }
            Drift::HookMissing { family, builtin } => {
                write!(f, "{family} jump from {builtin} is missing")
            }
            Drift::HookMoved {
                family,
                builtin,
                found,
            } => write!(
                f,
                "{family} jump from {builtin} is not the single first rule: {found:?}"
            ),
            Drift::HookUnwanted { family, builtin } => {
                write!(f, "{family} jump from {builtin} exists but is not wanted")
            }
        }
    }
}

impl View {
    /// Where `actual` (read from the kernel) differs from `self` (what we believe we wrote).
    pub fn drift_from(&self, actual: &View) -> Vec<Drift> {
        let mut out = Vec::new();
        for (name, want) in &self.sets.sets {
            let set = name.clone();
            match actual.sets.sets.get(name) {
                None => out.push(Drift::SetMissing { set }),
                Some(got) => {
                    if got.kind != want.kind
                        || got.family != want.family
                        || !maxelem_fits(got.maxelem, want.members.len())
                    {
                        out.push(Drift::SetParameters { set: set.clone() });
                    }
                    // Shared when the read took the members as we wrote them: nothing to compare.
                    if std::sync::Arc::ptr_eq(&want.members, &got.members)
                        && got.unparsed_members.is_empty()
                    {
                        continue;
                    }
                    let missing = want.members.difference(&got.members).count();
                    let extra =
                        got.members.difference(&want.members).count() + got.unparsed_members.len();
                    if missing + extra > 0 {
                        out.push(Drift::SetMembers {
                            set,
                            missing,
                            extra,
                        });
                    }
                }
            }
        }
        for name in actual
            .sets
            .sets
            .keys()
            .filter(|n| !self.sets.sets.contains_key(*n))
        {
            out.push(Drift::SetUnwanted { set: name.clone() });
        }
        let empty = KernelTable::default();
        for (family, want) in &self.tables {
            let family = *family;
            let got = actual.tables.get(&family).unwrap_or(&empty);
            let (got_chains, want_chains) = (got.chain_names(), want.chain_names());
            for chain in &want.chains {
                if !got_chains.contains(chain.as_str()) {
                    out.push(Drift::ChainMissing {
                        family,
                        chain: chain.clone(),
                    });
                } else if got.rules.get(chain).map(Vec::as_slice).unwrap_or_default()
                    != want.rules.get(chain).map(Vec::as_slice).unwrap_or_default()
                {
                    out.push(Drift::ChainRules {
                        family,
                        chain: chain.clone(),
                    });
                }
            }
            for chain in got
                .chains
                .iter()
                .filter(|c| !want_chains.contains(c.as_str()))
            {
                out.push(Drift::ChainUnwanted {
                    family,
                    chain: chain.clone(),
                });
            }
            out.extend(hook_drift(family, &want.jumps, &got.jumps));
        }
        out
    }
}

/// Hooks compared per built-in chain (iptables-save lists built-in chains in its own order).
fn hook_drift(family: Family, want: &[Jump], got: &[Jump]) -> Vec<Drift> {
    let in_chain = |jumps: &[Jump], builtin: &str| -> Vec<Jump> {
        jumps
            .iter()
            .filter(|j| j.builtin == builtin)
            .cloned()
            .collect()
    };
    let mut builtins: Vec<&str> = want.iter().chain(got).map(|j| j.builtin.as_str()).collect();
    builtins.sort_unstable();
    builtins.dedup();
    let mut out = Vec::new();
    for builtin in builtins {
        let (wanted, found) = (in_chain(want, builtin), in_chain(got, builtin));
        let builtin = builtin.to_string();
        if wanted == found {
            continue;
        }
        out.push(if found.is_empty() {
            Drift::HookMissing { family, builtin }
        } else if wanted.is_empty() {
            Drift::HookUnwanted { family, builtin }
        } else {
            Drift::HookMoved {
                family,
                builtin,
                found,
            }
        });
    }
    out
}
