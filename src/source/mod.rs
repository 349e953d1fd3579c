//! Where the cluster comes from: a manifests directory or the Kubernetes API. Both convert
//! Kubernetes objects with [`convert`] (the only code that sees Kubernetes types besides the
//! sources) and offer the reconcile loop the same shape, [`Source`].

pub mod change_times;
pub mod convert;
pub mod kube;
pub mod manifests;
mod shape;

pub use shape::Source;
