//! Walks a [`DesiredState`] the way netfilter walks the rendered rules: the verdict our chains give
//! one packet, without root and without the kernel. Pure. The compiler's semantic tests use it,
//! and strict mode (`compile::strict`) decides with it which established flows a new state denies,
//! so that decision and the rules cannot disagree. The end-to-end suite checks the same semantics
//! against the real kernel.

use super::ir::{
    ALLOW_MARK, DesiredState, Match, SetDirection, SetKind, SetMember, TIER_MARK, Target,
};
use crate::model::Protocol;
use std::net::IpAddr;

/// What follows the IP header, as far as our rules look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Port(Protocol, u16),
    Icmp6(u8),
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub established: bool,
    pub src_is_local: bool,
}

impl Packet {
    /// A new flow's first packet from `src` to `dst` that does not come from the node itself.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Packet {
        Packet {
            src,
            dst,
            l4,
            established: false,
            src_is_local: false,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Continue,
    Return,
    /// Rejected or dropped, by a rule of this chain.
    Rejected(String),
}

/// True if the packet gets through the hook of `builtin` (our rules only RETURN, REJECT or DROP).
///
/// Panics on a state the compiler never makes (a jump to a missing chain, a loop, a rule on a
/// missing set or on a set of the wrong type): those are bugs, not verdicts.
pub fn passes(state: &DesiredState, builtin: &str, packet: &Packet) -> bool {
    denying_chain(state, builtin, packet).is_none()
}

/// The chain whose rule rejects or drops the packet in the hook of `builtin`, or `None` if it
/// gets through.
pub fn denying_chain(state: &DesiredState, builtin: &str, packet: &Packet) -> Option<String> {
    let mut mark = 0u32;
    for hook in state.hooks.iter().filter(|h| h.builtin == builtin) {
        if let Outcome::Rejected(chain) = walk(state, &hook.target, packet, &mut mark, 0, None) {
            return Some(chain);
        }
    }
    None
}

/// A rule that matched a packet: its chain and its position in the chain.
pub type Step<'s> = (&'s str, usize);

/// What walking one chain did to a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace<'s> {
    /// Every rule that matched, in the order the walk met them (jumps before the rules of the
    /// chain they jump to).
    pub steps: Vec<Step<'s>>,
    /// The chain whose rule rejected or dropped the packet; `None` if it got through.
    pub rejected_by: Option<String>,
}

/// Walks `chain` alone, as a jump to it would, with the allow mark clear, recording every rule
/// that matched: which rules of which chains decided. `None` if the state has no such chain.
pub fn trace_chain<'s>(state: &'s DesiredState, chain: &str, packet: &Packet) -> Option<Trace<'s>> {
    state.chains.get(chain)?;
    let mut steps = Vec::new();
    let mut mark = 0u32;
    let rejected_by = match walk(state, chain, packet, &mut mark, 0, Some(&mut steps)) {
        Outcome::Rejected(by) => Some(by),
        Outcome::Return | Outcome::Continue => None,
    };
    Some(Trace { steps, rejected_by })
}

fn walk<'s>(
    state: &'s DesiredState,
    chain: &str,
    packet: &Packet,
    mark: &mut u32,
    depth: usize,
    mut steps: Option<&mut Vec<Step<'s>>>,
) -> Outcome {
    assert!(depth < 16, "chain loop at {chain}");
    let (chain, rules) = state
        .chains
        .get_key_value(chain)
        .unwrap_or_else(|| panic!("jump to missing chain {chain}"));
    for (position, rule) in rules.iter().enumerate() {
        if !rule
            .matches
            .iter()
            .all(|m| matches(state, m, packet, *mark))
        {
            continue;
        }
        if let Some(steps) = steps.as_deref_mut() {
            steps.push((chain.as_str(), position));
        }
        match &rule.target {
            Target::Jump(next) => {
                match walk(state, next, packet, mark, depth + 1, steps.as_deref_mut()) {
                    Outcome::Rejected(by) => return Outcome::Rejected(by),
                    Outcome::Return | Outcome::Continue => {}
                }
            }
            Target::Return => return Outcome::Return,
            Target::SetAllowMark => *mark |= ALLOW_MARK,
            Target::ClearAllowMark => *mark &= !ALLOW_MARK,
            Target::SetTierMark { accept } => {
                *mark |= TIER_MARK | if *accept { ALLOW_MARK } else { 0 }
            }
            Target::ClearMarks => *mark &= !(ALLOW_MARK | TIER_MARK),
            // NFLOG copies the packet and goes on to the next rule.
            Target::LogDenied(_) => {}
            Target::RejectWithTcpReset | Target::Reject | Target::Drop => {
                return Outcome::Rejected(chain.to_string());
            }
        }
    }
    Outcome::Continue
}

fn matches(state: &DesiredState, m: &Match, p: &Packet, mark: u32) -> bool {
    match m {
        Match::Source(net) => net.contains(&p.src),
        Match::Destination(net) => net.contains(&p.dst),
        Match::EstablishedOrRelated => p.established,
        Match::SourceIsLocal => p.src_is_local,
        Match::Protocol(proto) => matches!(p.l4, L4::Port(pp, _) if pp == *proto),
        Match::DestinationPorts { first, last } => {
            matches!(p.l4, L4::Port(_, port) if (*first..=*last).contains(&port))
        }
        Match::AllowMarkSet => mark & ALLOW_MARK != 0,
        Match::TierUndecided => mark & TIER_MARK == 0,
        Match::Icmp6Type(t) => matches!(p.l4, L4::Icmp6(pt) if pt == *t),
        Match::Set { name, direction } => {
            let set = state
                .sets
                .get(name)
                .unwrap_or_else(|| panic!("rule references missing set {name}"));
            // Exact entries are looked up (strict mode judges every conntrack entry against
            // sets of thousands); only prefixes need a walk.
            let exact = match (set.kind, direction, p.l4) {
                (SetKind::HashIp, SetDirection::Src, _) => Some(SetMember::Ip(p.src)),
                (SetKind::HashIp, SetDirection::Dst, _) => Some(SetMember::Ip(p.dst)),
                (SetKind::HashIpPort, SetDirection::DstDstPort, L4::Port(proto, port)) => {
                    Some(SetMember::IpPort(p.dst, proto, port))
                }
                (SetKind::HashIpPort, SetDirection::DstDstPort, _) => return false,
                _ => None,
            };
            if let Some(entry) = exact {
                return set.members.contains(&entry);
            }
            set.members.iter().any(|member| match (member, direction) {
                (SetMember::Ip(ip), SetDirection::Src) => *ip == p.src,
                (SetMember::Ip(ip), SetDirection::Dst) => *ip == p.dst,
                (SetMember::Net(net), SetDirection::Src) => net.contains(&p.src),
                (SetMember::Net(net), SetDirection::Dst) => net.contains(&p.dst),
                (SetMember::IpPort(ip, proto, port), SetDirection::DstDstPort) => {
                    *ip == p.dst && matches!(p.l4, L4::Port(pp, pt) if pp == *proto && pt == *port)
                }
                _ => panic!("set {name} used with a direction its type cannot match"),
            })
        }
    }
}
