//! The per-pod dispatch chains: one jump per isolated local address to its pod's chain, split
//! by address prefix into branch chains when there are many, so that a new flow walks a number of
//! rules that grows with the logarithm of the isolated local pods.

use super::ir::{Match, Rule, Target};
use super::names;
use super::rules::Direction;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A dispatch chain with more jumps than this is split by address prefix, so that a new flow
/// walks about 2·log2(n/LEAF) + LEAF rules to its pod's chain instead of up to one per isolated
/// local address.
const DISPATCH_LEAF: usize = 4;
/// Branch chains below a dispatch chain at most; deeper, a chain lists its jumps one by one (only
/// addresses spread bit by bit, never a node's pod CIDR, get there).
const DISPATCH_MAX_DEPTH: usize = 6;

/// The match on the subject pod's address: the source of its egress, the destination of its ingress.
pub(super) fn address_match(direction: Direction, net: IpNet) -> Match {
    match direction {
        Direction::Ingress => Match::Destination(net),
        Direction::Egress => Match::Source(net),
    }
}

/// The rules of a dispatch chain holding `entries` (a local address and the jump to its pod's
/// chain), adding the branch chains it needs to `chains`. Above [`DISPATCH_LEAF`] entries the
/// addresses are split on the first bit they do not share. A half of one or two jumps stays in
/// this chain, and the other half is split further here; when both halves are larger, each goes
/// behind one rule matching the prefix its addresses share (a branch chain, one level deeper).
/// Jumps for the same address stay together and in their order, so every packet meets the jumps
/// it met in a plain list, in the same order.
pub(super) fn dispatch_branch(
    direction: Direction,
    entries: Vec<(IpAddr, Rule)>,
    depth: usize,
    chains: &mut BTreeMap<String, Vec<Rule>>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut kept = Vec::new();
    let mut rest = entries;
    while rest.len() > DISPATCH_LEAF && depth < DISPATCH_MAX_DEPTH {
        let shared = shared_prefix(rest.iter().map(|(ip, _)| *ip));
        if shared.prefix_len() == shared.max_prefix_len() {
            // One address (a pod with several chains, or several pods claiming one address).
            break;
        }
        let split_bit = shared.prefix_len();
        let (zeros, ones): (Vec<_>, Vec<_>) = std::mem::take(&mut rest)
            .into_iter()
            .partition(|(ip, _)| !address_bit(*ip, split_bit));
        match (zeros.len() <= 2, ones.len() <= 2) {
            (true, _) => {
                kept.extend(zeros);
                rest = ones;
            }
            (false, true) => {
                kept.extend(ones);
                rest = zeros;
            }
            (false, false) => {
                for half in [zeros, ones] {
                    let prefix = shared_prefix(half.iter().map(|(ip, _)| *ip));
                    let chain = names::dispatch_branch_chain(direction.is_ingress(), &prefix);
                    let branch = dispatch_branch(direction, half, depth + 1, chains);
                    chains.insert(chain.clone(), branch);
                    rules.push(Rule::new(
                        vec![address_match(direction, prefix)],
                        Target::Jump(chain),
                    ));
                }
            }
        }
    }
    rules.extend(rest.into_iter().chain(kept).map(|(_, rule)| rule));
    rules
}

/// The longest prefix every address of one family shares.
fn shared_prefix(mut ips: impl Iterator<Item = IpAddr>) -> IpNet {
    let first = ips.next().expect("a dispatch branch has addresses");
    let base = left_aligned(first);
    let differ = ips.fold(0u128, |acc, ip| acc | (left_aligned(ip) ^ base));
    let width = if first.is_ipv4() { 32 } else { 128 };
    let len = (differ.leading_zeros() as u8).min(width);
    IpNet::new(first, len)
        .expect("a prefix length within the family's width")
        .trunc()
}

/// Bit `index` (0 = most significant) of `ip`.
fn address_bit(ip: IpAddr, index: u8) -> bool {
    (left_aligned(ip) >> (127 - index)) & 1 == 1
}

/// The address's bits from the most significant one of a `u128`, whatever its family.
fn left_aligned(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}
