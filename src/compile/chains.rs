//! Chain and rule building for one node and one family: all NetworkPolicy semantics, no I/O.
//!
//! Layout (per family, filter table):
//! - `FORWARD`, `INPUT` and `OUTPUT` each jump first thing to a dispatch chain of ours.
//! - A dispatch chain lets replies of allowed flows through, then sends traffic from an
//!   egress-isolated local pod (one `hash:ip` set lookup) to the egress dispatch chain, which jumps
//!   to that pod's egress chain (through branch chains by address prefix when there are many, so
//!   the walk grows with the logarithm of the local pods), and likewise traffic to an
//!   ingress-isolated local pod. A same-node flow passes both. Pod→node traffic (INPUT) meets the
//!   pod's egress chain only; traffic the node itself sends (OUTPUT from a local address) is allowed.
//! - A pod chain clears our mark bit, jumps to the chain of every policy that selects the pod for
//!   that direction, returns if one of them set the mark, and rejects otherwise.
//! - A policy chain sets the mark for every packet one of its rules allows. Peers are sets, one
//!   per distinct selection (see [`super::peers`]): a rule with N peers has N rules per port, each
//!   matching one peer's set, so no set is ever made for a particular combination of peers.
//!
//! Our chains only ever RETURN or REJECT, never ACCEPT, so the rules of kube-proxy, the CNI and the
//! host firewall after our jump still run.

use super::dispatch::{address_match, dispatch_branch};
use super::ir::{
    DesiredState, FailedClosed, Hook, IpSet, Match, Members, PolicyChainOrigin, Rule, RuleOrigin,
    SetDirection, SetKind, SetMember, Target,
};
use super::names;
use super::peers::SharedSelections;
use super::rules::{Direction, RuleBuilder};
use super::tiers::{self, PodTiers};
use crate::model::{ClusterPolicy, ClusterSnapshot, Family, Pod, Policy, Protocol};
use ipnet::IpNet;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

/// ICMPv6 neighbour discovery (router solicitation/advertisement, neighbour
/// solicitation/advertisement, redirect): link-local plumbing between a pod and its node that
/// policy must not break.
const NEIGHBOUR_DISCOVERY_TYPES: [u8; 5] = [133, 134, 135, 136, 137];

/// The snapshot's policies in the order of their `namespace/name` keys (the order chains are
/// built in, which the per-namespace ipBlock budget depends on), sorted once for both families.
pub(super) fn sorted_policies(snapshot: &ClusterSnapshot) -> Vec<&Policy> {
    let mut policies: Vec<&Policy> = snapshot.policies.iter().collect();
    // Without building a key per comparison.
    policies.sort_by(|a, b| key_order(&a.namespace, &a.name, &b.namespace, &b.name));
    policies
}

/// The desired state of `family` on `node`; `selections` must be up to date with `snapshot`, and
/// `policies` its [`sorted_policies`].
pub(super) fn build(
    snapshot: &ClusterSnapshot,
    policies: &[&Policy],
    node: &str,
    family: Family,
    selections: SharedSelections<'_>,
) -> DesiredState {
    ChainBuilder {
        snapshot,
        family,
        selections,
        state: DesiredState::default(),
        block_entries_by_namespace: HashMap::new(),
    }
    .run(policies, node)
}

struct ChainBuilder<'a> {
    snapshot: &'a ClusterSnapshot,
    family: Family,
    selections: SharedSelections<'a>,
    state: DesiredState,
    /// Per namespace: the ipBlock sets its policies use so far and their entries in all.
    block_entries_by_namespace: HashMap<String, (usize, BTreeSet<String>)>,
}

/// One local pod's isolation: the policies that select it, per direction.
struct LocalPod<'a> {
    pod: &'a Pod,
    ips: Vec<IpAddr>,
    ingress: Vec<&'a Policy>,
    egress: Vec<&'a Policy>,
    /// The ClusterNetworkPolicies whose subject the pod is, per direction.
    cluster_ingress: PodTiers<'a>,
    cluster_egress: PodTiers<'a>,
}

/// The order of the keys `a_namespace/a_name` and `b_namespace/b_name` as strings, without
/// joining them (policies are sorted this way on every compile).
fn key_order(a_namespace: &str, a_name: &str, b_namespace: &str, b_name: &str) -> Ordering {
    if a_namespace == b_namespace {
        return a_name.cmp(b_name);
    }
    let (a, b) = (a_namespace.as_bytes(), b_namespace.as_bytes());
    let common = a.len().min(b.len());
    let order = match a[..common].cmp(&b[..common]) {
        // One namespace starts the other: its '/' meets the other's next byte.
        Ordering::Equal if a.len() < b.len() => b'/'.cmp(&b[common]),
        Ordering::Equal => a[common].cmp(&b'/'),
        order => order,
    };
    if order != Ordering::Equal {
        return order;
    }
    // That byte is a '/' too (never in a Kubernetes namespace): compare the joined keys.
    let a = a_namespace.bytes().chain([b'/']).chain(a_name.bytes());
    let b = b_namespace.bytes().chain([b'/']).chain(b_name.bytes());
    a.cmp(b)
}

impl<'a> ChainBuilder<'a> {
    fn run(mut self, policies: &[&'a Policy], node: &str) -> DesiredState {
        // A policy selects pods of its own namespace only.
        let mut policies_by_namespace: HashMap<&str, Vec<&Policy>> = HashMap::new();
        for policy in policies {
            policies_by_namespace
                .entry(policy.namespace.as_str())
                .or_default()
                .push(policy);
        }
        let cluster_policies = tiers::ordered(self.snapshot);
        let mut local: Vec<LocalPod> = self
            .snapshot
            .pods
            .iter()
            .filter(|p| p.is_policy_relevant() && p.node_name.as_deref() == Some(node))
            .map(|pod| {
                let same_namespace = policies_by_namespace
                    .get(pod.namespace.as_str())
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                LocalPod {
                    pod,
                    ips: self.family_ips(pod),
                    ingress: same_namespace
                        .iter()
                        .copied()
                        .filter(|pol| pol.isolates_ingress && pol.selects(pod))
                        .collect(),
                    egress: same_namespace
                        .iter()
                        .copied()
                        .filter(|pol| pol.isolates_egress && pol.selects(pod))
                        .collect(),
                    cluster_ingress: tiers::pod_tiers(
                        &cluster_policies,
                        self.snapshot,
                        pod,
                        Direction::Ingress,
                    ),
                    cluster_egress: tiers::pod_tiers(
                        &cluster_policies,
                        self.snapshot,
                        pod,
                        Direction::Egress,
                    ),
                }
            })
            .filter(|lp| !lp.ips.is_empty())
            .collect();
        local.sort_by(|a, b| {
            key_order(&a.pod.namespace, &a.pod.name, &b.pod.namespace, &b.pod.name)
        });

        let mut ingress_dispatch = Vec::new();
        let mut egress_dispatch = Vec::new();
        // Whether some pod chain uses the tier mark, which the dispatch chains then clear too.
        let mut any_tiers = false;
        for lp in &local {
            for (direction, selecting, cluster) in [
                (Direction::Ingress, &lp.ingress, &lp.cluster_ingress),
                (Direction::Egress, &lp.egress, &lp.cluster_egress),
            ] {
                if selecting.is_empty() && cluster.is_empty() {
                    continue;
                }
                let chain = names::pod_chain(direction.is_ingress(), &lp.pod.key());
                if cluster.is_empty() {
                    self.pod_chain(&chain, direction, selecting, &local);
                } else {
                    any_tiers = true;
                    self.tiered_pod_chain(&chain, direction, lp, selecting, cluster, &local);
                }
                let comment = format!("{} {}", lp.pod.key(), direction.name());
                for ip in &lp.ips {
                    let out = match direction {
                        Direction::Ingress => &mut ingress_dispatch,
                        Direction::Egress => &mut egress_dispatch,
                    };
                    let m = address_match(direction, IpNet::from(*ip));
                    out.push((
                        *ip,
                        Rule::new(vec![m], Target::Jump(chain.clone())).commented(comment.clone()),
                    ));
                }
            }
        }

        // A new flow walks one set lookup per direction, not one rule per isolated local pod:
        // the per-pod jumps sit behind "isolated for egress/ingress" sets of local addresses.
        let mut to_dispatch = Vec::new();
        for (direction, chain, rules) in [
            (
                Direction::Egress,
                names::EGRESS_DISPATCH_CHAIN,
                egress_dispatch,
            ),
            (
                Direction::Ingress,
                names::INGRESS_DISPATCH_CHAIN,
                ingress_dispatch,
            ),
        ] {
            // The subject pod: the source of its egress, the destination of its ingress.
            let side = match direction {
                Direction::Egress => SetDirection::Src,
                Direction::Ingress => SetDirection::Dst,
            };
            let set = names::isolated_set(self.family, direction.is_ingress());
            let members = rules.iter().map(|(ip, _)| SetMember::Ip(*ip)).collect();
            self.state.sets.insert(
                set.clone(),
                IpSet {
                    kind: SetKind::HashIp,
                    family: self.family,
                    members: Members::new(members),
                },
            );
            let root = dispatch_branch(direction, rules, 0, &mut self.state.chains);
            self.state.chains.insert(chain.to_string(), root);
            to_dispatch.push(Rule::new(
                vec![Match::Set {
                    name: set,
                    direction: side,
                }],
                Target::Jump(chain.to_string()),
            ));
        }
        let [egress_dispatch, ingress_dispatch] = [&to_dispatch[0], &to_dispatch[1]];

        let established = Rule::new(vec![Match::EstablishedOrRelated], Target::Return);
        let clear_mark = Rule::new(
            vec![],
            if any_tiers {
                Target::ClearMarks
            } else {
                Target::ClearAllowMark
            },
        );
        let neighbour_discovery: Vec<Rule> = match self.family {
            Family::V4 => vec![],
            Family::V6 => NEIGHBOUR_DISCOVERY_TYPES
                .iter()
                .map(|t| Rule::new(vec![Match::Icmp6Type(*t)], Target::Return))
                .collect(),
        };

        let forward = vec![
            established.clone(),
            egress_dispatch.clone(),
            ingress_dispatch.clone(),
            clear_mark.clone(),
        ];

        let mut input = vec![established.clone()];
        input.extend(neighbour_discovery.iter().cloned());
        input.push(egress_dispatch.clone());
        input.push(clear_mark.clone());

        let mut output = vec![established];
        output.extend(neighbour_discovery);
        // The node may always reach its pods (kubelet probes); only traffic that merely leaves
        // through OUTPUT with a pod's source address (e.g. IPVS-forwarded) is judged.
        output.push(Rule::new(vec![Match::SourceIsLocal], Target::Return));
        output.push(egress_dispatch.clone());
        output.push(ingress_dispatch.clone());
        output.push(clear_mark);

        for (builtin, chain, rules) in [
            ("FORWARD", names::FORWARD_CHAIN, forward),
            ("INPUT", names::INPUT_CHAIN, input),
            ("OUTPUT", names::OUTPUT_CHAIN, output),
        ] {
            self.state.chains.insert(chain.to_string(), rules);
            self.state.hooks.push(Hook {
                builtin,
                target: chain.to_string(),
            });
        }
        self.state
    }

    fn family_ips(&self, pod: &Pod) -> Vec<IpAddr> {
        pod.ips
            .iter()
            .copied()
            .filter(|ip| Family::of(ip) == self.family)
            .collect()
    }

    fn pod_chain(
        &mut self,
        chain: &str,
        direction: Direction,
        selecting: &[&'a Policy],
        local: &[LocalPod<'a>],
    ) {
        let mut rules = vec![Rule::new(vec![], Target::ClearAllowMark)];
        rules.extend(self.policy_jumps(direction, selecting, local));
        rules.push(Rule::new(vec![Match::AllowMarkSet], Target::Return));
        rules.push(Rule::new(
            vec![Match::Protocol(Protocol::Tcp)],
            Target::RejectWithTcpReset,
        ));
        rules.push(Rule::new(vec![], Target::Reject));
        self.state.chains.insert(chain.to_string(), rules);
    }

    /// A pod chain with ClusterNetworkPolicy tiers around the NetworkPolicy stage (layout in
    /// [`tiers`]).
    fn tiered_pod_chain(
        &mut self,
        chain: &str,
        direction: Direction,
        lp: &LocalPod<'a>,
        selecting: &[&'a Policy],
        cluster: &PodTiers<'a>,
        local: &[LocalPod<'a>],
    ) {
        let admin = cluster
            .admin
            .iter()
            .map(|policy| self.cluster_jump(policy, direction))
            .collect();
        let network_policies =
            (!selecting.is_empty()).then(|| self.policy_jumps(direction, selecting, local));
        // The Baseline tier only where no NetworkPolicy decides (its chains are not built for
        // nothing).
        let baseline = match network_policies {
            Some(_) => vec![],
            None => cluster
                .baseline
                .iter()
                .map(|policy| self.cluster_jump(policy, direction))
                .collect(),
        };
        let rules = tiers::pod_chain(&lp.ips, direction, admin, network_policies, baseline);
        self.state.chains.insert(chain.to_string(), rules);
    }

    /// The jump to a cluster policy's chain, which is built on first use.
    fn cluster_jump(&mut self, policy: &ClusterPolicy, direction: Direction) -> Rule {
        let chain = names::cluster_policy_chain(direction.is_ingress(), &policy.name);
        if !self.state.chains.contains_key(&chain) {
            let built = tiers::policy_chain(
                self.snapshot,
                self.selections,
                self.family,
                policy,
                direction,
            );
            self.state.sets.extend(built.sets);
            self.state.chains.insert(chain.clone(), built.rules);
            self.state.failed_closed.extend(built.failed_closed);
            self.state.origins.insert(
                chain.clone(),
                PolicyChainOrigin {
                    policy: policy.name.clone(),
                    direction: direction.name(),
                    rules: built.origins,
                    tier: Some(policy.tier),
                },
            );
        }
        Rule::new(vec![], Target::Jump(chain)).commented(format!(
            "cnp {} {} {}",
            policy.tier.as_str(),
            policy.name,
            direction.name()
        ))
    }

    /// The jumps to the chains of the NetworkPolicies `selecting` (built on first use).
    fn policy_jumps(
        &mut self,
        direction: Direction,
        selecting: &[&'a Policy],
        local: &[LocalPod<'a>],
    ) -> Vec<Rule> {
        let mut rules = Vec::new();
        for policy in selecting {
            let policy_chain = names::policy_chain(direction.is_ingress(), &policy.key());
            if !self.state.chains.contains_key(&policy_chain) {
                let (body, origins) = self.policy_chain(policy, direction, local);
                self.state.chains.insert(policy_chain.clone(), body);
                self.state.origins.insert(
                    policy_chain.clone(),
                    PolicyChainOrigin {
                        policy: policy.key(),
                        direction: direction.name(),
                        rules: origins,
                        tier: None,
                    },
                );
            }
            rules.push(
                Rule::new(vec![], Target::Jump(policy_chain)).commented(format!(
                    "policy {} {}",
                    policy.key(),
                    direction.name()
                )),
            );
        }
        rules
    }

    fn policy_chain(
        &mut self,
        policy: &Policy,
        direction: Direction,
        local: &[LocalPod<'a>],
    ) -> (Vec<Rule>, Vec<RuleOrigin>) {
        let rules = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        let local_pods: Vec<&Pod> = local.iter().map(|lp| lp.pod).collect();
        let mut out = Vec::new();
        let mut origins = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            let builder = RuleBuilder {
                family: self.family,
                selections: self.selections,
                block_entries_by_namespace: &self.block_entries_by_namespace,
            };
            match builder.rule(policy, direction, rule, &local_pods) {
                Ok(parts) => {
                    if let Some((set, entries)) = parts.block_charge {
                        let used = self
                            .block_entries_by_namespace
                            .entry(policy.namespace.clone())
                            .or_default();
                        if used.1.insert(set) {
                            used.0 += entries;
                        }
                    }
                    self.state.sets.extend(parts.sets);
                    out.extend(parts.rules);
                    origins.extend(
                        parts
                            .origins
                            .into_iter()
                            .map(|o| RuleOrigin { rule: index, ..o }),
                    );
                }
                Err(reason) => self.state.failed_closed.push(FailedClosed {
                    policy: policy.key(),
                    direction: direction.name(),
                    rule: index,
                    reason,
                }),
            }
        }
        (out, origins)
    }
}

#[cfg(test)]
mod tests {
    use super::key_order;

    #[test]
    fn key_order_is_the_order_of_the_joined_keys() {
        // '-' sorts before '/', and a namespace may be a prefix of another.
        let keys = [
            ("a", "b"),
            ("a-x", "c"),
            ("a", "a-b"),
            ("ab", ""),
            ("a/x", "b"),
            ("a", "x/c"),
            ("b", "b"),
            ("a", ""),
            ("b", "a"),
        ];
        for (an, aname) in keys {
            for (bn, bname) in keys {
                assert_eq!(
                    key_order(an, aname, bn, bname),
                    format!("{an}/{aname}").cmp(&format!("{bn}/{bname}")),
                    "{an}/{aname} vs {bn}/{bname}"
                );
            }
        }
    }
}
