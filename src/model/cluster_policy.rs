//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) as the core sees it: validated by the
//! sources, so the compiler never meets a malformed object.
//!
//! Evaluation order per direction: Admin tier (by priority, then name) → NetworkPolicy (if any
//! selects the pod in that direction) → Baseline tier → allow. See docs/cluster-network-policy.md.

use super::{LabelSelector, Labels, Protocol};
use ipnet::IpNet;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterRuleAction {
    /// Ends this direction's evaluation: the packet is allowed in this direction (an egress Accept
    /// does not skip the destination's ingress).
    Accept,
    Deny,
    /// Skips the rest of this tier: evaluation goes on with the next stage.
    Pass,
}

impl ClusterRuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterRuleAction::Accept => "Accept",
            ClusterRuleAction::Deny => "Deny",
            ClusterRuleAction::Pass => "Pass",
        }
    }
}

/// The pods a ClusterNetworkPolicy applies to (hostNetwork pods never are).
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterSubject {
    /// Every pod of the namespaces the selector picks.
    Namespaces(LabelSelector),
    Pods {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0–1000, lower is evaluated first; ties are broken by name.
    pub priority: u32,
    pub subject: ClusterSubject,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

/// One ingress or egress rule, in the order the object lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRule {
    /// `spec.ingress[].name` (may be empty).
    pub name: String,
    pub action: ClusterRuleAction,
    /// Never empty from the API (the schema requires at least one peer); empty when every peer
    /// of an Accept rule failed closed (written for a newer CRD version): it matches nothing.
    pub peers: Vec<ClusterPeer>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<ClusterPort>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClusterPeer {
    /// Every pod of the namespaces the selector picks.
    Namespaces(LabelSelector),
    Pods {
        namespaces: LabelSelector,
        pods: LabelSelector,
    },
    /// Egress only in the API: CIDRs (they match pod addresses too). The sources also use it,
    /// with both whole address spaces, for a Deny or Pass rule that fails closed (deny all).
    Networks(Vec<IpNet>),
    /// Egress only (experimental): the addresses of the nodes the selector picks.
    Nodes(LabelSelector),
    /// Egress only (experimental): accepted but matches nothing — enforcing names safely needs the
    /// DNS replies held, which an iptables agent cannot do.
    DomainNames(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClusterPort {
    /// A protocol with an optional inclusive destination port range (`None`: every port).
    Protocol {
        protocol: Protocol,
        ports: Option<(u16, u16)>,
    },
    /// `destinationNamedPort`: resolved on the destination pod (any protocol the container port
    /// declares under that name).
    Named(String),
}

/// A Node as ClusterNetworkPolicy `nodes` peers need it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    /// `status.addresses` of type InternalIP / ExternalIP.
    pub addresses: Vec<IpAddr>,
}
