//! Desired kernel state for one node and one IP family: what the [`Compiler`](super::Compiler)
//! produces and the dataplane renders. Rules are structured rather than strings so that tests can evaluate them against
//! packets and the renderer is the only place that knows iptables syntax.

pub use crate::model::Family;
use crate::model::Protocol;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

/// The packet mark bit the agent uses to carry "some policy allowed this" from a policy chain back
/// to the pod chain. Chosen clear of kube-proxy (0x4000, 0x8000) and kube-router (0x10000,
/// 0x20000); it lies inside Calico's default mark mask (0xffff0000, configurable there), which is
/// fine only because Calico enforces policy itself and is not run beside this agent.
pub const ALLOW_MARK: u32 = 0x0040_0000;

/// The packet mark bit a ClusterNetworkPolicy chain sets when one of its rules decided (Accept
/// or Pass; Deny drops on the spot): the pod chain skips the rest of that tier once it is set,
/// and Accept sets [`ALLOW_MARK`] with it. Bit 12 is clear of kube-proxy (0x4000 masquerade,
/// 0x8000 drop), the CNI portmap plugin (0x2000), Cilium (0x0F00 magic, 0x00FF and 0xFFFF0000
/// identity: `pkg/datapath/linux/linux_defaults/mark.go`), Calico's default 0xFFFF0000,
/// kube-router (0x10000, 0x20000) and our own [`ALLOW_MARK`].
pub const TIER_MARK: u32 = 0x0000_1000;

/// The most members one set may hold. A selection or ipBlock list beyond it (150,000 pods is the
/// largest cluster Kubernetes supports; more prefixes than this only come from pathological or
/// hostile ipBlocks) is not programmed: its rule fails closed (see [`FailedClosed`]), so one
/// object can never exhaust the kernel's memory or block the writes of every other.
pub const MAX_SET_MEMBERS: usize = 262_144;

/// The most ipBlock entries (prefixes) the sets of one namespace's policies may hold in all, per
/// family: a tenant cannot add up over many policies what one set may not hold. A rule past it
/// fails closed like an oversized one (policies in name order, so the same ones every time).
pub const MAX_NAMESPACE_BLOCK_ENTRIES: usize = MAX_SET_MEMBERS;

/// A policy rule that could not be programmed and allows nothing instead: the pods it selects stay
/// isolated, every other rule and policy is programmed as usual.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FailedClosed {
    /// `namespace/name`.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Index of the rule in the policy's list for that direction.
    pub rule: usize,
    pub reason: String,
}

impl fmt::Display for FailedClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy {} {} rule {}: {} (the rule allows nothing)",
            self.policy, self.direction, self.rule, self.reason
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub sets: BTreeMap<String, IpSet>,
    /// Our chains in the filter table, by name.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Jumps from built-in chains into ours, each kept first in its built-in chain.
    pub hooks: Vec<Hook>,
    /// Rules left out because they could not be programmed (nothing in the kernel stands for them).
    pub failed_closed: Vec<FailedClosed>,
    /// Where the rules of each policy chain come from, by chain name: what `explain` reports.
    /// Never rendered.
    pub origins: BTreeMap<String, PolicyChainOrigin>,
}

/// The policy and direction a policy chain stands for, and the policy rule, peer and port each
/// of its rules comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChainOrigin {
    /// `namespace/name`.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// One per rule of the chain, in the chain's order.
    pub rules: Vec<RuleOrigin>,
    /// `Some` for a ClusterNetworkPolicy's chain (then `policy` is its name).
    pub tier: Option<crate::model::Tier>,
}

/// The part of a policy that one kernel rule of its chain stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOrigin {
    /// Index of the rule in the policy's list for that direction.
    pub rule: usize,
    /// Indices of the rule's peers the kernel rule matches (peers with the same selection share
    /// one rule, all ipBlocks share one); `None`: the rule has no peers, it matches any.
    pub peers: Option<Vec<usize>>,
    /// Index of the port in the rule's ports; `None`: the rule has no ports, it matches any.
    pub port: Option<usize>,
}

impl DesiredState {
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>() + self.hooks.len()
    }

    pub fn member_count(&self) -> usize {
        self.sets.values().map(|s| s.members.len()).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub builtin: &'static str,
    pub target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// The pods one selection chooses: their addresses ([`SetMember::Ip`]).
    HashIp,
    /// ipBlock prefixes ([`SetMember::Net`]).
    HashNet,
    /// Named ports resolved per pod: (pod address, protocol, port).
    HashIpPort,
}

impl SetKind {
    pub fn ipset_type(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashNet => "hash:net",
            SetKind::HashIpPort => "hash:ip,port",
        }
    }
}

/// A set's members, shared: an unchanged set is carried from sync to sync (and into the
/// dataplane's record of what it wrote) without copying, and compared by pointer first.
pub type Members = std::sync::Arc<BTreeSet<SetMember>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    pub kind: SetKind,
    pub family: Family,
    pub members: Members,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetMember {
    Ip(IpAddr),
    Net(IpNet),
    IpPort(IpAddr, Protocol, u16),
}

impl fmt::Display for SetMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetMember::Ip(ip) => write!(f, "{ip}"),
            SetMember::Net(net) => write!(f, "{net}"),
            SetMember::IpPort(ip, proto, port) => {
                write!(f, "{ip},{}:{port}", proto.as_kernel_str())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub target: Target,
    /// Shown in iptables-save; only ever built from validated names.
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, target: Target) -> Rule {
        Rule {
            matches,
            target,
            comment: None,
        }
    }

    pub fn commented(mut self, comment: impl Into<String>) -> Rule {
        self.comment = Some(comment.into());
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetDirection {
    /// Match the source address.
    Src,
    /// Match the destination address.
    Dst,
    /// Match destination address and destination port (`hash:ip,port`).
    DstDstPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Source(IpNet),
    Destination(IpNet),
    /// Replies and related packets (ICMP errors) of flows that were allowed when they started.
    EstablishedOrRelated,
    /// The packet comes from an address of this node (`-m addrtype --src-type LOCAL`).
    SourceIsLocal,
    Protocol(Protocol),
    /// Destination port range, always paired with `Protocol` before it. Rendered with
    /// `-m multiport`, which works for SCTP without the xt_sctp match.
    DestinationPorts {
        first: u16,
        last: u16,
    },
    Set {
        name: String,
        direction: SetDirection,
    },
    AllowMarkSet,
    /// [`TIER_MARK`] is clear: no ClusterNetworkPolicy rule of the current tier decided yet.
    TierUndecided,
    /// ICMPv6 type; used only to keep neighbour discovery between pod and node working.
    Icmp6Type(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Jump(String),
    Return,
    SetAllowMark,
    ClearAllowMark,
    /// A ClusterNetworkPolicy rule decided: sets [`TIER_MARK`], and [`ALLOW_MARK`] too when
    /// `accept` (Pass sets the tier bit only).
    SetTierMark {
        accept: bool,
    },
    /// Clears [`ALLOW_MARK`] and [`TIER_MARK`] (pod chains with ClusterNetworkPolicy stages,
    /// and the end of the dispatch chains when any exists).
    ClearMarks,
    /// Answer with a TCP reset (only after `Protocol(Tcp)`), so callers fail fast.
    RejectWithTcpReset,
    /// Answer with ICMP(v6) port unreachable.
    Reject,
    /// Drop silently (`--deny-action drop`): the sender times out, as the conformance tests of
    /// ClusterNetworkPolicy require. See `crate::enforcement`.
    Drop,
    /// Copy the packet to an NFLOG group, at most at a rate, and go on (non-terminating): put in
    /// front of each rule that drops or rejects by `--log-denied` (see `compile::log_denied`).
    LogDenied(LogRule),
}

/// What a [`Target::LogDenied`] rule sends where, and how often at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRule {
    /// The NFLOG group the agent reads.
    pub group: u16,
    /// Says which direction and chain dropped the packet (see `compile::log_denied::Prefix`).
    pub prefix: String,
    /// Packets per second this rule logs at most, after a burst of `burst` (`-m limit`).
    pub per_second: u32,
    pub burst: u32,
}
