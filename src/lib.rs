//! kube-netpol-iptables: Kubernetes NetworkPolicy enforced with ipset and iptables-restore batches.
//!
//! - [`model`]: the cluster as the core sees it; [`source`] builds it from Kubernetes objects
//!   (a manifests directory or the API).
//! - [`compile`]: the pure core, snapshot → [`compile::DesiredState`] per family for one node.
//! - [`dataplane`]: renders, diffs and writes that state to the kernel.
//! - [`reconcile`]: the one sync loop; [`metrics`]: Prometheus metrics and health endpoints;
//!   [`app`]: the runtime and commands; [`cli`]: the command line.
//!
//! See docs/design.md for the map of the code.

pub mod app;
pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod source;
