//! The sync loops: a snapshot (from a manifests directory or the Kubernetes API) is compiled for
//! both families and written; changes are coalesced; a full sync reads the kernel back every
//! resync period; failures keep the last good state in the kernel and are retried with backoff.

use crate::compile::{compile, compile_cached};
use crate::dataplane::{Dataplane, SyncMode, SyncReport};
use crate::kube_source::ClusterStore;
use crate::manifests;
use crate::metrics::Metrics;
use crate::model::ClusterSnapshot;
use crate::peer_cache::PeerCache;
use crate::state::{DesiredState, Family};
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub fn desired_states(snapshot: &ClusterSnapshot, node: &str) -> Vec<(Family, DesiredState)> {
    Family::ALL
        .iter()
        .map(|f| (*f, compile(snapshot, node, *f)))
        .collect()
}

/// `desired_states`, reusing the peer selections of earlier calls (see `PeerCache`): the same
/// result, at a cost proportional to what changed.
pub fn desired_states_cached(
    snapshot: &ClusterSnapshot,
    node: &str,
    cache: &mut PeerCache,
) -> Vec<(Family, DesiredState)> {
    cache.update(snapshot);
    let states = Family::ALL
        .iter()
        .map(|f| (*f, compile_cached(snapshot, node, *f, cache)))
        .collect();
    cache.evict_unused();
    states
}

/// Compiles a snapshot and writes it, logging the outcome and recording it in `metrics`.
pub fn sync_snapshot(
    dataplane: &mut Dataplane,
    cache: &mut PeerCache,
    snapshot: &ClusterSnapshot,
    node: &str,
    mode: SyncMode,
    metrics: Option<&Metrics>,
) -> Result<SyncReport> {
    let started = Instant::now();
    let mut desired = desired_states_cached(snapshot, node, cache);
    crate::enforcement::apply(&mut desired, snapshot, node, &dataplane.enforcement);
    let compiled = started.elapsed();
    report_failed_closed(&desired, metrics);
    let report = match dataplane.sync(&desired, mode) {
        Ok(r) => r,
        Err(e) => {
            if let Some(m) = metrics {
                m.sync_failed(mode, true);
            }
            return Err(e);
        }
    };
    for repair in &report.repairs {
        tracing::warn!(
            repair = repair.as_str(),
            "repaired drift: the kernel differed from what we had written"
        );
    }
    if let Some(m) = metrics {
        m.sync_succeeded(mode, started.elapsed(), &report, &desired);
    }
    // Strict mode: flows the new rules deny stop now, not when they end.
    if dataplane.enforcement.strict_mode
        && (report.ipset_lines + report.iptables_lines > 0 || mode == SyncMode::Full)
    {
        crate::dataplane::conntrack::cut_after_sync(&desired, metrics);
    }
    tracing::info!(
        node,
        ?mode,
        pods = snapshot.pods.len(),
        policies = snapshot.policies.len(),
        rules = desired.iter().map(|(_, s)| s.rule_count()).sum::<usize>(),
        sets = desired.iter().map(|(_, s)| s.sets.len()).sum::<usize>(),
        ipset_lines = report.ipset_lines,
        iptables_lines = report.iptables_lines,
        repairs = report.repairs.len(),
        compile_ms = compiled.as_millis() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "synced"
    );
    Ok(report)
}

/// Logs the policy rules that could not be programmed (they allow nothing) whenever that list
/// changes, and records them for /metrics and /readyz.
fn report_failed_closed(desired: &[(Family, DesiredState)], metrics: Option<&Metrics>) {
    let rules: BTreeSet<String> = desired
        .iter()
        .flat_map(|(_, s)| &s.failed_closed)
        .map(ToString::to_string)
        .collect();
    let rules: Vec<String> = rules.into_iter().collect();
    let before = match metrics {
        Some(m) => m.set_failed_closed(rules.clone()),
        None => Vec::new(),
    };
    if metrics.is_some() && before == rules {
        return;
    }
    for rule in &rules {
        tracing::warn!(
            rule = rule.as_str(),
            "a policy rule could not be programmed: it allows nothing (fail closed); everything else is enforced as usual"
        );
    }
    if rules.is_empty() && !before.is_empty() {
        tracing::info!("every policy rule is programmed again");
    }
}

/// Loads the directory, compiles and writes. Nothing is written if the directory does not load.
pub fn sync_from_dir(
    dataplane: &mut Dataplane,
    cache: &mut PeerCache,
    dir: &Path,
    node: &str,
    mode: SyncMode,
    metrics: Option<&Metrics>,
) -> Result<SyncReport> {
    let snapshot = match manifests::load_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            if let Some(m) = metrics {
                m.sync_failed(mode, false);
            }
            return Err(e.into());
        }
    };
    sync_snapshot(dataplane, cache, &snapshot, node, mode, metrics)
}

/// Says loudly when bridged pod traffic would bypass iptables.
pub fn check_bridge_netfilter() {
    let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => tracing::warn!(
            "{path} is 0: with a bridging CNI (e.g. Flannel's cni0) traffic between pods of this node bypasses iptables and policies do not apply to it; set net.bridge.bridge-nf-call-iptables=1 (kube-proxy needs it too)"
        ),
        Err(_) => tracing::warn!(
            "br_netfilter is not loaded: with a bridging CNI (e.g. Flannel's cni0) traffic between pods of this node bypasses iptables; run `modprobe br_netfilter` and set net.bridge.bridge-nf-call-iptables=1 (routing CNIs do not need it)"
        ),
    }
}

/// What identifies the directory's content for change detection: names, sizes, times and inodes
/// (a ConfigMap update swaps in new files, which may have the old size and time). `None` while
/// an entry cannot be read, so its repair counts as a change.
fn fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, SystemTime, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let files = manifests::manifest_files(dir).ok()?;
    Some(
        files
            .into_iter()
            .filter_map(|f| {
                let meta = std::fs::metadata(&f).ok()?;
                Some((f, meta.len(), meta.modified().ok()?, meta.ino()))
            })
            .collect(),
    )
}

pub struct WatchOptions {
    /// How often the directory is checked for changes. Polling, not inotify: it also works on the
    /// network and 9p file systems WSL2 mounts, where inotify sees nothing.
    pub poll_interval: Duration,
    /// A burst of changes becomes one sync once the source has been quiet this long...
    pub debounce: Duration,
    /// ...but a sync is never put off longer than this after the first change.
    pub max_delay: Duration,
    /// How often to read the kernel back and repair drift, even without changes.
    pub resync_period: Duration,
}

/// Set on SIGTERM/SIGINT: the loops finish the sync in progress (a batch is never cut in half)
/// and return.
pub static STOP: AtomicBool = AtomicBool::new(false);

fn stopping() -> bool {
    let stop = STOP.load(Ordering::Relaxed);
    if stop {
        tracing::info!(
            "stopping; the programmed state stays in the kernel (use `cleanup` to remove it)"
        );
    }
    stop
}

/// How often the loops check that our hooks and dispatch chains are intact between full syncs
/// (see `Dataplane::hooks_damaged`); damage triggers a full sync at once.
const CANARY_INTERVAL: Duration = Duration::from_secs(3);

const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// When to sync: coalesces changes, schedules full resyncs and retries with backoff. Shared by
/// both sources so they behave the same.
struct Schedule {
    /// (first change, latest change) while changes wait for the source to settle.
    pending: Option<(Instant, Instant)>,
    last_full: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_canary: Instant,
}

impl Schedule {
    fn new() -> Schedule {
        Schedule {
            pending: None,
            last_full: None,
            retry_at: None,
            backoff: INITIAL_BACKOFF,
            last_canary: Instant::now(),
        }
    }

    /// Runs `damaged` every `CANARY_INTERVAL` and schedules a full sync when it finds damage.
    fn check_canary(&mut self, now: Instant, damaged: impl FnOnce() -> Option<String>) {
        if now - self.last_canary < CANARY_INTERVAL || self.retry_at.is_some() {
            return;
        }
        self.last_canary = now;
        if let Some(what) = damaged() {
            tracing::warn!(
                damage = what.as_str(),
                "our rules were changed by someone else: repairing with a full sync now"
            );
            self.retry_at = Some(now);
        }
    }

    fn changed(&mut self, now: Instant) {
        self.pending = Some(self.pending.map_or((now, now), |(first, _)| (first, now)));
    }

    /// The sync to run now, if any.
    fn due(&self, now: Instant, o: &WatchOptions) -> Option<SyncMode> {
        let settled = self.pending.is_some_and(|(first, latest)| {
            now - latest >= o.debounce || now - first >= o.max_delay
        });
        let full_due = self.last_full.is_none_or(|t| now - t >= o.resync_period);
        let retry_due = self.retry_at.is_some_and(|t| now >= t);
        if full_due || retry_due {
            Some(SyncMode::Full)
        } else if settled {
            Some(SyncMode::Incremental)
        } else {
            None
        }
    }

    /// When `due` will next have something to do, unless another change comes first.
    fn next_due(&self, o: &WatchOptions) -> Instant {
        let settle = self
            .pending
            .map(|(first, latest)| (latest + o.debounce).min(first + o.max_delay));
        let full = self
            .last_full
            .map_or_else(Instant::now, |t| t + o.resync_period);
        [settle, Some(full), self.retry_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(full)
    }

    fn done(&mut self, now: Instant, mode: SyncMode, result: &Result<SyncReport>) {
        self.pending = None;
        match result {
            Ok(_) => {
                self.retry_at = None;
                self.backoff = INITIAL_BACKOFF;
                if mode == SyncMode::Full {
                    self.last_full = Some(now);
                }
            }
            Err(e) => {
                tracing::error!(
                    "sync failed, the last good state stays in the kernel; retrying in {:?}: {e:#}",
                    self.backoff
                );
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                // A source that never loads still counts as a resync attempt.
                self.last_full.get_or_insert(now);
            }
        }
    }
}

/// Runs until killed, from a manifests directory. Starts with a full sync (adopting whatever a
/// previous instance left), then syncs incrementally when the directory changes and fully every
/// resync period.
pub fn watch_dir(
    dataplane: &mut Dataplane,
    dir: &Path,
    node: &str,
    options: &WatchOptions,
    metrics: Option<&Metrics>,
) -> Result<()> {
    let mut last_seen = fingerprint(dir);
    let mut schedule = Schedule::new();
    let mut cache = PeerCache::default();
    loop {
        if stopping() {
            return Ok(());
        }
        if let Some(m) = metrics {
            m.heartbeat();
        }
        let now = Instant::now();
        let seen = fingerprint(dir);
        if seen != last_seen {
            last_seen = seen;
            schedule.changed(now);
        }
        schedule.check_canary(now, || dataplane.hooks_damaged());
        if let Some(mode) = schedule.due(now, options) {
            let result = sync_from_dir(dataplane, &mut cache, dir, node, mode, metrics);
            schedule.done(now, mode, &result);
        }
        std::thread::sleep(options.poll_interval);
    }
}

/// The Kubernetes loop's longest sleep without a change (it keeps /healthz and metrics current).
const KUBE_HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs until killed, from the Kubernetes API. Nothing is written until every kind has listed
/// once: the node is never programmed from a partial view.
pub async fn watch_cluster(
    mut dataplane: Dataplane,
    store: Arc<ClusterStore>,
    node: String,
    options: WatchOptions,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let mut schedule = Schedule::new();
    let mut cache = PeerCache::default();
    let mut last_generation: Option<u64> = None;
    let mut waiting_logged = false;
    loop {
        if stopping() {
            return Ok(());
        }
        metrics.heartbeat();
        for (kind, count) in store.invalid_counts() {
            metrics.set_invalid_objects(kind, count);
        }
        let now = Instant::now();
        match store.generation() {
            None => {
                if !waiting_logged {
                    tracing::info!(
                        "waiting for the first list of namespaces, pods and network policies"
                    );
                    waiting_logged = true;
                }
            }
            Some(generation) => {
                if last_generation.is_some_and(|g| g != generation) {
                    schedule.changed(now);
                }
                last_generation = Some(generation);
                // A few short processes; this loop runs on `block_on`'s own thread, not a worker.
                schedule.check_canary(now, || dataplane.hooks_damaged());
                if let Some(mode) = schedule.due(now, &options)
                    && let Some((generation, snapshot)) = store.snapshot()
                {
                    last_generation = Some(generation);
                    let node_name = node.clone();
                    let m = metrics.clone();
                    let (dp, c, result) = tokio::task::spawn_blocking(move || {
                        let result = sync_snapshot(
                            &mut dataplane,
                            &mut cache,
                            &snapshot,
                            &node_name,
                            mode,
                            Some(&m),
                        );
                        (dataplane, cache, result)
                    })
                    .await?;
                    dataplane = dp;
                    cache = c;
                    schedule.done(now, mode, &result);
                }
            }
        }
        // Wake on a change (the watchers notify), when the schedule has a sync due (the debounce
        // settles, a resync or retry), and at least every second for the heartbeat.
        // Before the first complete list there is nothing to schedule.
        let heartbeat = Instant::now() + KUBE_HEARTBEAT;
        let wake = match last_generation {
            Some(_) => schedule.next_due(&options).min(heartbeat),
            None => heartbeat,
        };
        let _ = tokio::time::timeout_at(wake.into(), store.changed()).await;
    }
}
