//! Starting the watchers.

use super::cluster_policy::{self, CRD_RECHECK};
use super::node_addresses;
use super::store::ClusterStore;
use super::watch::{report_invalid, watch_kind};
use crate::metrics::Metrics;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;

/// Starts watching the cluster; the returned store fills as lists complete. With `metrics`, the
/// watchers report whether each kind can be read (readiness, `kni_api_*`).
pub fn start(client: Client, metrics: Option<Arc<Metrics>>) -> Arc<ClusterStore> {
    start_with(client, metrics, CRD_RECHECK)
}

/// `start`, asking API discovery every `crd_recheck` whether ClusterNetworkPolicy is served
/// while it is not.
pub fn start_with(
    client: Client,
    metrics: Option<Arc<Metrics>>,
    crd_recheck: Duration,
) -> Arc<ClusterStore> {
    let store = Arc::new(ClusterStore::default());
    tokio::spawn(cluster_policy::watch(
        client.clone(),
        store.clone(),
        metrics.clone(),
        crd_recheck,
    ));
    tokio::spawn(node_addresses::watch(
        client.clone(),
        store.clone(),
        metrics.clone(),
    ));
    report_invalid(&store, metrics.as_deref());
    tokio::spawn(watch_kind(
        Api::<core::Namespace>::all(client.clone()),
        store.clone(),
        metrics.clone(),
        false,
    ));
    tokio::spawn(watch_kind(
        Api::<core::Pod>::all(client.clone()),
        store.clone(),
        metrics.clone(),
        false,
    ));
    tokio::spawn(watch_kind(
        Api::<net::NetworkPolicy>::all(client),
        store.clone(),
        metrics,
        false,
    ));
    store
}
