//! The Kubernetes source against an in-process fake API server: real list/watch HTTP to a real
//! kube::Client, checking what the core receives. No root needed.

mod fakeapi;

use fakeapi::{FakeApi, Kind};
use kube_netpol_iptables::kube_source::{self, ClusterStore};
use kube_netpol_iptables::model::ClusterSnapshot;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn seed(api: &FakeApi) {
    api.apply(Kind::Namespace, "metadata: {name: x, labels: {team: a}}");
    api.apply(Kind::Namespace, "metadata: {name: y}");
    api.apply(
        Kind::Pod,
        "metadata: {name: a, namespace: x, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\nstatus: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}",
    );
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}",
    );
}

/// Waits until the store's snapshot satisfies `ok`.
async fn until(
    store: &Arc<ClusterStore>,
    what: &str,
    ok: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, s)) = store.snapshot()
            && ok(&s)
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), store.changed()).await;
    }
}

fn pod_keys(s: &ClusterSnapshot) -> Vec<String> {
    s.pods.iter().map(|p| p.key()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_then_follows_watch_events() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client());
    let s = until(&store, "initial list", |s| {
        s.pods.len() == 1 && s.policies.len() == 1
    })
    .await;
    assert_eq!(s.namespaces["x"].labels["team"], "a");
    assert_eq!(s.namespaces["x"].labels["kubernetes.io/metadata.name"], "x");
    let pod = &s.pods[0];
    assert_eq!(pod.node_name.as_deref(), Some("n1"));
    assert_eq!(pod.ips.len(), 2);
    assert_eq!(pod.ports[0].name.as_deref(), Some("http"));

    api.apply(Kind::Pod, "metadata: {name: b, namespace: y}\nspec: {nodeName: n2, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.2}");
    until(&store, "pod added", |s| pod_keys(s) == ["x/a", "y/b"]).await;
    api.apply(Kind::Pod, "metadata: {name: a, namespace: x, labels: {app: api}}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.1}");
    until(&store, "label changed", |s| {
        s.pods[0].labels["app"] == "api"
    })
    .await;
    api.apply(Kind::Namespace, "metadata: {name: y, labels: {team: b}}");
    until(&store, "namespace label", |s| {
        s.namespaces["y"]
            .labels
            .get("team")
            .is_some_and(|t| t == "b")
    })
    .await;
    api.delete(Kind::NetworkPolicy, "x/deny");
    until(&store, "policy deleted", |s| s.policies.is_empty()).await;
    // Bookmarks flowed and did not disturb anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(api.shared.bookmarks_sent.load(Ordering::Relaxed) > 0);
    assert_eq!(pod_keys(&store.snapshot().unwrap().1), ["x/a", "y/b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_handed_out_before_every_kind_has_listed() {
    let api = FakeApi::start_local();
    seed(&api);
    api.hold_lists(Kind::NetworkPolicy);
    let store = kube_source::start(api.client());
    // Namespaces and pods list, policies do not: a snapshot now would open every isolated pod.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(api.shared.lists_served.load(Ordering::Relaxed) >= 2);
    assert!(
        store.snapshot().is_none(),
        "a partial view must not be handed out"
    );
    assert!(store.generation().is_none());
    api.release();
    until(&store, "complete view", |s| {
        s.policies.len() == 1 && s.pods.len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_relists_and_sees_what_changed_meanwhile() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client());
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    let lists_before = api.shared.lists_served.load(Ordering::Relaxed);
    // While the watches deliver nothing: x/a goes, x/c arrives, and history is compacted, so
    // after the connections drop the changes can only be learnt from a fresh list.
    api.pause_watches();
    api.delete(Kind::Pod, "x/a");
    api.apply(Kind::Pod, "metadata: {name: c, namespace: x}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.3}");
    api.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pod_keys(&store.snapshot().unwrap().1),
        ["x/a"],
        "nothing delivered while paused"
    );
    api.drop_watches();
    until(&store, "relisted after 410", |s| pod_keys(s) == ["x/c"]).await;
    api.resume_watches();
    assert!(
        api.shared.gone_sent.load(Ordering::Relaxed) > 0,
        "the client met a 410"
    );
    assert!(
        api.shared.lists_served.load(Ordering::Relaxed) > lists_before,
        "and listed again"
    );
    assert_eq!(store.snapshot().unwrap().1.policies.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resume_without_losing_events() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client());
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    for i in 0..5 {
        api.drop_watches();
        api.apply(Kind::Pod, &format!("metadata: {{name: p{i}, namespace: y}}\nspec: {{nodeName: n1, containers: []}}\nstatus: {{phase: Running, podIP: 10.0.1.{i}}}"));
    }
    until(&store, "all events after reconnects", |s| s.pods.len() == 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_object_is_left_out_and_counted_and_the_rest_is_kept() {
    let api = FakeApi::start_local();
    seed(&api);
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: bad, namespace: y}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/99}}]}]}",
    );
    let store = kube_source::start(api.client());
    let s = until(&store, "initial list", |s| s.pods.len() == 1).await;
    assert_eq!(
        s.policies.iter().map(|p| p.key()).collect::<Vec<_>>(),
        ["x/deny"]
    );
    assert_eq!(store.invalid_counts()["NetworkPolicy"], 1);
    // Fixed by an update: counted no more, and used.
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: bad, namespace: y}\nspec: {podSelector: {}}",
    );
    until(&store, "fixed policy", |s| s.policies.len() == 2).await;
    assert_eq!(store.invalid_counts()["NetworkPolicy"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_the_last_view() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client());
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    // The API goes away: watches fail and retry, the view stays.
    api.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, s) = store.snapshot().expect("the last view is kept");
    assert_eq!(pod_keys(&s), ["x/a"]);
    assert_eq!(s.policies.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_recovers_when_the_api_returns() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client());
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    api.set_available(false);
    // Changes made while the agent cannot see the API...
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: late, namespace: y}\nspec: {podSelector: {}}",
    );
    api.delete(Kind::Pod, "x/a");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pod_keys(&store.snapshot().unwrap().1),
        ["x/a"],
        "the last view is kept while down"
    );
    // ...arrive once it is back.
    api.set_available(true);
    let s = until(&store, "recovered", |s| {
        s.pods.is_empty() && s.policies.len() == 2
    })
    .await;
    assert!(s.policies.iter().any(|p| p.key() == "y/late"));
}
