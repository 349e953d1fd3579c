//! Kernel object names. Every chain and set the agent owns starts with [`PREFIX`]; names are derived
//! from what the object stands for (never a time or counter), so they are stable across syncs and
//! restarts and an unchanged cluster writes nothing. Hashed parts keep every name within iptables'
//! 28-character chain limit and ipset's 31-character set limit, whatever the input length.

use crate::state::Family;
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "KNI-";

/// iptables' limit on chain names (XT_EXTENSION_MAXNAMELEN - 1).
pub const MAX_CHAIN_NAME: usize = 28;
/// ipset's limit on set names (IPSET_MAXNAMELEN - 1).
pub const MAX_SET_NAME: usize = 31;

pub const FORWARD_CHAIN: &str = "KNI-FORWARD";
pub const INPUT_CHAIN: &str = "KNI-INPUT";
pub const OUTPUT_CHAIN: &str = "KNI-OUTPUT";

/// 64 bits of SHA-256 in hex: collisions need ~4 billion objects of one kind on one node.
fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        // A separator that cannot occur in Kubernetes names keeps ("ab","c") apart from ("a","bc").
        h.update([0u8]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The chain that judges traffic to (ingress) or from (egress) one local pod.
pub fn pod_chain(ingress: bool, pod_key: &str) -> String {
    let tag = if ingress { "PODI-" } else { "PODE-" };
    format!("{PREFIX}{tag}{}", digest(&[tag, pod_key]))
}

/// The chain that marks traffic one policy allows in one direction.
pub fn policy_chain(ingress: bool, policy_key: &str) -> String {
    let tag = if ingress { "POLI-" } else { "POLE-" };
    format!("{PREFIX}{tag}{}", digest(&[tag, policy_key]))
}

/// A set of peer addresses, named by what defines it (the policy's namespace and the peer list),
/// so rules with the same peers share one set.
pub fn peer_set(family: Family, definition: &str) -> String {
    let tag = match family {
        Family::V4 => "4P-",
        Family::V6 => "6P-",
    };
    format!("{PREFIX}{tag}{}", digest(&[tag, definition]))
}

/// A set of (address, protocol:port) pairs that one named port resolves to.
pub fn named_port_set(family: Family, definition: &str) -> String {
    let tag = match family {
        Family::V4 => "4N-",
        Family::V6 => "6N-",
    };
    format!("{PREFIX}{tag}{}", digest(&[tag, definition]))
}

/// The scratch set used to replace `name` atomically with `ipset swap`.
pub fn temporary_set(name: &str) -> String {
    format!("{name}-T")
}

pub fn is_owned(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// Whether `name` has the exact shape of a pod or policy chain this agent generates (our prefix,
/// a kind tag, 16 lowercase hex digits). Such a chain is ours even when nothing of ours leads to
/// it any more (e.g. another tool flushed our dispatch chains while the agent was down), so it is
/// cleaned up rather than left behind as someone else's.
pub fn is_generated_chain(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    ["PODI-", "PODE-", "POLI-", "POLE-"].iter().any(|tag| {
        rest.strip_prefix(tag).is_some_and(|hex| {
            hex.len() == 16
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_chain_names_are_recognised_by_their_shape() {
        use super::*;
        assert!(is_generated_chain(&pod_chain(true, "x/a")));
        assert!(is_generated_chain(&policy_chain(false, "x/p")));
        for other in [
            "KNI-custom",
            "KNI-FORWARD",
            "KNI-POLI-xyz",
            "KNI-POLI-0123456789ABCDEF",
            "OTHER-POLI-0123456789abcdef",
        ] {
            assert!(!is_generated_chain(other), "{other}");
        }
    }

    use super::*;

    #[test]
    fn names_are_stable_distinct_and_short() {
        let long_key = format!("{}/{}", "n".repeat(63), "p".repeat(253));
        let names = [
            pod_chain(true, &long_key),
            pod_chain(false, &long_key),
            policy_chain(true, &long_key),
            policy_chain(false, &long_key),
        ];
        for n in &names {
            assert!(n.len() <= MAX_CHAIN_NAME, "{n}");
            assert!(is_owned(n));
        }
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(pod_chain(true, "x/a"), pod_chain(true, "x/a"));
        assert_ne!(pod_chain(true, "x/a"), pod_chain(true, "x/b"));
        for fam in Family::ALL {
            let s = temporary_set(&peer_set(fam, &long_key));
            assert!(s.len() <= MAX_SET_NAME, "{s}");
            let s = temporary_set(&named_port_set(fam, &long_key));
            assert!(s.len() <= MAX_SET_NAME, "{s}");
        }
        assert_ne!(peer_set(Family::V4, "d"), peer_set(Family::V6, "d"));
        assert_ne!(peer_set(Family::V4, "d"), named_port_set(Family::V4, "d"));
    }

    #[test]
    fn digest_separates_parts() {
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
    }
}
