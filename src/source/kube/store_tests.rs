//! The store's snapshots share the pod list until a pod changes.

use super::store::{ClusterStore, apply_event};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::runtime::watcher::Event;
use std::sync::Arc;

fn pod(name: &str, app: &str, phase: &str) -> core::Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "x", "labels": {"app": app}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": phase, "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                   "conditions": [{"type": "Ready", "status": if phase == "Running" {"True"} else {"False"}}]}
    }))
    .unwrap()
}

fn policy(name: &str) -> net::NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": {"podSelector": {}}
    }))
    .unwrap()
}

fn namespace(team: &str) -> core::Namespace {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "labels": {"team": team}}
    }))
    .unwrap()
}

/// Lists every kind the first snapshot waits for.
fn listed_store() -> ClusterStore {
    let store = ClusterStore::default();
    fn list<K: super::store::Kind>(store: &ClusterStore, objects: Vec<K>) {
        let mut relist = None;
        apply_event::<K>(store, &mut relist, Event::Init);
        for o in objects {
            apply_event(store, &mut relist, Event::InitApply(o));
        }
        apply_event::<K>(store, &mut relist, Event::InitDone);
    }
    list(&store, vec![namespace("blue")]);
    list(
        &store,
        vec![pod("a", "web", "Running"), pod("b", "db", "Running")],
    );
    list::<net::NetworkPolicy>(&store, vec![]);
    list::<crate::source::convert::ClusterNetworkPolicy>(&store, vec![]);
    store
}

#[test]
fn snapshots_share_the_pod_list_until_a_pod_changes() {
    let store = listed_store();
    let (_, first) = store.snapshot().expect("every kind listed");
    assert_eq!(first.pods.len(), 2);

    // Other kinds change: the same list, not a copy.
    apply_event(&store, &mut None, Event::Apply(policy("p")));
    apply_event(&store, &mut None, Event::Apply(namespace("red")));
    let (_, second) = store.snapshot().unwrap();
    assert_eq!(second.policies.len(), 1);
    assert!(Arc::ptr_eq(&first.pods, &second.pods));

    // A pod's status moving on without changing what we use of it: still the same list.
    let mut unchanged = pod("a", "web", "Running");
    unchanged.status.as_mut().unwrap().conditions = None;
    apply_event(&store, &mut None, Event::Apply(unchanged));
    let (_, third) = store.snapshot().unwrap();
    assert!(Arc::ptr_eq(&first.pods, &third.pods));

    // A pod relabelled, deleted, or its phase changed: a new list with the change.
    apply_event(&store, &mut None, Event::Apply(pod("a", "db", "Running")));
    let (_, relabelled) = store.snapshot().unwrap();
    assert!(!Arc::ptr_eq(&first.pods, &relabelled.pods));
    assert_eq!(relabelled.pods[0].labels["app"], "db");
    assert_eq!(
        first.pods[0].labels["app"], "web",
        "an earlier snapshot is never changed"
    );

    apply_event(&store, &mut None, Event::Apply(pod("b", "db", "Succeeded")));
    let (_, finished) = store.snapshot().unwrap();
    assert!(!Arc::ptr_eq(&relabelled.pods, &finished.pods));
    assert_ne!(relabelled.pods[1].phase, finished.pods[1].phase);

    apply_event(
        &store,
        &mut None,
        Event::Delete(pod("b", "db", "Succeeded")),
    );
    let (_, deleted) = store.snapshot().unwrap();
    assert_eq!(deleted.pods.len(), 1);

    // A relist swaps the whole kind in: a new list.
    let mut relist = None;
    apply_event::<core::Pod>(&store, &mut relist, Event::Init);
    apply_event(
        &store,
        &mut relist,
        Event::InitApply(pod("c", "web", "Running")),
    );
    apply_event::<core::Pod>(&store, &mut relist, Event::InitDone);
    let (_, relisted) = store.snapshot().unwrap();
    assert_eq!(relisted.pods.len(), 1);
    assert_eq!(relisted.pods[0].name, "c");
}

fn pod_in(namespace: &str, name: &str, app: &str) -> core::Pod {
    let mut p = pod(name, app, "Running");
    p.metadata.namespace = Some(namespace.into());
    // An address per pod, so that sets show which pods they hold.
    let ip = format!(
        "10.0.{}.{}",
        namespace.len(),
        name.len() + 10 * name.matches('-').count()
    );
    let status = p.status.as_mut().unwrap();
    status.pod_ip = Some(ip.clone());
    status.pod_ips = Some(vec![core::PodIP { ip }]);
    p
}

/// Ingress to every pod of `namespace` from the pods labelled `app: web` anywhere.
fn from_web(namespace: &str) -> net::NetworkPolicy {
    let mut p = policy("from-web");
    p.metadata.namespace = Some(namespace.into());
    p.spec = Some(
        serde_json::from_value(serde_json::json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}]}]
        }))
        .unwrap(),
    );
    p
}

#[test]
fn the_shared_pod_list_always_equals_the_pods_in_the_store() {
    // Namespaces and names whose `namespace/name` keys sort differently from the pairs.
    let namespaces = ["a", "a-x", "ab", "x"];
    let names = ["b", "a-b", "c", "a"];
    for seed in [1u64, 9, 77] {
        let mut rng = crate::compile::tests::cache::Rng(seed);
        let store = listed_store();
        for namespace in namespaces {
            apply_event(&store, &mut None, Event::Apply(from_web(namespace)));
        }
        let mut compiler = crate::compile::Compiler::new();
        let mut hinted = 0;
        let mut expected: std::collections::BTreeMap<(String, String), crate::model::Pod> = store
            .snapshot()
            .unwrap()
            .1
            .pods
            .iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p.clone()))
            .collect();
        let mut held: Option<(Vec<crate::model::Pod>, Arc<Vec<crate::model::Pod>>)> = None;
        for step in 0..400 {
            let obj = pod_in(
                namespaces[rng.below(namespaces.len())],
                names[rng.below(names.len())],
                ["web", "db"][rng.below(2)],
            );
            let key = (
                obj.metadata.namespace.clone().unwrap(),
                obj.metadata.name.clone().unwrap(),
            );
            match rng.below(10) {
                0..=5 => {
                    expected.insert(key, crate::source::convert::pod(&obj).unwrap());
                    apply_event(&store, &mut None, Event::Apply(obj));
                }
                6..=8 => {
                    expected.remove(&key);
                    apply_event(&store, &mut None, Event::Delete(obj));
                }
                _ => {
                    // A relist of the pods expected so far.
                    let mut relist = None;
                    apply_event::<core::Pod>(&store, &mut relist, Event::Init);
                    for p in expected.values() {
                        let mut o = pod_in(&p.namespace, &p.name, &p.labels["app"]);
                        o.metadata.labels = Some(p.labels.clone());
                        let ip = p.ips[0].to_string();
                        let status = o.status.as_mut().unwrap();
                        status.pod_ip = Some(ip.clone());
                        status.pod_ips = Some(vec![core::PodIP { ip }]);
                        apply_event(&store, &mut relist, Event::InitApply(o));
                    }
                    apply_event::<core::Pod>(&store, &mut relist, Event::InitDone);
                }
            }
            if rng.below(3) == 0 {
                continue;
            }
            let (_, snapshot) = store.snapshot().unwrap();
            let want: Vec<&crate::model::Pod> = expected.values().collect();
            let got: Vec<&crate::model::Pod> = snapshot.pods.iter().collect();
            assert_eq!(got, want, "seed {seed} step {step}");
            // The compiler, told only which pods changed, ends where a fresh one does.
            hinted += usize::from(!snapshot.pods_changed.keys.is_empty());
            let cached = compiler.compile(&snapshot, "n1");
            let fresh = crate::compile::Compiler::new().compile(&snapshot, "n1");
            for family in crate::model::Family::ALL {
                assert!(
                    cached[family] == fresh[family],
                    "seed {seed} step {step}: {:#?}\nfresh: {:#?}",
                    cached[family].sets,
                    fresh[family].sets
                );
            }
            // Sometimes the previous snapshot is still held while pods change (then the list
            // is copied, never edited under it).
            if let Some((before, pods)) = held.take() {
                assert_eq!(
                    before, *pods,
                    "seed {seed} step {step}: a held snapshot changed"
                );
            }
            if rng.below(2) == 0 {
                held = Some(((*snapshot.pods).clone(), snapshot.pods));
            }
        }
        assert!(
            hinted > 50,
            "seed {seed}: only {hinted} snapshots named changed pods"
        );
    }
}
