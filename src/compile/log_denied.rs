//! Denied-packet logging (`--log-denied`): an NFLOG rule in front of every rule that drops or
//! rejects, with the same matches, so a packet is logged exactly where it meets its final
//! verdict and never when a later rule allows it. Applied last by the enforcement options'
//! `apply`, so it covers the pod chains, new-pod isolation and whatever else ends in a drop. Pure: the prefix says which direction and chain
//! dropped the packet, and the agent reading the group (`dataplane::nflog`) turns it back into
//! pods and policies with [`decode_prefix`] and [`isolating_policies`].

use super::ir::{DesiredState, LogRule, Rule, Target};
use super::names;
use super::new_pod_isolation;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The NFLOG group by default (`--nflog-group`).
pub const DEFAULT_GROUP: u16 = 100;
/// NFLOG's prefix holds 64 bytes with the terminating NUL (`struct xt_nflog_info`).
pub const MAX_PREFIX_LEN: usize = 63;
/// Every prefix of ours starts with this: another tool's packets in the same group are ignored.
const PREFIX_TAG: &str = "kni-deny-";

/// `--log-denied` and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDenied {
    pub group: u16,
    pub rate: Rate,
}

/// At most `per_second` packets a second, after a burst of `burst`, per drop rule: a pod chain
/// judges one pod in one direction, so the limit is per pod and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    /// `-m limit` allows at most 10,000 a second (`XT_LIMIT_SCALE`), and a burst up to 10,000.
    pub const MAX: u32 = 10_000;
}

impl Default for Rate {
    /// 5 a second after a burst of 10: enough to see what a pod is refused, little enough that a
    /// scan or a retry storm cannot flood the agent or its log.
    fn default() -> Rate {
        Rate {
            per_second: 5,
            burst: 10,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s,burst={}", self.per_second, self.burst)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `N/s` or `N/s,burst=B`.
    fn from_str(s: &str) -> Result<Rate, String> {
        let bad = || format!("{s:?} is not a rate like 5/s or 5/s,burst=10 (each 1 to 10000)");
        let (rate, burst) = match s.split_once(",burst=") {
            Some((rate, burst)) => (rate, Some(burst)),
            None => (s, None),
        };
        let per_second: u32 = rate
            .strip_suffix("/s")
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        let burst: u32 = match burst {
            Some(b) => b.parse().map_err(|_| bad())?,
            None => per_second.saturating_mul(2).min(Rate::MAX),
        };
        if !(1..=Rate::MAX).contains(&per_second) || !(1..=Rate::MAX).contains(&burst) {
            return Err(bad());
        }
        Ok(Rate { per_second, burst })
    }
}

/// Which way the dropped packet was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// The destination pod's ingress.
    Ingress,
    /// The source pod's egress.
    Egress,
    /// A chain reached from both directions, or from neither.
    Other,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
            Direction::Other => "other",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an NFLOG prefix of ours says: the direction and the chain whose rule dropped the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    pub direction: Direction,
    pub chain: String,
}

/// `kni-deny-<direction>-<chain>`: at most 9 + 8 + 28 = 45 bytes, and only letters, digits and
/// `-`, which iptables-save prints unquoted (so what we render is what it prints back).
pub fn encode_prefix(direction: Direction, chain: &str) -> String {
    let prefix = format!("{PREFIX_TAG}{direction}-{chain}");
    debug_assert!(prefix.len() <= MAX_PREFIX_LEN);
    prefix
}

/// The direction and chain in a prefix of ours; `None` for anyone else's.
pub fn decode_prefix(prefix: &str) -> Option<Prefix> {
    let rest = prefix.strip_prefix(PREFIX_TAG)?;
    let (direction, chain) = rest.split_once('-')?;
    let direction = match direction {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        "other" => Direction::Other,
        _ => return None,
    };
    names::is_owned(chain).then(|| Prefix {
        direction,
        chain: chain.to_string(),
    })
}

fn is_deny(target: &Target) -> bool {
    matches!(
        target,
        Target::Drop | Target::Reject | Target::RejectWithTcpReset
    )
}

/// Puts an NFLOG rule in front of every rule of `state` that drops or rejects.
pub fn apply(state: &mut DesiredState, log: &LogDenied) {
    let directions = chain_directions(state);
    for (chain, rules) in state.chains.iter_mut() {
        if !rules.iter().any(|r| is_deny(&r.target)) {
            continue;
        }
        let direction = directions.get(chain).copied().unwrap_or(Direction::Other);
        let target = Target::LogDenied(LogRule {
            group: log.group,
            prefix: encode_prefix(direction, chain),
            per_second: log.rate.per_second,
            burst: log.rate.burst,
        });
        let mut logged = Vec::with_capacity(rules.len() + 2);
        for rule in rules.drain(..) {
            if is_deny(&rule.target) {
                logged.push(Rule::new(rule.matches.clone(), target.clone()));
            }
            logged.push(rule);
        }
        *rules = logged;
    }
}

/// The direction each chain judges, from the chains that lead to it: the per-pod dispatch
/// chains and new-pod isolation's destination (ingress) and source (egress) chains.
fn chain_directions(state: &DesiredState) -> BTreeMap<String, Direction> {
    let mut reached: BTreeMap<String, BTreeSet<Direction>> = BTreeMap::new();
    for (root, direction) in [
        (names::INGRESS_DISPATCH_CHAIN, Direction::Ingress),
        (new_pod_isolation::DESTINATION_CHAIN, Direction::Ingress),
        (names::EGRESS_DISPATCH_CHAIN, Direction::Egress),
        (new_pod_isolation::SOURCE_CHAIN, Direction::Egress),
    ] {
        let mut todo = vec![root.to_string()];
        while let Some(chain) = todo.pop() {
            let Some(rules) = state.chains.get(&chain) else {
                continue;
            };
            if !reached.entry(chain).or_default().insert(direction) {
                continue;
            }
            todo.extend(rules.iter().filter_map(|r| match &r.target {
                Target::Jump(next) => Some(next.clone()),
                _ => None,
            }));
        }
    }
    reached
        .into_iter()
        .map(|(chain, directions)| {
            let direction = match directions.into_iter().collect::<Vec<_>>()[..] {
                [one] => one,
                _ => Direction::Other,
            };
            (chain, direction)
        })
        .collect()
}

/// The policies a denied packet's `chain` names: for a pod chain, every NetworkPolicy
/// (`namespace/name`) that isolates the pod in that direction, as `explain` lists them; for a
/// ClusterNetworkPolicy's chain (its Deny rule dropped the packet), that policy as `Tier/name`.
pub fn isolating_policies(state: &DesiredState, chain: &str) -> Vec<String> {
    if let Some(origin) = state.origins.get(chain)
        && let Some(tier) = origin.tier
    {
        return vec![format!("{}/{}", tier.as_str(), origin.policy)];
    }
    let mut policies: Vec<String> = Vec::new();
    for rule in state.chains.get(chain).into_iter().flatten() {
        if let Target::Jump(next) = &rule.target
            && let Some(origin) = state.origins.get(next)
            && origin.tier.is_none()
            && !policies.contains(&origin.policy)
        {
            policies.push(origin.policy.clone());
        }
    }
    policies
}

#[cfg(test)]
mod tests;
