//! Which iptables backend (legacy or nft) the agent writes to, and how `auto` picks the one the
//! host uses. No command-line types here: the CLI maps its own argument onto [`BackendChoice`].

use super::error::{DataplaneError, Result};
use super::parse;
use super::process::Tables;
use crate::state::Family;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Legacy,
    Nft,
}

impl BackendChoice {
    /// The names `FromStr` accepts, for the command line's list of possible values.
    pub const NAMES: [&'static str; 3] = ["auto", "legacy", "nft"];
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "legacy" => Ok(BackendChoice::Legacy),
            "nft" => Ok(BackendChoice::Nft),
            other => Err(format!(
                "unknown backend {other:?} (one of: {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Legacy => Backend::Nft,
            Backend::Nft => Backend::Legacy,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse_and_others_do_not() {
        for name in BackendChoice::NAMES {
            assert!(name.parse::<BackendChoice>().is_ok(), "{name}");
        }
        assert_eq!("nft".parse(), Ok(BackendChoice::Nft));
        assert!("nftables".parse::<BackendChoice>().is_err());
    }
}
