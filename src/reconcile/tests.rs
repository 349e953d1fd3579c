//! The loop against a fake source and a fake target, in tokio's paused time: no root, no kernel,
//! and minutes of schedule run in milliseconds.

use super::*;
use crate::dataplane::SyncMode;
use crate::model::ClusterSnapshot;
use crate::source::Source;
use crate::source::convert::implicit_namespace;
use anyhow::{Result, bail};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

const MS: Duration = Duration::from_millis(1);

fn timing() -> Timing {
    Timing {
        debounce: 100 * MS,
        max_delay: 1000 * MS,
        resync_period: Duration::from_secs(300),
    }
}

/// A source whose content is its generation (one namespace named after it).
#[derive(Default)]
struct FakeSource {
    generation: Mutex<Option<u64>>,
    changed: Notify,
    broken: AtomicBool,
    loads: AtomicUsize,
    change_times: crate::source::change_times::ChangeTimes,
}

impl FakeSource {
    fn ready() -> Arc<FakeSource> {
        let s = FakeSource::default();
        *s.generation.lock().unwrap() = Some(0);
        Arc::new(s)
    }

    fn bump(&self) {
        let mut g = self.generation.lock().unwrap();
        *g = Some(g.map_or(0, |g| g + 1));
        self.change_times.record(g.unwrap());
        self.changed.notify_one();
    }
}

impl Source for FakeSource {
    fn generation(&self) -> Option<u64> {
        *self.generation.lock().unwrap()
    }

    async fn changed(&self) {
        self.changed.notified().await
    }

    fn snapshot(&self) -> Result<Option<(u64, ClusterSnapshot)>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) {
            bail!("the source does not load");
        }
        let Some(generation) = self.generation() else {
            return Ok(None);
        };
        let mut snapshot = ClusterSnapshot::default();
        let name = format!("gen-{generation}");
        snapshot
            .namespaces
            .insert(name.clone(), implicit_namespace(&name, Default::default()));
        Ok(Some((generation, snapshot)))
    }

    fn waiting_for(&self) -> &'static str {
        "waiting for the fake"
    }

    fn change_seen(&self, generation: u64) -> Option<std::time::Instant> {
        self.change_times.take_through(generation)
    }
}

/// One call of `Target::sync`: when (since the test started), how, which generation, and
/// whether it succeeded.
#[derive(Debug, Clone, PartialEq)]
struct Synced {
    at: Duration,
    mode: SyncMode,
    generation: u64,
    ok: bool,
}

/// Tells that a sync started, then waits for the release.
type Gate = (mpsc::Sender<()>, Arc<Mutex<mpsc::Receiver<()>>>);

#[derive(Clone)]
struct FakeTarget {
    start: Instant,
    log: Arc<Mutex<Vec<Synced>>>,
    /// Syncs still to fail.
    failures: Arc<AtomicUsize>,
    /// Reported by the next canary check.
    damage: Arc<Mutex<Option<String>>>,
    /// When set, each sync says it started and then waits to be released.
    gate: Option<Gate>,
    /// Called with the generation being synced, inside the sync.
    during_sync: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Work each sync does after its writes (real time), like strict mode's flow cut.
    after_write: Duration,
    in_force_at: Arc<Mutex<Option<std::time::Instant>>>,
}

impl FakeTarget {
    fn new() -> FakeTarget {
        FakeTarget {
            start: Instant::now(),
            log: Default::default(),
            failures: Default::default(),
            damage: Default::default(),
            gate: None,
            during_sync: None,
            after_write: Duration::ZERO,
            in_force_at: Default::default(),
        }
    }

    fn log(&self) -> Vec<Synced> {
        self.log.lock().unwrap().clone()
    }

    fn modes(&self) -> Vec<(SyncMode, u64)> {
        self.log().iter().map(|s| (s.mode, s.generation)).collect()
    }
}

impl Target for FakeTarget {
    fn sync(&mut self, snapshot: &ClusterSnapshot, mode: SyncMode) -> Result<()> {
        if let Some((started, release)) = &self.gate {
            started.send(()).unwrap();
            release.lock().unwrap().recv().unwrap();
        }
        let generation = snapshot.namespaces.keys().next().unwrap()[4..]
            .parse()
            .unwrap();
        if let Some(during) = &self.during_sync {
            during(generation);
        }
        let ok = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err();
        self.log.lock().unwrap().push(Synced {
            at: self.start.elapsed(),
            mode,
            generation,
            ok,
        });
        *self.in_force_at.lock().unwrap() = Some(std::time::Instant::now());
        std::thread::sleep(self.after_write);
        if ok {
            Ok(())
        } else {
            bail!("restore rejected")
        }
    }

    fn damage(&mut self) -> Option<String> {
        self.damage.lock().unwrap().take()
    }

    fn in_force_at(&self) -> Option<std::time::Instant> {
        *self.in_force_at.lock().unwrap()
    }
}

fn start(
    source: &Arc<FakeSource>,
    target: &FakeTarget,
    timing: Timing,
) -> (CancellationToken, tokio::task::JoinHandle<Result<()>>) {
    start_with(source, target, timing, None)
}

fn start_with(
    source: &Arc<FakeSource>,
    target: &FakeTarget,
    timing: Timing,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> (CancellationToken, tokio::task::JoinHandle<Result<()>>) {
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(
        source.clone(),
        target.clone(),
        timing,
        metrics,
        stop.clone(),
    ));
    (stop, handle)
}

#[tokio::test(start_paused = true)]
async fn starts_with_a_full_sync_and_a_burst_of_changes_becomes_one_sync() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(10 * MS).await;
    assert_eq!(target.modes(), [(SyncMode::Full, 0)]);
    for _ in 0..5 {
        source.bump();
        sleep(20 * MS).await;
    }
    // Not before the source has been quiet for the debounce...
    sleep(50 * MS).await;
    assert_eq!(target.log().len(), 1);
    // ...then once, with the latest content.
    sleep(100 * MS).await;
    assert_eq!(
        target.modes(),
        [(SyncMode::Full, 0), (SyncMode::Incremental, 5)]
    );
    sleep(Duration::from_secs(10)).await;
    assert_eq!(target.log().len(), 2, "{:?}", target.log());
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_change_on_a_quiet_source_is_synced_at_once_and_the_burst_behind_it_coalesces() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(2)).await;
    assert_eq!(target.modes(), [(SyncMode::Full, 0)]);
    // Quiet for longer than the debounce: the next change is synced without waiting for it.
    source.bump();
    sleep(MS).await;
    assert_eq!(
        target.modes(),
        [(SyncMode::Full, 0), (SyncMode::Incremental, 1)]
    );
    // Changes right behind it wait for the source to settle, and become one sync.
    for _ in 0..4 {
        source.bump();
        sleep(20 * MS).await;
    }
    assert_eq!(target.log().len(), 2, "{:?}", target.log());
    sleep(150 * MS).await;
    assert_eq!(
        target.modes(),
        [
            (SyncMode::Full, 0),
            (SyncMode::Incremental, 1),
            (SyncMode::Incremental, 5)
        ]
    );
    // And after another quiet spell, at once again.
    sleep(Duration::from_secs(1)).await;
    source.bump();
    sleep(MS).await;
    assert_eq!(target.log().len(), 4, "{:?}", target.log());
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_steady_stream_of_changes_still_syncs_within_the_max_delay() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(10 * MS).await;
    for _ in 0..100 {
        source.bump();
        sleep(50 * MS).await;
    }
    // 5 s of changes every 50 ms, never quiet for the 100 ms debounce: a sync every max delay.
    let incremental: Vec<Synced> = target
        .log()
        .into_iter()
        .filter(|s| s.mode == SyncMode::Incremental)
        .collect();
    assert!((4..=5).contains(&incremental.len()), "{incremental:?}");
    for pair in incremental.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap <= 1100 * MS, "{incremental:?}");
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_doubling_and_success_resets() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    target.failures.store(4, Ordering::SeqCst);
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(20)).await;
    let log = target.log();
    let oks: Vec<bool> = log.iter().map(|s| s.ok).collect();
    assert_eq!(oks, [false, false, false, false, true], "{log:?}");
    // Every retry is a full sync (the kernel may hold half of what failed).
    assert!(log.iter().all(|s| s.mode == SyncMode::Full), "{log:?}");
    let gaps: Vec<Duration> = log.windows(2).map(|w| w[1].at - w[0].at).collect();
    let expected = [500 * MS, 1000 * MS, 2000 * MS, 4000 * MS];
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            *gap >= want && *gap < want + 50 * MS,
            "gaps {gaps:?}, expected {expected:?}"
        );
    }
    // After the success the backoff starts afresh: one failure waits the initial backoff.
    target.failures.store(1, Ordering::SeqCst);
    source.bump();
    sleep(Duration::from_secs(2)).await;
    let log = target.log();
    let last = &log[log.len() - 2..];
    assert!(!last[0].ok && last[1].ok, "{log:?}");
    let gap = last[1].at - last[0].at;
    assert!(
        gap >= INITIAL_BACKOFF && gap < INITIAL_BACKOFF + 50 * MS,
        "{log:?}"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_backoff_is_capped() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    target.failures.store(usize::MAX, Ordering::SeqCst);
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(300)).await;
    let log = target.log();
    let longest = log.windows(2).map(|w| w[1].at - w[0].at).max().unwrap();
    assert!(
        longest >= MAX_BACKOFF && longest < MAX_BACKOFF + 50 * MS,
        "{longest:?}"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_full_resync_fires_every_period_without_changes() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(16 * 60)).await;
    let log = target.log();
    assert!(log.iter().all(|s| s.mode == SyncMode::Full), "{log:?}");
    let minutes: Vec<u64> = log.iter().map(|s| s.at.as_secs() / 60).collect();
    assert_eq!(minutes, [0, 5, 10, 15], "{log:?}");
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_change_during_backoff_is_not_lost() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(10 * MS).await;
    target.failures.store(1, Ordering::SeqCst);
    source.bump();
    sleep(150 * MS).await;
    assert_eq!(target.log().last().map(|s| s.ok), Some(false));
    // The retry is 500 ms away; the source changes meanwhile.
    source.bump();
    sleep(Duration::from_secs(2)).await;
    let last = target.log().last().cloned().unwrap();
    assert!(last.ok && last.generation == 2, "{:?}", target.log());
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_change_during_a_sync_is_synced_after_it() {
    let source = FakeSource::ready();
    let mut target = FakeTarget::new();
    let changing = source.clone();
    target.during_sync = Some(Arc::new(move |generation| {
        if generation == 1 {
            changing.bump();
        }
    }));
    let (stop, handle) = start(&source, &target, timing());
    sleep(10 * MS).await;
    source.bump();
    sleep(Duration::from_secs(1)).await;
    assert_eq!(
        target.modes(),
        [
            (SyncMode::Full, 0),
            (SyncMode::Incremental, 1),
            (SyncMode::Incremental, 2)
        ]
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_source_that_does_not_load_is_retried_and_nothing_is_written() {
    let source = FakeSource::ready();
    source.broken.store(true, Ordering::SeqCst);
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(4)).await;
    // At 0, 0.5, 1.5 and 3.5 s.
    assert_eq!(source.loads.load(Ordering::SeqCst), 4);
    assert!(target.log().is_empty());
    source.broken.store(false, Ordering::SeqCst);
    source.bump();
    sleep(Duration::from_secs(10)).await;
    // The repair is a change: synced once it settles, not at the next retry (7.5 s).
    let log = target.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0].ok && log[0].generation == 1, "{log:?}");
    assert!(log[0].at < Duration::from_millis(4200), "{log:?}");
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn nothing_is_written_before_the_source_is_complete() {
    let source = Arc::new(FakeSource::default());
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(30)).await;
    assert!(target.log().is_empty());
    assert_eq!(source.loads.load(Ordering::SeqCst), 0);
    source.bump();
    sleep(10 * MS).await;
    assert_eq!(target.modes(), [(SyncMode::Full, 0)]);
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn damage_found_by_the_canary_is_repaired_with_a_full_sync_at_once() {
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start(&source, &target, timing());
    sleep(Duration::from_secs(10)).await;
    *target.damage.lock().unwrap() = Some("hook removed".into());
    sleep(CANARY_INTERVAL + HEARTBEAT).await;
    let log = target.log();
    assert_eq!(target.modes(), [(SyncMode::Full, 0), (SyncMode::Full, 0)]);
    assert!(log[1].at < Duration::from_secs(10) + CANARY_INTERVAL + HEARTBEAT);
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn cancellation_finishes_the_current_sync_and_stops() {
    let source = FakeSource::ready();
    let mut target = FakeTarget::new();
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    target.gate = Some((started_tx, Arc::new(Mutex::new(release_rx))));
    let (stop, handle) = start(&source, &target, timing());
    // Wait (without advancing time) until the first sync is inside the target.
    while started.try_recv().is_err() {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.cancel();
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!handle.is_finished(), "the loop left a sync half done");
    release.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert_eq!(target.modes(), [(SyncMode::Full, 0)]);
    // Nothing further was started.
    assert!(started.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn once_waits_for_the_source_then_syncs_fully_once() {
    let source = Arc::new(FakeSource::default());
    let target = FakeTarget::new();
    let stop = CancellationToken::new();
    let task = tokio::spawn(once(source.clone(), target.clone(), stop));
    sleep(Duration::from_secs(5)).await;
    assert!(target.log().is_empty());
    source.bump();
    task.await.unwrap().unwrap();
    assert_eq!(target.modes(), [(SyncMode::Full, 0)]);

    // A failed write is the command's failure.
    let target = FakeTarget::new();
    target.failures.store(1, Ordering::SeqCst);
    let result = once(
        FakeSource::ready(),
        target.clone(),
        CancellationToken::new(),
    )
    .await;
    assert!(result.is_err());
    assert_eq!(target.log().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn once_told_to_stop_before_the_source_is_complete_fails_without_writing() {
    let source = Arc::new(FakeSource::default());
    let target = FakeTarget::new();
    let stop = CancellationToken::new();
    let task = tokio::spawn(once(source, target.clone(), stop.clone()));
    sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("stopped before the first sync"),
        "{err}"
    );
    assert!(target.log().is_empty());
}

/// The programming latency: one sample per successful sync of seen changes (a burst is one
/// sample; a failed sync's changes are measured by the retry that writes them); none for the
/// start-up sync or a resync without changes.
#[tokio::test(start_paused = true)]
async fn each_successful_sync_of_changes_gives_one_latency_sample() {
    let samples = |m: &crate::metrics::Metrics| -> u64 {
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix("kni_programming_latency_seconds_count "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let metrics = crate::metrics::Metrics::new(Duration::from_secs(600));
    let source = FakeSource::ready();
    let target = FakeTarget::new();
    let (stop, handle) = start_with(&source, &target, timing(), Some(metrics.clone()));
    sleep(10 * MS).await;
    assert_eq!(samples(&metrics), 0, "start-up sync");
    for _ in 0..3 {
        source.bump();
        sleep(20 * MS).await;
    }
    sleep(200 * MS).await;
    assert_eq!(samples(&metrics), 1, "{:?}", target.log());
    target.failures.store(1, Ordering::SeqCst);
    source.bump();
    sleep(200 * MS).await;
    assert_eq!(samples(&metrics), 1, "failed: {:?}", target.log());
    sleep(Duration::from_secs(1)).await;
    assert_eq!(samples(&metrics), 2, "retried: {:?}", target.log());
    sleep(Duration::from_secs(400)).await;
    assert_eq!(samples(&metrics), 2, "resyncs see no change");
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_latency_ends_when_the_writes_do_not_after_the_work_that_follows_them() {
    let metrics = crate::metrics::Metrics::new(Duration::from_secs(600));
    let source = FakeSource::ready();
    let mut target = FakeTarget::new();
    // Strict mode's flow cut, say: 300 ms of real time after the rules are in the kernel.
    target.after_write = Duration::from_millis(300);
    let (stop, handle) = start_with(&source, &target, timing(), Some(metrics.clone()));
    while target.log().is_empty() {
        sleep(MS).await;
    }
    source.bump();
    while !target.log().iter().any(|s| s.generation == 1) {
        sleep(MS).await;
    }
    let read = |name: &str| -> f64 {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    // The sample is taken when the sync returns.
    while read("kni_programming_latency_seconds_count") < 1.0 {
        sleep(MS).await;
    }
    let took = read("kni_programming_latency_seconds_sum");
    assert!(
        (0.0..0.2).contains(&took),
        "{took} s: the work after the writes was counted"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}
