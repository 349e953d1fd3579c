//! The cluster as the core sees it: only the fields NetworkPolicy enforcement needs.
//!
//! Sources (manifests directory, Kubernetes API) convert their objects into these validated types,
//! so the compiler never has to deal with malformed input.

pub mod cidr;
mod cluster_policy;
mod family;
mod selector;

pub use cluster_policy::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, ClusterRuleAction, ClusterSubject,
    NodeInfo, Tier,
};
pub use family::{Family, PerFamily};
pub use selector::{LabelSelector, Requirement};

use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};

pub type Labels = BTreeMap<String, String>;

/// Everything the compiler needs to know about the cluster at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSnapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Shared, not copied: a source hands out the same list while no pod changed, and the
    /// compiler then skips comparing pods (see `Compiler::compile`). Change it with
    /// [`ClusterSnapshot::pods_mut`].
    pub pods: Arc<Vec<Pod>>,
    /// Which pods differ from an earlier list, when the source knows (the Kubernetes store
    /// does): the compiler then compares only those. A hint, never part of what the snapshot
    /// means (equal snapshots may carry different hints); the default is no hint.
    pub pods_changed: PodsChanged,
    pub policies: Vec<Policy>,
    /// `spec.podCIDRs` of the Node objects seen (only this node's in Kubernetes mode), by node
    /// name: new-pod isolation uses them.
    pub node_pod_cidrs: BTreeMap<String, Vec<IpNet>>,
    /// ClusterNetworkPolicies (both tiers), in no particular order.
    pub cluster_policies: Vec<ClusterPolicy>,
    /// Nodes by name with labels and addresses; filled only when some ClusterNetworkPolicy has
    /// a `nodes` peer (manifests mode: every `kind: Node` given).
    pub nodes: BTreeMap<String, NodeInfo>,
}

impl ClusterSnapshot {
    /// The pods to change; copied first if another snapshot (or a source's cache) shares them.
    /// Drops any [`PodsChanged`] hint, which would no longer be true.
    pub fn pods_mut(&mut self) -> &mut Vec<Pod> {
        self.pods_changed = PodsChanged::default();
        Arc::make_mut(&mut self.pods)
    }
}

/// The list `to` is the list `since` (as some earlier snapshot held it) with only the pods of
/// `keys` (`namespace/name`) added, changed or removed; both sorted by namespace and name. It
/// speaks of a snapshot's pods only while they are `to` (so a list replaced or changed since,
/// which moves it, is never described by it). The default, pointing at no list, is no hint.
#[derive(Debug, Clone, Default)]
pub struct PodsChanged {
    /// Weak: the lists stay comparable by address (and their addresses unused by others)
    /// without being kept alive.
    pub since: Weak<Vec<Pod>>,
    pub to: Weak<Vec<Pod>>,
    pub keys: Vec<String>,
}

/// A hint, not state: it never makes two snapshots unequal.
impl PartialEq for PodsChanged {
    fn eq(&self, _: &PodsChanged) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn parse(s: &str) -> PodPhase {
        match s {
            "Pending" => PodPhase::Pending,
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub node_name: Option<String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub phase: PodPhase,
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// Whether NetworkPolicy applies to this pod at all, as subject or as peer. hostNetwork pods
    /// share the node's IP, and finished pods may have handed their IP to a new pod.
    pub fn is_policy_relevant(&self) -> bool {
        !self.host_network
            && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
            && !self.ips.is_empty()
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The order of a snapshot's pod list when its source names changed pods (`PodsChanged`):
    /// by namespace, then name. The store sorts and edits by it, the compiler searches by it.
    pub fn sort_key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The lower-case name iptables (`-p`) and ipset (`proto:port`) both use.
    pub fn as_kernel_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    pub ingress: Vec<PolicyRule>,
    pub egress: Vec<PolicyRule>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace && self.pod_selector.matches(&pod.labels)
    }
}

/// One ingress or egress rule. `None` for peers or ports means the list was absent or empty,
/// which the API defines as "all peers" / "all ports".
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Peer {
    /// Pods chosen by selectors. `namespaces: None` means the policy's own namespace;
    /// `pods: None` means every pod of the chosen namespaces.
    Pods {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: Option<PortRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// An inclusive range; a single port has `first == last`.
    Range {
        first: u16,
        last: u16,
    },
    Named(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_and_host_network_pods_are_not_relevant() {
        let mut p = Pod {
            namespace: "x".into(),
            name: "a".into(),
            labels: Labels::new(),
            node_name: Some("n1".into()),
            ips: vec!["10.0.0.1".parse().unwrap()],
            host_network: false,
            phase: PodPhase::Running,
            ports: vec![],
        };
        assert!(p.is_policy_relevant());
        p.phase = PodPhase::Succeeded;
        assert!(!p.is_policy_relevant());
        p.phase = PodPhase::Failed;
        assert!(!p.is_policy_relevant());
        p.phase = PodPhase::Running;
        p.host_network = true;
        assert!(!p.is_policy_relevant());
        p.host_network = false;
        p.ips.clear();
        assert!(!p.is_policy_relevant());
    }
}
