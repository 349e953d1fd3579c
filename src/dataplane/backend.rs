//! Which iptables backend (legacy or nft) the agent writes to (`detect.rs` picks one for
//! `auto`). No command-line types here: the CLI maps its own argument onto [`BackendChoice`].

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
