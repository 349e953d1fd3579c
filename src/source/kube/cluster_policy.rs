//! ClusterNetworkPolicies, watched while the API serves them. The group comes from a
//! CustomResourceDefinition (kubernetes-sigs/network-policy-api) that may be installed after the
//! agent starts, or removed: API discovery (`GET /apis/policy.networking.k8s.io/v1alpha2`, which
//! every authenticated client may read through the `system:discovery` ClusterRole, so no extra
//! RBAC) is asked at start and then every `CRD_RECHECK` while the kind is not served. Served: the
//! kind is listed and watched like the others. The definition deleted: kube-apiserver deletes its
//! objects (DELETED events) and then answers 404, upon which the policies are dropped and
//! discovery is asked again.
//!
//! Not served is not an error: the agent is ready and enforces NetworkPolicy. Served but not
//! readable (RBAC) at start holds up the first sync as for every other kind (never a partial
//! view), and readiness names it.

use super::store::ClusterStore;
use super::watch::{report_invalid, watch_kind};
use crate::metrics::Metrics;
use crate::source::convert::ClusterNetworkPolicy;
use crate::source::convert::cluster_policy_api::{API_VERSION, PLURAL};
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;

/// How often discovery is asked whether ClusterNetworkPolicy has become served: one small
/// request per node every 10 s, answered from kube-apiserver's memory, while the CRD is absent (a
/// CRD installed later is enforced within that; a CRD watch would need read access to every CRD).
pub const CRD_RECHECK: Duration = Duration::from_secs(10);
/// The retry after discovery failed for another reason (the API unreachable: every kind waits).
const DISCOVERY_RETRY: Duration = Duration::from_secs(3);

const LOG_TARGET: &str = "kube_netpol_iptables::kube_source";

/// Whether the API serves `clusternetworkpolicies` in policy.networking.k8s.io/v1alpha2.
async fn served(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(API_VERSION).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == PLURAL)),
        // The group/version does not exist (kube-apiserver: 404 for an unknown path).
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Follows the kind for the life of the process.
pub(super) async fn watch(
    client: Client,
    store: Arc<ClusterStore>,
    metrics: Option<Arc<Metrics>>,
    recheck: Duration,
) {
    // What the store holds: `Some(false)` not served (and counted as listed), `None` unknown yet.
    let mut known_absent: Option<bool> = None;
    let mut failing = false;
    loop {
        let absent = match served(&client).await {
            Ok(true) => {
                failing = false;
                // At start the kind's "listed" line says it; a CRD installed later is news.
                if known_absent == Some(true) {
                    tracing::info!(target: LOG_TARGET, "{API_VERSION} ClusterNetworkPolicy is served now: watching it");
                }
                watch_kind(
                    Api::<ClusterNetworkPolicy>::all(client.clone()),
                    store.clone(),
                    metrics.clone(),
                    true,
                )
                .await;
                tracing::warn!(target: LOG_TARGET, "{API_VERSION} ClusterNetworkPolicy is no longer served (its CustomResourceDefinition was deleted): its policies are no longer enforced");
                store.clear_kind::<ClusterNetworkPolicy>(true);
                report_invalid(&store, metrics.as_deref());
                known_absent = Some(true);
                // Not at once: discovery and the resource could disagree for a moment.
                tokio::time::sleep(recheck).await;
                continue;
            }
            Ok(false) => {
                failing = false;
                true
            }
            // Discovery refused (RBAC without system:discovery): the kind cannot be known, so it
            // cannot be waited for either; NetworkPolicy stays enforced.
            Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403) => {
                if !failing {
                    tracing::warn!(target: LOG_TARGET, "cannot ask API discovery whether ClusterNetworkPolicy is served ({}): going on without it, asking again every {recheck:?}", status.message);
                    failing = true;
                }
                true
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(target: LOG_TARGET, "cannot ask API discovery whether ClusterNetworkPolicy is served: {e}; retrying");
                    failing = true;
                }
                tokio::time::sleep(DISCOVERY_RETRY).await;
                continue;
            }
        };
        if known_absent != Some(absent) {
            tracing::info!(target: LOG_TARGET, "{API_VERSION} ClusterNetworkPolicy is not served (its CustomResourceDefinition is not installed): enforcing NetworkPolicy only, asking again every {recheck:?}");
            store.clear_kind::<ClusterNetworkPolicy>(true);
            report_invalid(&store, metrics.as_deref());
            known_absent = Some(absent);
        }
        tokio::time::sleep(recheck).await;
    }
}
