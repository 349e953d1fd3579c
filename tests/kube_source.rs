//! The Kubernetes source against an in-process fake API server: real list/watch HTTP to a real
//! kube::Client, checking what the core receives and what the API server is asked, and how
//! often. No root needed.

use kni_testlab::fakeapi;

use fakeapi::{
    FakeApi, Kind, metric, pod_keys, ready_within, seed, synced_metrics, until, watching,
};
use kube_netpol_iptables::metrics::Metrics;
use kube_netpol_iptables::source::kube as kube_source;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Checks that every list since `since` asks for resourceVersion=0 with no limit (served from the
/// watch cache, not a quorum read from etcd: re-lists after a 410 or an outage come from every
/// node at once); returns how many there were.
fn assert_watch_cache_lists(api: &FakeApi, kind: Kind, since: Instant) -> usize {
    let lists: Vec<_> = api
        .requests_of(kind, false)
        .into_iter()
        .filter(|r| r.at >= since)
        .collect();
    for r in &lists {
        assert_eq!(
            r.query.get("resourceVersion").map(String::as_str),
            Some("0"),
            "{kind:?} list: {:?}",
            r.query
        );
        assert!(
            !r.query.contains_key("limit"),
            "{kind:?} list: {:?}",
            r.query
        );
        assert!(
            !r.query.contains_key("continue"),
            "{kind:?} list: {:?}",
            r.query
        );
    }
    lists.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_then_follows_watch_events() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client(), None);
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
    let store = kube_source::start(api.client(), None);
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
    let store = kube_source::start(api.client(), None);
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    watching(&api, Kind::Pod).await;
    let lists_before = api.shared.lists_served.load(Ordering::Relaxed);
    let before_410 = Instant::now();
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
    assert!(assert_watch_cache_lists(&api, Kind::Pod, before_410) >= 1);
    assert_eq!(store.snapshot().unwrap().1.policies.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resume_without_losing_events() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client(), None);
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
    let store = kube_source::start(api.client(), None);
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
    let store = kube_source::start(api.client(), None);
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
    let store = kube_source::start(api.client(), None);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_served_from_the_watch_cache_and_watches_resume_from_them() {
    let api = FakeApi::start_local();
    seed(&api);
    // More pods than one page would hold if a page size of 1 were ever sent.
    api.apply(Kind::Pod, "metadata: {name: b, namespace: y}\nspec: {nodeName: n2, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.2}");
    let rv = api.resource_version().to_string();
    let store = kube_source::start(api.client(), None);
    until(&store, "initial list", |s| s.pods.len() == 2).await;
    // Give the watches time to be opened.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for kind in [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy] {
        let lists = api.requests_of(kind, false);
        assert_eq!(lists.len(), 1, "{kind:?}: one list");
        let q = &lists[0].query;
        // resourceVersion=0 (any version): kube-apiserver answers from its watch cache; with a
        // limit kube-rs would drop it and make every list a quorum read from etcd.
        assert_eq!(
            q.get("resourceVersion").map(String::as_str),
            Some("0"),
            "{kind:?} list: {q:?}"
        );
        assert!(!q.contains_key("limit"), "{kind:?} list has a limit: {q:?}");
        assert!(!q.contains_key("continue"), "{kind:?} list: {q:?}");
        let watches = api.requests_of(kind, true);
        assert!(!watches.is_empty(), "{kind:?}: watched");
        for w in &watches {
            assert_eq!(
                w.query.get("resourceVersion"),
                Some(&rv),
                "{kind:?} watch from the list's version: {:?}",
                w.query
            );
            assert_eq!(
                w.query.get("allowWatchBookmarks").map(String::as_str),
                Some("true")
            );
            // Bounds how long a revoked permission goes unnoticed (authorized at start only).
            assert_eq!(
                w.query.get("timeoutSeconds"),
                Some(&kube_source::WATCH_TIMEOUT.as_secs().to_string()),
                "{kind:?} watch: {:?}",
                w.query
            );
        }
    }
    for r in api.requests() {
        assert_eq!(
            r.user_agent.as_deref(),
            Some(kube_source::USER_AGENT),
            "every request names the agent: {r:?}"
        );
    }
    assert!(kube_source::USER_AGENT.starts_with("kube-netpol-iptables/"));
    assert_eq!(
        kube_source::USER_AGENT,
        format!("kube-netpol-iptables/{}", env!("CARGO_PKG_VERSION"))
    );
}

/// How long after the API returns the store has a change made right then; the API was gone for
/// long enough that a growing backoff would have reached tens of seconds.
async fn outage_then_back(
    api: &FakeApi,
    go: impl Fn(&FakeApi),
    come_back: impl Fn(&FakeApi),
) -> Duration {
    seed(api);
    let metrics = synced_metrics();
    let store = kube_source::start(api.client(), Some(metrics.clone()));
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    let gone = Instant::now();
    go(api);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let why = metrics
        .readiness()
        .expect_err("not ready while the API is down");
    assert!(why.contains("cannot read"), "{why}");
    assert_eq!(
        metric(&metrics, "kni_api_readable{kind=\"Pod\"}"),
        Some(0.0)
    );
    assert_eq!(
        pod_keys(&store.snapshot().unwrap().1),
        ["x/a"],
        "the last view is kept"
    );

    let old_rv = api.resource_version();
    come_back(api);
    let back = Instant::now();
    api.apply(Kind::Pod, "metadata: {name: after, namespace: y}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.9}");
    until(&store, "the change made after the API returned", |s| {
        pod_keys(s).contains(&"y/after".to_string())
    })
    .await;
    let took = back.elapsed();
    // A watch from before the outage is tried at most once per kind: it resumes, or meets 410
    // and the kind is listed again.
    for kind in [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy] {
        let old = api
            .requests_of(kind, true)
            .into_iter()
            .filter(|r| {
                r.at >= back && r.query["resourceVersion"].parse::<u64>().unwrap() <= old_rv
            })
            .count();
        assert!(old <= 1, "{kind:?}: {old} watches from before the outage");
        assert_watch_cache_lists(api, kind, gone);
    }
    ready_within(&metrics, Duration::from_secs(5)).await;
    took
}

/// Connection refused; the server restarts with a new history (410 for every old version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_view_is_current_within_5s_of_the_api_returning() {
    let api = FakeApi::start_local();
    let restarted = Instant::now() + Duration::from_secs(12);
    let took = outage_then_back(&api, FakeApi::stop, FakeApi::restart).await;
    eprintln!("current again {took:?} after the API returned");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    // The restarted server forgot every version: each kind was listed again, from the cache.
    for kind in [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy] {
        assert!(
            assert_watch_cache_lists(&api, kind, restarted) >= 1,
            "{kind:?}"
        );
    }
}

/// 503 for every request (kube-client's own retry of 503 would sleep longer and longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_503_outage_the_view_is_current_within_5s_of_the_api_returning() {
    let api = FakeApi::start_local();
    let took = outage_then_back(&api, |a| a.set_available(false), |a| a.set_available(true)).await;
    eprintln!("current again {took:?} after the API returned");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
}

/// kube-apiserver ends every watch after its timeout; the watch resumes from where it was, with
/// no new list and no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_closed_by_the_server_resumes_without_a_list() {
    let api = FakeApi::start_local();
    seed(&api);
    api.cap_watches(Duration::from_millis(700));
    let metrics = synced_metrics();
    let store = kube_source::start(api.client(), Some(metrics.clone()));
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    api.apply(Kind::Pod, "metadata: {name: later, namespace: y}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.8}");
    until(&store, "event after several watch timeouts", |s| {
        s.pods.len() == 2
    })
    .await;
    assert!(api.requests_of(Kind::Pod, true).len() >= 3, "re-watched");
    assert_eq!(
        api.requests_of(Kind::Pod, false).len(),
        1,
        "never listed again"
    );
    assert!(
        !metrics.render().contains("kni_api_watch_errors_total{"),
        "{}",
        metrics.render()
    );
    assert!(metrics.ready());
}

/// A connection reset under an open watch (load balancer, apiserver going away) is not a reason
/// to list again: as client-go's reflector does, the watch resumes from the last version seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_watch_connection_resumes_from_the_last_version_without_a_list() {
    let api = FakeApi::start_local();
    seed(&api);
    let store = kube_source::start(api.client(), None);
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    watching(&api, Kind::Pod).await;
    // Bookmarks bring every watcher to the current version.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rv = api.resource_version().to_string();
    let reset = Instant::now();
    api.reset_connections();
    api.apply(Kind::Pod, "metadata: {name: b, namespace: y}\nspec: {nodeName: n2, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.2}");
    until(&store, "the change made at the reset", |s| {
        s.pods.len() == 2
    })
    .await;
    for kind in [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy] {
        let lists = api
            .requests_of(kind, false)
            .into_iter()
            .filter(|r| r.at >= reset)
            .count();
        assert_eq!(lists, 0, "{kind:?} listed again after a reset");
    }
    let watches: Vec<_> = api
        .requests_of(Kind::Pod, true)
        .into_iter()
        .filter(|r| r.at >= reset)
        .collect();
    assert!(!watches.is_empty());
    assert_eq!(
        watches[0].query.get("resourceVersion"),
        Some(&rv),
        "{:?}",
        watches[0].query
    );
}

/// API Priority and Fairness rejects with 429 and Retry-After; the agent does not come back
/// sooner than it was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_not_retried_before_its_retry_after() {
    let api = FakeApi::start_local();
    seed(&api);
    // The three first lists, one per kind.
    api.throttle(3, 2);
    let store = kube_source::start(api.client(), None);
    until(&store, "listed after the 429s", |s| s.pods.len() == 1).await;
    for kind in [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy] {
        let requests = api.requests_of(kind, false);
        assert_eq!(requests[0].status, 429, "{kind:?}: {requests:?}");
        let waited = requests[1].at - requests[0].at;
        assert!(
            waited >= Duration::from_secs(2),
            "{kind:?} retried after {waited:?}"
        );
        assert!(waited < Duration::from_secs(4), "{kind:?}: {waited:?}");
    }
}

/// A permission revoked while a watch is open: kube-apiserver authorized the watch when it
/// started and keeps sending its events; the next request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_permission_applies_from_the_next_request() {
    let api = FakeApi::start_local();
    seed(&api);
    api.cap_watches(Duration::from_secs(2));
    let metrics = synced_metrics();
    let store = kube_source::start(api.client(), Some(metrics.clone()));
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    ready_within(&metrics, Duration::from_secs(5)).await;
    watching(&api, Kind::Pod).await;
    let watches_before = api.requests_of(Kind::Pod, true).len();
    api.set_forbidden(Kind::Pod, true);
    let revoked = Instant::now();
    api.apply(Kind::Pod, "metadata: {name: b, namespace: y}\nspec: {nodeName: n2, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.2}");
    until(&store, "an event on the watch opened before", |s| {
        s.pods.len() == 2
    })
    .await;
    // Noticed at the next watch, which the server's watch timeout bounds.
    let deadline = revoked + Duration::from_secs(4);
    while metrics.ready() {
        assert!(Instant::now() < deadline, "the revocation went unnoticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = metrics.readiness().unwrap_err();
    assert!(
        why.contains("cannot read Pod") && why.contains("403"),
        "{why}"
    );
    let refused = api.requests_of(Kind::Pod, true)[watches_before..].to_vec();
    assert!(refused.iter().all(|r| r.status == 403), "{refused:?}");
}

/// RBAC missing from the start: no sync ever happened, and readiness names the kind that cannot
/// be read rather than only "no successful sync yet". Once allowed, the kind is listed from the
/// watch cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_missing_from_the_start_is_named_by_readiness() {
    let api = FakeApi::start_local();
    seed(&api);
    api.set_forbidden(Kind::NetworkPolicy, true);
    let metrics = Metrics::new(Duration::from_secs(120));
    let started = Instant::now();
    let store = kube_source::start(api.client(), Some(metrics.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let why = metrics.readiness().unwrap_err();
    assert!(why.contains("cannot read NetworkPolicy"), "{why}");
    api.set_forbidden(Kind::NetworkPolicy, false);
    fakeapi::until_within(&store, "policies listed", Duration::from_secs(40), |s| {
        s.policies.len() == 1
    })
    .await;
    assert!(assert_watch_cache_lists(&api, Kind::NetworkPolicy, started) >= 2);
}

/// The fake answers lists as kube-apiserver does, so the tests above mean something:
/// resourceVersion=0 ignores limit; other lists are paginated; a continue token from before a
/// compaction is 410 Expired; a revoked permission is a 403 Status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_api_server_lists_like_kube_apiserver() {
    let api = FakeApi::start_local();
    for i in 0..5 {
        api.apply(Kind::Namespace, &format!("metadata: {{name: n{i}}}"));
    }
    let client = api.client();
    let get = |url: String| {
        let client = client.clone();
        async move {
            let req = axum::http::Request::get(url).body(Vec::new()).unwrap();
            client.request::<serde_json::Value>(req).await
        }
    };
    let cached = get("/api/v1/namespaces?limit=2&resourceVersion=0".into())
        .await
        .unwrap();
    assert_eq!(
        cached["items"].as_array().unwrap().len(),
        5,
        "limit ignored for RV=0"
    );
    assert!(cached["metadata"]["continue"].is_null());

    let page1 = get("/api/v1/namespaces?limit=2".into()).await.unwrap();
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let token = page1["metadata"]["continue"].as_str().unwrap().to_string();
    assert_eq!(page1["metadata"]["remainingItemCount"], 3);
    // A change between pages does not show in the paginated list (one consistent version).
    api.apply(Kind::Namespace, "metadata: {name: n9}");
    let page2 = get(format!("/api/v1/namespaces?limit=2&continue={token}"))
        .await
        .unwrap();
    let page3 = get(format!(
        "/api/v1/namespaces?limit=2&continue={}",
        page2["metadata"]["continue"].as_str().unwrap()
    ))
    .await
    .unwrap();
    assert!(page3["metadata"]["continue"].is_null());
    let names: Vec<String> = [&page1, &page2, &page3]
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap().iter())
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n4"]);

    api.compact();
    match get(format!("/api/v1/namespaces?limit=2&continue={token}")).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    api.set_forbidden(Kind::Pod, true);
    match get("/api/v1/pods?resourceVersion=0".into()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"))
        }
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

// ClusterNetworkPolicy (issue 14): served only while its CRD is installed; Nodes only while a
// policy selects them.

const RECHECK: Duration = Duration::from_millis(200);

/// Waits until a metric series has `value` (metrics follow the store a moment later).
async fn metric_becomes(metrics: &Metrics, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(metrics, series) != Some(value) {
        assert!(
            Instant::now() < deadline,
            "{series} is {:?}, not {value}",
            metric(metrics, series)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cnp(name: &str, priority: u32) -> String {
    format!(
        "metadata: {{name: {name}}}\nspec: {{tier: Admin, priority: {priority}, subject: {{namespaces: {{matchLabels: {{team: a}}}}}}, ingress: [{{action: Deny, from: [{{namespaces: {{}}}}]}}]}}"
    )
}

fn cnp_names(s: &kube_netpol_iptables::model::ClusterSnapshot) -> Vec<(String, u32)> {
    s.cluster_policies
        .iter()
        .map(|p| (p.name.clone(), p.priority))
        .collect()
}

/// Without the CRD the agent has its view (and would be ready); the CRD installed later is
/// picked up by discovery, its policies follow the API, and deleting the CRD drops them while
/// everything else stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_network_policies_follow_the_crd_and_the_api() {
    let api = FakeApi::start_local();
    seed(&api);
    let metrics = synced_metrics();
    let store = kube_source::start_with(api.client(), Some(metrics.clone()), RECHECK);
    let s = until(&store, "view without the CRD", |s| s.pods.len() == 1).await;
    assert!(s.cluster_policies.is_empty());
    ready_within(&metrics, Duration::from_secs(10)).await;
    assert!(
        api.requests_of(Kind::ClusterNetworkPolicy, false)
            .is_empty()
    );

    api.install_cluster_policy_crd();
    api.apply(Kind::ClusterNetworkPolicy, &cnp("a", 10));
    let s = until(&store, "CNP after the CRD was installed", |s| {
        s.cluster_policies.len() == 1
    })
    .await;
    assert_eq!(cnp_names(&s), [("a".to_string(), 10)]);
    metric_becomes(
        &metrics,
        "kni_cluster_network_policies{tier=\"Admin\"}",
        1.0,
    )
    .await;
    // Lists come from the watch cache like the other kinds'.
    assert!(
        assert_watch_cache_lists(
            &api,
            Kind::ClusterNetworkPolicy,
            Instant::now() - Duration::from_secs(60)
        ) >= 1
    );

    api.apply(Kind::ClusterNetworkPolicy, &cnp("a", 20));
    api.apply(Kind::ClusterNetworkPolicy, &cnp("b", 5));
    until(&store, "priority change and a second CNP", |s| {
        cnp_names(s) == [("a".to_string(), 20), ("b".to_string(), 5)]
    })
    .await;
    // A dropped watch resumes from its version, without a list, as for the other kinds.
    let lists = api.requests_of(Kind::ClusterNetworkPolicy, false).len();
    api.drop_watches();
    api.delete(Kind::ClusterNetworkPolicy, "b");
    until(&store, "CNP deleted", |s| {
        cnp_names(s) == [("a".to_string(), 20)]
    })
    .await;

    assert_eq!(
        api.requests_of(Kind::ClusterNetworkPolicy, false).len(),
        lists
    );
    assert!(
        api.requests_of(Kind::ClusterNetworkPolicy, true)
            .iter()
            .all(|r| r
                .query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true"))
    );

    api.remove_cluster_policy_crd();
    let s = until(&store, "CRD deleted", |s| s.cluster_policies.is_empty()).await;
    assert_eq!(pod_keys(&s), ["x/a"]);
    assert_eq!(s.policies.len(), 1);
    // Still following the cluster, and ready.
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: more, namespace: y}\nspec: {podSelector: {}}",
    );
    until(&store, "NetworkPolicy after the CRD went", |s| {
        s.policies.len() == 2
    })
    .await;
    ready_within(&metrics, Duration::from_secs(10)).await;
    metric_becomes(
        &metrics,
        "kni_cluster_network_policies{tier=\"Admin\"}",
        0.0,
    )
    .await;

    // And installed again.
    api.install_cluster_policy_crd();
    api.apply(Kind::ClusterNetworkPolicy, &cnp("c", 1));
    until(&store, "CNP after the CRD came back", |s| {
        cnp_names(s) == [("c".to_string(), 1)]
    })
    .await;
}

/// Discovery is asked again while the CRD is absent, at the interval given, not in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_asked_again_at_the_recheck_interval() {
    let api = FakeApi::start_local();
    seed(&api);
    let _store = kube_source::start_with(api.client(), None, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let asked = api.shared.cnp_discoveries.load(Ordering::Relaxed);
    assert!(
        (3..=6).contains(&asked),
        "{asked} discovery requests in 2.2 s"
    );
}

/// With the CRD served at start, nothing is handed out before ClusterNetworkPolicies have
/// listed: the first sync never goes without the admin's policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_crd_is_listed_before_the_first_snapshot() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(Kind::ClusterNetworkPolicy, &cnp("a", 1));
    api.hold_lists(Kind::ClusterNetworkPolicy);
    let store = kube_source::start_with(api.client(), None, RECHECK);
    watching(&api, Kind::NetworkPolicy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.generation().is_none());
    assert!(store.snapshot().is_none());
    api.release();
    let s = until(&store, "first snapshot", |_| true).await;
    assert_eq!(cnp_names(&s), [("a".to_string(), 1)]);
}

/// An invalid ClusterNetworkPolicy is logged, counted and left out; the others are enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_cluster_network_policy_is_counted_and_skipped() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(Kind::ClusterNetworkPolicy, &cnp("good", 1));
    // What a CRD without the CEL rules (or an older one) could let through.
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: bad}\nspec: {tier: Admin, priority: 3, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [10.0.0.0/33]}]}]}",
    );
    let metrics = synced_metrics();
    let store = kube_source::start_with(api.client(), Some(metrics.clone()), RECHECK);
    let s = until(&store, "initial list", |s| !s.cluster_policies.is_empty()).await;
    assert_eq!(cnp_names(&s), [("good".to_string(), 1)]);
    assert_eq!(store.invalid_counts()["ClusterNetworkPolicy"], 1);
    metric_becomes(
        &metrics,
        "kni_invalid_objects{kind=\"ClusterNetworkPolicy\"}",
        1.0,
    )
    .await;
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: bad}\nspec: {tier: Baseline, priority: 3, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [10.0.0.0/8]}]}]}",
    );
    until(&store, "fixed CNP", |s| s.cluster_policies.len() == 2).await;
    assert_eq!(store.invalid_counts()["ClusterNetworkPolicy"], 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    metric_becomes(
        &metrics,
        "kni_invalid_objects{kind=\"ClusterNetworkPolicy\"}",
        0.0,
    )
    .await;
    metric_becomes(
        &metrics,
        "kni_cluster_network_policies{tier=\"Baseline\"}",
        1.0,
    )
    .await;
}

fn node_lists(api: &FakeApi) -> usize {
    api.requests_of(Kind::Node, false).len()
}

/// Every Node is listed and watched only while a ClusterNetworkPolicy has a `nodes` peer; then
/// their labels and addresses are in the snapshot and follow the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_watched_only_while_a_policy_selects_nodes() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(
        Kind::Node,
        "metadata: {name: n1, labels: {role: infra}}\nstatus: {addresses: [{type: InternalIP, address: 10.9.0.1}, {type: Hostname, address: n1}, {type: InternalIP, address: 'fd00:9::1'}]}",
    );
    api.apply(
        Kind::Node,
        "metadata: {name: n2}\nstatus: {addresses: [{type: ExternalIP, address: 203.0.113.2}]}",
    );
    api.apply(Kind::ClusterNetworkPolicy, &cnp("pods-only", 1));
    let store = kube_source::start_with(api.client(), None, RECHECK);
    let s = until(&store, "initial list", |s| s.cluster_policies.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.nodes.is_empty());
    assert_eq!(node_lists(&api), 0, "nodes listed without a nodes peer");

    let to_infra = "metadata: {name: to-infra}\nspec: {tier: Admin, priority: 2, subject: {namespaces: {}}, egress: [{action: Deny, to: [{nodes: {matchLabels: {role: infra}}}]}]}";
    api.apply(Kind::ClusterNetworkPolicy, to_infra);
    let s = until(&store, "nodes listed", |s| s.nodes.len() == 2).await;
    assert_eq!(s.cluster_policies.len(), 2);
    let ips: Vec<String> = s.nodes["n1"]
        .addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(ips, ["10.9.0.1", "fd00:9::1"]);
    assert_eq!(s.nodes["n1"].labels["role"], "infra");
    assert_eq!(
        s.nodes["n2"].addresses,
        ["203.0.113.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let lists = node_lists(&api);
    assert!(lists >= 1);
    // Without a field selector: every node.
    assert!(
        api.requests_of(Kind::Node, false)
            .iter()
            .all(|r| !r.query.contains_key("fieldSelector"))
    );

    api.apply(
        Kind::Node,
        "metadata: {name: n2, labels: {role: infra}}\nstatus: {addresses: [{type: ExternalIP, address: 203.0.113.3}]}",
    );
    until(&store, "node relabelled and readdressed", |s| {
        s.nodes.get("n2").is_some_and(|n| {
            n.labels.get("role").is_some_and(|r| r == "infra")
                && n.addresses == ["203.0.113.3".parse::<std::net::IpAddr>().unwrap()]
        })
    })
    .await;
    api.delete(Kind::Node, "n1");
    until(&store, "node deleted", |s| s.nodes.len() == 1).await;

    // No more nodes peers: the node view is dropped and the watch stops.
    api.delete(Kind::ClusterNetworkPolicy, "to-infra");
    until(&store, "nodes dropped", |s| {
        s.nodes.is_empty() && s.cluster_policies.len() == 1
    })
    .await;
    let watches = api.requests_of(Kind::Node, true).len();
    api.apply(Kind::Node, "metadata: {name: n3}");
    api.cap_watches(Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        api.requests_of(Kind::Node, true).len(),
        watches,
        "nodes still watched"
    );
    assert_eq!(node_lists(&api), lists);
    assert!(store.snapshot().unwrap().1.nodes.is_empty());
}

/// A policy with a `nodes` peer present at start: the first snapshot waits for the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_snapshot_waits_for_the_nodes_a_policy_needs() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(
        Kind::Node,
        "metadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 10.9.0.1}]}",
    );
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: to-nodes}\nspec: {tier: Baseline, priority: 2, subject: {namespaces: {}}, egress: [{action: Accept, to: [{nodes: {}}]}]}",
    );
    api.hold_lists(Kind::Node);
    let store = kube_source::start_with(api.client(), None, RECHECK);
    watching(&api, Kind::ClusterNetworkPolicy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.snapshot().is_none());
    api.release();
    let s = until(&store, "first snapshot", |_| true).await;
    assert_eq!(s.nodes["n1"].addresses.len(), 1);
}

/// Nodes forbidden (RBAC): the rest is enforced anyway (a policy cannot stop the node following
/// the cluster), and readiness names the kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_forbidden_do_not_hold_up_the_view() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: to-nodes}\nspec: {tier: Admin, priority: 2, subject: {namespaces: {}}, egress: [{action: Deny, to: [{nodes: {}}]}]}",
    );
    api.set_forbidden(Kind::Node, true);
    let metrics = synced_metrics();
    let store = kube_source::start_with(api.client(), Some(metrics.clone()), RECHECK);
    let s = until(&store, "view without nodes", |s| {
        s.cluster_policies.len() == 1
    })
    .await;
    assert!(s.nodes.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let why = metrics.readiness().unwrap_err();
    assert!(why.contains("cannot read Node"), "{why}");
}

/// The CRD served but ClusterNetworkPolicy not readable (RBAC without the rule): as for every
/// kind, nothing is handed out before it lists (never a first sync without the admin's
/// policies), and readiness names it. Granted, it lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_served_crd_holds_up_the_first_sync_and_is_named() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(Kind::ClusterNetworkPolicy, &cnp("a", 1));
    api.set_forbidden(Kind::ClusterNetworkPolicy, true);
    let metrics = Metrics::new(Duration::from_secs(120));
    let store = kube_source::start_with(api.client(), Some(metrics.clone()), RECHECK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(store.snapshot().is_none());
    let why = metrics.readiness().unwrap_err();
    assert!(why.contains("cannot read ClusterNetworkPolicy"), "{why}");
    assert!(
        api.requests_of(Kind::ClusterNetworkPolicy, false)
            .iter()
            .all(|r| r.status == 403)
    );
    api.set_forbidden(Kind::ClusterNetworkPolicy, false);
    let s = fakeapi::until_within(&store, "CNPs listed", Duration::from_secs(40), |_| true).await;
    assert_eq!(cnp_names(&s), [("a".to_string(), 1)]);
}

/// The CRD deleted while the agent missed the deletions of its objects (a watch that delivered
/// nothing meanwhile): the 404 that follows drops the policies all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_crd_drops_its_policies_even_when_the_deletions_were_missed() {
    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(Kind::ClusterNetworkPolicy, &cnp("a", 1));
    let store = kube_source::start_with(api.client(), None, RECHECK);
    until(&store, "CNP listed", |s| s.cluster_policies.len() == 1).await;
    // Open watches deliver nothing from here on; new ones get 404.
    api.pause_watches();
    api.remove_cluster_policy_crd();
    let s = until(&store, "CNPs dropped", |s| s.cluster_policies.is_empty()).await;
    assert_eq!(s.policies.len(), 1);
    let cnp_requests: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::ClusterNetworkPolicy)
        .map(|r| (r.watch, r.status))
        .collect();
    assert!(cnp_requests.contains(&(true, 404)), "{cnp_requests:?}");
}
