//! kube-netpol-iptables: Kubernetes NetworkPolicy enforced with ipset and iptables-restore batches.
//!
//! - [`model`]: the cluster as the core sees it; [`convert`] builds it from Kubernetes objects.
//! - [`compile`]: the pure core, snapshot → [`compile::DesiredState`] per family for one node.
//! - [`dataplane`]: renders, diffs and writes that state to the kernel.
//! - [`manifests`] and [`kube_source`]: the sources; [`agent`]: the sync loops; [`metrics`]:
//!   Prometheus metrics and health endpoints; [`cli`]: the command line.

pub mod agent;
pub mod cli;
pub mod compile;
pub mod convert;
pub mod dataplane;
pub mod fuzzing;
pub mod instance_lock;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
pub mod model;

// The paths these modules had before `model/` and `compile/`, kept so callers still build.
pub use compile::{ir as state, names};
pub use model::cidr;
pub mod peer_cache {
    //! The peer cache now lives inside [`crate::compile::Compiler`].
    pub use crate::compile::Compiler as PeerCache;
}
