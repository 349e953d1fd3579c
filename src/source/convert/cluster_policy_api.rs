//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) as the API serves it: our own serde
//! types, written from kubernetes-sigs/network-policy-api v0.2.0
//! `apis/v1alpha2/clusternetworkpolicy_types.go` and the experimental CRD
//! `config/crd/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml` (a superset of
//! the standard one: it adds the `nodes` and `domainNames` egress peers).
//!
//! Every field is optional and enums are plain strings, so that one object the agent cannot use
//! never fails the deserialization of a whole list: `cluster_policy::cluster_policy` checks what
//! the CRD's schema and CEL rules require and says what is wrong. Fields of a peer or protocol
//! this version does not know are kept (`unknown`) so that a peer written for a newer CRD is
//! reported as such, not mistaken for an empty one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub const GROUP: &str = "policy.networking.k8s.io";
pub const VERSION: &str = "v1alpha2";
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
pub const KIND: &str = "ClusterNetworkPolicy";
pub const PLURAL: &str = "clusternetworkpolicies";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicy {
    #[serde(default)]
    pub metadata: meta::ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
}

impl kube::Resource for ClusterNetworkPolicy {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        API_VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &meta::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut meta::ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub tier: Option<String>,
    pub priority: Option<i64>,
    pub subject: Option<Subject>,
    pub ingress: Option<Vec<IngressRule>>,
    pub egress: Option<Vec<EgressRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    pub namespaces: Option<meta::LabelSelector>,
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    pub namespace_selector: Option<meta::LabelSelector>,
    pub pod_selector: Option<meta::LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IngressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub from: Option<Vec<Peer>>,
    pub protocols: Option<Vec<Protocol>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EgressRule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub to: Option<Vec<Peer>>,
    pub protocols: Option<Vec<Protocol>>,
}

/// An ingress or egress peer; the CRD allows only `namespaces` and `pods` in ingress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub namespaces: Option<meta::LabelSelector>,
    pub pods: Option<NamespacedPod>,
    pub nodes: Option<meta::LabelSelector>,
    pub networks: Option<Vec<String>>,
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    pub tcp: Option<ProtocolPorts>,
    pub udp: Option<ProtocolPorts>,
    pub sctp: Option<ProtocolPorts>,
    pub destination_named_port: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    pub destination_port: Option<Port>,
}

/// Exactly one of `number` or `range`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Port {
    pub number: Option<i64>,
    pub range: Option<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortRange {
    pub start: Option<i64>,
    pub end: Option<i64>,
}
