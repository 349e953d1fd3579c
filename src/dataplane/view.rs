//! Our part of the kernel as data: sets and each family's filter table. The same types describe
//! what was parsed from the kernel (`parse.rs`) and what rendering the desired state yields
//! (`render/`), so the two can be compared; both import this module, neither imports the other.

use crate::compile::ir::{Family, Members, SetKind};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The comment every hook of ours (a built-in chain's jump into our chains) carries: what makes a
/// jump ours, across restarts and releases.
pub const HOOK_COMMENT: &str = "kube-netpol-iptables";

/// The comment of the only rule of a chain we no longer use but cannot delete yet (someone else's
/// rule jumps to it): the rule matches everything and does nothing, so the chain marks nothing.
pub const RETIRED_COMMENT: &str = "kube-netpol-iptables: retired, still referenced";

/// Our part of one family's filter table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Chains with our prefix.
    pub chains: Vec<String>,
    /// Rules in built-in chains that jump to one of our chains.
    pub jumps: Vec<Jump>,
    /// Our chains' rules, as iptables-save prints them (without `-A CHAIN`).
    pub rules: BTreeMap<String, Vec<String>>,
    /// Our chains that someone else's rule jumps to: the kernel refuses to delete them while that
    /// rule exists.
    pub referenced: BTreeSet<String>,
    /// Sets our chains' rules match on (what makes a set ours, besides our registry).
    pub sets_used: BTreeSet<String>,
    /// Chains with our prefix that are not ours: never touched, warned about.
    pub foreign: Vec<String>,
}

impl KernelTable {
    /// The names of `chains`, for lookups (tables hold hundreds of chains; a scan per lookup made
    /// every diff quadratic).
    pub fn chain_names(&self) -> HashSet<&str> {
        self.chains.iter().map(String::as_str).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub builtin: String,
    /// 1-based position in the built-in chain.
    pub position: usize,
    /// The rule as iptables-save prints it, after `-A CHAIN `.
    pub spec: String,
}

impl Jump {
    /// The chain this jump leads to (the last word of its spec).
    pub fn target(&self) -> &str {
        self.spec.rsplit(' ').next().unwrap_or_default()
    }
}

/// Our sets, from `ipset save`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSets {
    pub sets: BTreeMap<String, KernelSet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSet {
    /// None when the kernel's type is not one we create.
    pub kind: Option<SetKind>,
    pub family: Option<Family>,
    pub maxelem: Option<u32>,
    pub members: Members,
    /// Entries we could not read back (they are deleted on the next sync).
    pub unparsed_members: Vec<String>,
}

/// A set as `ipset list -t` shows it: what it was created as and how many entries it holds, without
/// the entries (cheap to read however large the set is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetHeader {
    pub kind: Option<SetKind>,
    pub family: Option<Family>,
    pub maxelem: Option<u32>,
    pub entries: usize,
}

impl SetHeader {
    /// Whether `believed` (what we wrote) still describes a set with this header: same type, family
    /// and size, and as many entries. Members replaced one for one keep the count; those are found
    /// by the rotating full read (see `sync.rs`).
    pub fn matches(&self, believed: &KernelSet) -> bool {
        self.kind == believed.kind
            && self.family == believed.family
            && self.maxelem == believed.maxelem
            && self.entries == believed.members.len()
            && believed.unparsed_members.is_empty()
    }
}

/// Our part of the kernel: sets and both families' filter tables. Either read from the kernel or
/// derived from what we last wrote (what the kernel holds if nobody else touched it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub sets: KernelSets,
    pub tables: BTreeMap<Family, KernelTable>,
}

/// ipset's own default `maxelem`: sets smaller than half of it keep it, so most sets never change
/// parameters.
const MIN_MAXELEM: u32 = 65_536;

/// The `maxelem` a set of `members` entries is created with: room to double before it must be
/// rebuilt, and a kernel-enforced bound on what the set can ever hold.
pub fn maxelem_for(members: usize) -> u32 {
    let room = members.max(1).saturating_mul(2).next_power_of_two();
    u32::try_from(room).unwrap_or(u32::MAX).max(MIN_MAXELEM)
}

/// Whether a set created with `maxelem` suits `members` entries: at least half (so it can hold
/// them) and at most four times what a new one would get. Otherwise it is rebuilt (filled aside,
/// swapped in); the slack keeps a set that grows or shrinks a little from being rebuilt.
pub fn maxelem_fits(maxelem: Option<u32>, members: usize) -> bool {
    let new = maxelem_for(members);
    maxelem.is_some_and(|m| m >= new / 2 && m <= new.saturating_mul(4))
}
