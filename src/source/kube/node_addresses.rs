//! Every Node's labels and addresses, for ClusterNetworkPolicy `nodes` peers, watched only while
//! some ClusterNetworkPolicy has such a peer. Otherwise the agent reads only its own Node (see
//! `node`): a list and watch of every Node costs each agent a copy of every node's object at
//! start and an event per node status update (kubelets update their Node's status and lease
//! routinely), which a cluster without `nodes` peers should not pay on every node.
//!
//! While needed, the first snapshot waits for the first list (the policies are never enforced
//! with node addresses missing), unless the watch fails (RBAC): then readiness says why and the
//! policies are enforced with the nodes known so far.

use super::store::ClusterStore;
use super::watch::watch_kind;
use crate::metrics::Metrics;
use k8s_openapi::api::core::v1 as core;
use kube::{Api, Client};
use std::sync::Arc;
use tokio::sync::watch;

const LOG_TARGET: &str = "kube_netpol_iptables::kube_source";

/// Waits until `needed` is `want`; false if the store is gone.
async fn until(needed: &mut watch::Receiver<bool>, want: bool) -> bool {
    needed.wait_for(|n| *n == want).await.is_ok()
}

/// Starts and stops the Node watch as ClusterNetworkPolicies come and go, for the life of the
/// process.
pub(super) async fn watch(client: Client, store: Arc<ClusterStore>, metrics: Option<Arc<Metrics>>) {
    let mut needed = store.nodes_needed();
    loop {
        if !until(&mut needed, true).await {
            return;
        }
        tracing::info!(target: LOG_TARGET, "a ClusterNetworkPolicy selects nodes: watching every Node's labels and addresses");
        store.clear_kind::<core::Node>(false);
        tokio::select! {
            _ = watch_kind(Api::<core::Node>::all(client.clone()), store.clone(), metrics.clone(), false) => {}
            _ = until(&mut needed, false) => {}
        }
        tracing::info!(target: LOG_TARGET, "no ClusterNetworkPolicy selects nodes any more: stopped watching every Node");
        store.clear_kind::<core::Node>(false);
        if let Some(m) = &metrics {
            m.set_api_problem("Node", None);
        }
    }
}
