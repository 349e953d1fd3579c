//! The kernel feature probe: before anything is programmed, every set type, match and target the
//! agent uses is created in scratch objects of our own and removed again, so a missing one is
//! named with its module instead of half-programming the node. The probe rules are built from
//! the same [`Rule`] values the compiler produces and rendered by the one renderer.

use super::error::{DataplaneError, MissingFeature, Result};
use super::kernel::Kernel;
use super::render::{self, PROBE_PREFIX};
use super::sets;
use crate::compile::ir::{Family, Match, Rule, SetDirection, SetKind, Target};
use crate::model::Protocol;

const PROBE_CHAIN: &str = "KNI-PROBE";

/// A set type to create, or a rule (matches and target) to append to the probe chain.
enum Probe {
    /// `None`: a `list:set` (the registry's type).
    Set(Option<(SetKind, Family)>),
    Rule(fn(probe_set: &str) -> Rule),
}

struct Feature {
    what: &'static str,
    module: &'static str,
    probe: Probe,
}

const FEATURES: &[Feature] = &[
    Feature {
        what: "ipset type hash:net (IPv4)",
        module: "ip_set_hash_net",
        probe: Probe::Set(Some((SetKind::HashNet, Family::V4))),
    },
    Feature {
        what: "ipset type hash:net (IPv6)",
        module: "ip_set_hash_net",
        probe: Probe::Set(Some((SetKind::HashNet, Family::V6))),
    },
    Feature {
        what: "ipset type hash:ip (IPv4)",
        module: "ip_set_hash_ip",
        probe: Probe::Set(Some((SetKind::HashIp, Family::V4))),
    },
    Feature {
        what: "ipset type hash:ip (IPv6)",
        module: "ip_set_hash_ip",
        probe: Probe::Set(Some((SetKind::HashIp, Family::V6))),
    },
    Feature {
        what: "ipset type hash:ip,port",
        module: "ip_set_hash_ipport",
        probe: Probe::Set(Some((SetKind::HashIpPort, Family::V4))),
    },
    Feature {
        what: "ipset type list:set (the agent's registry of its sets)",
        module: "ip_set_list_set",
        probe: Probe::Set(None),
    },
    Feature {
        what: "the set match",
        module: "xt_set",
        probe: Probe::Rule(|set| {
            let m = Match::Set {
                name: set.to_string(),
                direction: SetDirection::Src,
            };
            Rule::new(vec![m], Target::Return)
        }),
    },
    Feature {
        what: "the conntrack match",
        module: "xt_conntrack",
        probe: Probe::Rule(|_| Rule::new(vec![Match::EstablishedOrRelated], Target::Return)),
    },
    Feature {
        what: "the addrtype match",
        module: "xt_addrtype",
        probe: Probe::Rule(|_| Rule::new(vec![Match::SourceIsLocal], Target::Return)),
    },
    Feature {
        what: "the comment match",
        module: "xt_comment",
        probe: Probe::Rule(|_| Rule::new(vec![], Target::Return).commented("probe")),
    },
    Feature {
        what: "the multiport match",
        module: "xt_multiport",
        probe: Probe::Rule(|_| {
            let ports = Match::DestinationPorts {
                first: 80,
                last: 81,
            };
            Rule::new(vec![Match::Protocol(Protocol::Sctp), ports], Target::Return)
        }),
    },
    Feature {
        what: "the mark match and MARK target",
        module: "xt_mark",
        probe: Probe::Rule(|_| Rule::new(vec![Match::AllowMarkSet], Target::ClearAllowMark)),
    },
    Feature {
        what: "the REJECT target",
        module: "ipt_REJECT / ip6t_REJECT",
        probe: Probe::Rule(|_| {
            let tcp = Match::Protocol(Protocol::Tcp);
            Rule::new(vec![tcp], Target::RejectWithTcpReset)
        }),
    },
];

/// The scratch set of a set probe.
fn probe_set(kind: Option<(SetKind, Family)>) -> String {
    let suffix = match kind {
        None => "LIST",
        Some((SetKind::HashNet, Family::V4)) => "NET4",
        Some((SetKind::HashNet, Family::V6)) => "NET6",
        Some((SetKind::HashIp, Family::V4)) => "IP4",
        Some((SetKind::HashIp, Family::V6)) => "IP6",
        Some((SetKind::HashIpPort, _)) => "IPPORT",
    };
    format!("{PROBE_PREFIX}{suffix}")
}

/// Checks that the kernel has every feature the agent uses; see the module comment.
pub fn probe_kernel(kernel: &(impl Kernel + ?Sized)) -> Result<()> {
    let sets: Vec<(&Feature, String, String)> = FEATURES
        .iter()
        .filter_map(|f| match f.probe {
            Probe::Set(kind) => Some((
                f,
                probe_set(kind),
                render::probe_set_create(&probe_set(kind), kind),
            )),
            Probe::Rule(_) => None,
        })
        .collect();
    let destroy_sets = || {
        for (_, name, _) in &sets {
            let _ = sets::restore(kernel, &render::destroy_batch([name]));
        }
    };
    // All at once first (the usual case, one process); one by one only to find what is missing.
    let mut missing: Vec<MissingFeature> = Vec::new();
    let note = |f: &Feature, e: DataplaneError| MissingFeature {
        what: f.what,
        module: f.module,
        error: e.to_string(),
    };
    let batch: String = sets.iter().map(|(_, _, line)| line.as_str()).collect();
    if sets::restore(kernel, &batch).is_err() {
        destroy_sets();
        for (f, _, line) in &sets {
            if let Err(e) = sets::restore(kernel, line) {
                missing.push(note(f, e));
            }
        }
    }
    if missing.is_empty() {
        for family in Family::ALL {
            let set = probe_set(Some((SetKind::HashNet, family)));
            let rules: Vec<(&Feature, Rule)> = FEATURES
                .iter()
                .filter_map(|f| match f.probe {
                    Probe::Rule(rule) => Some((f, rule(&set))),
                    Probe::Set(_) => None,
                })
                .collect();
            let all: Vec<&Rule> = rules.iter().map(|(_, r)| r).collect();
            if let Err(e) =
                kernel.iptables_restore(family, &render::chain_batch(family, PROBE_CHAIN, &all))
            {
                // A held lock is not a missing feature: say what it is.
                if matches!(e, DataplaneError::LockHeld { .. }) {
                    destroy_sets();
                    return Err(e);
                }
                for (f, rule) in &rules {
                    let one = render::chain_batch(family, PROBE_CHAIN, &[rule]);
                    if let Err(e) = kernel.iptables_restore(family, &one) {
                        missing.push(note(f, e));
                    }
                }
            }
            let _ = kernel.iptables_restore(family, &render::delete_chain_batch(PROBE_CHAIN));
            if !missing.is_empty() {
                break;
            }
        }
    }
    destroy_sets();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::FeatureMissing(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Backend;
    use crate::dataplane::memory::MemoryKernel;

    #[test]
    fn the_probe_leaves_nothing_behind() {
        let kernel = MemoryKernel::new(Backend::Nft);
        probe_kernel(&kernel).unwrap();
        assert!(kernel.state().sets.is_empty());
        for family in Family::ALL {
            let saved = kernel.iptables_save(family).unwrap();
            assert!(!saved.contains(PROBE_CHAIN), "{saved}");
        }
    }

    #[test]
    fn a_held_lock_is_not_a_missing_feature() {
        let kernel = MemoryKernel::new(Backend::Legacy);
        kernel.state().faults.lock_held = true;
        let err = probe_kernel(&kernel).unwrap_err();
        assert!(matches!(err, DataplaneError::LockHeld { .. }), "{err}");
        assert!(kernel.state().sets.is_empty());
    }

    #[test]
    fn refused_rules_are_named_with_their_modules() {
        let kernel = MemoryKernel::new(Backend::Nft);
        kernel.state().faults.reject_iptables = usize::MAX;
        let err = probe_kernel(&kernel).unwrap_err();
        let DataplaneError::FeatureMissing(missing) = &err else {
            panic!("{err}");
        };
        assert_eq!(missing.len(), 7, "every rule feature: {err}");
        assert!(
            err.to_string()
                .contains("the set match (kernel module xt_set)"),
            "{err}"
        );
        assert!(kernel.state().sets.is_empty());
    }
}
