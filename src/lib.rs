//! kube-netpol-iptables: Kubernetes NetworkPolicy enforced with ipset and iptables-restore batches.
//!
//! - [`model`]: the cluster as the core sees it; [`convert`] builds it from Kubernetes objects.
//! - [`compile`]: the pure core, snapshot → [`state::DesiredState`] for one node and family.
//! - [`dataplane`]: renders, diffs and writes that state to the kernel.
//! - [`manifests`] and [`kube_source`]: the sources; [`agent`]: the sync loops; [`metrics`]:
//!   Prometheus metrics and health endpoints; [`cli`]: the command line.

pub mod agent;
pub mod cidr;
pub mod cli;
pub mod compile;
pub mod convert;
pub mod dataplane;
pub mod enforcement;
pub mod fuzzing;
pub mod instance_lock;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod names;
pub mod new_pod_isolation;
pub mod node_source;
pub mod peer_cache;
pub mod simulate;
pub mod state;
pub mod strict;

#[cfg(test)]
mod compile_tests;
