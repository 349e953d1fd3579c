//! The Kubernetes API source: one watcher per kind (Namespaces, Pods, NetworkPolicies, and
//! ClusterNetworkPolicies while the API serves them, and every Node while a ClusterNetworkPolicy
//! selects nodes) keeps a store of objects already converted to the core's model, so memory
//! holds only the fields enforcement needs, not whole API objects.
//!
//! A (re-)list (start, 410 Gone, reconnect after an error) is buffered and swapped in whole when it
//! completes (`Init` … `InitDone`), so the store never shows a half-listed kind; and no snapshot is
//! handed out until every kind has listed once. During an API outage the watchers retry with
//! backoff and the store keeps the last state, which stays enforced. As client-go's reflector
//! does, a failed watch resumes from the last resourceVersion seen, and a kind is listed afresh
//! (resourceVersion=0, from the API server's watch cache) only after 410 Expired or a failed list.

mod client;
mod cluster_policy;
pub mod node;
mod node_addresses;
mod start;
mod store;
mod watch;

pub use client::{DEFAULT_LOG_FILTER, USER_AGENT, client, client_for};
pub use cluster_policy::CRD_RECHECK;
pub use start::{start, start_with};
pub use store::ClusterStore;
pub use watch::WATCH_TIMEOUT;
#[cfg(test)]
mod store_tests;
