//! A kind the agent may not read (RBAC revoked), against the in-process fake API server: how
//! often it is asked, what is logged, counted and reported as readiness. Alone in its binary
//! because it captures the process's log.

use kni_testlab::fakeapi;

use fakeapi::{
    FakeApi, Kind, metric, pod_keys, ready_within, seed, synced_metrics, until, until_within,
};
use kube_netpol_iptables::source::kube as kube_source;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines written by the tracing subscriber installed for one test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self, containing: &str) -> Vec<String> {
        self.lines_since(0, containing)
    }

    /// Where the log ends now, for `lines_since`.
    fn mark(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn lines_since(&self, mark: usize, containing: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap()[mark..])
            .lines()
            .filter(|l| l.contains(containing))
            .map(str::to_string)
            .collect()
    }

    /// Lines of the Kubernetes source since `mark` (all at INFO or above: the filter is the
    /// agent's default).
    fn source_lines_since(&self, mark: usize) -> Vec<String> {
        self.lines_since(mark, "kube_netpol_iptables::kube_source")
    }
}

/// Revoked RBAC: the lists back off growing intervals, the log says so once (and once when it
/// is fixed), the metrics count each failure and readiness gives the reason. Then the same for
/// a kind that may be listed but not watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_kind_is_retried_with_growing_backoff_and_reported_once() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            kube_source::DEFAULT_LOG_FILTER,
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The only test in this binary, so the global subscriber sees this test's lines alone.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let api = FakeApi::start_local();
    seed(&api);
    api.install_cluster_policy_crd();
    api.apply(
        Kind::ClusterNetworkPolicy,
        "metadata: {name: c}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}",
    );
    // kube-apiserver checks RBAC when a watch starts; a short server-side watch timeout makes
    // the revocation show at the next watch within a second.
    api.cap_watches(Duration::from_secs(1));
    let metrics = synced_metrics();
    let store = kube_source::start(api.client(), Some(metrics.clone()));
    until(&store, "initial list", |s| s.pods.len() == 1).await;
    let first_lists = log.lines("listed");
    assert_eq!(first_lists.len(), 4, "one line per kind: {first_lists:#?}");
    // Watches time out every second and resume: nothing to log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(log.source_lines_since(0).len(), 4, "{:#?}", log.lines(""));

    let mark = log.mark();
    api.set_forbidden(Kind::Pod, true);
    let revoked = Instant::now();
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;

    // The open watch ends at its timeout; the next one is refused, and so are its retries
    // (a failed watch is retried from its resourceVersion, without a list).
    let denied: Vec<Instant> = api
        .requests()
        .into_iter()
        .filter(|r| r.kind == Kind::Pod && r.status == 403 && r.at >= revoked)
        .map(|r| r.at)
        .collect();
    let gaps: Vec<Duration> = denied.windows(2).map(|w| w[1] - w[0]).collect();
    // 0.5–1 s, 1–2 s, 2–4 s, 4–8 s, …: at most 5 lists in 10 s (a reset backoff makes ~8).
    assert!(
        (3..=6).contains(&denied.len()),
        "{} denied lists in {window:?}, gaps {gaps:?}",
        denied.len()
    );
    for pair in gaps.windows(2) {
        assert!(
            pair[1] + Duration::from_millis(100) >= pair[0],
            "intervals grow: {gaps:?}"
        );
    }
    assert!(*gaps.last().unwrap() >= Duration::from_secs(2), "{gaps:?}");
    // Each failure counted; the state change logged once, not per retry.
    let errors = metric(
        &metrics,
        "kni_api_watch_errors_total{kind=\"Pod\",reason=\"forbidden\"}",
    )
    .expect("error counter");
    assert!(errors >= denied.len() as f64, "{errors} < {}", denied.len());
    assert_eq!(
        metric(&metrics, "kni_api_readable{kind=\"Pod\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&metrics, "kni_api_readable{kind=\"Namespace\"}"),
        Some(1.0)
    );
    let warned = log.source_lines_since(mark);
    assert_eq!(warned.len(), 1, "one line while denied: {warned:#?}");
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
    assert!(
        warned[0].contains("cannot read Pod") && warned[0].contains("403"),
        "{}",
        warned[0]
    );
    assert!(warned[0].contains("will keep retrying"), "{}", warned[0]);
    let why = metrics
        .readiness()
        .expect_err("not ready while pods cannot be read");
    assert!(why.contains("Pod") && why.contains("forbidden"), "{why}");
    // Still enforcing the last view.
    assert_eq!(pod_keys(&store.snapshot().unwrap().1), ["x/a"]);

    // Permission restored (while the pods changed): read again, logged once, ready.
    api.delete(Kind::Pod, "x/a");
    api.set_forbidden(Kind::Pod, false);
    // The next retry comes within the backoff reached (at most 32 s).
    until_within(
        &store,
        "pods after the permission is back",
        Duration::from_secs(40),
        |s| s.pods.is_empty(),
    )
    .await;
    ready_within(&metrics, Duration::from_secs(5)).await;
    assert_eq!(
        metric(&metrics, "kni_api_readable{kind=\"Pod\"}"),
        Some(1.0)
    );
    assert_eq!(
        log.lines("Pod readable again").len(),
        1,
        "{:#?}",
        log.lines("")
    );
    assert_eq!(log.lines("WARN").len(), 1);

    // A Role that allows list but not watch: every watch is refused. The kind is not readable
    // (its changes would not be seen) and stays so, without a line per retry.
    api.set_watch_forbidden(Kind::NetworkPolicy, true);
    let mark = log.mark();
    let revoked = Instant::now();
    // Seen when the open watch times out (1 s) and the next one is refused.
    while metrics.ready() {
        assert!(
            revoked.elapsed() < Duration::from_secs(3),
            "revocation unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ever_ready = false;
    while revoked.elapsed() < Duration::from_secs(8) {
        ever_ready |= metrics.ready();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let denied = api
        .requests_of(Kind::NetworkPolicy, true)
        .into_iter()
        .filter(|r| r.at >= revoked && r.status == 403)
        .count();
    assert!((2..=6).contains(&denied), "{denied} refused watches in 8 s");
    assert_eq!(
        log.source_lines_since(mark).len(),
        1,
        "one line while denied: {:#?}",
        log.lines("")
    );
    let why = metrics
        .readiness()
        .expect_err("not ready while policies cannot be watched");
    assert!(why.contains("cannot read NetworkPolicy"), "{why}");
    assert!(!ever_ready, "readiness flapped between lists");
    assert_eq!(
        log.lines("cannot read NetworkPolicy").len(),
        1,
        "{:#?}",
        log.lines("")
    );
    assert!(log.lines("NetworkPolicy readable again").is_empty());
    api.set_watch_forbidden(Kind::NetworkPolicy, false);
    ready_within(&metrics, Duration::from_secs(40)).await;
    assert_eq!(log.lines("NetworkPolicy readable again").len(), 1);
    assert_eq!(log.lines("WARN").len(), 2);

    // Routine re-lists (410 after compaction) are not worth a line each.
    let quiet = log.mark();
    for _ in 0..3 {
        let lists = api
            .shared
            .lists_served
            .load(std::sync::atomic::Ordering::Relaxed);
        api.compact();
        api.drop_watches();
        while api
            .shared
            .lists_served
            .load(std::sync::atomic::Ordering::Relaxed)
            < lists + 4
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        log.source_lines_since(quiet).is_empty(),
        "{:#?}",
        log.lines("")
    );
}
