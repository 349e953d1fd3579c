//! The sync loop for the manifests source: load → compile (both families) → write, then watch the
//! directory and sync again when it changes.

use crate::compile::compile;
use crate::dataplane::{self, Tables};
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

/// One full sync from the directory. Nothing is written if the directory does not load.
pub fn sync_once(tables: &Tables, dir: &Path, node: &str) -> Result<()> {
    let snapshot = manifests::load_dir(dir)?;
    let started = Instant::now();
    let desired = desired_states(&snapshot, node);
    let report = dataplane::sync(tables, &desired)?;
    tracing::info!(
        node,
        pods = snapshot.pods.len(),
        policies = snapshot.policies.len(),
        rules = desired.iter().map(|(_, s)| s.rule_count()).sum::<usize>(),
        sets = desired.iter().map(|(_, s)| s.sets.len()).sum::<usize>(),
        ipset_lines = report.ipset_lines,
        iptables_lines = report.iptables_lines,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "synced"
    );
    Ok(())
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
    /// A full sync from the kernel's actual state, even without changes.
    pub resync_period: Duration,
}

/// Runs until killed: syncs at start, whenever the directory changes, and every resync period.
/// A broken directory or a failed write keeps the last good state in the kernel and is retried.
pub fn watch(tables: &Tables, dir: &Path, node: &str, options: &WatchOptions) -> Result<()> {
    let mut last_seen = None;
    let mut last_sync: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        let seen = fingerprint(dir);
        let changed = seen != last_seen;
        let due = last_sync.is_none_or(|t| t.elapsed() >= options.resync_period);
        let retry = retry_at.is_some_and(|t| Instant::now() >= t);
        if changed || due || retry {
            last_seen = seen;
            match sync_once(tables, dir, node) {
                Ok(()) => {
                    retry_at = None;
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::error!("sync failed, the last good state stays in the kernel: {e:#}");
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            last_sync = Some(Instant::now());
        }
        std::thread::sleep(options.poll_interval);
    }
}
