//! This node's pod CIDRs from its Node object (`spec.podCIDRs`), for new-pod isolation: read
//! from `kind: Node` objects in manifests mode, and in Kubernetes mode watched with a field
//! selector on this node's name only (one object, not every node of the cluster).
//!
//! The Node watch never holds up enforcement: until it has been read (or while RBAC forbids
//! it), new-pod isolation uses `--pod-cidr` or stays off.

use super::ClusterStore;
use crate::source::convert::pod_cidrs;
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use std::sync::Arc;

/// Watches this node's Node object and keeps its pod CIDRs in `store`, until the process ends.
pub fn start(client: Client, store: Arc<ClusterStore>, node: String) {
    tokio::spawn(async move {
        let api: Api<core::Node> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        let mut failing = false;
        let mut seen_in_list = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            node,
                            "cannot read this node's Node object (its pod CIDRs, for new-pod isolation; the agent needs list and watch on nodes): {e}; retrying, meanwhile --pod-cidr or nothing is used"
                        );
                        failing = true;
                    }
                    continue;
                }
            };
            failing = false;
            match event {
                Event::Init => seen_in_list = false,
                Event::InitApply(n) | Event::Apply(n) => {
                    seen_in_list = true;
                    match pod_cidrs(&n) {
                        Ok((name, cidrs)) if name == node => store.set_node_pod_cidrs(&node, cidrs),
                        Ok(_) => {}
                        Err(e) => tracing::error!(node, "ignoring this node's pod CIDRs: {e}"),
                    }
                }
                Event::Delete(_) => store.set_node_pod_cidrs(&node, Vec::new()),
                Event::InitDone if !seen_in_list => store.set_node_pod_cidrs(&node, Vec::new()),
                Event::InitDone => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(spec: serde_json::Value) -> core::Node {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn pod_cidrs_come_from_pod_cidrs_or_the_single_field() {
        let both = node(
            serde_json::json!({"podCIDRs": ["10.244.1.0/24", "fd00:1::/64"], "podCIDR": "10.9.0.0/16"}),
        );
        assert_eq!(
            pod_cidrs(&both).unwrap(),
            (
                "n1".to_string(),
                vec![
                    "10.244.1.0/24".parse().unwrap(),
                    "fd00:1::/64".parse().unwrap()
                ]
            )
        );
        let old = node(serde_json::json!({"podCIDR": "10.244.1.0/24"}));
        assert_eq!(
            pod_cidrs(&old).unwrap().1,
            vec!["10.244.1.0/24".parse().unwrap()]
        );
        assert_eq!(pod_cidrs(&node(serde_json::json!({}))).unwrap().1, vec![]);
        assert!(pod_cidrs(&node(serde_json::json!({"podCIDRs": ["nope"]}))).is_err());
    }
}
