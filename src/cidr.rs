//! Exact CIDR set arithmetic for ipBlocks.
//!
//! `cidr − except` is computed into plain prefixes so that several ipBlocks in one rule are a true
//! union: ipset `nomatch` entries would be shared by every block in a set and give wrong answers
//! when blocks overlap.

use ipnet::IpNet;

/// The prefixes that cover exactly `cidr` minus every prefix in `except`. Host bits in any input
/// are ignored, as the API server allows them. Excepts of another family are ignored.
pub fn subtract(cidr: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    let mut remaining = vec![cidr.trunc()];
    for hole in except.iter().map(IpNet::trunc) {
        let mut next = Vec::with_capacity(remaining.len() + hole.prefix_len() as usize);
        for block in remaining {
            if hole.contains(&block) {
                // The hole swallows the block entirely.
            } else if block.contains(&hole) {
                carve(block, hole, &mut next);
            } else {
                next.push(block);
            }
        }
        remaining = next;
    }
    remaining
}

/// Pushes the prefixes of `block` that lie outside `hole` (which `block` strictly contains): at
/// each level, the half that does not hold the hole is kept whole.
fn carve(block: IpNet, hole: IpNet, out: &mut Vec<IpNet>) {
    let mut current = block;
    while current.prefix_len() < hole.prefix_len() {
        let mut halves = current
            .subnets(current.prefix_len() + 1)
            .expect("a prefix shorter than the hole can be split");
        let (low, high) = (halves.next().unwrap(), halves.next().unwrap());
        if low.contains(&hole) {
            out.push(high);
            current = low;
        } else {
            out.push(low);
            current = high;
        }
    }
}

/// ipset's `hash:net` cannot store a /0, so a whole address space becomes its two halves
/// (exactly the same addresses; never an approximation).
pub fn ipset_storable(net: IpNet) -> Vec<IpNet> {
    if net.prefix_len() == 0 {
        net.subnets(1).expect("a /0 splits into two /1").collect()
    } else {
        vec![net]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn covers(nets: &[IpNet], ip: &str) -> bool {
        let ip: IpAddr = ip.parse().unwrap();
        nets.iter().any(|net| net.contains(&ip))
    }

    #[test]
    fn no_except_is_the_block_itself_with_host_bits_cleared() {
        assert_eq!(subtract(n("10.1.2.3/8"), &[]), vec![n("10.0.0.0/8")]);
    }

    #[test]
    fn except_cuts_an_exact_hole() {
        let r = subtract(n("10.0.0.0/8"), &[n("10.1.0.0/16")]);
        assert!(covers(&r, "10.0.0.1"));
        assert!(covers(&r, "10.2.0.1"));
        assert!(covers(&r, "10.255.255.255"));
        assert!(!covers(&r, "10.1.0.0"));
        assert!(!covers(&r, "10.1.255.255"));
        assert!(!covers(&r, "11.0.0.0"));
        // 16 - 8 halves are kept, one per level.
        assert_eq!(r.len(), 8);
        // Pieces never overlap.
        for (i, a) in r.iter().enumerate() {
            for b in &r[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
    }

    #[test]
    fn several_and_nested_excepts() {
        let r = subtract(
            n("192.168.0.0/16"),
            &[
                n("192.168.1.0/24"),
                n("192.168.1.128/25"),
                n("192.168.200.7/32"),
            ],
        );
        assert!(!covers(&r, "192.168.1.5"));
        assert!(!covers(&r, "192.168.1.200"));
        assert!(!covers(&r, "192.168.200.7"));
        assert!(covers(&r, "192.168.200.6"));
        assert!(covers(&r, "192.168.200.8"));
        assert!(covers(&r, "192.168.0.255"));
        assert!(covers(&r, "192.168.2.0"));
    }

    #[test]
    fn except_covering_the_block_leaves_nothing() {
        assert!(subtract(n("10.1.0.0/16"), &[n("10.0.0.0/8")]).is_empty());
        assert!(subtract(n("10.1.0.0/16"), &[n("10.1.0.0/16")]).is_empty());
    }

    #[test]
    fn disjoint_and_other_family_excepts_are_ignored() {
        assert_eq!(
            subtract(n("10.0.0.0/8"), &[n("11.0.0.0/8"), n("fd00::/8")]),
            vec![n("10.0.0.0/8")]
        );
    }

    #[test]
    fn ipv6_except() {
        let r = subtract(n("fd00::/16"), &[n("fd00:1::/32")]);
        assert!(covers(&r, "fd00::1"));
        assert!(covers(&r, "fd00:2::1"));
        assert!(!covers(&r, "fd00:1::1"));
        assert!(!covers(&r, "fd01::1"));
    }

    #[test]
    fn whole_space_is_split_not_approximated() {
        assert_eq!(
            ipset_storable(n("0.0.0.0/0")),
            vec![n("0.0.0.0/1"), n("128.0.0.0/1")]
        );
        assert_eq!(ipset_storable(n("::/0")), vec![n("::/1"), n("8000::/1")]);
        assert_eq!(ipset_storable(n("10.0.0.0/8")), vec![n("10.0.0.0/8")]);
        // /0 with an except still carves exactly.
        let r: Vec<IpNet> = subtract(n("0.0.0.0/0"), &[n("10.0.0.0/8")])
            .into_iter()
            .flat_map(ipset_storable)
            .collect();
        assert!(covers(&r, "9.255.255.255"));
        assert!(covers(&r, "11.0.0.0"));
        assert!(covers(&r, "255.255.255.255"));
        assert!(!covers(&r, "10.20.30.40"));
        assert!(r.iter().all(|p| p.prefix_len() > 0));
    }
}
