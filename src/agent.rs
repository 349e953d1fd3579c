//! The sync loop for the manifests source: load → compile (both families) → write, then watch the
//! directory and sync again when it changes.

use crate::compile::compile;
use crate::dataplane::{Dataplane, SyncMode, SyncReport};
use crate::manifests;
use crate::model::ClusterSnapshot;
use crate::state::{DesiredState, Family};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

pub fn desired_states(snapshot: &ClusterSnapshot, node: &str) -> Vec<(Family, DesiredState)> {
    Family::ALL
        .iter()
        .map(|f| (*f, compile(snapshot, node, *f)))
        .collect()
}

/// Loads the directory, compiles and writes. Nothing is written if the directory does not load.
pub fn sync_from_dir(
    dataplane: &mut Dataplane,
    dir: &Path,
    node: &str,
    mode: SyncMode,
) -> Result<SyncReport> {
    let snapshot = manifests::load_dir(dir)?;
    let started = Instant::now();
    let desired = desired_states(&snapshot, node);
    let compiled = started.elapsed();
    let report = dataplane.sync(&desired, mode)?;
    for repair in &report.repairs {
        tracing::warn!(
            repair = repair.as_str(),
            "repaired drift: the kernel differed from what we had written"
        );
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

/// What identifies the directory's content for change detection: names, sizes and times.
fn fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, SystemTime)>> {
    let files = manifests::manifest_files(dir).ok()?;
    Some(
        files
            .into_iter()
            .filter_map(|f| {
                let meta = std::fs::metadata(&f).ok()?;
                Some((f, meta.len(), meta.modified().ok()?))
            })
            .collect(),
    )
}

pub struct WatchOptions {
    /// How often the directory is checked for changes. Polling, not inotify: it also works on the
    /// network and 9p file systems WSL2 mounts, where inotify sees nothing.
    pub poll_interval: Duration,
    /// A burst of changes becomes one sync once the directory has been quiet this long...
    pub debounce: Duration,
    /// ...but a sync is never put off longer than this after the first change.
    pub max_delay: Duration,
    /// How often to read the kernel back and repair drift, even without changes.
    pub resync_period: Duration,
}

/// Runs until killed. Starts with a full sync (adopting whatever a previous instance left), then
/// syncs incrementally when the directory changes and fully every resync period. A broken
/// directory or a failed write keeps the last good state in the kernel and is retried with backoff.
pub fn watch(
    dataplane: &mut Dataplane,
    dir: &Path,
    node: &str,
    options: &WatchOptions,
) -> Result<()> {
    let mut last_seen = fingerprint(dir);
    let mut last_full: Option<Instant> = None;
    // Set while a change waits for the directory to settle: (first change, latest change).
    let mut pending: Option<(Instant, Instant)> = None;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let now = Instant::now();
        let seen = fingerprint(dir);
        if seen != last_seen {
            last_seen = seen;
            pending = Some(pending.map_or((now, now), |(first, _)| (first, now)));
        }
        let settled = pending.is_some_and(|(first, latest)| {
            now - latest >= options.debounce || now - first >= options.max_delay
        });
        let full_due = last_full.is_none_or(|t| now - t >= options.resync_period);
        let retry_due = retry_at.is_some_and(|t| now >= t);
        if settled || full_due || retry_due {
            let mode = if full_due || retry_due {
                SyncMode::Full
            } else {
                SyncMode::Incremental
            };
            pending = None;
            match sync_from_dir(dataplane, dir, node, mode) {
                Ok(_) => {
                    retry_at = None;
                    backoff = INITIAL_BACKOFF;
                    if mode == SyncMode::Full {
                        last_full = Some(now);
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "sync failed, the last good state stays in the kernel; retrying in {backoff:?}: {e:#}"
                    );
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // A directory that never loads still counts as a resync attempt.
                    last_full.get_or_insert(now);
                }
            }
        }
        std::thread::sleep(options.poll_interval);
    }
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
