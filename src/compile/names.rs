//! Kernel object names. Every chain and set the agent owns starts with [`PREFIX`]; names are derived
//! from what the object stands for (never a time or counter), so they are stable across syncs and
//! restarts and an unchanged cluster writes nothing. Hashed parts keep every name within iptables'
//! 28-character chain limit and ipset's 31-character set limit, whatever the input length.

use super::selection::PodSelection;
use crate::model::{Family, Protocol};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "KNI-";

/// iptables' limit on chain names (XT_EXTENSION_MAXNAMELEN - 1).
pub const MAX_CHAIN_NAME: usize = 28;
/// ipset's limit on set names (IPSET_MAXNAMELEN - 1).
pub const MAX_SET_NAME: usize = 31;

pub const FORWARD_CHAIN: &str = "KNI-FORWARD";
pub const INPUT_CHAIN: &str = "KNI-INPUT";
pub const OUTPUT_CHAIN: &str = "KNI-OUTPUT";
/// Behind the dispatch chains: one jump per isolated local pod address, reached only by traffic
/// of isolated pods (see [`isolated_set`]).
pub const EGRESS_DISPATCH_CHAIN: &str = "KNI-DISPATCH-E";
pub const INGRESS_DISPATCH_CHAIN: &str = "KNI-DISPATCH-I";

/// 64 bits of SHA-256 in hex: collisions need ~4 billion objects of one kind on one node.
fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        // A separator that cannot occur in Kubernetes names keeps ("ab","c") apart from ("a","bc").
        h.update([0u8]);
    }
    let first: [u8; 8] = h.finalize()[..8].try_into().expect("SHA-256 has 32 bytes");
    format!("{:016x}", u64::from_be_bytes(first))
}

/// The chain that judges traffic to (ingress) or from (egress) one local pod.
pub fn pod_chain(ingress: bool, pod_key: &str) -> String {
    let tag = if ingress { "PODI-" } else { "PODE-" };
    format!("{PREFIX}{tag}{}", digest(&[tag, pod_key]))
}

/// A branch of a dispatch chain: the jumps for the isolated local addresses within `prefix`.
pub fn dispatch_branch_chain(ingress: bool, prefix: &IpNet) -> String {
    let tag = if ingress { "DISPI-" } else { "DISPE-" };
    format!("{PREFIX}{tag}{}", digest(&[tag, &prefix.to_string()]))
}

/// The chain that marks traffic one policy allows in one direction.
pub fn policy_chain(ingress: bool, policy_key: &str) -> String {
    let tag = if ingress { "POLI-" } else { "POLE-" };
    format!("{PREFIX}{tag}{}", digest(&[tag, policy_key]))
}

/// The chain of one ClusterNetworkPolicy (cluster-scoped: named by its name alone) in one
/// direction: its rules in order, each deciding Accept, Deny or Pass.
pub fn cluster_policy_chain(ingress: bool, name: &str) -> String {
    let tag = if ingress { "CNPI-" } else { "CNPE-" };
    format!("{PREFIX}{tag}{}", digest(&[tag, name]))
}

/// Whether `chain` is a ClusterNetworkPolicy chain of the egress direction (a Deny there is the
/// source's verdict).
pub fn is_cluster_egress_chain(chain: &str) -> bool {
    has_generated_shape(chain, &["CNPE-"])
}

fn set_name(family: Family, kind: char, encoding: &str) -> String {
    let family = match family {
        Family::V4 => '4',
        Family::V6 => '6',
    };
    let tag = format!("{family}{kind}-");
    format!("{PREFIX}{tag}{}", digest(&[&tag, encoding]))
}

/// The `hash:ip` set of the addresses of local pods isolated for ingress (or egress).
pub fn isolated_set(family: Family, ingress: bool) -> String {
    let (kind, encoding) = if ingress {
        ('I', "isolated;ingress")
    } else {
        ('E', "isolated;egress")
    };
    set_name(family, kind, encoding)
}

/// Whether `name` is one of the dispatch's isolation sets (which exist whatever the policies).
pub fn is_isolation_set(name: &str) -> bool {
    Family::ALL
        .iter()
        .any(|f| [true, false].iter().any(|i| isolated_set(*f, *i) == name))
}

/// The `hash:ip` set of the addresses of the pods one selection chooses.
pub fn pod_set(family: Family, selection: &PodSelection) -> String {
    set_name(family, 'S', &selection.encode())
}

/// The `hash:net` set of ipBlock prefixes, named by the prefixes themselves (sorted, aggregated),
/// so blocks written differently that cover the same addresses share one set.
pub fn block_set(family: Family, prefixes: &[IpNet]) -> String {
    let mut encoding = String::from("blocks;");
    for p in prefixes {
        encoding.push_str(&p.to_string());
        encoding.push(',');
    }
    set_name(family, 'B', &encoding)
}

/// The `hash:ip,port` set a named port resolves to on the pods of `selection` (egress peers).
pub fn named_port_set(
    family: Family,
    selection: &PodSelection,
    port_name: &str,
    protocol: Protocol,
) -> String {
    let encoding = named_port_encoding(selection, port_name, protocol);
    set_name(family, 'N', &encoding)
}

/// The `hash:ip,port` set a named port resolves to on the local pods of `selection` (ingress: the
/// pods a policy selects on this node).
pub fn local_named_port_set(
    family: Family,
    selection: &PodSelection,
    port_name: &str,
    protocol: Protocol,
) -> String {
    let encoding = named_port_encoding(selection, port_name, protocol);
    set_name(family, 'L', &encoding)
}

fn named_port_encoding(selection: &PodSelection, port_name: &str, protocol: Protocol) -> String {
    format!(
        "{};port={}:{port_name};proto={}",
        selection.encode(),
        port_name.len(),
        protocol.as_kernel_str()
    )
}

/// The scratch set used to replace `name` atomically with `ipset swap`.
pub fn temporary_set(name: &str) -> String {
    format!("{name}-T")
}

pub fn is_owned(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// Whether `name` is our prefix, then `tag`, then 16 lowercase hex digits.
fn has_generated_shape(name: &str, tags: &[&str]) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    tags.iter().any(|tag| {
        rest.strip_prefix(tag).is_some_and(|hex| {
            hex.len() == 16
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    })
}

/// Set tags of this release: pod selections, ipBlocks, named ports on peers, named ports on local
/// pods, local pods isolated for ingress and egress.
const SET_TAGS: [&str; 12] = [
    "4S-", "6S-", "4B-", "6B-", "4N-", "6N-", "4L-", "6L-", "4I-", "6I-", "4E-", "6E-",
];
/// Set tags of the previous release (peer sets per rule's peer list, `hash:net`): still
/// recognised so that the first sync after an upgrade removes them.
const PREVIOUS_SET_TAGS: [&str; 2] = ["4P-", "6P-"];

/// Whether `name` has the exact shape of a set this agent generates, in this release or the
/// previous one (whose `4P-`/`6P-` peer sets an upgrade must remove).
pub fn is_generated_set(name: &str) -> bool {
    has_generated_shape(name, &SET_TAGS) || has_generated_shape(name, &PREVIOUS_SET_TAGS)
}

/// Whether `name` has the exact shape of a pod or policy chain this agent generates (our prefix,
/// a kind tag, 16 lowercase hex digits). Such a chain is ours even when nothing of ours leads to
/// it any more (e.g. another tool flushed our dispatch chains while the agent was down), so it is
/// cleaned up rather than left behind as someone else's.
/// The previous release generated the same pod and policy chain shapes; the dispatch chains
/// behind the isolation sets are new and, like the pod chains, may be left unreachable when
/// another tool flushes ours.
pub fn is_generated_chain(name: &str) -> bool {
    has_generated_shape(
        name,
        &[
            "PODI-", "PODE-", "POLI-", "POLE-", "CNPI-", "CNPE-", "DISPI-", "DISPE-",
        ],
    ) || name == EGRESS_DISPATCH_CHAIN
        || name == INGRESS_DISPATCH_CHAIN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LabelSelector;

    #[test]
    fn generated_chain_names_are_recognised_by_their_shape() {
        assert!(is_generated_chain(&pod_chain(true, "x/a")));
        assert!(is_generated_chain(&policy_chain(false, "x/p")));
        assert!(is_generated_chain(&cluster_policy_chain(true, "p")));
        assert!(is_generated_chain(&cluster_policy_chain(false, "p")));
        assert!(is_cluster_egress_chain(&cluster_policy_chain(false, "p")));
        assert!(!is_cluster_egress_chain(&cluster_policy_chain(true, "p")));
        assert!(is_owned(&cluster_policy_chain(true, &"p".repeat(253))));
        assert!(cluster_policy_chain(true, &"p".repeat(253)).len() <= MAX_CHAIN_NAME);
        assert!(is_generated_chain(EGRESS_DISPATCH_CHAIN));
        assert!(is_generated_chain(INGRESS_DISPATCH_CHAIN));
        assert!(is_isolation_set(&isolated_set(Family::V6, true)));
        assert!(!is_isolation_set(&pod_set(
            Family::V6,
            &PodSelection::everything()
        )));
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

    #[test]
    fn sets_of_this_and_the_previous_release_are_recognised_by_their_shape() {
        let everything = PodSelection::everything();
        for family in Family::ALL {
            for name in [
                pod_set(family, &everything),
                block_set(family, &["10.0.0.0/8".parse().unwrap()]),
                named_port_set(family, &everything, "http", Protocol::Tcp),
                local_named_port_set(family, &everything, "http", Protocol::Tcp),
                isolated_set(family, true),
                isolated_set(family, false),
            ] {
                assert!(is_generated_set(&name), "{name}");
                assert!(!is_generated_set(&temporary_set(&name)), "{name}");
            }
        }
        // Written by the previous release (peer sets per peer list, named ports per rule).
        for previous in ["KNI-4P-fb314cfbcf8df6aa", "KNI-6N-c70f1bf467248b0f"] {
            assert!(is_generated_set(previous), "{previous}");
        }
        for other in [
            "KNI-4X-fb314cfbcf8df6aa",
            "KNI-4P-fb314",
            "KNI-REGISTRY",
            "4P-fb314cfbcf8df6aa",
        ] {
            assert!(!is_generated_set(other), "{other}");
        }
    }

    /// Set names are what the kernel holds across restarts and upgrades: a change here renames
    /// sets on every node. Change these only on purpose, with an upgrade note.
    #[test]
    fn set_names_are_pinned() {
        let sel = |pairs: &[(&str, &str)]| LabelSelector {
            match_labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: vec![],
        };
        let db = sel(&[("app", "db")]);
        let prod = sel(&[("env", "prod")]);
        let got = [
            pod_set(Family::V4, &PodSelection::everything()),
            pod_set(Family::V6, &PodSelection::everything()),
            pod_set(Family::V4, &PodSelection::of_peer("x", None, Some(&db))),
            pod_set(
                Family::V4,
                &PodSelection::of_peer("x", Some(&prod), Some(&db)),
            ),
            pod_set(Family::V4, &PodSelection::of_peer("x", Some(&prod), None)),
            block_set(
                Family::V4,
                &[
                    "10.0.0.0/8".parse().unwrap(),
                    "192.168.1.0/24".parse().unwrap(),
                ],
            ),
            block_set(Family::V6, &["fd00::/8".parse().unwrap()]),
            named_port_set(
                Family::V4,
                &PodSelection::everything(),
                "http",
                Protocol::Tcp,
            ),
            local_named_port_set(
                Family::V6,
                &PodSelection::of_peer("x", None, Some(&db)),
                "dns",
                Protocol::Udp,
            ),
        ];
        let want = [
            "KNI-4S-7daeda61587daefa",
            "KNI-6S-bd37c3e9164b6ec4",
            "KNI-4S-8970a7c4e36d00be",
            "KNI-4S-bc317b5beb6059b7",
            "KNI-4S-0386ac6669d735fa",
            "KNI-4B-62769276e380c61f",
            "KNI-6B-71fdadd280c9f621",
            "KNI-4N-174f0317b91f41b5",
            "KNI-6L-a32d2b3f1046bcb9",
        ];
        assert_eq!(got.to_vec(), want.to_vec());
    }

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
        let long = PodSelection::of_peer(
            &"n".repeat(63),
            None,
            Some(&LabelSelector {
                match_labels: [("k".repeat(300), "v".repeat(63))].into(),
                match_expressions: vec![],
            }),
        );
        for fam in Family::ALL {
            for name in [
                pod_set(fam, &long),
                block_set(fam, &["::/1".parse().unwrap()]),
                named_port_set(fam, &long, &"p".repeat(15), Protocol::Sctp),
                local_named_port_set(fam, &long, &"p".repeat(15), Protocol::Sctp),
            ] {
                let s = temporary_set(&name);
                assert!(s.len() <= MAX_SET_NAME, "{s}");
            }
        }
        assert_ne!(pod_set(Family::V4, &long), pod_set(Family::V6, &long));
        assert_ne!(
            named_port_set(Family::V4, &long, "p", Protocol::Tcp),
            local_named_port_set(Family::V4, &long, "p", Protocol::Tcp)
        );
        assert_ne!(
            named_port_set(Family::V4, &long, "p", Protocol::Tcp),
            named_port_set(Family::V4, &long, "p", Protocol::Udp)
        );
    }

    #[test]
    fn digest_separates_parts() {
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
    }
}
