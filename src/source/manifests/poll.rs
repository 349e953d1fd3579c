//! The manifests directory as a [`Source`]: polled for changes, loaded whole on demand.

use super::load::load_dir_with_limit;
use super::read::manifest_files;
use crate::model::ClusterSnapshot;
use crate::source::Source;
use crate::source::change_times::ChangeTimes;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What identifies the directory's content for change detection: names, sizes, times and inodes
/// (a ConfigMap update swaps in new files, which may have the old size and time). `None` while
/// an entry cannot be read, so its repair counts as a change.
type Fingerprint = Option<Vec<(PathBuf, u64, SystemTime, u64)>>;

fn fingerprint(dir: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let files = manifest_files(dir).ok()?;
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

/// A manifests directory. Polling, not inotify: it also works on the network and 9p file systems
/// WSL2 mounts, where inotify sees nothing.
pub struct DirSource {
    dir: PathBuf,
    max_file_bytes: u64,
    generation: AtomicU64,
    changed: Notify,
    change_times: ChangeTimes,
    /// A load started early (see [`DirSource::prefetching`]), with the directory's fingerprint
    /// and generation from before it began.
    prefetch: Mutex<Option<Prefetch>>,
}

type Prefetch = (
    Fingerprint,
    u64,
    JoinHandle<Result<ClusterSnapshot, super::LoadError>>,
);

impl DirSource {
    pub fn new(dir: PathBuf, max_file_bytes: u64) -> Arc<DirSource> {
        Arc::new(DirSource {
            dir,
            max_file_bytes,
            generation: AtomicU64::new(0),
            changed: Notify::new(),
            change_times: ChangeTimes::default(),
            prefetch: Mutex::new(None),
        })
    }

    /// `new`, with the first load started at once on a thread of its own, so that it overlaps
    /// what the agent does before its first sync (the node lock, the kernel probe). The first
    /// `snapshot` takes it if the directory has not changed since (same fingerprint and
    /// generation); otherwise it loads again.
    pub fn prefetching(dir: PathBuf, max_file_bytes: u64) -> Arc<DirSource> {
        let source = DirSource::new(dir.clone(), max_file_bytes);
        let before = fingerprint(&dir);
        let load = std::thread::spawn(move || load_dir_with_limit(&dir, max_file_bytes));
        *source.prefetch.lock().unwrap() = Some((before, 0, load));
        source
    }

    fn take_prefetched(
        &self,
        generation: u64,
    ) -> Option<Result<ClusterSnapshot, super::LoadError>> {
        let (before, at_generation, load) = self.prefetch.lock().unwrap().take()?;
        let loaded = load.join().ok()?;
        (at_generation == generation && before.is_some() && before == fingerprint(&self.dir))
            .then_some(loaded)
    }

    /// Checks the directory every `interval` until `stop`; a change bumps the generation. The
    /// first look is taken before anything is awaited, so a change right after the caller's
    /// first load is seen.
    pub fn poll(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut last_seen = fingerprint(&self.dir);
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let source = self.clone();
                let Ok(seen) = tokio::task::spawn_blocking(move || fingerprint(&source.dir)).await
                else {
                    return;
                };
                if seen != last_seen {
                    last_seen = seen;
                    let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    self.change_times.record(generation);
                    self.changed.notify_one();
                }
            }
        }
    }
}

impl Source for DirSource {
    fn generation(&self) -> Option<u64> {
        Some(self.generation.load(Ordering::Relaxed))
    }

    async fn changed(&self) {
        self.changed.notified().await
    }

    /// Loads the whole directory; nothing is enforced from a directory that does not load.
    fn snapshot(&self) -> anyhow::Result<Option<(u64, ClusterSnapshot)>> {
        let generation = self.generation.load(Ordering::Relaxed);
        let snapshot = match self.take_prefetched(generation) {
            Some(loaded) => loaded?,
            None => load_dir_with_limit(&self.dir, self.max_file_bytes)?,
        };
        Ok(Some((generation, snapshot)))
    }

    fn waiting_for(&self) -> &'static str {
        "waiting for the manifests directory"
    }

    fn change_seen(&self, generation: u64) -> Option<std::time::Instant> {
        self.change_times.take_through(generation)
    }
}
