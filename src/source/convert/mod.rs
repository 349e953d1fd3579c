//! Kubernetes objects (k8s-openapi types) → the core's validated model. Shared by every source.
//!
//! Applies the defaults the API server would (policyTypes, protocol TCP, the namespace name label)
//! and rejects what its validation would reject, with a message that says where.

mod cluster_policy;
pub mod cluster_policy_api;
mod cluster_policy_values;
mod node;
mod pod;
mod policy;
mod validate;

pub use cluster_policy::{cluster_policy, domain_names, warn_domain_names_once};
pub use cluster_policy_api::ClusterNetworkPolicy;
pub use node::{node_info, pod_cidrs};
pub use pod::{NAMESPACE_NAME_LABEL, implicit_namespace, namespace, parse_ip_sloppy, pod};
pub use policy::policy;
pub use validate::InvalidField;

#[cfg(test)]
mod cluster_policy_tests;
#[cfg(test)]
mod tests;
